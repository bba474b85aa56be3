"""`agentproxy run | validate | token`. Every command exits non-zero on failure and says what
to change."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentproxy import config as config_module
from agentproxy import startup
from agentproxy.clock import SYSTEM
from agentproxy.config import Config, ConfigError
from agentproxy.errors import Unavailable
from agentproxy.proxy import runtime as runtime_module

if TYPE_CHECKING:
    from agentproxy.proxy.assemble import Services

log = logging.getLogger("agentproxy")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="agentproxy", description="Authorization proxy for AI agents."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("--config", required=True, type=Path, help="path to agentproxy.yaml")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the ports (SO_REUSEPORT); more than 1 needs store.redis",
    )
    run.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)

    validate = commands.add_parser(
        "validate", help="check a config and its policies; print every problem"
    )
    validate.add_argument("--config", required=True, type=Path)

    token = commands.add_parser("token", help="mint a test token (demo and development only)")
    token.add_argument(
        "--key", required=True, type=Path, help="issuer private key (PEM) or HMAC secret file"
    )
    token.add_argument("--issuer", required=True)
    token.add_argument("--audience", required=True)
    token.add_argument("--agent", required=True, help="the acting agent")
    token.add_argument(
        "--for-user", help="the user the agent acts for (RFC 8693: sub=user, act.sub=agent)"
    )
    token.add_argument(
        "--via", action="append", default=[], help="an earlier actor in the chain (repeatable)"
    )
    token.add_argument("--role", action="append", default=[], help="a role (repeatable)")
    token.add_argument("--task", help="task id claim")
    token.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="K=V",
        help="an extra claim (repeatable; V as JSON if it parses, else a string), "
        "e.g. parent_task=plan-1",
    )
    token.add_argument("--ttl", default="15m", help='lifetime, e.g. "15m"')

    revoke = commands.add_parser(
        "revoke", help="put an agent, a user or a token on the fleet's deny list"
    )
    revoke.add_argument("--config", required=True, type=Path)
    who = revoke.add_mutually_exclusive_group(required=True)
    who.add_argument("--agent", help="the agent id (token sub, or act.sub when delegated)")
    who.add_argument("--user", help="a user: every token acting for them (sub when delegated)")
    who.add_argument("--token-id", help="one token's jti")
    revoke.add_argument(
        "--until", help='RFC 3339 time or a duration from now ("24h"); default: for good'
    )
    revoke.add_argument("--reason", default="")

    explain = commands.add_parser("explain", help="why a call would be allowed or denied")
    explain.add_argument("--config", required=True, type=Path)
    explain.add_argument("--token", required=True, help="the caller's bearer token")
    explain.add_argument(
        "--request",
        required=True,
        help='e.g. "GET /v1/employees/42", "grpc /hr.v1.Employees/Get", "mcp tools/call lookup"',
    )
    explain.add_argument(
        "--args", help="gRPC request fields or MCP arguments, as a JSON object", default=None
    )
    explain.add_argument(
        "--body",
        help="an HTTP call's body as sent (or @FILE), read as args like the data plane reads it",
    )
    explain.add_argument(
        "--content-type",
        default="application/json",
        help="the body's Content-Type (application/json, application/x-www-form-urlencoded)",
    )
    explain.add_argument("--task", help="a declared task id (X-Agentproxy-Task)")
    explain.add_argument("--json", action="store_true", help="machine-readable output")

    policy = commands.add_parser("policy", help="policy tools")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    policy_test = policy_commands.add_parser("test", help="run the *_test.yaml suites in DIR")
    policy_test.add_argument("dir", type=Path)
    policy_test.add_argument("--verbose", "-v", action="store_true", help="list passing cases too")

    audit = commands.add_parser("audit", help="audit trail tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser("verify", help="check hash chains and signed checkpoints")
    verify.add_argument("files", nargs="+", type=Path)
    verify.add_argument(
        "--key", type=Path, help="Ed25519 key (public or private PEM) of checkpoints"
    )
    query = audit_commands.add_parser("query", help="filter audit records (JSONL out)")
    query.add_argument("files", nargs="+", type=Path)
    for name in ("agent", "user", "task", "action", "effect"):
        query.add_argument(f"--{name}")
    query.add_argument("--since", help="RFC 3339 time, or a duration back from now (24h)")
    query.add_argument("--until", help="RFC 3339 time, or a duration back from now")
    trace = audit_commands.add_parser(
        "trace", help="a task's chain from the trail: agents, subtasks, actions, approvals"
    )
    trace.add_argument("task")
    trace.add_argument("files", nargs="+", type=Path)
    trace.add_argument("--json", action="store_true", help="the tree as JSON")
    audit_hash = audit_commands.add_parser(
        "hash", help="the HMAC a redacted value would have (is it this value?)"
    )
    audit_hash.add_argument("--key", type=Path, required=True, help="audit.hmac_key_file")
    audit_hash.add_argument("value", help="the value, as JSON if it parses as JSON, else a string")

    approvals = commands.add_parser("approvals", help="list and decide pending approvals")
    approval_commands = approvals.add_subparsers(dest="approvals_command", required=True)
    for name, text in (
        ("list", "pending approvals you may decide"),
        ("show", "one approval"),
        ("approve", "approve one"),
        ("deny", "deny one"),
    ):
        sub = approval_commands.add_parser(name, help=text)
        sub.add_argument("--admin", required=True, help="admin URL, e.g. http://127.0.0.1:9901")
        sub.add_argument("--token", required=True, help="your own bearer token (approver)")
        if name == "list":
            sub.add_argument(
                "--state", default="pending", choices=["pending", "approved", "denied", "expired"]
            )
        else:
            sub.add_argument("id")
        if name in ("approve", "deny"):
            sub.add_argument("--reason", default="")

    budgets = commands.add_parser("budgets", help="what the spend limits have left")
    budget_commands = budgets.add_subparsers(dest="budgets_command", required=True)
    show = budget_commands.add_parser("show", help="each budget's window, used and remaining")
    show.add_argument("--admin", required=True, help="admin URL, e.g. http://127.0.0.1:9901")
    show.add_argument("--token", required=True, help="an operator's bearer token")
    show.add_argument("--json", action="store_true", help="machine-readable output")

    keys = commands.add_parser("keys", help="key material for a deployment")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_commands.add_parser(
        "generate", help="write the context, audit signing and audit HMAC keys into DIR"
    )
    generate.add_argument("dir", type=Path)

    tools = commands.add_parser("tools", help="MCP tool pinning")
    tools_commands = tools.add_subparsers(dest="tools_command", required=True)
    accept = tools_commands.add_parser("accept", help="accept a changed tool's new definition")
    accept.add_argument("--admin", required=True, help="admin URL, e.g. http://127.0.0.1:9901")
    accept.add_argument("--token", required=True, help="an operator's bearer token")
    accept.add_argument("--upstream", required=True)
    accept.add_argument("--tool", required=True)

    args = parser.parse_args(argv)
    if args.command == "run":
        if args.workers > 1:
            return _run_workers(args.config, args.log_level, args.workers)
        return _run(args.config, args.log_level, worker=args.worker)
    if args.command == "validate":
        return _validate(args.config)
    if args.command == "revoke":
        return asyncio.run(_revoke(args))
    if args.command == "explain":
        return asyncio.run(_explain(args))
    if args.command == "policy":
        return _policy_test(args.dir, args.verbose)
    if args.command == "audit":
        return _audit(args)
    if args.command == "budgets":
        return asyncio.run(_budgets_show(args))
    if args.command == "keys":
        return _keys_generate(args.dir)
    if args.command == "tools":
        return asyncio.run(_tools_accept(args))
    if args.command == "approvals":
        return asyncio.run(_approvals(args))
    return _token(args)


def _validate(path: Path) -> int:
    try:
        config = runtime_module.load_config(path)
        policy = runtime_module.check(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print(f"{len(exc.issues)} problem(s) found", file=sys.stderr)
        return 1
    upstreams, rules = len(config.upstreams), len(policy.rules)
    print(f"{path}: ok ({upstreams} upstream(s), {rules} rule(s), policy version {policy.version})")
    return 0


def _run_workers(path: Path, level: str, workers: int) -> int:
    """Starts `workers` processes on the same ports and supervises them: signals are passed
    on, and if one dies the rest are stopped (the orchestrator restarts the pod)."""
    import os
    import subprocess
    import tempfile

    try:
        config = runtime_module.load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if config.store.redis is None:
        print(
            f"--workers {workers} needs store.redis: each worker is its own process, and the "
            "embedded memory store (revocations, limits, task history) is per process",
            file=sys.stderr,
        )
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="agentproxy-metrics-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    command = [
        sys.executable,
        "-m",
        "agentproxy",
        "run",
        "--config",
        str(path),
        "--log-level",
        level,
        "--worker",
    ]
    children: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    # Before any worker exists: a signal while they start is passed on to those started,
    # never the default action (SIGHUP's would kill the supervisor).
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for i in range(workers):
        children.append(subprocess.Popen(command, env=dict(env, AGENTPROXY_WORKER=str(i))))
    code = 0
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.2)
        code = next(c.returncode for c in children if c.returncode is not None)
        forward(signal.SIGTERM, None)
        for child in children:
            child.wait()
    finally:
        import shutil

        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


def _run(path: Path, level: str, *, worker: bool = False) -> int:
    startup.remember_hups()  # again, for callers of main() that did not come through __main__
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = runtime_module.load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional on platforms it does not support
        log.info("uvloop not available; using the default event loop")
    try:
        return asyncio.run(_serve(config, reuse_port=worker))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except Unavailable as exc:
        print(f"cannot start: {exc.detail}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    except (ImportError, ValueError) as exc:  # tracing without the otel extra, a bad OTEL_*
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1


def tune_gc() -> None:
    """The garbage collector as a started proxy runs it (bench/scale.py times `decide()` so)."""
    # What start-up built (modules, the compiled policy, CEL programs) lives as long as the
    # process: frozen, full collections no longer walk it. Under audit load they came every
    # second or so and paused the loop ~28 ms each (bench/http_overhead.py's p99).
    gc.collect()
    gc.freeze()
    # A call leaves no cyclic garbage behind (measured: collections free nothing under load),
    # so young collections every 700 allocations only cost; every 10,000 is still often.
    gc.set_threshold(10_000, 10, 10)


async def _serve(config: config_module.Config, *, reuse_port: bool = False) -> int:
    from agentproxy.proxy.server import ProxyServer

    server = ProxyServer(config, reuse_port=reuse_port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    wanted = asyncio.Event()  # a reload asked for; SIGHUPs that come during one make one more

    async def reloader() -> None:
        while True:
            await wanted.wait()
            wanted.clear()
            await server.reload()

    # Installed before any listener opens, so no signal finds the defaults (SIGHUP's kills);
    # one asked for while starting runs once the proxy serves.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, wanted.set)
    await server.start()
    if startup.HUPS:
        startup.HUPS.clear()
        wanted.set()
    reloads = asyncio.create_task(reloader())
    tune_gc()
    listen = config.listen
    grpc = ""
    if listen.grpc is not None:
        grpc += f", gRPC {listen.grpc.host}:{server.grpc_port}"
    if listen.admin_grpc is not None:
        grpc += f", admin gRPC {listen.admin_grpc.host}:{server.admin_grpc_port}"
    log.info(
        "agentproxy ready: data plane http://%s:%d, admin http://%s:%d%s (policy version %s)",
        listen.http.host,
        server.http_port,
        listen.admin.host,
        server.admin_port,
        grpc,
        server.pipeline.runtime.policy.version,
    )
    await stop.wait()
    log.info("shutting down")
    reloads.cancel()
    await server.stop()
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    from agentproxy.admin.server import BadAdminRequest, parse_until
    from agentproxy.proxy.server import make_store
    from agentproxy.store import Revocation, StoreError
    from agentproxy.store.base import RevocationKind

    try:
        config = runtime_module.load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if config.store.redis is None:
        print(
            "this config uses the embedded memory store, which lives inside the running proxy:\n"
            "  revoke through its admin API (POST /v1/revocations with an operator token),\n"
            "  or configure store.redis so that the CLI and the whole fleet share revocations",
            file=sys.stderr,
        )
        return 1
    try:
        until = parse_until(args.until, SYSTEM.now())
        kind: RevocationKind = "agent" if args.agent else "user" if args.user else "token"
        revocation = Revocation(kind, args.agent or args.user or args.token_id, until, args.reason)
    except (BadAdminRequest, ValueError) as exc:
        print(f"cannot revoke: {exc}", file=sys.stderr)
        return 1
    store = make_store(config.store)
    try:
        await store.start()
        await store.revoke(revocation)
    except StoreError as exc:
        print(f"cannot revoke: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    when = "for good" if revocation.until == float("inf") else f"until {args.until}"
    print(
        f"revoked {revocation.kind} {revocation.subject} {when}; every proxy refuses it within 1s"
    )
    return 0


async def _explain(args: argparse.Namespace) -> int:
    import orjson

    from agentproxy.errors import Refusal
    from agentproxy.proxy import assemble
    from agentproxy.proxy.explain import explain
    from agentproxy.store import StoreError

    try:
        config = runtime_module.load_config(args.config)
        runtime = await runtime_module.build(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except Unavailable as exc:
        print(f"cannot explain: {exc.detail}", file=sys.stderr)
        return 1
    call_args = None
    if args.args is not None:
        try:
            call_args = orjson.loads(args.args)
        except orjson.JSONDecodeError as exc:
            print(f"--args is not JSON: {exc}", file=sys.stderr)
            return 2
        if not isinstance(call_args, dict):
            print("--args must be a JSON object", file=sys.stderr)
            return 2
    body = None
    if args.body is not None:
        try:
            body = (
                await asyncio.to_thread(Path(args.body[1:]).read_bytes)
                if args.body.startswith("@")
                else args.body.encode("utf-8")
            )
        except OSError as exc:
            print(f"--body {args.body}: {exc}", file=sys.stderr)
            return 2
    services = _explain_services(config)
    try:
        await services.store.start()
        # A fleet's revocations live in its Redis; the memory store is the running proxy's
        # own, so a CLI explain with it knows none (the admin API's explain does).
        await services.revocations.refresh()
        pipeline = assemble.build_explain(runtime, services)
        result = await explain(
            pipeline,
            args.token,
            args.request,
            task=args.task,
            args=call_args,
            body=body,
            content_type=args.content_type,
        )
    except Refusal as exc:
        print(
            f"the proxy would refuse this call before deciding: {exc.status} {exc.detail}",
            file=sys.stderr,
        )
        return 1
    except StoreError as exc:
        print(f"cannot read the decision store: {exc}", file=sys.stderr)
        return 1
    finally:
        await services.store.close()
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(result["text"])
    return 0


def _explain_services(config: Config) -> Services:
    """What the explain stages read, over the configured store."""
    from agentproxy.metering.metrics import Metrics
    from agentproxy.proxy import assemble
    from agentproxy.proxy.server import make_store

    return assemble.services(
        config,
        make_store(config.store),
        SYSTEM,
        metrics=Metrics(tuple(name for name, _ in config.metering.attribution)),
        stopping=asyncio.Event(),
    )


def _policy_test(directory: Path, verbose: bool) -> int:
    from agentproxy.core import Action
    from agentproxy.policy.testing import format_report, run_dir
    from agentproxy.protocols.request_line import describe_line

    def describe_request(line: str, body: bytes | None, content_type: str | None) -> Action:
        # No upstream is running: gRPC arguments are taken as written, an HTTP body is read
        # by its Content-Type (JSON if none is given).
        return describe_line(
            line, None, lambda service, path: None, body=body, content_type=content_type
        )

    if not directory.is_dir():
        print(f"{directory} is not a directory", file=sys.stderr)
        return 1
    try:
        report = run_dir(directory, describe_request, runtime_module.builtin_rules())
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(format_report(report, verbose=verbose))
    return 1 if report.failed else 0


def _audit(args: argparse.Namespace) -> int:
    import orjson

    if args.audit_command == "verify":
        from agentproxy.audit.keys import load_public_key
        from agentproxy.audit.verify import verify

        try:
            key = load_public_key(args.key) if args.key else None
        except (OSError, ValueError) as exc:
            print(f"cannot read the checkpoint key: {exc}", file=sys.stderr)
            return 1
        report = verify(args.files, key)
        for note in report.notes:
            print(f"note: {note}")
        for problem in report.problems:
            print(problem, file=sys.stderr)
        if report.omitted:
            print(f"... and {report.omitted} more problem(s)", file=sys.stderr)
        chains = ", ".join(f"{c} (to seq {s})" for c, s in sorted(report.chains.items()))
        verdict = "ok" if report.ok else "FAILED"
        print(
            f"{verdict}: {report.records} record(s), {report.checkpoints} checkpoint(s); "
            f"chains: {chains or 'none'}"
        )
        if key is None and report.checkpoints:
            print("note: checkpoint signatures not checked (give --key)")
        return 0 if report.ok else 1
    if args.audit_command == "query":
        from agentproxy.admin.server import BadAdminRequest
        from agentproxy.audit.query import query

        now = SYSTEM.now()
        try:
            since = _moment(args.since, now)
            until = _moment(args.until, now)
        except BadAdminRequest as exc:
            print(f"invalid time: {exc.detail}", file=sys.stderr)
            return 1
        try:
            for record in query(
                args.files,
                agent=args.agent,
                user=args.user,
                task=args.task,
                action=args.action,
                effect=args.effect,
                since=since,
                until=until,
            ):
                sys.stdout.buffer.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        except OSError as exc:
            print(f"cannot read: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.audit_command == "trace":
        from agentproxy.audit.tree import records, render, task_tree

        try:
            tree = task_tree(args.task, records(args.files))
        except OSError as exc:
            print(f"cannot read: {exc}", file=sys.stderr)
            return 1
        if tree is None:
            print(f"no record names task {args.task!r}", file=sys.stderr)
            return 1
        if args.json:
            sys.stdout.buffer.write(orjson.dumps(tree.to_json(), option=orjson.OPT_INDENT_2))
            sys.stdout.buffer.write(b"\n")
        else:
            print(render(tree))
        return 0
    from agentproxy.audit.chain import hmac_value

    try:
        key = args.key.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        print(f"cannot read the key: {exc}", file=sys.stderr)
        return 1
    try:
        value = orjson.loads(args.value)
    except orjson.JSONDecodeError:
        value = args.value
    print(hmac_value(key, value))
    return 0


async def _approvals(args: argparse.Namespace) -> int:
    import aiohttp
    import orjson

    base = args.admin.rstrip("/") + "/v1/approvals"
    headers = {"Authorization": f"Bearer {args.token}"}
    command = args.approvals_command
    if command == "list":
        method, url, body = "GET", f"{base}?state={args.state}&limit=1000", None
    elif command == "show":
        method, url, body = "GET", f"{base}/{args.id}", None
    else:
        method, url, body = "POST", f"{base}/{args.id}/{command}", {"reason": args.reason}
    listed: list[dict[str, Any]] = []
    try:
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.request(method, url, json=body, headers=headers) as response:
                    payload = await response.read()
                    status = response.status
                try:
                    data = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    data = {"detail": payload.decode(errors="replace")}
                if status != 200 or command != "list":
                    break
                listed += data["approvals"]
                # A list comes in pages: follow them to the end.
                if not data.get("next_cursor"):
                    break
                url = f"{base}?state={args.state}&limit=1000&cursor={data['next_cursor']}"
    except aiohttp.ClientError as exc:
        print(f"cannot reach {args.admin}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(
            f"{command} failed ({status}): {data.get('detail') or data.get('error') or data}",
            file=sys.stderr,
        )
        return 1
    if command == "list":
        data = {"approvals": listed}
        for a in data["approvals"]:
            print(approval_lines(a))
        if not data["approvals"]:
            print(f"no {args.state} approvals you may see")
    else:
        sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


def approval_lines(a: dict[str, Any]) -> str:
    """One approval as `approvals list` prints it: who (with the delegation chain) wants what,
    times in RFC 3339 (UTC), the task and upstream, and what the grant is bound to."""
    import orjson

    from agentproxy.clock import rfc3339

    user = f" for {a['user']}" if a.get("user") else ""
    via = f" (via {' → '.join(a['chain'])})" if a.get("chain") else ""
    query = f"  query {orjson.dumps(a['query']).decode()}" if a.get("query") else ""
    digest = str(a.get("arguments_sha256") or "")[:16]
    lines = [
        f"{a['id']}  {a['state']:8}  {a['agent']}{user}{via}  {a['action']}  "
        f"rule {a['rule']}: {a['reason']}",
        f"    created {rfc3339(a['created'])}  expires {rfc3339(a['expires'])}"
        f"  task {a.get('task') or '-'}  upstream {a.get('upstream') or '-'}",
        f"    arguments {orjson.dumps(a['summary']).decode()}"
        f" ({a.get('arguments_bytes', 0)} bytes, sha256 {digest}…;"
        f" `approvals show` has them whole){query}",
    ]
    quorum = int(a.get("quorum") or 1)
    if quorum > 1:
        votes = a.get("votes") or []
        given = ", ".join(f"{v['by']} at {rfc3339(v['at'])}" for v in votes) or "none yet"
        lines.append(f"    approvals {len(votes)} of {quorum}: {given}")
    return "\n".join(lines)


async def _budgets_show(args: argparse.Namespace) -> int:
    import aiohttp
    import orjson

    url = args.admin.rstrip("/") + "/v1/budgets"
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, headers={"Authorization": f"Bearer {args.token}"}) as response,
        ):
            payload = await response.read()
            status = response.status
    except aiohttp.ClientError as exc:
        print(f"cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"refused ({status}): {payload.decode(errors='replace')}", file=sys.stderr)
        return 1
    data = orjson.loads(payload)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    for budget in data["budgets"]:
        print(
            f"{budget['limit']}: {budget['spend']:g} {budget['currency']} per {budget['window']}"
            f" (rules {', '.join(budget['rules'])})"
        )
        for counter in budget["counters"] or []:
            print(
                f"    {counter['key']}  used {counter['used']:.6g}  remaining "
                f"{counter['remaining']:.6g}  window {counter['window_start']} to "
                f"{counter['window_end']}"
            )
        if not budget["counters"]:
            print("    nothing spent in this window")
    return 0


def _keys_generate(directory: Path) -> int:
    from agentproxy.identity.issue import DEPLOYMENT_KEYS, generate_deployment_keys

    try:
        paths = generate_deployment_keys(directory)
    except FileExistsError as exc:
        print(f"nothing written: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot write keys into {directory}: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"{path}  {DEPLOYMENT_KEYS[path.name]}")
    print(
        "\nIn agentproxy.yaml:\n"
        f"  context_token: {{signing_key_file: {paths[0]}}}\n"
        f"  audit: {{file: …, signing_key_file: {paths[1]}, hmac_key_file: {paths[3]}}}\n"
        "Keep the private files secret (mounted from a Secret in Kubernetes); publish the"
        " .pub.pem to whoever verifies the trail."
    )
    return 0


async def _tools_accept(args: argparse.Namespace) -> int:
    import aiohttp

    url = args.admin.rstrip("/") + "/v1/tools/accept"
    body = {"upstream": args.upstream, "tool": args.tool}
    headers = {"Authorization": f"Bearer {args.token}"}
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=body, headers=headers) as response,
        ):
            text = await response.text()
            if response.status != 200:
                print(f"not accepted ({response.status}): {text}", file=sys.stderr)
                return 1
    except aiohttp.ClientError as exc:
        print(f"cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    print(text)
    return 0


def _moment(text: str | None, now: float) -> float | None:
    """An RFC 3339 time, or a duration meaning that long before `now`."""
    if text is None:
        return None
    from agentproxy.admin.server import parse_until
    from agentproxy.config.yamldoc import parse_duration

    seconds = parse_duration(text)
    if seconds is not None:
        return now - seconds
    return parse_until(text, now)


def _set_claim(claims: dict[str, Any], name: str, value: Any) -> bool:
    """Sets `name`, a dotted path (`realm_access.roles` nests, as Keycloak writes it)
    unless it is a URI-style name (`https://example.com/roles`, Auth0's namespaced claims).
    False when the path runs into a value that is not an object."""
    steps = [name] if "/" in name or ":" in name else name.split(".")
    at = claims
    for step in steps[:-1]:
        inner = at.setdefault(step, {})
        if not isinstance(inner, dict):
            return False
        at = inner
    at[steps[-1]] = value
    return True


def _token(args: argparse.Namespace) -> int:
    from agentproxy.config.yamldoc import parse_duration
    from agentproxy.identity.issue import mint_token

    ttl = parse_duration(args.ttl)
    if ttl is None:
        print(f'invalid --ttl {args.ttl!r} (write e.g. "15m")', file=sys.stderr)
        return 1
    import orjson

    extra: dict[str, Any] = {}
    for pair in args.claim:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            print(f"invalid --claim {pair!r} (write K=V)", file=sys.stderr)
            return 1
        try:
            value: Any = orjson.loads(text)
        except orjson.JSONDecodeError:
            value = text
        if not _set_claim(extra, name, value):
            print(f"invalid --claim {pair!r}: {name} is already set another way", file=sys.stderr)
            return 1
    if args.task:
        extra["task"] = args.task
    if args.via and not args.for_user:
        print("--via needs --for-user: a delegation chain acts for a user", file=sys.stderr)
        return 1
    # `--via` lists earlier actors earliest first; nested `act` claims put the latest outside.
    actors = [args.agent, *reversed(args.via)] if args.for_user else []
    subject = args.for_user or args.agent
    try:
        token = mint_token(
            key_file=args.key,
            issuer=args.issuer,
            audience=args.audience,
            subject=subject,
            actors=actors,
            roles=args.role,
            ttl=ttl,
            claims=extra,
            now=SYSTEM.now(),
        )
    except (OSError, ValueError) as exc:
        print(f"cannot mint token: {exc}", file=sys.stderr)
        return 1
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
