"""From a :class:`~chat.errors.ChatError` to the gRPC status a client gets: one place."""

from __future__ import annotations

from typing import Any

from google.rpc import error_details_pb2
from grpclib import GRPCError
from grpclib.const import Status

from chat.errors import ChatError, InvalidArgument, RateLimited

__all__ = ["grpc_error", "status_details"]


def status_details(error: ChatError) -> list[Any] | None:
    """The standard error details (``google.rpc``) that go with ``error``'s status.

    ``BadRequest`` names the field of an :class:`~chat.errors.InvalidArgument` and
    ``RetryInfo`` says how long to wait after a rate limit, so clients act on data rather
    than on the wording of the message.
    """
    if isinstance(error, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.problem
        )
        return [error_details_pb2.BadRequest(field_violations=[violation])]
    if isinstance(error, RateLimited) and error.retry_after is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromNanoseconds(round(error.retry_after * 1e9))
        return [info]
    return None


def grpc_error(error: ChatError) -> GRPCError:
    """The ``GRPCError`` that reports ``error``: its status, message and details."""
    return GRPCError(Status(int(error.status)), error.message, status_details(error))
