"""The wire contract: the original fields, generated code in step with chat.proto, comments."""

from __future__ import annotations

import enum
import filecmp
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

import chatpb
from chat import ContextPolicy, EventKind, FinishReason, MessageStatus, RequestKind, Role
from scripts.generate import DESCRIPTOR_SET, OUTPUT, generate

# The original schema: these names, numbers and values never change.
ORIGINAL_REQUEST_FIELDS = {"type": 1, "session_id": 2, "message": 3, "timestamp": 4}
ORIGINAL_REQUEST_TYPES = {"MESSAGE": 0, "PING": 1, "TYPING_START": 2, "TYPING_STOP": 3}
ORIGINAL_RESPONSE_FIELDS = {
    "type": 1,
    "session_id": 2,
    "status_message": 3,
    "context_messages": 4,
    "chunk_text": 5,
    "chunk_number": 6,
    "total_chunks": 7,
    "processing_time": 8,
    "message_count": 9,
    "error_message": 10,
    "timestamp": 11,
}
ORIGINAL_RESPONSE_TYPES = {
    "STATUS": 0,
    "RESPONSE_START": 1,
    "CHUNK": 2,
    "RESPONSE_COMPLETE": 3,
    "ERROR": 4,
    "PONG": 5,
    "SESSION_UPDATE": 6,
}
RPCS = {
    "CreateSession",
    "GetSessionInfo",
    "UpdateSession",
    "ListSessions",
    "DeleteSession",
    "GetServerStats",
    "WhoAmI",
    "Chat",
}


def test_generated_code_is_in_step_with_chat_proto(tmp_path: Path) -> None:
    fresh = tmp_path / "chatpb"
    generate(fresh)
    committed = sorted(p.name for p in OUTPUT.iterdir() if p.name != "__pycache__")
    assert sorted(p.name for p in fresh.iterdir()) == committed
    _match, mismatch, errors = filecmp.cmpfiles(fresh, OUTPUT, committed, shallow=False)
    stale = mismatch + errors
    assert not stale, f"gen/chatpb is stale ({stale} differ from chat.proto): run `tox -e proto`"


def _fields(descriptor: object) -> dict[str, int]:
    return {f.name: f.number for f in descriptor.fields}  # type: ignore[attr-defined]


def _values(enum: object) -> dict[str, int]:
    return {v.name: v.number for v in enum.values}  # type: ignore[attr-defined]


def test_original_request_and_response_fields_are_unchanged() -> None:
    request = chatpb.ChatRequest.DESCRIPTOR
    response = chatpb.ChatResponse.DESCRIPTOR
    assert _fields(request).items() >= ORIGINAL_REQUEST_FIELDS.items()
    assert _fields(response).items() >= ORIGINAL_RESPONSE_FIELDS.items()
    assert _values(request.enum_types_by_name["Type"]).items() >= ORIGINAL_REQUEST_TYPES.items()
    assert _values(response.enum_types_by_name["Type"]).items() >= ORIGINAL_RESPONSE_TYPES.items()
    types = {f.name: f.type for f in response.fields}
    assert types["processing_time"] == descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE
    assert types["context_messages"] == descriptor_pb2.FieldDescriptorProto.TYPE_INT32


def test_additions_use_new_numbers() -> None:
    request = _fields(chatpb.ChatRequest.DESCRIPTOR)
    response = _fields(chatpb.ChatResponse.DESCRIPTOR)
    assert request["request_id"] > max(ORIGINAL_REQUEST_FIELDS.values())
    for name in ("request_id", "finish_reason", "usage", "model", "error_code"):
        assert response[name] > max(ORIGINAL_RESPONSE_FIELDS.values())
    request_types = _values(chatpb.ChatRequest.DESCRIPTOR.enum_types_by_name["Type"])
    assert request_types["CANCEL"] > max(ORIGINAL_REQUEST_TYPES.values())


def test_service_has_no_package_and_every_rpc() -> None:
    service = chatpb.CHAT_PROTO_DESCRIPTOR.services_by_name["ChatService"]
    assert service.full_name == "ChatService"
    assert {m.name for m in service.methods} == RPCS
    chat = service.methods_by_name["Chat"]
    assert chat.client_streaming
    assert chat.server_streaming
    routes = set(chatpb.ChatServiceBase().__mapping__())
    assert routes == {f"/ChatService/{name}" for name in RPCS}


def test_domain_enums_have_the_wire_numbers() -> None:
    pairs: list[tuple[type[enum.IntEnum], Any, str]] = [
        (Role, chatpb.Role, "ROLE_"),
        (MessageStatus, chatpb.MessageStatus, "MESSAGE_STATUS_"),
        (FinishReason, chatpb.FinishReason, "FINISH_REASON_"),
        (ContextPolicy, chatpb.ContextPolicy, "CONTEXT_POLICY_"),
        (RequestKind, chatpb.ChatRequestType, ""),
        (EventKind, chatpb.ChatResponseType, ""),
    ]
    for domain, wire, prefix in pairs:
        names = {v.name: v.number for v in wire.DESCRIPTOR.values}
        for member in domain:
            assert names[prefix + member.name] == member.value, (domain, member)


def test_every_message_field_enum_and_rpc_is_documented() -> None:
    # The descriptor set that ships beside the generated code keeps the comments (and is
    # checked against chat.proto by the staleness test above).
    data = (OUTPUT / DESCRIPTOR_SET).read_bytes()
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(data).file
    comments = {
        tuple(location.path): location.leading_comments.strip()
        for location in file.source_code_info.location
    }
    missing: list[str] = []

    def need(path: tuple[int, ...], name: str) -> None:
        if not comments.get(path):
            missing.append(name)

    def enum(path: tuple[int, ...], descriptor: descriptor_pb2.EnumDescriptorProto) -> None:
        need(path, descriptor.name)
        for index, value in enumerate(descriptor.value):
            need((*path, 2, index), f"{descriptor.name}.{value.name}")

    def message(path: tuple[int, ...], descriptor: descriptor_pb2.DescriptorProto) -> None:
        need(path, descriptor.name)
        for index, field in enumerate(descriptor.field):
            need((*path, 2, index), f"{descriptor.name}.{field.name}")
        for index, nested in enumerate(descriptor.enum_type):
            enum((*path, 4, index), nested)
        for index, nested_message in enumerate(descriptor.nested_type):
            message((*path, 3, index), nested_message)

    for index, descriptor in enumerate(file.message_type):
        message((4, index), descriptor)
    for index, descriptor in enumerate(file.enum_type):
        enum((5, index), descriptor)
    for index, service in enumerate(file.service):
        need((6, index), service.name)
        for method_index, method in enumerate(service.method):
            need((6, index, 2, method_index), f"{service.name}.{method.name}")
    assert not missing, f"undocumented in chat.proto: {missing}"


def test_every_message_and_enum_has_its_generated_class() -> None:
    # betterproto2 names nested types Parent + Name (ChatRequest.Type -> ChatRequestType).
    file = chatpb.CHAT_PROTO_DESCRIPTOR
    expected = {
        **{name: m for name, m in file.message_types_by_name.items()},
        **{name: e for name, e in file.enum_types_by_name.items()},
        **{
            m.name + nested.name: nested
            for m in file.message_types_by_name.values()
            for nested in m.enum_types
        },
    }
    for name, descriptor in expected.items():
        generated = getattr(chatpb, name)
        assert generated.DESCRIPTOR.full_name == descriptor.full_name, name
    assert set(chatpb.__all__) == {*expected, "ChatServiceBase", "ChatServiceStub"}
