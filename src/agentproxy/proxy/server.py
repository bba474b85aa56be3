"""The proxy process: listeners, the current runtime snapshot, reload and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from agentproxy.admin.grpc import WATCH_QUEUE, add_admin_services
from agentproxy.admin.server import admin_app, operator_allowed
from agentproxy.approvals.authorize import check_approver
from agentproxy.approvals.lifecycle import Approval, Event, State
from agentproxy.approvals.notify import Notifier, Webhook
from agentproxy.audit.decision_log import DecisionLog
from agentproxy.audit.settings import AuditSettings
from agentproxy.audit.sinks import AuditError
from agentproxy.audit.trail import AuditTrail
from agentproxy.config import Config, ConfigError
from agentproxy.config.model import StoreSettings
from agentproxy.core import Principal
from agentproxy.errors import Denied
from agentproxy.identity.revocations import RevocationList
from agentproxy.metering.meter import Meter
from agentproxy.metering.metrics import Metrics
from agentproxy.protocols.grpc import Method as GrpcMethod
from agentproxy.proxy import runtime as runtime_module
from agentproxy.proxy.explain import explain
from agentproxy.proxy.grpc import GrpcDataPlane
from agentproxy.proxy.grpc_upstreams import Channels, Descriptors
from agentproxy.proxy.http import HttpDataPlane, McpState
from agentproxy.proxy.pipeline import Pipeline, Services
from agentproxy.proxy.upstream import UpstreamClient
from agentproxy.proxy.watch import watch
from agentproxy.store import MemoryStore, Revocation, Store, StoreError

log = logging.getLogger("agentproxy")
HealthServicer = health_aio.HealthServicer

# Request lines and header fields up to 16 KiB reach us (aiohttp refuses longer ones with 400
# itself); tokens have their own, lower limit (`identity.max_token_bytes`).
MAX_FIELD = 16 * 1024
SHUTDOWN_GRACE = 10.0


class ProxyServer:
    def __init__(
        self, config: Config, *, watch_interval: float | None = 1.0, reuse_port: bool = False
    ) -> None:
        """`watch_interval`: how often config and policy files are checked for changes
        (None: only SIGHUP and `reload()` reload). `reuse_port`: several worker processes
        share the listeners (SO_REUSEPORT; the kernel spreads connections among them)."""
        self.config = config
        self._reuse_port = reuse_port
        self._watch_interval = watch_interval
        self._watcher: asyncio.Task[None] | None = None
        self._approval_watch: asyncio.Task[None] | None = None
        # Approvals this replica opened, by when they expire (to report their expiry once).
        self._opened: dict[str, float] = {}
        self._approval_watchers: set[asyncio.Queue[tuple[str, Approval]]] = set()
        self.notifier: Notifier | None = None
        self.metrics = Metrics(tuple(name for name, _ in config.metering.attribution))
        self.store = make_store(config.store)
        self.services = Services(
            store=self.store,
            revocations=RevocationList(
                self.store,
                shared=config.store.redis is not None,
                on_error=lambda op: self.metrics.store_errors.labels(op).inc(),
            ),
            metrics=self.metrics,
            decision_log=DecisionLog(config.decision_log),
            on_error=config.store.on_error,
            task_ttl=config.store.task_ttl,
        )
        self._refresher: asyncio.Task[None] | None = None
        self.upstream_client = UpstreamClient()
        self.mcp = McpState(
            on_tool_change=lambda upstream, tool: self.metrics.tool_changes.labels(
                upstream, tool
            ).inc()
        )
        self.channels = Channels()
        self.descriptors = Descriptors()
        self._pipeline: Pipeline | None = None
        self._runners: list[web.BaseRunner] = []
        self._grpc_servers: list[aio.Server] = []
        self._health: HealthServicer | None = None
        self._ready = False
        self.http_port = 0
        self.admin_port = 0
        self.grpc_port = 0
        self.admin_grpc_port = 0

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise RuntimeError("the proxy has not started")
        return self._pipeline

    @property
    def decision_log(self) -> DecisionLog:
        return self.services.decision_log

    def is_ready(self) -> bool:
        return self._ready

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.exposition

    def jwks(self) -> dict[str, Any]:
        return self.pipeline.runtime.signer.jwks()

    async def operator(self, token: str) -> Principal:
        principal = await self.pipeline.runtime.verifier.verify(token, time.time())
        operator_allowed(principal, self.config.admin.operators)
        return principal

    async def explain(
        self, token: str, request: str, task: str | None, args: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return await explain(
            self.pipeline.runtime,
            token,
            request,
            time.time(),
            task=task,
            store=self.store,
            args=args,
        )

    def policy_version(self) -> str:
        return self.pipeline.runtime.policy.version

    async def accept_tool(self, upstream: str, tool: str) -> str | None:
        return self.mcp.pins.accept(upstream, tool)

    async def approver(self, token: str) -> Principal:
        return await self.pipeline.runtime.verifier.verify(token, time.time())

    def is_operator(self, principal: Principal) -> bool:
        try:
            operator_allowed(principal, self.config.admin.operators)
        except Denied:
            return False
        return True

    async def list_approvals(self, state: str | None) -> list[Approval]:
        return await self.store.list_approvals(state, time.time())

    async def get_approval(self, approval_id: str) -> Approval | None:
        return await self.store.get_approval(approval_id, time.time())

    async def decide_approval(
        self, approval_id: str, event: Event, principal: Principal, reason: str
    ) -> Approval:
        """Checks the approver (four-eyes), applies the event everywhere, tells everyone."""
        now = time.time()
        approval = await self.store.get_approval(approval_id, now)
        if approval is None:
            raise KeyError(approval_id)
        check_approver(principal, approval)
        decided = await self.store.decide_approval(approval_id, event, principal.agent, reason, now)
        self._approval_event(decided.state.value, decided)
        return decided

    def _approval_event(self, event: str, approval: Approval) -> None:
        """An approval event: a metric, a decision log line, an audit record, a webhook."""
        if event == "requested":
            self._opened[approval.id] = approval.expires
        if event in ("approved", "denied", "expired"):
            self.metrics.approvals.labels(event).inc()
        record = {"kind": "approval", "event": event, **approval.to_json()}
        self.services.decision_log.write_event(record)
        if self.services.audit is not None:
            self.services.audit.submit(record)
        if self.notifier is not None:
            self.notifier.notify(event, approval)
        for queue in self._approval_watchers:
            with contextlib.suppress(asyncio.QueueFull):  # a slow watcher catches up by polling
                queue.put_nowait((event, approval))

    async def grpc_method(self, service: str, path: str) -> GrpcMethod | None:
        runtime = self.pipeline.runtime
        methods = await self.descriptors.methods(runtime, runtime.route_grpc(service))
        return methods.get(path) if methods is not None else None

    def subscribe_approvals(self) -> asyncio.Queue[tuple[str, Approval]]:
        queue: asyncio.Queue[tuple[str, Approval]] = asyncio.Queue(maxsize=WATCH_QUEUE)
        self._approval_watchers.add(queue)
        return queue

    def unsubscribe_approvals(self, queue: asyncio.Queue[tuple[str, Approval]]) -> None:
        self._approval_watchers.discard(queue)

    async def _watch_approvals(self) -> None:
        """Every second: the pending gauge (counted, not listed: lists stop at a limit), and
        the expiry of approvals this replica opened once their time is up (each replica
        reports its own, so a fleet does not count one expiry N times)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                now = time.time()
                self.metrics.approvals_pending.set(await self.store.count_pending(now))
                await self._report_expired(now)
            except StoreError as exc:
                self.metrics.store_errors.labels("approvals").inc()
                log.warning("cannot read pending approvals: %s", exc)

    async def _report_expired(self, now: float) -> None:
        due = [aid for aid, expires in self._opened.items() if expires <= now]
        for approval_id in due:
            approval = await self.store.get_approval(approval_id, now)  # expires it if due
            if approval is not None and approval.state is State.PENDING:
                continue  # a clock between replicas; asked again next second
            del self._opened[approval_id]
            if approval is not None and approval.state is State.EXPIRED:
                self._approval_event("expired", approval)

    async def revoke(self, revocation: Revocation) -> None:
        """Writes to the store (the fleet sees it within a second) and applies it here now."""
        await self.store.revoke(revocation)
        await self.services.revocations.refresh(time.time())
        log.warning("revoked %s %s until %s", revocation.kind, revocation.subject, revocation.until)

    async def start(self) -> None:
        """Builds the runtime, then opens the listeners. Raises ConfigError or Unavailable."""
        try:
            runtime = await runtime_module.build(self.config)
        except Exception:
            self.metrics.policy_reloads.labels("failure").inc()
            raise
        self.metrics.policy_reloads.labels("success").inc()
        await self.store.start()
        if self.config.audit.enabled:
            trail = AuditTrail(audit_settings(self.config), on_drop=self.metrics.audit_dropped.inc)
            await trail.start()
            self.services.audit = trail
            self.services.audit_required = self.config.audit.required
        await self.services.revocations.refresh(time.time())
        self._refresher = asyncio.get_running_loop().create_task(self.services.revocations.run())
        if self.config.approvals.webhooks:
            self.notifier = Notifier(
                [
                    Webhook(h.url, h.secret.value if h.secret else None)
                    for h in self.config.approvals.webhooks
                ],
                ui_url=self.config.approvals.ui_url,
                on_failure=lambda host: log.error("approval webhook to %s failed", host),
            )
            await self.notifier.start()
        self.services.approvals = self.config.approvals
        self.services.meter = Meter(self.config.metering, self.metrics)
        self.services.notify = self._approval_event
        self._approval_watch = asyncio.get_running_loop().create_task(self._watch_approvals())
        self._pipeline = Pipeline(runtime, self.services)
        data_plane = HttpDataPlane(lambda: self.pipeline, self.upstream_client, self.mcp)
        listen = self.config.listen
        admin = web.AppRunner(admin_app(self), access_log=None)
        http = web.ServerRunner(
            # auto_decompress=False: bodies pass through as sent (a gzip body stays gzip, with
            # its Content-Encoding and length); the MCP adapter decodes what it authorizes.
            web.Server(
                data_plane.handle,
                max_field_size=MAX_FIELD,
                max_line_size=MAX_FIELD,
                auto_decompress=False,
            ),
            access_log=None,
            shutdown_timeout=SHUTDOWN_GRACE,
        )
        for runner in (admin, http):
            await runner.setup()
            self._runners.append(runner)
        reuse = self._reuse_port or None
        admin_site = web.TCPSite(admin, listen.admin.host, listen.admin.port, reuse_port=reuse)
        http_site = web.TCPSite(http, listen.http.host, listen.http.port, reuse_port=reuse)
        await admin_site.start()
        await http_site.start()
        self.admin_port = _bound_port(admin)
        self.http_port = _bound_port(http)
        if listen.grpc is not None:
            await self._start_grpc(str(listen.grpc))
        if listen.admin_grpc is not None:
            await self._start_admin_grpc(str(listen.admin_grpc))
        if self._watch_interval is not None:
            self._watcher = asyncio.get_running_loop().create_task(
                watch(
                    lambda: self.config,
                    lambda: self.config.policy_globs,
                    self.reload,
                    self._watch_interval,
                )
            )
        self._ready = True

    async def _start_grpc(self, address: str) -> None:
        """The gRPC data plane, with the standard health service (no token needed: probes
        send none). The listener's message limit is the largest of the upstreams'; each
        upstream's own limit is applied per call."""
        largest = max(
            (u.max_message_bytes for u in self.config.upstreams if u.is_grpc),
            default=4 * 1024 * 1024,
        )
        server = aio.server(
            options=[
                ("grpc.max_receive_message_length", largest),
                ("grpc.max_send_message_length", largest),
                ("grpc.so_reuseport", 1 if self._reuse_port else 0),
            ],
        )
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        server.add_generic_rpc_handlers(
            (GrpcDataPlane(lambda: self.pipeline, self.channels, self.descriptors),)
        )
        self.grpc_port = _bind(server, address)
        await server.start()
        self._grpc_servers.append(server)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def _start_admin_grpc(self, address: str) -> None:
        """agentproxy.v1.Authorizer and Approvals, with the health service too."""
        server = aio.server(options=[("grpc.so_reuseport", 1 if self._reuse_port else 0)])
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        add_admin_services(server, self)
        self.admin_grpc_port = _bind(server, address)
        await server.start()
        self._grpc_servers.append(server)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def reload(self, path: Path | None = None) -> bool:
        """Builds a complete new snapshot from the config file, or keeps the current one.

        Calls in flight finish under the snapshot they started with. Listener addresses are
        read at start only. Returns whether the new snapshot took effect.
        """
        try:
            config = runtime_module.load_config(path or self.config.source)
            runtime = await runtime_module.build(config)
        except ConfigError as exc:
            self.metrics.policy_reloads.labels("failure").inc()
            log.error("reload rejected, the previous policy stays in force:\n%s", exc)
            return False
        except Exception as exc:
            self.metrics.policy_reloads.labels("failure").inc()
            log.error("reload failed, the previous policy stays in force: %s", exc)
            return False
        if config.listen != self.config.listen:
            log.warning("listen addresses changed; they take effect at the next restart")
        if config.store != self.config.store:
            log.warning("store settings changed; they take effect at the next restart")
        if config.decision_log != self.config.decision_log:
            self.services.decision_log.flush()
            self.services.decision_log = DecisionLog(config.decision_log)
        if config.audit != self.config.audit:
            log.warning("audit settings changed; they take effect at the next restart")
        self.services.on_error = config.store.on_error
        self.services.approvals = config.approvals
        self.services.task_ttl = config.store.task_ttl
        self.config = config
        self._pipeline = Pipeline(runtime, self.services)
        self.descriptors.forget()
        self.metrics.policy_reloads.labels("success").inc()
        log.info("reloaded: policy version %s", runtime.policy.version)
        return True

    async def stop(self) -> None:
        """Not ready first, then stop accepting, let calls in flight finish (held approval
        calls are answered "pending" at once), flush the audit trail, close upstreams."""
        self._ready = False
        self.services.stopping.set()
        if self._watcher is not None:
            self._watcher.cancel()  # no reload while shutting down
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        # The data planes first (reversed start order): they stop accepting and let calls in
        # flight finish within SHUTDOWN_GRACE; the admin listener answers not-ready meanwhile.
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        admin, data_planes = self._runners[:1], self._runners[1:]  # admin started first
        await asyncio.gather(
            *(server.stop(SHUTDOWN_GRACE) for server in self._grpc_servers),
            *(runner.cleanup() for runner in data_planes),
        )
        for runner in admin:
            await runner.cleanup()
        self._grpc_servers.clear()
        self._runners.clear()
        for task in (self._refresher, self._approval_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.notifier is not None:
            await self.notifier.close()
        await self.upstream_client.close()
        await self.channels.close()
        if self.services.audit is not None:
            try:
                await self.services.audit.close()  # flushes what is queued
            except AuditError as exc:
                log.error("audit: records lost at shutdown: %s", exc)
        await self.store.close()
        self.services.decision_log.flush()


def audit_settings(config: Config) -> AuditSettings:
    """One chain per writer: the host name (a pod name is stable across restarts, so the
    chain continues), and with --workers a file and chain per worker."""
    audit = config.audit
    worker = os.environ.get("AGENTPROXY_WORKER")
    replica = socket.gethostname() + (f"-w{worker}" if worker else "")
    file = audit.file
    if file is not None and worker:
        file = file.with_name(f"{file.stem}.w{worker}{file.suffix}")
    return AuditSettings(
        file=file,
        stdout=audit.stdout,
        redis_stream=audit.redis_stream,
        redis=config.store.redis,
        hmac_key=audit.hmac_key.value if audit.hmac_key else None,
        signing_key_file=audit.signing_key_file,
        checkpoint_every=audit.checkpoint_every,
        required=audit.required,
        max_file_bytes=audit.max_file_bytes,
        rotate_every=audit.rotate_every,
        replica=replica,
        redact=audit.redact,
    )


def make_store(settings: StoreSettings) -> Store:
    """No `store.redis`: the embedded memory store."""
    if settings.redis is None:
        return MemoryStore()
    from agentproxy.store.redis import RedisStore

    return RedisStore(settings.redis)


def _bind(server: aio.Server, address: str) -> int:
    """Raises OSError when the address cannot be bound (grpcio only says port 0)."""
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address} (gRPC)")
    return port


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return 0
