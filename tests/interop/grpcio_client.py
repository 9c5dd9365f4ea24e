"""An independent client built with grpcio (C core) from chat.proto, run in its own process.

Usage: ``python grpcio_client.py TARGET GENERATED_DIR``. ``GENERATED_DIR`` holds ``chat_pb2``
and ``chat_pb2_grpc`` made by grpcio-tools from chat.proto. It drives the server through a
whole session and prints what it observed as JSON, for the test to check.

It runs in a process of its own because grpcio's health and reflection modules register the
same protobuf files as grpclib's, and one process cannot hold both.
"""

from __future__ import annotations

import importlib
import json
import queue
import sys
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

END = object()


def requests(outbox: queue.Queue[Any]) -> Iterator[Any]:
    while (item := outbox.get(timeout=30)) is not END:
        yield item


def main(target: str, generated: str) -> None:
    sys.path.insert(0, generated)
    pb = importlib.import_module("chat_pb2")
    rpc = importlib.import_module("chat_pb2_grpc")
    result: dict[str, Any] = {}
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        health = health_pb2_grpc.HealthStub(channel)
        result["health"] = {
            name: health_pb2.HealthCheckResponse.ServingStatus.Name(
                health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            )
            for name in ("", "ChatService")
        }
        result["reflection"] = reflect(channel)

        stub = rpc.ChatServiceStub(channel)
        created = stub.CreateSession(pb.CreateSessionRequest(title="grpcio"), timeout=10)
        session_id = created.session_id
        outbox: queue.Queue[Any] = queue.Queue()
        events = stub.Chat(requests(outbox), timeout=60)
        Type = pb.ChatRequest.Type

        def turn(text: str, request_id: str) -> list[dict[str, Any]]:
            outbox.put(pb.ChatRequest(session_id=session_id, message=text, request_id=request_id))
            # A PING right behind the message: answered while the reply streams.
            outbox.put(pb.ChatRequest(type=Type.PING, request_id=f"ping-{request_id}"))
            seen = []
            for event in events:
                seen.append(
                    {
                        "type": pb.ChatResponse.Type.Name(event.type),
                        "request_id": event.request_id,
                        "chunk_text": event.chunk_text,
                        "chunk_number": event.chunk_number,
                        "total_chunks": event.total_chunks,
                        "message_count": event.message_count,
                        "error_code": event.error_code,
                        "finish_reason": pb.FinishReason.Name(event.finish_reason),
                    }
                )
                if event.request_id == request_id and event.type in (
                    pb.ChatResponse.RESPONSE_COMPLETE,
                    pb.ChatResponse.ERROR,
                ):
                    return seen
            raise RuntimeError("stream ended early")

        long_text = " ".join(f"word{n}" for n in range(30))
        result["turns"] = [turn(long_text, "t1"), turn("second message", "t2")]
        outbox.put(pb.ChatRequest(session_id="no-such-session", message="x", request_id="bad"))
        for event in events:
            if event.request_id == "bad":
                result["bad"] = {
                    "type": pb.ChatResponse.Type.Name(event.type),
                    "code": event.error_code,
                }
                break
        outbox.put(END)
        result["stream_rest"] = len(list(events))

        listed = stub.ListSessions(pb.ListSessionsRequest(page_size=10), timeout=10)
        result["listed"] = [s.session_id for s in listed.sessions]
        info = stub.GetSessionInfo(
            pb.SessionInfoRequest(session_id=session_id, include_messages=True), timeout=10
        )
        result["history"] = [
            {
                "role": pb.Role.Name(m.role),
                "content": m.content,
                "status": pb.MessageStatus.Name(m.status),
            }
            for m in info.messages
        ]
        result["session_id"] = session_id
        deleted = stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=10)
        result["deleted_messages"] = deleted.deleted_messages
        try:
            stub.GetSessionInfo(pb.SessionInfoRequest(session_id=session_id), timeout=10)
            result["after_delete"] = "found"
        except grpc.RpcError as error:
            result["after_delete"] = error.code().name
    result["gzip"] = gzip_calls(target, pb, rpc)
    print(json.dumps(result))


def gzip_calls(target: str, pb: Any, rpc: Any) -> dict[str, Any]:
    """A session and a turn over a channel that compresses every request with gzip."""
    with grpc.insecure_channel(target, compression=grpc.Compression.Gzip) as channel:
        stub = rpc.ChatServiceStub(channel)
        created = stub.CreateSession(pb.CreateSessionRequest(title="gzip " * 30), timeout=10)
        request = pb.ChatRequest(
            session_id=created.session_id, message="compressed " * 20, request_id="g1"
        )
        events = list(stub.Chat(iter([request]), timeout=30))
        return {
            "title": created.session.title,
            "last": pb.ChatResponse.Type.Name(events[-1].type),
            "reply": "".join(e.chunk_text for e in events),
        }


def reflect(channel: grpc.Channel) -> dict[str, Any]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(**kwargs: Any) -> Any:
        (response,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(**kwargs)]), timeout=10
        )
        return response

    services = [s.name for s in ask(list_services="").list_services_response.service]
    (raw,) = ask(
        file_containing_symbol="ChatService"
    ).file_descriptor_response.file_descriptor_proto
    file = descriptor_pb2.FileDescriptorProto.FromString(raw)
    comments = {
        tuple(location.path): location.leading_comments.strip()
        for location in file.source_code_info.location
    }
    message_index = [m.name for m in file.message_type].index("ChatRequest")
    return {
        "services": services,
        "file": file.name,
        "package": file.package,
        "methods": [m.name for m in file.service[0].method],
        "chat_request_comment": comments.get((4, message_index), ""),
    }


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
