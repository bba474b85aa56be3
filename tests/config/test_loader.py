"""The loader: every problem at once, each at its file and line, with what to change."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentproxy import config
from agentproxy.config import ConfigError
from agentproxy.config.yamldoc import parse_duration
from agentproxy.proxy.runtime import check, load_config

GOOD_POLICY = """\
default: deny
rules:
  - id: read
    agents: [hr-bot]
    actions: ["http:GET /v1/employees/{id}"]
    effect: allow
"""


def write(d: Path, main: str, policy: str = GOOD_POLICY) -> Path:
    (d / "secret").write_text("s3cret\n")
    (d / "pub.pem").write_text("not checked by the loader\n")
    (d / "policies").mkdir(exist_ok=True)
    (d / "policies" / "p.yaml").write_text(policy)
    path = d / "agentproxy.yaml"
    path.write_text(main)
    return path


MAIN = """\
listen: {http: "127.0.0.1:8080", admin: "127.0.0.1:9901"}
upstreams:
  - name: hr
    url: "http://127.0.0.1:8000"
    match: {path_prefix: /v1}
    timeout: 5s
    credentials: {header: X-Api-Key, value_file: secret}
identity:
  issuers:
    - issuer: https://idp
      audiences: [agentproxy]
      public_key_file: pub.pem
      algorithms: [RS256]
