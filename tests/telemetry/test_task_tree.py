"""The task tree from a real trail: a planner (acting for alice) delegates to a researcher and
a writer, whose tokens name the planner's task as their parent (minted with `agentproxy token
--claim parent_task=…`); the writer's publish waits for an editor's approval. `agentproxy audit
trace` reads the chain back, as text and JSON; the approval wait is a span of its own."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import AUDIENCE, ISSUER, Keys, ProxyFactory, Upstream
from tests.telemetry.receiver import Received

POLICY = """
default: deny
rules:
  - id: plan-reads
    agents: [planner]
    actions: ["http:GET /public/**"]
    effect: allow
  - id: research
    agents: [researcher]
    actions: ["http:GET /v1/employees/{id}"]
    effect: allow
    cost: {amount: 0.25, currency: USD}
  - id: publish
    agents: [writer]
    actions: ["http:POST /v1/docs"]
    effect: require_approval
    reason: publishing needs an editor
    approval: {approvers: ["role:editor"], timeout: 1h, hold: 5s, grant: once}
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentproxy", *args], capture_output=True, text=True, check=False
    )


def mint(key: Path, agent: str, task: str, *more: str) -> str:
    done = cli(
        "token",
        "--key",
        str(key),
        "--issuer",
        ISSUER,
        "--audience",
        AUDIENCE,
        "--agent",
        agent,
        "--task",
        task,
        *more,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def test_a_planner_and_two_agents_read_back_as_one_tree(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream, tmp_path: Path, collector: Received
) -> None:
    key = tmp_path / "issuer-private.pem"
    key.write_bytes(keys.private_pem)
    planner = mint(key, "planner", "plan-1", "--for-user", "alice")
    researcher = mint(key, "researcher", "research-1", "--claim", "parent_task=plan-1")
    writer = mint(key, "writer", "write-1", "--claim", "parent_task=plan-1")
    editor = keys.token("bob", roles=["editor"])
    audit = tmp_path / "audit.jsonl"
    received = collector
    proxy = await make_proxy(
        policy=POLICY,
        extra=(
            f"audit: {{file: {audit}}}\n"
            'admin: {operators: ["role:auditor"]}\n'
            f'telemetry: {{otlp: {{endpoint: "{received.endpoint}", protocol: grpc}}}}\n'
        ),
    )
    async with aiohttp.ClientSession() as s:

        async def call(token: str, method: str, path: str) -> int:
            headers = {"Authorization": f"Bearer {token}"}
            async with s.request(method, proxy.base + path, headers=headers) as r:
                await r.read()
                return r.status

        assert await call(planner, "GET", "/public/plan") == 200
        assert await call(researcher, "GET", "/v1/employees/7") == 200
        assert await call(researcher, "GET", "/v1/employees/8") == 200
        held = asyncio.ensure_future(call(writer, "POST", "/v1/docs"))
        deadline = time.monotonic() + 3
        while True:
            async with s.get(
                proxy.admin + "/v1/approvals?state=pending",
                headers={"Authorization": f"Bearer {editor}"},
            ) as r:
                waiting = (await r.json())["approvals"]
            if waiting:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the editor reads the draft
        async with s.post(
            f"{proxy.admin}/v1/approvals/{waiting[0]['id']}/approve",
            headers={"Authorization": f"Bearer {editor}"},
            json={"reason": "reviewed the draft"},
        ) as r:
            assert r.status == 200
        assert await asyncio.wait_for(held, 5) == 200
        # A call of another task, which must not appear in plan-1's tree.
        assert await call(keys.token("researcher", task="other"), "GET", "/v1/employees/9")
        # The admin API serves the same tree, to operators only.
        auditor = {"Authorization": f"Bearer {keys.token('eve', roles=['auditor'])}"}
        await asyncio.sleep(0.2)  # the trail's writer lingers before a batch
        async with s.get(proxy.admin + "/v1/tasks/plan-1/tree", headers=auditor) as r:
            assert r.status == 200
            served = await r.json()
        async with s.get(proxy.admin + "/v1/tasks/plan-1/tree?format=text", headers=auditor) as r:
            assert r.status == 200 and (await r.text()).startswith("task plan-1  started")
        editor_auth = {"Authorization": f"Bearer {editor}"}
        async with s.get(proxy.admin + "/v1/tasks/plan-1/tree", headers=editor_auth) as r:
            assert r.status == 403
        async with s.get(proxy.admin + "/v1/tasks/nope/tree", headers=auditor) as r:
            assert r.status == 404
        async with s.get(proxy.admin + "/ui/tasks") as r:
            assert r.status == 200 and "Content-Security-Policy" in r.headers
    await proxy.server.stop()
    spans = await received.wait(1)
    approval_spans = [s for s in spans if s.name == "approval"]
    assert len(approval_spans) == 1
    (wait,) = approval_spans
    assert wait.end - wait.start > 250_000_000  # held until bob approved
    assert wait.attributes["agentproxy.approval_id"] == waiting[0]["id"]
    server = next(s for s in spans if s.span_id == wait.parent_id)
    assert server.attributes["agentproxy.parent_task"] == "plan-1"
    assert server.attributes["gen_ai.security.verdict.type"] == "escalate"
    assert server.attributes["gen_ai.security.action.type"] == "allow"  # approved

    done = cli("audit", "trace", "plan-1", str(audit), "--json")
    assert done.returncode == 0, done.stderr
    tree = orjson.loads(done.stdout)
    assert served["subtasks"][0]["task"] == "research-1"
    assert [t["task"] for t in served["subtasks"]] == [t["task"] for t in tree["subtasks"]]
    assert tree["task"] == "plan-1" and tree["parent"] is None
    assert tree["started_by"] == {"agent": "planner", "user": "alice"}
    assert [t["task"] for t in tree["subtasks"]] == ["research-1", "write-1"]
    assert [e["type"] for e in tree["events"]] == ["action", "task", "task"]
    research, write = tree["subtasks"]
    assert research["parent"] == "plan-1" and research["agents"] == ["researcher"]
    assert research["parent_source"] == "token"
    assert [e["action"] for e in research["events"]] == [
        "http:GET /v1/employees/7",
        "http:GET /v1/employees/8",
    ]
    first = research["events"][0]
    assert (first["effect"], first["rule"], first["status"]) == ("allow", "research", 200)
    assert first["policy_version"] and len(first["trace_id"]) == 32
    assert research["cost"] == {"USD": 0.5}
    assert tree["cost"] == {"USD": 0.5}  # the subtasks' cost is the task's
    kinds = [(e["type"], e.get("event") or e.get("effect")) for e in write["events"]]
    # Requested and approved while the call was held, its grant used; the decision is
    # recorded once the gate let the call through.
    assert kinds == [
        ("approval", "requested"),
        ("approval", "approved"),
        ("approval", "used"),
        ("action", "require_approval"),
    ]
    approved = next(e for e in write["events"] if e.get("event") == "approved")
    assert approved["decided_by"] == "bob" and approved["reason"] == "reviewed the draft"
    publish = next(e for e in write["events"] if e["type"] == "action")
    assert publish["status"] == 200 and publish["approval_id"] == approved["approval_id"]
    assert "other" not in done.stdout

    text = cli("audit", "trace", "plan-1", str(audit))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("task plan-1  started ")
    assert "by alice via planner" in lines[0] and "cost: 0.5 USD" in lines[0]
    assert any("task research-1 (subtask of plan-1)" in line for line in lines)
    assert any(
        "approval" in line and "approved by bob: reviewed the draft" in line for line in lines
    )
    assert any("http:GET /v1/employees/8  allow  rule research" in line for line in lines)
    missing = cli("audit", "trace", "nope", str(audit))
    assert missing.returncode == 1 and "no record names task 'nope'" in missing.stderr


async def test_an_orchestrators_header_names_the_parent_of_a_declared_task(
    make_proxy: ProxyFactory, keys: Keys, upstream: Upstream, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    proxy = await make_proxy(extra=f"audit: {{file: {audit}}}\n")
    declared = {"X-Agentproxy-Task": "sub-1", "X-Agentproxy-Parent-Task": "plan-1"}
    async with aiohttp.ClientSession() as s:

        async def get(token: str, headers: dict[str, str]) -> tuple[int, str]:
            sent = {"Authorization": f"Bearer {token}", **headers}
            async with s.get(proxy.base + "/public/x", headers=sent) as r:
                return r.status, await r.text()

        # No task in the token: the declared task, and its declared parent.
        assert (await get(keys.token("worker"), declared))[0] == 200
        assert "x-agentproxy-parent-task" not in {k.lower() for k in upstream.seen[-1].headers}
        # A task in the token: its parent is the token's (none here), never the header's.
        assert (await get(keys.token("worker", task="t-9"), declared))[0] == 200
        bad = {"X-Agentproxy-Parent-Task": "bad value!"}
        assert (await get(keys.token("worker"), bad))[0] == 400
        # Where only the token may name tasks, the header is refused.
        text = proxy.config_path.read_text().replace(
            "      algorithms: [RS256]\n", "      algorithms: [RS256]\n  task_from: [token]\n"
        )
        proxy.config_path.write_text(text)
        assert await proxy.server.reload()
        parent_only = {"X-Agentproxy-Parent-Task": "plan-1"}
        status, body = await get(keys.token("worker", task="t-9"), parent_only)
        assert status == 400 and "identity.task_from" in body
    await proxy.server.stop()
    found = [orjson.loads(line) for line in audit.read_bytes().splitlines()]
    decisions = [r for r in found if r.get("kind") == "decision" and r.get("status") != 400]
    assert [(r["task"], r["parent_task"], r["parent_source"]) for r in decisions] == [
        ("sub-1", "plan-1", "header"),
        ("t-9", None, None),
    ]
    tree = cli("audit", "trace", "sub-1", str(audit), "--json")
    shown = orjson.loads(tree.stdout)
    assert (shown["parent"], shown["parent_source"]) == ("plan-1", "header")
