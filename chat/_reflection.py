"""Server reflection that serves chat.proto with its comments.

grpclib's reflection serializes files from a descriptor pool, and a pool drops the
comments (source info), so ``grpcurl describe`` would show bare names. The generated package
ships ``chat.binpb``, the same file compiled with its comments; this reflection service
answers with it. Both protocol versions are served (grpcurl speaks v1, older clients and
grpcio's reflection client v1alpha).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from importlib.resources import files
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pool import DescriptorPool
from grpclib._typing import IServable
from grpclib.health.v1 import health_pb2
from grpclib.reflection import _deprecated
from grpclib.reflection import service as reflection_v1
from grpclib.reflection.v1 import reflection_pb2
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2
from grpclib.utils import _service_name

import chatpb

__all__ = ["with_reflection"]


class _Documented:
    """Replaces the bytes of documented files in file-descriptor responses."""

    _documented: Mapping[str, bytes]

    def _file_descriptor_response(self, file_descriptor: Any) -> Any:
        # grpclib 0.4's hook for building these responses (pinned below 0.5).
        response = super()._file_descriptor_response(file_descriptor)  # type: ignore[misc]
        documented = self._documented.get(file_descriptor.name)
        if documented is not None:
            protos = response.file_descriptor_response.file_descriptor_proto
            del protos[:]
            protos.append(documented)
        return response


class _ReflectionV1(_Documented, reflection_v1.ServerReflection):
    def __init__(self, names: Collection[str], pool: Any, documented: Mapping[str, bytes]) -> None:
        super().__init__(_service_names=names, _pool=pool)
        self._documented = documented


class _ReflectionV1Alpha(_Documented, _deprecated.ServerReflection):
    def __init__(self, names: Collection[str], pool: Any, documented: Mapping[str, bytes]) -> None:
        super().__init__(_service_names=names, _pool=pool)
        self._documented = documented


def _documented_files() -> dict[str, bytes]:
    data = files(chatpb).joinpath("chat.binpb").read_bytes()
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(data)
    return {f.name: f.SerializeToString() for f in descriptor_set.file}


def with_reflection(services: Collection[IServable]) -> list[IServable]:
    """``services`` plus reflection (v1 and v1alpha) describing all of them.

    The descriptor pool is built per call, so that several servers in one process never
    share or mutate a pool.
    """
    pool = DescriptorPool()
    for descriptor in (
        chatpb.CHAT_PROTO_DESCRIPTOR,
        health_pb2.DESCRIPTOR,
        reflection_pb2.DESCRIPTOR,
        reflection_v1alpha_pb2.DESCRIPTOR,
    ):
        pool.AddSerializedFile(descriptor.serialized_pb)
    documented = _documented_files()
    # The reflection services list themselves too, as gRPC's reference servers do.
    names = [_service_name(service) for service in services] + [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    return [
        *services,
        _ReflectionV1(names, pool, documented),
        _ReflectionV1Alpha(names, pool, documented),
    ]