policy_files: ["policies/*.yaml"]
"""


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check(load_config(path))
    return str(info.value).splitlines()


def test_good_config_loads_with_secrets_masked(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MAIN))
    (up,) = cfg.upstreams
    assert up.path_prefix == "/v1" and up.timeout == 5.0
    assert up.credentials is not None and up.credentials.value.value == b"s3cret"
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(up.credentials)
    assert cfg.listen.http.port == 8080
    assert [r.id for r in cfg.policy_files[0].rules] == ["read"]


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, MAIN + "oops: [unclosed\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}:16:") and "invalid YAML" in line


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path, MAIN.replace("    timeout: 5s", "    timout: 5s"))
    (line,) = problems(path)
    assert line.startswith(f"{path}:6:5: $.upstreams[0].timout: unknown key")
    assert 'did you mean "timeout"' in line


def test_every_problem_is_reported_at_once_sorted(tmp_path: Path) -> None:
    bad_policy = (
        GOOD_POLICY.replace("effect: allow", "efect: allow") + "  - id: x\n    agents: [a]\n"
    )
    main = MAIN.replace("5s", "5 seconds").replace("RS256", "none")
    lines = problems(write(tmp_path, main, bad_policy))
    text = "\n".join(lines)
    assert "invalid duration '5 seconds'" in text
    assert "unsupported algorithm 'none'" in text
    assert 'unknown key (did you mean "effect"?)' in text
    assert 'missing required key "actions"' in text
    assert len(lines) >= 5
    assert lines == sorted(lines, key=lambda s: (s.split(":")[0], int(s.split(":")[1])))


def test_bad_cel_is_a_load_error_at_the_when_line(tmp_path: Path) -> None:
    policy = GOOD_POLICY + "    when: 'resource.id =='\n"
    path = write(tmp_path, MAIN, policy)
    (line,) = problems(path)
    assert line.startswith(
        f"{tmp_path / 'policies' / 'p.yaml'}:7:11: rule read.when: CEL does not compile"
    )


def test_cel_must_be_boolean_and_reference_known_variables(tmp_path: Path) -> None:
    policy = GOOD_POLICY + "    when: '1 + 2'\n"
    assert "must be a boolean expression" in problems(write(tmp_path, MAIN, policy))[0]
    policy = GOOD_POLICY + "    when: 'secrets.x == 1'\n"
    assert "undeclared reference" in problems(write(tmp_path, MAIN, policy))[0]


def test_duplicate_keys_and_rule_ids_are_refused(tmp_path: Path) -> None:
    policy = GOOD_POLICY + GOOD_POLICY.split("rules:\n")[1].replace(
        "agents: [hr-bot]", "agents: [x]\n    agents: [y]"
    )
    text = "\n".join(problems(write(tmp_path, MAIN, policy)))
    assert "duplicate key" in text
    assert "rule id 'read' is already used at" in text


def test_key_confusion_is_refused_at_load(tmp_path: Path) -> None:
    main = MAIN.replace("algorithms: [RS256]", "algorithms: [RS256, HS256]")
    assert any(
        "HS* algorithms need hs256_secret_file" in line for line in problems(write(tmp_path, main))
    )


def test_audience_and_key_source_are_required(tmp_path: Path) -> None:
    main = MAIN.replace("      audiences: [agentproxy]\n", "").replace(
        "      public_key_file: pub.pem\n", ""
    )
    text = "\n".join(problems(write(tmp_path, main)))
    assert 'missing required key "audiences"' in text
    assert "set exactly one of discovery: true, jwks_url" in text


def test_missing_files_and_empty_globs(tmp_path: Path) -> None:
    main = MAIN.replace("value_file: secret", "value_file: nope").replace(
        "policies/*.yaml", "nowhere/*.yaml"
    )
    text = "\n".join(problems(write(tmp_path, main)))
    assert "cannot read secret file 'nope'" in text
    assert "'nowhere/*.yaml' matches no policy file" in text


def test_protocol_specific_keys_are_refused_elsewhere(tmp_path: Path) -> None:
    main = MAIN.replace("    timeout: 5s\n", "    timeout: 5s\n    max_message_bytes: 10\n")
    assert any("applies to protocol: grpc only" in line for line in problems(write(tmp_path, main)))
    main = MAIN.replace("    timeout: 5s\n", "    timeout: 5s\n    pin_tools: enforce\n")
    assert any("applies to protocol: mcp only" in line for line in problems(write(tmp_path, main)))


def test_policy_test_files_are_not_policies(tmp_path: Path) -> None:
    path = write(tmp_path, MAIN)
    (tmp_path / "policies" / "p_test.yaml").write_text("tests: []\n")
    assert len(config.load(path).policy_files) == 1


def test_bad_action_patterns(tmp_path: Path) -> None:
    for pattern, message in [
        ("GET /x", "must start with one of"),
        ("http:GET x", 'an http action is "http:METHOD /path"'),
        ("http:GET /a/{id", "unbalanced"),
        ("http:GET /a/{query}", "reserved"),
        ("http:GET /{id}/{id}", "used twice"),
    ]:
        policy = GOOD_POLICY.replace("http:GET /v1/employees/{id}", pattern)
        (line,) = problems(write(tmp_path, MAIN, policy))
        assert message in line, line


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("50ms", 0.05),
        ("30s", 30.0),
        ("15m", 900.0),
        ("24h", 86400.0),
        ("1h30m", 5400.0),
        (2, 2.0),
        ("", None),
        ("5", None),
        ("-1s", None),
        ("1d", None),
        (True, None),
        ("1 h", None),
    ],
)
def test_durations(text: object, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_validate_command_prints_every_problem_and_exits_1(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MAIN.replace("    timeout: 5s", "    timout: 5s"),
        GOOD_POLICY + "    when: 'resource.id =='\n",
    )
    out = subprocess.run(
        [sys.executable, "-m", "agentproxy", "validate", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1
    assert f"{path}:6:5: $.upstreams[0].timout: unknown key" in out.stderr
    assert "p.yaml:7:11: rule read.when: CEL does not compile" in out.stderr
    assert "2 problem(s) found" in out.stderr


@pytest.mark.parametrize("example", sorted(Path("examples").glob("*/agentproxy.yaml")))
def test_validate_command_accepts_the_examples(example: Path, tmp_path: Path) -> None:
    from agentproxy.identity.issue import generate_demo_keypair

    # A copy of every example (one may use another's files), with the issuer keys their
    # run.py would make (never committed).
    shutil.copytree(
        example.parent.parent, tmp_path / "examples", ignore=shutil.ignore_patterns(".keys")
    )
    for each in (tmp_path / "examples").iterdir():
        if each.is_dir():
            (each / ".keys").mkdir()
            generate_demo_keypair(each / ".keys" / "issuer.pem", each / ".keys" / "issuer.pub.pem")
    copy = tmp_path / "examples" / example.parent.name
    out = subprocess.run(
        [sys.executable, "-m", "agentproxy", "validate", "--config", str(copy / example.name)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def test_store_and_admin_sections(tmp_path: Path) -> None:
    main = MAIN + (
        "store:\n  redis: {url: 'redis://:hunter2@127.0.0.1:6379/0', timeout: 20ms}\n"
        "  on_error: allow_cached\n  task_ttl: 1h\nadmin: {operators: ['role:security']}\n"
    )
    cfg = config.load(write(tmp_path, main))
    assert cfg.store.redis is not None and cfg.store.redis.timeout == 0.02
    assert cfg.store.on_error == "allow_cached" and cfg.store.task_ttl == 3600
    assert "hunter2" not in repr(cfg)
    assert cfg.admin.operators == ("role:security",)
    bad = MAIN + "store:\n  redis: {url: 'http://x'}\n  on_eror: deny\n"
    text = "\n".join(problems(write(tmp_path, bad)))
    assert "must be a redis://" in text
    assert 'unknown key (did you mean "on_error"?)' in text


def test_store_redis_takes_sentinel_or_cluster(tmp_path: Path) -> None:
    (tmp_path / "redis-password").write_text("pw-cluster-9\n")
    sentinel = MAIN + (
        "store:\n  redis:\n    sentinel: {service: mymaster, nodes: ['10.0.0.1:26379', "
        "'s2:26379']}\n    pool_timeout: 250ms\n"
    )
    cfg = config.load(write(tmp_path, sentinel))
    redis = cfg.store.redis
    assert redis is not None and redis.sentinel is not None and redis.url == ""
    assert redis.sentinel.service == "mymaster"
    assert redis.sentinel.nodes == ("10.0.0.1:26379", "s2:26379")
    assert redis.pool_timeout == 0.25
    cluster = MAIN + (
        "store:\n  redis: {cluster_nodes: ['127.0.0.1:7000'], password_file: redis-password}\n"
    )
    cfg = config.load(write(tmp_path, cluster))
    assert cfg.store.redis is not None and cfg.store.redis.cluster_nodes == ("127.0.0.1:7000",)
    assert cfg.store.redis.password is not None
    assert cfg.store.redis.password.value == b"pw-cluster-9"
    assert "pw-cluster-9" not in repr(cfg)


@pytest.mark.parametrize(
    ("redis", "expected"),
    [
        ("{}", '$.store.redis: needs one of "url", "sentinel" or "cluster_nodes"'),
        (
            "{url: 'redis://x:6379', cluster_nodes: ['x:7000']}",
            "$.store.redis.cluster_nodes: only one of url, cluster_nodes may be given",
        ),
        ("{cluster_nodes: ['x']}", """$.store.redis.cluster_nodes[0]: must be "host:port\""""),
        ("{cluster_nodes: []}", "$.store.redis.cluster_nodes: must name a cluster node"),
        (
            "{sentinel: {nodes: ['s:26379']}}",
            '$.store.redis.sentinel: missing required key "service"',
        ),
        (
            "{sentinel: {service: m, nodes: ['s:99999']}}",
            '$.store.redis.sentinel.nodes[0]: must be "host:port"',
        ),
        ("{sentinel: {service: m, node: ['s:1']}}", 'unknown key (did you mean "nodes"?)'),
        (
            "{cluster_nodes: ['x:7000'], key_prefix: 'a{b}:'}",
            "$.store.redis.key_prefix: must not contain { or } on a Redis Cluster",
        ),
        ("{url: 'redis://x:6379', pool_timeout: 0s}", "$.store.redis.pool_timeout: must be"),
        (
            "{cluster_nodes: ['x:7000'], wait_replicas: 1}",
            "$.store.redis.wait_replicas: is for a single Redis or Sentinel",
        ),
    ],
)
def test_bad_store_redis_topologies_are_refused_at_their_line(
    tmp_path: Path, redis: str, expected: str
) -> None:
    main = MAIN + f"store:\n  redis: {redis}\n"
    text = "\n".join(problems(write(tmp_path, main)))
    assert "agentproxy.yaml:" in text and expected in text, text


