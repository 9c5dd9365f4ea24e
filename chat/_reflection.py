"""Server reflection that serves chat.proto with its comments.

grpclib's reflection serializes files from a descriptor pool, and a pool drops the
comments (source info), so ``grpcurl describe`` would show bare names. The generated package
ships ``chat.binpb``, the same file compiled with its comments; this reflection service
answers with it. Both protocol versions are served (grpcurl speaks v1, older clients and
grpcio's reflection client v1alpha).
"""

from __future__ import annotations

from collections.abc import Collection
from importlib.resources import files

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pool import DescriptorPool
from grpclib.health.v1 import health_pb2
from grpclib.reflection.v1 import reflection_pb2
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2

import chatpb
from chat._compat import IServable, ReflectionV1, ReflectionV1Alpha, service_name

__all__ = ["with_reflection"]


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
    names = [service_name(service) for service in services] + [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    return [
        *services,
        ReflectionV1(names, pool, documented),
        ReflectionV1Alpha(names, pool, documented),
    ]
