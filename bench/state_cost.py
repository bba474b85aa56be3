"""What each stateful feature adds per call, with the memory store and with Redis, against
the full pipeline with no stateful feature on, all measured in one run.

Every configuration is a real config file loaded by the proxy's own loader and assembled by
`proxy/assemble.py` exactly as `agentproxy run` does (verifier, revocation mirror and
approval expiry running, decision log to /dev/null, metrics, the signed context token of
every forwarded call); only the sockets are left out: an exchange that forwards nowhere
answers 200, so what is left is the pipeline's own cost, which wall time through wrk on
these 2 shared cores would hide in its noise. The features, one at a time:

- rate limit: the allowing rule has a calls-per-window limit (reserved every call);
- budget: the rule has a cost and a spend limit (reserved, its remainder read for the
  budget header, settled after the answer);
- revocations: 1,000 agents and 1,000 tokens on the deny list (none of them the caller);
- approvals: the rule requires approval, already granted (`grant: {ttl: 1h}`): each call
  uses the stored grant;
- task history: the rule's `when` reads `task.calls` (history read each call, no memo) and
  labels the task (the call recorded in its history after the answer);
- audit trail: decision and outcome records, hash-chained, to a file (memory store) or the
  Redis stream (Redis), without and with `audit.required` (the call waits for its record).

Redis is a private redis-server on a free port (no persistence), each configuration in its
own database. Each configuration runs `--calls` calls one at a time (latency added) and the
same with 16 in flight (CPU per call: what limits throughput), alternating configurations
round by round; the best round counts (noise only ever makes a run slower). Writes
bench/results/state_cost.md.

    .venv/bin/python bench/state_cost.py [--calls 2000] [--rounds 5]    # make bench-state
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
import uvloop
from common import Issuer, best, cpu_seconds, free_port, machine, table, wait_port, write_result

from agentproxy.approvals.lifecycle import Event
from agentproxy.audit.decision_log import DecisionLog
from agentproxy.audit.trail import AuditTrail
from agentproxy.clock import SYSTEM
from agentproxy.core import Call, Principal
from agentproxy.errors import ApprovalRefused
from agentproxy.metering.metrics import Metrics
from agentproxy.proxy import assemble
from agentproxy.proxy import runtime as runtime_module
from agentproxy.proxy.context import context_headers
from agentproxy.proxy.pipeline import Pipeline, start_call
from agentproxy.proxy.server import audit_settings, make_store
from agentproxy.store import Revocation

PATH = "/v1/employees/42"
TASK = "bench-task-1"
RULE = """
  - id: read-employees
    agents: [hr-bot, "role:hr"]
    actions: ["http:GET /v1/employees/{id}"]
    when: 'resource.id != "13" && principal.claims.dept == "hr"'
"""
ALLOW = "    effect: allow\n"
BASELINE = "none (baseline)"
# One feature each, added to the rule above (limits far from reached: the bench measures the
# check, never a refusal).
FEATURES: dict[str, str] = {
    BASELINE: ALLOW,
    "rate limit": ALLOW + "    limits: [{name: rate, calls: 1000000000, window: 1h, key: agent}]\n",
    "budget": ALLOW
    + "    cost: {amount: 0.001, currency: USD}\n"
    + "    limits: [{name: spend, spend: 1000000000, currency: USD, window: 24h, key: agent}]\n",
    "revocations (1,000 agents + 1,000 tokens)": ALLOW,
    "approvals (granted, ttl 1h)": (
        "    effect: require_approval\n"
        "    approval: {approvers: [alice], timeout: 1h, hold: 0s, grant: {ttl: 1h}}\n"
    ),
    "task history": ALLOW.replace("effect", "obligations: {label_task: [hr]}\n    effect").replace(
        "'resource", "'task.calls < 1000000000 && resource"
    ),
    "audit trail": ALLOW,
    "audit trail, required": ALLOW,
}
REVOKED = 1000
# The longest any configuration may take to build, be measured or stop (seconds).
STEP_TIMEOUT = 120.0


@dataclass
class Setup:
    """One configuration, built and started: its pipeline and what must be stopped."""

    name: str
    store_name: str
    pipeline: Pipeline
    services: assemble.Services
    token: str
    task: str | None
    decision_log: DecisionLog
    background: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self) -> None:
        self.decision_log.flush()
        for task in self.background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.services.audit is not None:
            await self.services.audit.close()
        await self.services.store.close()


@dataclass
class Runs:
    """One configuration's measurements, a value per round."""

    cpu: list[float] = field(default_factory=list)  # µs/call, 16 in flight
    latency: list[float] = field(default_factory=list)  # µs/call, one at a time
    redis_cpu: list[float] = field(default_factory=list)  # redis-server's µs/call


