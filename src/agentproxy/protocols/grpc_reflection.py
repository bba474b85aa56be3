"""gRPC server reflection (what grpcurl, grpcui and Postman use), as the proxy answers it for
the services behind it: messages in, messages out, no channel.

`grpc.reflection.v1` and `grpc.reflection.v1alpha` carry the same messages field for field
(the v1 proto is the v1alpha one renamed), so one set of message classes reads both, and the
upstreams are asked in v1alpha, the version every grpcio server serves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection_pb2

from agentproxy.errors import BadRequest

__all__ = [
    "NOT_FOUND",
    "REFLECTION_SERVICES",
    "UPSTREAM_METHOD",
    "Ask",
    "answer_error",
    "answering",
    "described_services",
    "filter_files",
    "list_request",
    "list_services_answer",
    "listed_services",
    "not_found",
    "read_ask",
    "symbol_request",
]

REFLECTION_SERVICES: Final = frozenset(
    {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
)
UPSTREAM_METHOD: Final = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
NOT_FOUND: Final = 5  # google.rpc.Code, as grpcio's reflection servicer answers

AskKind = Literal[
    "list_services",
    "file_by_filename",
    "file_containing_symbol",
    "file_containing_extension",
    "all_extension_numbers_of_type",
]


@dataclass(frozen=True, slots=True)
class Ask:
    """One request of a reflection stream: what it asks (`kind`) about what (`subject`: a
    file name or a fully-qualified symbol or type, "" for list_services), and its bytes."""

    kind: AskKind
    subject: str
    raw: bytes


def read_ask(message: bytes) -> Ask:
    """The caller's ServerReflectionRequest. Raises BadRequest for one that does not decode
    or asks nothing."""
    try:
        request = reflection_pb2.ServerReflectionRequest.FromString(message)
    except DecodeError:
        raise BadRequest("not a ServerReflectionRequest") from None
    kind = request.WhichOneof("message_request")
    if kind is None:
        raise BadRequest("a ServerReflectionRequest that asks nothing")
    if kind == "file_containing_extension":
        subject = request.file_containing_extension.containing_type
    elif kind == "list_services":
        subject = ""
    else:
        subject = getattr(request, kind)
    return Ask(kind, subject, message)


def symbol_request(symbol: str) -> bytes:
    """A request for the file that defines `symbol` (the proxy's own question to an
    upstream: which methods a service has)."""
    return reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol).SerializeToString()


def list_request() -> bytes:
    return reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()


def _answer(message: bytes) -> reflection_pb2.ServerReflectionResponse:
    try:
        return reflection_pb2.ServerReflectionResponse.FromString(message)
    except DecodeError:
        raise ValueError("not a ServerReflectionResponse") from None


def answer_error(message: bytes) -> int | None:
    """The error code of an upstream's answer, None for an answer that is not an error.
    Raises ValueError for bytes that are not an answer."""
    answer = _answer(message)
    if answer.WhichOneof("message_response") != "error_response":
        return None
    return int(answer.error_response.error_code)


def listed_services(message: bytes) -> tuple[str, ...]:
    """The services of an upstream's list_services answer. Raises ValueError for another
    answer."""
    answer = _answer(message)
    if answer.WhichOneof("message_response") != "list_services_response":
        raise ValueError("not a list_services answer")
    return tuple(service.name for service in answer.list_services_response.service)


def described_services(message: bytes) -> dict[str, tuple[str, ...]]:
    """The services (full name → method names) defined by the files of a file descriptor
    answer. Raises ValueError for another answer or a file that does not decode."""
    return {
        _full(file.package, service.name): tuple(method.name for method in service.method)
        for file in _files(_answer(message))
        for service in file.service
    }


def filter_files(
    message: bytes, keep_service: Callable[[str], bool], keep_method: Callable[[str, str], bool]
) -> bytes:
    """A file descriptor answer with the services `keep_service(full name)` refuses, and the
    methods `keep_method(service, method)` refuses, removed from every file; any other
    answer unchanged. Raises ValueError for bytes that are not an answer, or a file that
    does not decode."""
    answer = _answer(message)
    if answer.WhichOneof("message_response") != "file_descriptor_response":
        return message
    changed = False
    files: list[bytes] = []
    for file in _files(answer):
        kept = []
        for service in file.service:
            name = _full(file.package, service.name)
            if not keep_service(name):
                changed = True
                continue
            methods = [m for m in service.method if keep_method(name, m.name)]
            if len(methods) != len(service.method):
                changed = True
                del service.method[:]
                service.method.extend(methods)
            kept.append(service)
        if len(kept) != len(file.service):
            del file.service[:]
            file.service.extend(kept)
        files.append(file.SerializeToString())
    if not changed:
        return message
    del answer.file_descriptor_response.file_descriptor_proto[:]
    answer.file_descriptor_response.file_descriptor_proto.extend(files)
    return answer.SerializeToString()


def list_services_answer(ask: Ask, services: Iterable[str]) -> bytes:
    """The answer to a list_services ask: `services`, in the order given."""
    request = reflection_pb2.ServerReflectionRequest.FromString(ask.raw)
    listing = reflection_pb2.ListServiceResponse(
        service=[reflection_pb2.ServiceResponse(name=name) for name in services]
    )
    answer = reflection_pb2.ServerReflectionResponse(
        valid_host=request.host, original_request=request, list_services_response=listing
    )
    return answer.SerializeToString()


def answering(message: bytes, ask: Ask) -> bytes:
    """An upstream's answer to another request, as the answer to `ask` (its
    `original_request`). Raises ValueError for bytes that are not an answer."""
    answer = _answer(message)
    request = reflection_pb2.ServerReflectionRequest.FromString(ask.raw)
    answer.original_request.CopyFrom(request)
    answer.valid_host = request.host
    return answer.SerializeToString()


def not_found(ask: Ask) -> bytes:
    """NOT_FOUND for `ask`, as grpcio's reflection servicer answers a symbol it lacks: the
    same answer whether the symbol does not exist or is not the caller's to see."""
    request = reflection_pb2.ServerReflectionRequest.FromString(ask.raw)
    error = reflection_pb2.ErrorResponse(error_code=NOT_FOUND, error_message="not found")
    answer = reflection_pb2.ServerReflectionResponse(
        valid_host=request.host, original_request=request, error_response=error
    )
    return answer.SerializeToString()


def _files(
    answer: reflection_pb2.ServerReflectionResponse,
) -> list[descriptor_pb2.FileDescriptorProto]:
    if answer.WhichOneof("message_response") != "file_descriptor_response":
        raise ValueError("not a file descriptor answer")
    files = []
    for raw in answer.file_descriptor_response.file_descriptor_proto:
        try:
            files.append(descriptor_pb2.FileDescriptorProto.FromString(raw))
        except DecodeError:
            raise ValueError("a file descriptor that does not decode") from None
    return files


def _full(package: str, name: str) -> str:
    return f"{package}.{name}" if package else name