def test_an_audit_stream_needs_a_single_redis(tmp_path: Path) -> None:
    main = MAIN + (
        "store:\n  redis: {cluster_nodes: ['x:7000']}\naudit: {redis_stream: agentproxy:audit}\n"
    )
    text = "\n".join(problems(write(tmp_path, main)))
    assert "$.audit.redis_stream: needs store.redis.url" in text


def test_limits_cost_and_obligations_are_checked(tmp_path: Path) -> None:
    policy = GOOD_POLICY + (
        "    cost: {amount: 0.5, currency: usd}\n"
        "    obligations: {label_task: ['bad label']}\n"
        "    limits:\n"
        "      - {name: a, calls: 10, spend: 1.0, window: 1m}\n"
        "      - {name: b, spend: 1.0, currency: EUR, window: 1m}\n"
        "      - {name: c, calls: 5}\n"
        "      - {name: d, calls: 5, window: 1m, key: 'principal.nope('}\n"
        "  - id: deny-with-limits\n    agents: [x]\n    actions: ['http:GET /x']\n"
        "    effect: deny\n    limits: [{name: e, calls: 1, window: 1m}]\n"
        "  - id: needs-approval\n    agents: [x]\n    actions: ['http:GET /y']\n"
        "    effect: require_approval\n"
    )
    text = "\n".join(problems(write(tmp_path, MAIN, policy)))
    for expected in [
        "must be an ISO 4217 code",
        "label 'bad label'",
        "set exactly one of calls (per window) or spend (per window)",
        "must match the rule's cost currency",
        'missing required key "window"',
        "key is not agent, user, task or CEL that compiles",
        "limits, cost and obligations apply to calls a rule allows",
        'require_approval needs "approval: {approvers',
    ]:
        assert expected in text, expected