class BenchExchange:
    """Forwards nowhere: builds what the HTTP exchange sends upstream about the call (the
    context headers and signed token), then answers 200."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._signer = pipeline.runtime.signer
        self._responded = False

    @property
    def responded(self) -> bool:
        return self._responded

    async def describe(self, call: Call) -> None:
        return None

    async def forward(self, call: Call) -> None:
        context_headers(call, self._signer, method="GET", path=PATH)
        call.status = 200
        self._responded = True

    async def refuse(self, call: Call) -> None:
        call.status = call.refusal.status if call.refusal is not None else 500
        self._responded = True


def config_text(d: Path, slug: str, feature: str, redis_url: str | None) -> Path:
    """The config and policy files of one configuration."""
    (d / f"{slug}-policy.yaml").write_text("default: deny\nrules:\n" + RULE + FEATURES[feature])
    store = f"store: {{redis: {{url: '{redis_url}', timeout: 1s}}}}\n" if redis_url else ""
    audit = ""
    if feature.startswith("audit"):
        sink = "redis_stream: 'agentproxy:audit'" if redis_url else f"file: {d / slug}-audit.jsonl"
        audit = f"audit: {{{sink}, required: {'true' if 'required' in feature else 'false'}}}\n"
    path = d / f"{slug}.yaml"
    path.write_text(
        f"""
listen: {{http: "127.0.0.1:0", admin: "127.0.0.1:0"}}
upstreams:
  - {{name: hr, url: "http://127.0.0.1:9", credentials: {{header: X-Api-Key, value_file: secret}}}}
identity:
  issuers: [{{issuer: "https://idp.bench", audiences: [agentproxy], public_key_file: issuer.pem, algorithms: [RS256]}}]
