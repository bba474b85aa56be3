"""The gRPC adapter, bytes in and values out: method paths, metadata, refusals, args."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import descriptor_pb2, struct_pb2, timestamp_pb2

from agentproxy.errors import (
    ApprovalCap,
    ApprovalRefused,
    BadRequest,
    Denied,
    InternalError,
    LimitRefused,
    MissingCredential,
    NoRoute,
    PayloadTooLarge,
    Unauthenticated,
    Unavailable,
    UpstreamFailed,
    UpstreamTimeout,
)
from agentproxy.protocols import grpc
from agentproxy.protocols.grpc import Code
from tests.conftest import Generated


def test_method_paths_become_actions() -> None:
    action = grpc.describe("/hrtest.v1.Employees/Get")
    assert action.name == "grpc:/hrtest.v1.Employees/Get"
    assert (action.protocol, action.operation, action.target) == (
        "grpc",
        "hrtest.v1.Employees",
        "/hrtest.v1.Employees/Get",
    )
    assert grpc.describe("/Svc/M").name == "grpc:/Svc/M"


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/",
        "hrtest.v1.Employees/Get",
        "/hrtest.v1.Employees/",
        "/hrtest.v1.Employees/Get/",
        "/hrtest.v1.Employees/Get/More",
        "/hrtest.v1.Employees/../Get",
        "/hr..v1.Employees/Get",
        "/.hr.Employees/Get",
        "/hrtest.v1.Employees/Get*",
        "/hrtest.v1.Employees/G%65t",
        "/hrtest.v1.Employees/Get\x00",
        "/hrtest.v1 .Employees/Get",
        "//hrtest.v1.Employees/Get",
        "/hrtest.v1.Employees/Gét",
    ],
)
def test_odd_method_paths_are_refused(path: str) -> None:
    with pytest.raises(BadRequest, match="not a gRPC method path"):
        grpc.describe(path)


def test_bearer_from_metadata() -> None:
    assert grpc.bearer([("authorization", "Bearer abc.def.ghi")]) == "abc.def.ghi"
    assert grpc.bearer([("x-other", "1")]) is None
    with pytest.raises(Unauthenticated, match="more than one"):
        grpc.bearer([("authorization", "Bearer a"), ("authorization", "Bearer b")])
    with pytest.raises(Unauthenticated):
        grpc.bearer([("authorization", "Basic dXNlcjpwYXNz")])
    with pytest.raises(Unauthenticated, match="text"):
        grpc.bearer([("authorization", b"Bearer x")])


def test_declared_task_once() -> None:
    assert grpc.declared_task([("x-agentproxy-task", "t-1")]) == "t-1"
    assert grpc.declared_task([]) is None
    with pytest.raises(BadRequest):
        grpc.declared_task([("x-agentproxy-task", "a"), ("x-agentproxy-task", "b")])


def test_request_metadata_filter() -> None:
    kept = grpc.metadata_to_forward(
        [
            ("authorization", "Bearer secret"),
            ("x-agentproxy-agent", "root"),
            ("x-agentproxy-context", "forged"),
            ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),
            ("user-agent", "client/1"),
            ("grpc-timeout", "1S"),
            (":authority", "x"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-api-key", "agent-chosen"),
            ("x-request-id", "r-1"),
            ("x-trace-bin", b"\x00"),
            ("x-request-id", "r-2"),
        ],
        strip=frozenset({"X-Api-Key"}),
    )
    assert kept == [("x-request-id", "r-1"), ("x-trace-bin", b"\x00"), ("x-request-id", "r-2")]


def test_response_metadata_filter_keeps_rich_error_details() -> None:
    kept = grpc.metadata_to_return(
        [
            ("x-upstream", "1"),
            ("grpc-status-details-bin", b"\x08\x05"),
            ("grpc-message", "x"),
            (":status", "200"),
        ]
    )
    assert kept == [("x-upstream", "1"), ("grpc-status-details-bin", b"\x08\x05")]


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        (MissingCredential(), Code.UNAUTHENTICATED),
        (Unauthenticated("bad"), Code.UNAUTHENTICATED),
        (Denied("no", rule="r"), Code.PERMISSION_DENIED),
        (ApprovalRefused("wait", outcome="pending", approval_id="a1"), Code.FAILED_PRECONDITION),
        (ApprovalRefused("no", outcome="denied", approval_id="a1"), Code.PERMISSION_DENIED),
        (ApprovalRefused("late", outcome="expired", approval_id="a1"), Code.FAILED_PRECONDITION),
        (ApprovalRefused("used", outcome="used", approval_id="a1"), Code.FAILED_PRECONDITION),
        (LimitRefused("over", limit="l", retry_after=2.5), Code.RESOURCE_EXHAUSTED),
        (ApprovalCap("too many"), Code.RESOURCE_EXHAUSTED),
        (PayloadTooLarge("big"), Code.RESOURCE_EXHAUSTED),
        (Unavailable("down", component="store"), Code.UNAVAILABLE),
        (UpstreamFailed("gone"), Code.UNAVAILABLE),
        (UpstreamTimeout("slow"), Code.DEADLINE_EXCEEDED),
        (NoRoute("where"), Code.UNIMPLEMENTED),
        (BadRequest("odd"), Code.INVALID_ARGUMENT),
        (InternalError("bug"), Code.INTERNAL),
    ],
)
def test_refusals_map_to_status_codes(refusal: Any, code: Code) -> None:
    reply = grpc.render(refusal, decision_id="d-1")
    assert reply.code is code
    assert reply.http_status == grpc.HTTP_STATUS[code]
    assert ("x-agentproxy-decision-id", "d-1") in reply.trailers
    assert "decision d-1" in reply.message


def test_render_carries_rule_members_and_retry_after() -> None:
    reply = grpc.render(
        LimitRefused("limit calls is used up", limit="calls", retry_after=2.5, rule="reads"),
        decision_id="d-9",
    )
    assert reply.message == "limit calls is used up (decision d-9, rule reads)"
    assert dict(reply.trailers) == {
        "x-agentproxy-decision-id": "d-9",
        "x-agentproxy-rule": "reads",
        "x-agentproxy-limit": "calls",
        "retry-after": "3",
    }
    pending = grpc.render(
        ApprovalRefused("waiting", outcome="pending", approval_id="ab12", rule="big"),
        decision_id="d-2",
    )
    assert dict(pending.trailers)["x-agentproxy-approval-id"] == "ab12"


def test_status_message_is_one_printable_line() -> None:
    reply = grpc.render(BadRequest("line one\nline\x00two" + "x" * 5000), decision_id="d")
    assert reply.message.isprintable() and len(reply.message) <= 1024


# --- descriptor sets and args ----------------------------------------------------------------


@pytest.fixture(scope="module")
def methods(hr: Generated) -> dict[str, grpc.Method]:
    return grpc.load_descriptor_set(hr.descriptor_set.read_bytes())


def test_descriptor_set_lists_every_method_with_its_kind(methods: dict[str, grpc.Method]) -> None:
    kinds = {
        path: (m.client_streaming, m.server_streaming)
        for path, m in methods.items()
        if path.startswith("/hrtest.v1.")
    }
    assert kinds == {
        "/hrtest.v1.Employees/Get": (False, False),
        "/hrtest.v1.Employees/List": (False, True),
        "/hrtest.v1.Employees/Import": (True, False),
        "/hrtest.v1.Employees/Chat": (True, True),
        "/hrtest.v1.Employees/Slow": (False, False),
        "/hrtest.v1.Employees/Fail": (False, False),
    }


def test_args_use_proto_names_native_numbers_and_enum_names(
    methods: dict[str, grpc.Method], hr: Generated
) -> None:
    extra = struct_pb2.Struct()
    extra.update({"k": [1, "two"]})
    request = hr.pb2.GetRequest(
        id="42",
        amount=2**40,
        level=hr.pb2.HIGH,
        labels={"team": "hr"},
        tags=["a", "b"],
        at=timestamp_pb2.Timestamp(seconds=1_700_000_000),
        inner=hr.pb2.Inner(note="n"),
        extra=extra,
        blob=b"\x00\x01",
    )
    args = grpc.decode_args(methods["/hrtest.v1.Employees/Get"], request.SerializeToString())
    assert args == {
        "id": "42",
        "amount": 2**40,  # a number, not the JSON mapping's string
        "level": "HIGH",
        "labels": {"team": "hr"},
        "tags": ["a", "b"],
        "at": "2023-11-14T22:13:20Z",
        "inner": {"note": "n"},
        "extra": {"k": [1.0, "two"]},
        "blob": b"\x00\x01",
        "code": 0,
    }


def test_unset_fields_defaults_and_presence(methods: dict[str, grpc.Method], hr: Generated) -> None:
    args = grpc.decode_args(methods["/hrtest.v1.Employees/Get"], b"")
    # proto3 scalars read as their defaults (what the upstream sees); message fields and
    # `optional` ones are absent unless set, so has() tells.
    assert args == {
        "id": "",
        "amount": 0,
        "level": "LEVEL_UNSPECIFIED",
        "labels": {},
        "tags": [],
        "blob": b"",
        "code": 0,
    }
    with_reason = grpc.decode_args(
        methods["/hrtest.v1.Employees/Get"], hr.pb2.GetRequest(reason="").SerializeToString()
    )
    assert with_reason["reason"] == ""


def test_unknown_enum_numbers_stay_numbers(methods: dict[str, grpc.Method]) -> None:
    # field 3 (level), varint 7: a value this descriptor set does not name
    args = grpc.decode_args(methods["/hrtest.v1.Employees/Get"], b"\x18\x07")
    assert args["level"] == 7


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe"])
def test_a_message_that_does_not_decode_is_a_bad_request(
    methods: dict[str, grpc.Method], data: bytes
) -> None:
    with pytest.raises(BadRequest, match=r"hrtest\.v1\.GetRequest"):
        grpc.decode_args(methods["/hrtest.v1.Employees/Get"], data)


def test_descriptor_sets_that_do_not_resolve(hr: Generated) -> None:
    with pytest.raises(grpc.DescriptorError, match="not a FileDescriptorSet"):
        grpc.load_descriptor_set(b"\xff\xff\xff")
    files = descriptor_pb2.FileDescriptorSet.FromString(hr.descriptor_set.read_bytes())
    own = [f for f in files.file if f.name == "hrgrpc.proto"]
    alone = descriptor_pb2.FileDescriptorSet(file=own).SerializeToString()
    with pytest.raises(grpc.DescriptorError, match="--include_imports"):
        grpc.load_descriptor_set(alone)
    # Any order resolves (reflection returns files as it likes).
    reordered = descriptor_pb2.FileDescriptorSet(file=list(reversed(files.file)))
    assert "/hrtest.v1.Employees/Get" in grpc.load_descriptor_set(reordered.SerializeToString())
