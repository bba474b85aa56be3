"""gRPC upstreams and listeners in the config: routed by service, limits, descriptor sets."""

from __future__ import annotations

from pathlib import Path

from agentproxy import config
from tests.config.test_loader import MAIN, problems, write

GRPC = """\
  - name: payroll
    url: "grpc://127.0.0.1:50052"
    protocol: grpc
    match: {service: payroll.v1.Payroll}
    max_message_bytes: 1048576
  - name: rest
    url: "grpcs://grpc.internal:443"
    protocol: grpc
"""


def with_grpc(extra: str = GRPC, listen: str = "") -> str:
    main = MAIN.replace("identity:", extra + "identity:", 1)
    if listen:
        main = main.replace('admin: "127.0.0.1:9901"}', f'admin: "127.0.0.1:9901", {listen}}}')
    return main


def test_grpc_upstreams_and_listeners_load(tmp_path: Path) -> None:
    listen = 'grpc: "127.0.0.1:50051", admin_grpc: "127.0.0.1:9902"'
    cfg = config.load(write(tmp_path, with_grpc(listen=listen)))
    http, payroll, rest = cfg.upstreams
    assert not http.is_grpc and payroll.is_grpc and rest.is_grpc
    assert payroll.service == "payroll.v1.Payroll" and payroll.max_message_bytes == 1048576
    assert rest.service is None and rest.max_message_bytes == 4 * 1024 * 1024
    assert cfg.listen.grpc is not None and cfg.listen.grpc.port == 50051
    assert cfg.listen.admin_grpc is not None and cfg.listen.admin_grpc.port == 9902


def test_no_grpc_listener_unless_configured(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MAIN))
    assert cfg.listen.grpc is None and cfg.listen.admin_grpc is None


def test_grpc_mistakes_are_each_reported(tmp_path: Path) -> None:
    bad = """\
  - name: a
    url: "grpc://127.0.0.1:1/some/path"
    protocol: grpc
    match: {path_prefix: /x}
    max_body_bytes: 10
  - name: b
    url: "grpc://127.0.0.1:2"
    protocol: grpc
    match: {service: "not a service"}
    max_message_bytes: 0
    descriptor_set: missing.binpb
  - name: c
    url: "ftp://127.0.0.1:3"
    protocol: grpc
  - name: d
    url: "grpc://127.0.0.1:4"
    protocol: grpc
"""
    text = "\n".join(problems(write(tmp_path, with_grpc(bad, listen='grpc: "nowhere"'))))
    assert 'must be "grpc://host:port"' in text
    assert "$.upstreams[1].match.path_prefix: unknown key" in text
    assert "$.upstreams[1].max_body_bytes: applies to HTTP protocols" in text
    assert "$.upstreams[2].match.service: must be a full service name" in text
    assert "$.upstreams[2].max_message_bytes: must be a positive number" in text
    assert "$.upstreams[2].descriptor_set: file 'missing.binpb' does not exist" in text
    assert "$.upstreams[3].url" in text
    assert "more than one gRPC upstream has no match" in text
    assert "$.listen.grpc: invalid address" in text


def test_one_service_one_upstream(tmp_path: Path) -> None:
    twice = GRPC.replace(
        '    url: "grpcs://grpc.internal:443"\n',
        '    url: "grpcs://grpc.internal:443"\n    match: {service: payroll.v1.Payroll}\n',
    )
    text = "\n".join(problems(write(tmp_path, with_grpc(twice))))
    assert "service 'payroll.v1.Payroll' is already served by another upstream" in text


def test_a_descriptor_set_that_is_not_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.binpb").write_bytes(b"\xff\xff not protobuf")
    extra = GRPC + "    descriptor_set: bad.binpb\n"
    text = "\n".join(problems(write(tmp_path, with_grpc(extra))))
    assert "$.upstreams[2].descriptor_set: not a FileDescriptorSet" in text


def test_descriptor_set_applies_to_grpc_only(tmp_path: Path) -> None:
    main = MAIN.replace("    timeout: 5s\n", "    timeout: 5s\n    descriptor_set: reflection\n")
    assert any("applies to protocol: grpc only" in line for line in problems(write(tmp_path, main)))