policy_files: [{slug}-policy.yaml]
decision_log: stdout
{store}{audit}"""
    )
    return path


async def build(
    d: Path,
    slug: str,
    feature: str,
    store_name: str,
    redis_url: str | None,
    token: str,
    sink: object,
) -> Setup:
    """One configuration as `agentproxy run` assembles it, its state prepared."""
    config = runtime_module.load_config(config_text(d, slug, feature, redis_url))
    runtime = await runtime_module.build(config)
    metrics = Metrics(())
    store = make_store(config.store)
    audit = None
    if config.audit.enabled:
        audit = AuditTrail(audit_settings(config), on_drop=metrics.audit_dropped.inc)
    services = assemble.services(
        config, store, SYSTEM, metrics=metrics, stopping=asyncio.Event(), audit=audit
    )
    decision_log = DecisionLog("stdout", stream=sink)  # type: ignore[arg-type]
    assemble.wire_approvals(
        services.approvals,
        metrics=metrics,
        decision_log=lambda: decision_log,
        audit=audit,
        notifier=None,
    )
    await store.start()
    if feature.startswith("revocations"):
        for i in range(REVOKED):
            await store.revoke(Revocation("agent", f"revoked-agent-{i}"))
            await store.revoke(Revocation("token", f"revoked-token-{i}"))
    await services.revocations.refresh()
    if audit is not None:
        await audit.start()
    pipeline = assemble.build(runtime, services, decision_log)
    loop = asyncio.get_running_loop()
    setup = Setup(
        feature,
        store_name,
        pipeline,
        services,
        token,
        TASK if feature == "task history" else None,
        decision_log,
        [
            loop.create_task(services.revocations.run()),
            loop.create_task(services.approvals.run()),
        ],
    )
    if feature.startswith("approvals"):
        await grant(setup)
    return setup


async def one_call(setup: Setup) -> Call:
    pipeline = setup.pipeline
    clock = pipeline.clock
    action, _, upstream = pipeline.runtime.describe_http("GET", PATH)
    call = start_call(
        action,
        upstream.name,
        started=clock.monotonic(),
        now=clock.now(),
        bearer=setup.token,
        declared_task=setup.task,
        refusal=None,
    )
    await pipeline.run(call, BenchExchange(pipeline))
    return call


async def grant(setup: Setup) -> None:
    """Asks once (pending), approves as alice: later identical calls pass on the grant."""
    call = await one_call(setup)
    if not isinstance(call.refusal, ApprovalRefused) or call.refusal.approval_id is None:
        raise RuntimeError(f"approvals: expected a pending approval, got {call.refusal!r}")
    await setup.services.approvals.decide(
        call.refusal.approval_id, Event.APPROVE, Principal(agent="alice"), ""
    )


async def measure(setup: Setup, runs: Runs, calls: int, redis_pid: int | None) -> None:
    """One round: `calls` one at a time (wall µs per call), then `calls` with 16 in flight
    (process CPU µs per call, and redis-server's)."""
    started = time.perf_counter()
    for _ in range(calls):
        check(setup, await one_call(setup))
        # A served call returns to the loop (the socket); so must these, or the trail's
        # writer and the revocation mirror would never run between calls.
        await asyncio.sleep(0)
    runs.latency.append((time.perf_counter() - started) / calls * 1e6)

    async def worker(n: int) -> None:
        for _ in range(n):
            check(setup, await one_call(setup))
            await asyncio.sleep(0)

    redis_before = cpu_seconds(redis_pid) if redis_pid else 0.0
    cpu = time.process_time()
    await asyncio.gather(*(worker(calls // 16) for _ in range(16)))
    runs.cpu.append((time.process_time() - cpu) / (calls // 16 * 16) * 1e6)
    if redis_pid:
        used = cpu_seconds(redis_pid) - redis_before
        runs.redis_cpu.append(used / (calls // 16 * 16) * 1e6)


def check(setup: Setup, call: Call) -> None:
    """Every measured call is forwarded: a refusal means the bench measures the wrong path."""
    if call.refusal is not None or call.status != 200:
        raise RuntimeError(f"{setup.store_name} {setup.name}: call refused: {call.refusal!r}")


def start_redis(port: int) -> subprocess.Popen[bytes]:
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "no", "--databases", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    wait_port(port, proc=proc)
    # Others' tests start Redis servers on free ports too: if one took this port first, ours
    # exited and the bench must not measure theirs.
    answering = redis.Redis(host="127.0.0.1", port=port).info("server")["process_id"]
    if answering != proc.pid:
        proc.terminate()
        raise RuntimeError(f"port {port} is another process's Redis (pid {answering})")
    return proc


def report(results: dict[tuple[str, str], Runs], args: argparse.Namespace) -> str:
    base = results[("memory", BASELINE)]
    base_cpu = best(base.cpu, high=False)
    base_lat = best(base.latency, high=False)
    rows = []
    for (store_name, feature), s in results.items():
        cpu = best(s.cpu, high=False)
        lat = best(s.latency, high=False)
        redis = f"{best(s.redis_cpu, high=False):.0f}" if s.redis_cpu else "–"
        rows.append(
            [
                feature,
                store_name,
                f"{cpu:.0f}",
                f"{cpu - base_cpu:+.0f}",
                f"{cpu / base_cpu:.2f}",
                f"{lat:.0f}",
                f"{lat - base_lat:+.0f}",
                f"{lat / base_lat:.2f}",
                redis,
            ]
        )
    header = [
        "feature",
        "store",
        "CPU µs/call",
        "added",
        "× baseline",
        "latency µs",
        "added",
        "× baseline",
        "redis-server CPU µs/call",
    ]
    return "\n".join(
        [
            f"# The cost of state ({machine()})",
            "",
            "`make bench-state` (`bench/state_cost.py --calls "
            f"{args.calls} --rounds {args.rounds}`). The full pipeline as `agentproxy run` "
            "assembles it (RS256 token verified once then cached, the CEL rule, revocation "
            "check, decision log, metrics, signed context token), without sockets; the "
            "baseline is that pipeline with the memory store and no stateful feature on, and "
            "every other row adds one feature. CPU µs/call: this process's CPU per call with "
            "16 calls in flight (Redis: its client side; redis-server's own is the last "
            "column). Latency: wall time per call, one call at a time (with Redis: the round "
            f"trips). Best of {args.rounds} alternating rounds of {args.calls} calls each; "
            "each configuration is built, warmed up, measured and stopped on its own in each "
            "round, so no other configuration's background work (revocation mirror, audit "
            "writer) runs meanwhile. "
            "`Redis, none`: the store configured, no feature on (the revocation mirror "
            "refreshes in the background).",
            "",
            table(header, rows, "llrrrrrrr"),
            "",
        ]
    )


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000, help="calls per round and mode")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--name", default="state_cost", help="results file name")
    parser.add_argument("--only", default="", help="only features whose name contains this")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is missing: apt-get install redis-server", file=sys.stderr)
        return 1
    d = Path(tempfile.mkdtemp(prefix="ap-state-"))
    (d / "secret").write_text("bench-secret\n")
    issuer = Issuer.create(d)
    token = issuer.mint("hr-bot", roles=["hr"], dept="hr")
    port = free_port()
    server = start_redis(port)
    features = [f for f in FEATURES if args.only in f or f == BASELINE]
    configs = [(store, f) for store in ("memory", "Redis") for f in features]
    results = {config: Runs() for config in configs}
    with open("/dev/null", "wb") as sink:  # noqa: ASYNC230 - opened once, before measuring
        try:
            for r in range(args.rounds):
                for i, (store_name, feature) in enumerate(configs):
                    # A fresh database per configuration and round: no state carried over.
                    url = f"redis://127.0.0.1:{port}/{r * len(configs) + i}"
                    slug = f"r{r}-{i}"
                    redis_url = url if store_name == "Redis" else None
                    print(f"  {store_name}, {feature}", flush=True)
                    # A configuration that hangs is named, not waited for.
                    async with asyncio.timeout(STEP_TIMEOUT):
                        setup = await build(d, slug, feature, store_name, redis_url, token, sink)
                    try:
                        async with asyncio.timeout(STEP_TIMEOUT):
                            await measure(setup, Runs(), 200, None)  # caches, pools, the token
                            pid = server.pid if redis_url else None
                            await measure(setup, results[(store_name, feature)], args.calls, pid)
                    finally:
                        async with asyncio.timeout(STEP_TIMEOUT):
                            await setup.stop()
                print(f"round {r + 1} of {args.rounds} done", flush=True)
        finally:
            server.terminate()
            server.wait(10)
    write_result(args.name, report(results, args))
    return 0


if __name__ == "__main__":
    # The proxy's own event loop (agentproxy run uses uvloop).
    raise SystemExit(uvloop.run(main()))
