"""The proxy process: its services, its listeners, the current pipeline, reload and shutdown.

Everything the stages share is built whole in `__init__` (nothing is filled in later), the
pipeline in `start()` once the runtime snapshot is built (JWKS may need fetching), and a
reload builds a new snapshot and pipeline or keeps the old ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

from aiohttp import web
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from agentproxy.admin.grpc import add_admin_services
from agentproxy.admin.server import admin_app
from agentproxy.approvals.notify import Notifier, Webhook
from agentproxy.audit.decision_log import DecisionLog
from agentproxy.audit.records import redaction_paths
from agentproxy.audit.settings import AuditSettings
from agentproxy.audit.sinks import AuditError
from agentproxy.audit.trail import AuditTrail
from agentproxy.clock import SYSTEM, Clock
from agentproxy.config import Config, ConfigError
from agentproxy.config.model import StoreSettings
from agentproxy.metering.metrics import Metrics
from agentproxy.proxy import assemble
from agentproxy.proxy import runtime as runtime_module
from agentproxy.proxy.backend import ProxyBackend
from agentproxy.proxy.grpc import GrpcDataPlane
from agentproxy.proxy.grpc_upstreams import Channels, Descriptors
from agentproxy.proxy.http_plane import HttpDataPlane
from agentproxy.proxy.listener import ConnectionBounds, HttpListener
from agentproxy.proxy.pins import McpState
from agentproxy.proxy.pipeline import Pipeline
from agentproxy.proxy.upstream import UpstreamClient
from agentproxy.proxy.watch import watch
from agentproxy.store import MemoryStore, Store, StoreError
from agentproxy.telemetry import tracing

log = logging.getLogger("agentproxy")
HealthServicer = health_aio.HealthServicer

SHUTDOWN_GRACE = 10.0
# How often a proxy that started without its store tries to reach it again.
STORE_RETRY = 1.0


class ProxyServer:
    def __init__(
        self,
        config: Config,
        *,
        watch_interval: float | None = 1.0,
        reuse_port: bool = False,
        clock: Clock = SYSTEM,
    ) -> None:
        """`watch_interval`: how often config and policy files are checked for changes
        (None: only SIGHUP and `reload()` reload). `reuse_port`: several worker processes
        share the listeners (SO_REUSEPORT; the kernel spreads connections among them).
        `clock`: what every stage, the store and the approval service read the time from.

        Raises ValueError when the metering attribution does not compile (`validate` says so
        first)."""
        self.config = config
        self.clock = clock
        self._reuse_port = reuse_port
        self._watch_interval = watch_interval
        self._stopping = asyncio.Event()
        metrics = Metrics(tuple(name for name, _ in config.metering.attribution))
        store = make_store(config.store)
        self.decision_log = DecisionLog(config.decision_log, clock=clock)
        audit = None
        if config.audit.enabled:
            audit = AuditTrail(
                audit_settings(config), on_drop=metrics.audit_dropped.inc, clock=clock
            )
        self.notifier = _notifier(config)
        # One tracer for the life of the process (a changed `telemetry:` needs a restart).
        self.tracing = tracing(config.telemetry, on_drop=metrics.telemetry_dropped.inc)
        if self.tracing is not None:
            exporter = self.tracing.exporter
            log.info(
                "tracing: OTLP %s to %s, sampling %g (parent-based)",
                exporter.protocol,
                exporter.endpoint or "the OTEL_EXPORTER_OTLP_* endpoint",
                exporter.ratio,
            )
        self.services = assemble.services(
            config,
            store,
            clock,
            metrics=metrics,
            stopping=self._stopping,
            audit=audit,
            tracing=self.tracing,
        )
        assemble.wire_approvals(
            self.services.approvals,
            metrics=metrics,
            decision_log=lambda: self.decision_log,
            audit=audit,
            notifier=self.notifier,
        )
        self.upstream_client = UpstreamClient()
        self.channels = Channels()
        self.descriptors = Descriptors(clock)
        self.backend = ProxyBackend(self, self.services, self.descriptors)
        self._pipeline: Pipeline | None = None
        self._explainer: Pipeline | None = None
        self._tasks: list[asyncio.Task[None]] = []  # the revocation mirror, approval expiry
        self._watcher: asyncio.Task[None] | None = None
        self._runners: list[web.BaseRunner] = []  # the admin listener's
        self._http: HttpListener | None = None
        self._grpc_servers: list[aio.Server] = []
        self._health: HealthServicer | None = None
        self._ready = False
        self._store_up = False
        self.http_port = 0
        self.admin_port = 0
        self.grpc_port = 0
        self.admin_grpc_port = 0
        self.ext_authz_port = 0

    @property
    def store(self) -> Store:
        return self.services.store

    @property
    def metrics(self) -> Metrics:
        return self.services.metrics

    @property
    def registry(self) -> CollectorRegistry:
        return self.services.metrics.exposition

    @property
    def mcp(self) -> McpState:
        return self.services.mcp

    @property
    def pipeline(self) -> Pipeline:
        """The data plane's pipeline for the snapshot in force."""
        if self._pipeline is None:
            raise RuntimeError("the proxy has not started")
        return self._pipeline

    @property
    def explainer(self) -> Pipeline:
        """The explain pipeline for the snapshot in force."""
        if self._explainer is None:
            raise RuntimeError("the proxy has not started")
        return self._explainer

    def is_ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Builds the runtime and the pipeline, starts the services, then opens the listeners.
        Raises ConfigError or Unavailable."""
        try:
            runtime = await runtime_module.build(self.config)
        except Exception:
            self.metrics.policy_reloads.labels("failure").inc()
            raise
        self.metrics.policy_reloads.labels("success").inc()
        services = self.services
        store_up = self._store_up = await self._connect_store(first=True)
        if services.audit is not None:
            await services.audit.start()
        if self.notifier is not None:
            await self.notifier.start()
        self._use(runtime)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(services.revocations.run()))
        self._tasks.append(loop.create_task(services.approvals.run()))
        await self._listen()
        if self._watch_interval is not None:
            self._watcher = loop.create_task(
                watch(
                    lambda: self.config,
                    lambda: self.config.policy_globs,
                    self.reload,
                    self._watch_interval,
                )
            )
        if store_up:
            self._ready = True
        else:
            self._tasks.append(loop.create_task(self._reconnect_store()))

    async def _connect_store(self, *, first: bool = False) -> bool:
        """Starts the store and loads the revocations. False while the store cannot be
        reached: a proxy started before its Redis serves not ready (`/readyz` 503; calls
        that need the store are refused closed) instead of exiting, and connects when Redis
        answers. Said once, naming what was tried, never as a traceback."""
        try:
            await self.services.store.start()
            await self.services.revocations.refresh()
        except StoreError as exc:
            if first:
                log.warning(
                    "store unreachable at start (%s): serving not ready, retrying every %gs",
                    exc,
                    STORE_RETRY,
                )
            return False
        return True

    async def _reconnect_store(self) -> None:
        while True:
            await asyncio.sleep(STORE_RETRY)
            if await self._connect_store():
                break
        log.info("store reached: ready")
        self._store_up = True
        self._ready = not self._stopping.is_set()
        if self._health is not None and self._ready:
            await self._health.set("", health_pb2.HealthCheckResponse.SERVING)

    def _use(self, runtime: runtime_module.Runtime) -> None:
        """Makes `runtime` the snapshot in force: new pipelines, built whole, swapped in."""
        pipeline = assemble.build(runtime, self.services, self.decision_log)
        explainer = assemble.build_explain(runtime, self.services)
        self._pipeline, self._explainer = pipeline, explainer

    async def _listen(self) -> None:
        listen = self.config.listen
        data_plane = HttpDataPlane(lambda: self.pipeline, self.upstream_client, self.mcp)
        admin = web.AppRunner(
            admin_app(self.backend, self.clock),
            access_log=None,
            keepalive_timeout=listen.idle_timeout,
        )
        bounds = ConnectionBounds(
            "http",
            self.metrics,
            max_connections=listen.max_connections,
            header_timeout=listen.header_timeout,
            idle_timeout=listen.idle_timeout,
        )
        await admin.setup()
        self._runners.append(admin)
        reuse = self._reuse_port or None
        admin_site = web.TCPSite(admin, listen.admin.host, listen.admin.port, reuse_port=reuse)
        await admin_site.start()
        self.admin_port = _bound_port(admin)
        # Bodies pass through as sent (a gzip body stays gzip, with its Content-Encoding and
        # length); the MCP and LLM adapters decode what they authorize. No access log: the
        # decision log records every call (an access log would write an ?access_token= in
        # clear).
        self._http = HttpListener(data_plane.handle, bounds, self.clock)
        self.http_port = await self._http.start(
            listen.http.host, listen.http.port, reuse_port=self._reuse_port
        )
        if listen.grpc is not None:
            await self._start_grpc(str(listen.grpc))
        if listen.admin_grpc is not None:
            await self._start_admin_grpc(str(listen.admin_grpc))
        if listen.ext_authz is not None:
            await self._start_ext_authz(str(listen.ext_authz))

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
        # Like /readyz: not serving while the store has not been reached.
        status = health_pb2.HealthCheckResponse
        await self._health.set("", status.SERVING if self._store_up else status.NOT_SERVING)

    async def _start_admin_grpc(self, address: str) -> None:
        """agentproxy.v1.Authorizer and Approvals, with the health service too."""
        server = aio.server(options=[("grpc.so_reuseport", 1 if self._reuse_port else 0)])
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        add_admin_services(server, self.backend)
        self.admin_grpc_port = _bind(server, address)
        await server.start()
        self._grpc_servers.append(server)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def _start_ext_authz(self, address: str) -> None:
        """Envoy's ext_authz v3 (gRPC), with the health service: the decision service behind
        a gateway, on the pipeline of the snapshot in force."""
        from agentproxy.proxy.ext_authz import add_authorization_service

        largest = max((u.max_body_bytes for u in self.config.upstreams), default=1 << 20)
        server = aio.server(
            options=[
                # Envoy sends the body it buffered (with_request_body) inside the Check.
                ("grpc.max_receive_message_length", largest + (1 << 20)),
                ("grpc.so_reuseport", 1 if self._reuse_port else 0),
            ]
        )
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        add_authorization_service(server, lambda: self.pipeline)
        self.ext_authz_port = _bind(server, address)
        await server.start()
        self._grpc_servers.append(server)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def reload(self, path: Path | None = None) -> bool:
        """Builds a complete new snapshot from the config file, or keeps the current one.

        Calls in flight finish under the pipeline they started with. Listener addresses, the
        store, the audit trail and metering are read at start only. Returns whether the new
        snapshot took effect.
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
        for section in ("listen", "store", "audit", "metering"):
            if getattr(config, section) != getattr(self.config, section):
                log.warning("%s settings changed; they take effect at the next restart", section)
        if config.decision_log != self.config.decision_log:
            self.decision_log.flush()
            self.decision_log = DecisionLog(config.decision_log, clock=self.clock)
        self.config = config
        self._use(runtime)
        self.descriptors.forget()
        self.metrics.policy_reloads.labels("success").inc()
        log.info("reloaded: policy version %s", runtime.policy.version)
        return True

    async def stop(self) -> None:
        """Not ready first, then stop accepting, let calls in flight finish (held approval
        calls are answered "pending" at once), flush the audit trail, close upstreams."""
        self._ready = False
        self._stopping.set()
        if self._watcher is not None:
            await _cancel(self._watcher)  # no reload while shutting down
            self._watcher = None
        # The data planes first (reversed start order): they stop accepting and let calls in
        # flight finish within SHUTDOWN_GRACE; the admin listener answers not-ready meanwhile.
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        http, self._http = self._http, None
        await asyncio.gather(
            *(server.stop(SHUTDOWN_GRACE) for server in self._grpc_servers),
            *((http.close(SHUTDOWN_GRACE),) if http is not None else ()),
        )
        for runner in self._runners:
            await runner.cleanup()
        self._grpc_servers.clear()
        self._runners.clear()
        for task in self._tasks:
            await _cancel(task)
        self._tasks.clear()
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
        self.decision_log.flush()
        if self.tracing is not None:
            # Sends what is queued; off the loop, since the exporter's calls block.
            await asyncio.to_thread(self.tracing.close)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _notifier(config: Config) -> Notifier | None:
    if not config.approvals.webhooks:
        return None
    return Notifier(
        [Webhook(h.url, h.secret.value if h.secret else None) for h in config.approvals.webhooks],
        ui_url=config.approvals.ui_url,
        on_failure=lambda host: log.error("approval webhook to %s failed", host),
    )


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
        redact=redaction_paths(audit.redact),
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