def test_approval_specs(tmp_path: Path) -> None:
    policy = GOOD_POLICY.replace("effect: allow", "effect: require_approval") + (
        "    approval: {approvers: ['role:finance', 'user:carol'], timeout: 1h, hold: 20s,"
        " grant: {ttl: 30m}}\n"
    )
    cfg = config.load(write(tmp_path, MAIN, policy))
    spec = cfg.policy_files[0].rules[0].approval
    assert spec is not None
    assert (spec.approvers, spec.timeout, spec.hold, spec.grant_ttl) == (
        ("role:finance", "user:carol"),
        3600.0,
        20.0,
        1800.0,
    )
    bad = GOOD_POLICY.replace("effect: allow", "effect: require_approval") + (
        "    approval: {approvers: [], hold: 5m, grant: twice}\n"
    )
    text = "\n".join(problems(write(tmp_path, MAIN, bad)))
    assert "name at least one approver" in text
    assert "must be between 0s and 55s" in text
    assert 'write "once" or {ttl: 1h}' in text
    misplaced = GOOD_POLICY + "    approval: {approvers: [carol]}\n"
    assert any(
        "applies to effect: require_approval only" in line
        for line in problems(write(tmp_path, MAIN, misplaced))
    )


def test_output_caps_load_and_bad_ones_are_named(tmp_path: Path) -> None:
    metering = (
        "metering:\n  prices:\n"
        '    "gpt-4o*": {input_per_mtok: 2.5, output_per_mtok: 10, max_output_tokens: 16384}\n'
        "  default_max_output_tokens: 1000\n"
    )
    cfg = config.load(write(tmp_path, MAIN + metering))
    assert cfg.metering.prices[0][1].max_output_tokens == 16384
    assert cfg.metering.default_max_output_tokens == 1000
    bad = metering.replace("16384", "0").replace("1000", "-5")
    text = "\n".join(problems(write(tmp_path, MAIN + bad)))
    assert "max_output_tokens: must be at least 1" in text
    assert "default_max_output_tokens: must be at least 1" in text


def test_path_readings_and_forwarded_host_load_and_bad_ones_are_named(tmp_path: Path) -> None:
    extra = (
        '    forwarded_host: "hr.example.com:8443"\n'
        "    paths: {case: insensitive, integer_segments: canonical}\n"
    )
    main = MAIN.replace("    timeout: 5s\n", "    timeout: 5s\n" + extra)
    (up,) = config.load(write(tmp_path, main)).upstreams
    assert (up.forwarded_host, up.path_case, up.integer_segments) == (
        "hr.example.com:8443",
        "insensitive",
        "canonical",
    )
    bad = main.replace("hr.example.com:8443", "evil.test/path").replace("insensitive", "lower")
    text = "\n".join(problems(write(tmp_path, bad)))
    assert "forwarded_host: must be a host[:port]" in text
    assert "case" in text and "insensitive" in text


