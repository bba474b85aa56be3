"""The gRPC adapter: method path → Action, request message → `args`, refusal → status.

Pure: no channels or servers here. Messages stay bytes until policy needs their fields: with a
`FileDescriptorSet` for the upstream, the first request message is decoded with protobuf and
handed to CEL as plain values under its proto field names.

The canonical action is `grpc:/<package.Service>/<Method>`: operation is the service, target
the full method path (what is forwarded).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from agentproxy.core import Action
from agentproxy.errors import (
    ApprovalCap,
    ApprovalRefused,
    BadRequest,
    CredentialRefused,
    Denied,
    InternalError,
    LimitRefused,
    NoRoute,
    PayloadTooLarge,
    Refusal,
    Unauthenticated,
    Unavailable,
    UpstreamFailed,
    UpstreamTimeout,
)
from agentproxy.protocols.http import REQUEST_DROP, bearer_token, header_key

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_METHOD_PATH = re.compile(rf"/({_IDENT}(?:\.{_IDENT})*)/({_IDENT})")

Metadata = list[tuple[str, str | bytes]]


class Code(enum.IntEnum):
    """gRPC status codes (grpc/doc/statuscodes.md); the numbers are the wire values."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# What the decision log and metrics record as `status` for a gRPC call: the HTTP status a
# gateway would map the code to (google.rpc.Code's documented HTTP mapping; CANCELLED is 499).
HTTP_STATUS: Mapping[Code, int] = {
    Code.OK: 200,
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}


def describe(method: str) -> Action:
    """`/hr.v1.Employees/Get` → `grpc:/hr.v1.Employees/Get`.

    Raises BadRequest for anything but `/<package.Service>/<Method>` made of proto identifiers
    (no dots or slashes to play with, so a glob cannot be steered across services).
    """
    m = _METHOD_PATH.fullmatch(method)
    if m is None:
        shown = method[:200].encode("ascii", "backslashreplace").decode()
        raise BadRequest(f"not a gRPC method path: {shown!r}")
    return Action("grpc", m.group(1), method, name="grpc:" + method)


def service_of(action: Action) -> str:
    return action.operation


