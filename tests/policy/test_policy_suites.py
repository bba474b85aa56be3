"""Policy behaviour as YAML case files, run by the same runner as `agentproxy policy test`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agentproxy.config.yamldoc import ConfigError
from agentproxy.core import Action
from agentproxy.policy.testing import format_report, run_dir
from agentproxy.protocols.request_line import describe_line
from tests.conftest import Keys, ProxyFactory

CASES = Path(__file__).parent / "cases"


def describe_request(line: str, body: bytes | None, content_type: str | None) -> Action:
    return describe_line(
        line, None, lambda service, path: None, body=body, content_type=content_type
    )


def test_case_files_pass_and_cover_every_rule() -> None:
    report = run_dir(CASES, describe_request)
    assert report.failed == [], format_report(report)
    assert report.uncovered == []
    assert len(report.results) == 9


def test_a_failing_case_is_reported_with_its_trace(tmp_path: Path) -> None:
    (tmp_path / "hr.yaml").write_text((CASES / "hr.yaml").read_text())
    suite = (CASES / "hr_test.yaml").read_text().split("  - name: deny overrides")[0]
    (tmp_path / "hr_test.yaml").write_text(
        suite.replace("    expect: deny\n    rule: none", "    expect: allow")
    )
    report = run_dir(tmp_path, describe_request)
    assert len(report.failed) == 1
    text = format_report(report)
    assert "FAIL the CEO's record is default-denied" in text
    assert "expected: allow" in text and "got:      deny by rule none" in text
    assert "resource.id = '1'" in text
    assert "rules no test exercised:" in text and "hr-updates" in text
    assert text.endswith("1 passed, 1 failed")


def test_bad_suites_are_load_errors_with_lines(tmp_path: Path) -> None:
    (tmp_path / "hr.yaml").write_text((CASES / "hr.yaml").read_text())
    (tmp_path / "x_test.yaml").write_text(
        "tests:\n  - name: a\n    principal: {agent: a}\n    request: 'GET /a/../%2f'\n"
        "    expect: allow\n  - name: b\n    principal: {agnt: a}\n    expect: maybe\n"
    )
    with pytest.raises(ConfigError) as info:
        run_dir(tmp_path, describe_request)
    text = str(info.value)
    assert "x_test.yaml:4:5: $.tests[0].request" in text
    assert 'did you mean "agent"' in text
    assert "must be one of allow, deny, require_approval" in text
    assert 'give exactly one of "request"' in text


def test_cli_policy_test_exit_codes(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "agentproxy", "policy", "test", str(CASES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().endswith("9 passed, 0 failed")
    (tmp_path / "hr.yaml").write_text((CASES / "hr.yaml").read_text())
    (tmp_path / "hr_test.yaml").write_text(
        "tests:\n  - name: wrong\n    principal: {agent: hr-bot}\n"
        "    request: 'GET /v1/employees/42'\n    expect: deny\n"
    )
    bad = subprocess.run(
        [sys.executable, "-m", "agentproxy", "policy", "test", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1
    assert "FAIL wrong" in bad.stdout


BODY_POLICY = """
rules:
  - id: small-transfers
    agents: [payer]
    actions: ["http:POST /v1/transfers"]
    when: 'args.amount <= 100'
    effect: allow
  - id: form-transfers
    agents: [payer]
    actions: ["http:POST /v1/form"]
    when: 'int(args.amount) <= 100'
    effect: allow
"""


def test_cases_give_http_bodies_read_as_the_data_plane_reads_them(tmp_path: Path) -> None:
    (tmp_path / "pay.yaml").write_text(BODY_POLICY)
    (tmp_path / "pay_test.yaml").write_text(
        """tests:
  - name: a small transfer, written as YAML
    principal: {agent: payer}
    request: "POST /v1/transfers"
    body: {amount: 50}
    expect: allow
  - name: a large one, as sent
    principal: {agent: payer}
    request: "POST /v1/transfers"
    body: '{"amount": 5e6}'
    expect: deny
  - name: a form
    principal: {agent: payer}
    request: "POST /v1/form"
    body: "amount=50"
    content_type: application/x-www-form-urlencoded
    expect: allow
"""
    )
    report = run_dir(tmp_path, describe_request)
    assert report.failed == [], format_report(report)
    (tmp_path / "bad_test.yaml").write_text(
        """tests:
  - name: a body the data plane refuses
    principal: {agent: payer}
    request: "POST /v1/transfers"
    body: '{"amount": 5, "Amount": 5000}'
    expect: allow
"""
    )
    with pytest.raises(ConfigError) as info:
        run_dir(tmp_path, describe_request)
    assert "bad_test.yaml:5:5: $.tests[0].body: JSON body: keys" in str(info.value)
    assert "one key to a parser" in str(info.value)


def test_conditions_read_the_parent_task(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        """rules:
  - id: subtasks-of-the-plan
    agents: [worker]
    actions: ["http:GET /v1/**"]
    when: 'task.parent == "plan-1"'
    effect: allow
"""
    )
    (tmp_path / "p_test.yaml").write_text(
        """tests:
  - name: a subtask of the plan
    principal: {agent: worker}
    request: "GET /v1/x"
    task: {id: sub-1, parent: plan-1}
    expect: allow
  - name: a task of its own
    principal: {agent: worker}
    request: "GET /v1/x"
    task: {id: sub-2}
    expect: deny
"""
    )
    report = run_dir(tmp_path, describe_request)
    assert report.failed == [], format_report(report)


async def test_a_token_names_the_parent_task_policy_reads(
    make_proxy: ProxyFactory, keys: Keys
) -> None:
    import aiohttp

    policy = """
default: deny
rules:
  - id: subtasks-of-the-plan
    agents: [worker]
    actions: ["http:GET /public/**"]
    when: 'task.parent == "plan-1"'
    effect: allow
"""
    proxy = await make_proxy(policy=policy)

    async def get(token: str) -> int:
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            aiohttp.ClientSession() as s,
            s.get(proxy.base + "/public/x", headers=headers) as r,
        ):
            return r.status

    assert await get(keys.token("worker", task="sub-1", parent_task="plan-1")) == 200
    assert await get(keys.token("worker", task="sub-2", parent_task="plan-2")) == 403
    assert await get(keys.token("worker", task="sub-3")) == 403


def test_calendar_windows_are_utc_days_iso_weeks_and_months() -> None:
    from agentproxy.policy.limits import calendar_window

    now = 1_796_601_600.0 + 13 * 3600  # Mon 2026-12-07 13:00 UTC
    assert calendar_window("day", now) == (1_796_601_600.0, 86400.0)
    assert calendar_window("week", now) == (1_796_601_600.0, 7 * 86400.0)  # from Monday
    assert calendar_window("week", now + 6 * 86400) == (1_796_601_600.0, 7 * 86400.0)
    assert calendar_window("month", now) == (1_796_083_200.0, 31 * 86400.0)  # December