def test_max_body_bytes_defaults_by_protocol_and_is_checked(tmp_path: Path) -> None:
    upstreams = """\
  - {name: api, url: "http://127.0.0.1:8001", match: {path_prefix: /api}}
  - {name: tools, url: "http://127.0.0.1:8002", protocol: mcp, match: {path_prefix: /mcp}}
  - {name: models, url: "http://127.0.0.1:8003", protocol: llm, match: {path_prefix: /llm}}
  - {name: big, url: "http://127.0.0.1:8004", protocol: llm, match: {path_prefix: /big},
     max_body_bytes: 33554432}
"""
    text = MAIN.replace("upstreams:\n", "upstreams:\n" + upstreams)
    loaded = {u.name: u.max_body_bytes for u in load_config(write(tmp_path, text)).upstreams}
    assert loaded == {
        "hr": 64 << 20,
        "api": 64 << 20,
        "tools": 1 << 20,
        "models": 8 << 20,
        "big": 32 << 20,
    }
    bad = MAIN.replace("    timeout: 5s\n", "    timeout: 5s\n    max_body_bytes: 0\n")
    assert any(
        "$.upstreams[0].max_body_bytes: must be a positive number of bytes" in line
        for line in problems(write(tmp_path, bad))
    )


SILENT_POLICY = """\
default: deny
rules:
  - id: by-amount
    agents: [payer]
    actions: ["http:POST /v1/transfers"]
    when: 'args.amount <= 100'
    effect: allow
  - id: get-by-args
    agents: [payer]
    actions: ["http:GET /v1/transfers"]
    when: 'args.id == "1"'
    effect: allow
  - id: unbound
    agents: [payer]
    actions: ["http:GET /v1/employees/{id}", "http:GET /v1/employees"]
    when: 'resource.employee == "1" && "resource.nope" != ""'
    effect: allow
  - id: guarded
    agents: [payer]
    actions: ["http:GET /v1/teams/{team}", "http:GET /v1/teams"]
    when: '!has(resource.team) || resource.team == "a"'
    effect: allow
"""

BAD_SHAPES = """\
rules:
  - id: shapes
    agents: [payer]
    actions: ["http:GET /v1/**", "mcp:tools/call/x"]
    effect: allow
    obligations: {redact_fields: ["items[]", "a..b"], keep_items: {path: "x y", when: "item."}}
  - id: bad-when
    agents: [payer]
    actions: ["http:GET /v1/**"]
    effect: allow
    obligations: {keep_items: {path: items, when: "item."}}
"""


def test_validate_catches_what_would_silently_deny(tmp_path: Path) -> None:
    main = MAIN.replace("    timeout: 5s", "    timeout: 5s\n    body: stream")
    text = "\n".join(problems(write(tmp_path, main, SILENT_POLICY)))
    assert "rule by-amount.when: reads args on HTTP calls, but upstream hr never reads" in text
    assert "rule get-by-args.when: reads args, but 'http:GET /v1/transfers' calls carry" in text
    assert "resource.employee: action 'http:GET /v1/employees/{id}' binds id" in text
    assert "resource.employee: action 'http:GET /v1/employees' binds nothing" in text
    assert "resource.nope" not in text  # a string, not a read
    assert "rule guarded" not in text


def test_validate_catches_bad_obligations_and_claim_paths(tmp_path: Path) -> None:
    main = MAIN.replace(
        "policy_files:",
        "  claims: {roles: 'realm_access.roles[0]', task: 'ctx..task'}\npolicy_files:",
    )
    text = "\n".join(problems(write(tmp_path, main, BAD_SHAPES)))
    assert "every action must start with http: (not 'mcp:tools/call/x')" in text
    assert "path 'items[]': ends in []" in text and "path 'a..b'" in text
    assert "path 'x y'" in text
    assert "rule bad-when.obligations.keep_items.when: CEL does not compile" in text
    assert "$.identity.claims.roles: 'realm_access.roles[0]' is not a claim name" in text
    assert "$.identity.claims.task: 'ctx..task'" in text


def test_claims_are_read_by_dotted_paths() -> None:
    from agentproxy.config.model import ClaimNames
    from agentproxy.identity.principal import principal_from_claims

    names = ClaimNames(agent="azp", roles="realm_access.roles", task="https://ex.com/task")
    claims = {
        "azp": "bot",
        "realm_access": {"roles": ["hr"]},
        "https://ex.com/task": "t-1",
    }
    principal = principal_from_claims(claims, names, "https://idp", 0.0)
    assert principal.agent == "bot" and principal.roles == {"hr"} and principal.task == "t-1"
    assert principal_from_claims({"azp": "bot"}, names, "i", 0.0).roles == frozenset()