def bearer(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The bearer token from the `authorization` metadata. Raises Unauthenticated when
    there is more than one, or one that is not `Bearer <token>`."""
    values = [v for k, v in metadata if k == "authorization"]
    if len(values) > 1:
        raise Unauthenticated("more than one authorization metadata entry")
    if not values:
        return None
    value = values[0]
    if not isinstance(value, str):
        raise Unauthenticated("authorization metadata must be text")
    return bearer_token(value)


def declared_task(metadata: Iterable[tuple[str, str | bytes]]) -> str | bytes | None:
    """The agent's own `x-agentproxy-task`, for the shell to validate. Raises BadRequest
    when it is sent twice."""
    values = [v for k, v in metadata if k == "x-agentproxy-task"]
    if len(values) > 1:
        raise BadRequest("more than one x-agentproxy-task metadata entry")
    return values[0] if values else None


def metadata_to_forward(
    metadata: Iterable[tuple[str, str | bytes]], *, strip: frozenset[str]
) -> Metadata:
    """The agent's metadata the upstream may see, in order, duplicates kept.

    Drops `authorization` (the agent's credential is never forwarded), `x-agentproxy-*` (only
    the proxy sets those), trace context (the proxy continues it), `user-agent` (the channel
    sends its own), reserved `grpc-*` and pseudo-headers, `x-forwarded-*`, the client-address
    and override headers HTTP drops, and every name in `strip` (the upstream credential's, so
    an agent cannot supply its own). Keys are matched with `_` as `-` (`x_agentproxy_user`
    reaches a service that maps metadata to CGI-style names as `x-agentproxy-user`). Never
    raises.
    """
    drop = {header_key(s) for s in strip} | _REQUEST_DROPPED
    kept: Metadata = []
    for key, value in metadata:
        folded = header_key(key)
        if folded in drop or folded.startswith(("x-agentproxy-", "x-forwarded-", "grpc-", ":")):
            continue
        kept.append((key, value))
    return kept


_REQUEST_DROPPED = frozenset(
    {"authorization", "traceparent", "tracestate", "user-agent", "forwarded", "te", "host"}
    | REQUEST_DROP
)


def metadata_to_return(metadata: Iterable[tuple[str, str | bytes]]) -> Metadata:
    """The upstream's initial or trailing metadata the agent may see: all but reserved keys
    (`grpc-status-details-bin`, the rich error details, passes). Never raises."""
    return [
        (key, value)
        for key, value in metadata
        if not key.startswith(":")
        and (not key.startswith("grpc-") or key == "grpc-status-details-bin")
    ]


@dataclass(frozen=True, slots=True)
class GrpcReply:
    """A refusal as gRPC renders it: a status and trailing metadata."""

    code: Code
    message: str
    trailers: tuple[tuple[str, str], ...]

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


def code_of(refusal: Refusal) -> Code:
    """The status code for a refusal: CONTRACT.md's table, then gRPC's own conventions
    (an oversized message is RESOURCE_EXHAUSTED, an unknown service UNIMPLEMENTED)."""
    if isinstance(refusal, Unauthenticated):
        return Code.UNAUTHENTICATED
    if isinstance(refusal, ApprovalRefused):
        return Code.PERMISSION_DENIED if refusal.outcome == "denied" else Code.FAILED_PRECONDITION
    if isinstance(refusal, Denied | CredentialRefused):
        return Code.PERMISSION_DENIED
    if isinstance(refusal, LimitRefused | ApprovalCap | PayloadTooLarge):
        return Code.RESOURCE_EXHAUSTED
    if isinstance(refusal, UpstreamTimeout):
        return Code.DEADLINE_EXCEEDED
    if isinstance(refusal, Unavailable | UpstreamFailed):
        return Code.UNAVAILABLE
    if isinstance(refusal, NoRoute):
        return Code.UNIMPLEMENTED
    if isinstance(refusal, BadRequest):
        return Code.INVALID_ARGUMENT
    if isinstance(refusal, InternalError):
        return Code.INTERNAL
    return Code.UNKNOWN if refusal.fault == "upstream" else Code.INTERNAL


def render(refusal: Refusal, *, decision_id: str) -> GrpcReply:
    """The status message names the decision id and rule (clients often show only the
    message); trailing metadata carries them, the refusal's members (`limit`, `approval_id`)
    and `retry-after`, each as `x-agentproxy-<name>`. Never raises."""
    message = refusal.detail + f" (decision {decision_id}"
    message += f", rule {refusal.rule})" if refusal.rule is not None else ")"
    trailers: list[tuple[str, str]] = [("x-agentproxy-decision-id", decision_id)]
    if refusal.rule is not None:
        trailers.append(("x-agentproxy-rule", refusal.rule))
    for name, value in refusal.members.items():
        trailers.append(("x-agentproxy-" + name.replace("_", "-"), str(value)))
    retry = refusal.headers.get("Retry-After")
    if retry is not None:
        trailers.append(("retry-after", retry))
    return GrpcReply(code_of(refusal), _printable(message), tuple(trailers))


def _printable(text: str) -> str:
    # The message travels percent-encoded in grpc-message; keep it one readable line.
    return "".join(c if c.isprintable() else " " for c in text)[:1024]


@dataclass(frozen=True, slots=True)
class Method:
    """What a descriptor set says about one method."""

    path: str
    input: type[Message]
    client_streaming: bool
    server_streaming: bool


class DescriptorError(ValueError):
    pass


def load_descriptor_set(data: bytes) -> dict[str, Method]:
    """Every method of every service in a serialized FileDescriptorSet, by path.

    Raises DescriptorError when the bytes are not a descriptor set, or a file's imports are
    missing (build it with `protoc --include_imports --descriptor_set_out=...`).
    """
    try:
        files = descriptor_pb2.FileDescriptorSet.FromString(data)
    except DecodeError as exc:
        raise DescriptorError(f"not a FileDescriptorSet: {exc}") from None
    return methods_of(files.file)


def methods_of(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> dict[str, Method]:
    """Raises DescriptorError for files that do not resolve (missing imports, duplicates)."""
    pool = descriptor_pool.DescriptorPool()
    pending = list(files)
    # Add files whose imports are already in the pool; protoc orders them, reflection may not.
    added: set[str] = set()
    while pending:
        ready = [f for f in pending if all(d in added for d in f.dependency)]
        if not ready:
            missing = sorted({d for f in pending for d in f.dependency} - added)
            raise DescriptorError(
                f"imports missing from the descriptor set: {', '.join(missing)} "
                "(build it with protoc --include_imports)"
            )
        for file in ready:
            try:
                pool.Add(file)
            except (TypeError, ValueError) as exc:
                raise DescriptorError(f"{file.name}: {exc}") from None
            added.add(file.name)
            pending.remove(file)
    methods: dict[str, Method] = {}
    for name in added:
        for service in pool.FindFileByName(name).services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                methods[path] = Method(
                    path,
                    message_factory.GetMessageClass(method.input_type),
                    method.client_streaming,
                    method.server_streaming,
                )
    return methods


def decode_args(method: Method, data: bytes) -> dict[str, Any]:
    """The request message as CEL reads it. Raises BadRequest if it does not decode."""
    try:
        message = method.input.FromString(data)
    except DecodeError:
        raise BadRequest(
            f"the request message does not decode as {method.input.DESCRIPTOR.full_name}"
        ) from None
    return message_to_args(message)


def args_from_json(method: Method, data: Mapping[str, Any]) -> dict[str, Any]:
    """A request given in its JSON mapping (explain, Authorizer.Check) read into the message
    type, so it has the data plane's `args` (defaults included). Raises BadRequest for fields
    the message type does not have or values that do not fit."""
    try:
        message = json_format.ParseDict(dict(data), method.input())
    except json_format.ParseError as exc:
        raise BadRequest(f"args do not fit {method.input.DESCRIPTOR.full_name}: {exc}") from None
    return message_to_args(message)


def message_to_args(message: Message) -> dict[str, Any]:
    """Proto field names; scalars as Python values (64-bit integers stay numbers, unlike the
    JSON mapping, so `args.amount > 1000` works); enums by name; unset proto3 scalars at
    their default (what the upstream will read); unset message and optional fields absent,
    so `has(args.x)` means what it says. Well-known types take their JSON form (a Timestamp
    is an RFC 3339 string, a Struct a map)."""
    out: dict[str, Any] = {}
    fields: Any = message.DESCRIPTOR.fields
    for field in fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            if _is_map(field):
                value_field = field.message_type.fields_by_name["value"]
                out[field.name] = {k: _value(value_field, v) for k, v in value.items()}
            else:
                out[field.name] = [_value(field, v) for v in value]
        elif field.has_presence and not message.HasField(field.name):
            continue
        else:
            out[field.name] = _value(field, value)
    return out


def _is_map(field: Any) -> bool:
    message_type = field.message_type
    return message_type is not None and message_type.GetOptions().map_entry


def _value(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name.startswith("google.protobuf."):
            return json_format.MessageToDict(value, preserving_proto_field_name=True)
        return message_to_args(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    return value
