"""What the gRPC data plane keeps per upstream across calls and reloads: its channel, and what
its methods are (from a descriptor set file, or fetched once by reflection)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import grpc
from grpc import aio

from agentproxy.clock import SYSTEM, Clock
from agentproxy.config.model import Upstream
from agentproxy.errors import Unavailable
from agentproxy.protocols import grpc as adapter
from agentproxy.proxy.runtime import Runtime

log = logging.getLogger("agentproxy.grpc")

# How long a failed reflection fetch is not retried (calls needing it get UNAVAILABLE).
REFLECTION_RETRY = 5.0

Methods = Mapping[str, adapter.Method]


class Channels:
    """One channel per upstream, shared by every call to it and kept across reloads (a
    changed URL or message limit gets a new channel)."""

    def __init__(self) -> None:
        self._channels: dict[str, tuple[Upstream, aio.Channel]] = {}
        self._retired: list[aio.Channel] = []

    def get(self, upstream: Upstream) -> aio.Channel:
        known = self._channels.get(upstream.name)
        if known is not None and _same_channel(known[0], upstream):
            return known[1]
        if known is not None:
            self._retired.append(known[1])  # calls in flight may still use it
        channel = open_channel(upstream)
        self._channels[upstream.name] = (upstream, channel)
        return channel

    async def close(self) -> None:
        for channel in [c for _, c in self._channels.values()] + self._retired:
            await channel.close()
        self._channels.clear()
        self._retired.clear()


def _same_channel(a: Upstream, b: Upstream) -> bool:
    return a.url == b.url and a.max_message_bytes == b.max_message_bytes


def target_of(url: str) -> tuple[str, bool]:
    """`grpc://host:port` → (`host:port`, tls?)."""
    parts = urlsplit(url)
    tls = parts.scheme in ("grpcs", "https")
    port = parts.port or (443 if tls else 80)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}", tls


def open_channel(upstream: Upstream) -> aio.Channel:
    target, tls = target_of(upstream.url)
    options = [
        ("grpc.max_send_message_length", upstream.max_message_bytes),
        ("grpc.max_receive_message_length", upstream.max_message_bytes),
        # The caller decides whether to retry; a proxy that retried could repeat a write.
        ("grpc.enable_retries", 0),
        ("grpc.primary_user_agent", "agentproxy"),
    ]
    if tls:
        return aio.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
    return aio.insecure_channel(target, options=options)


class Descriptors:
    """What each gRPC upstream's methods are: from its descriptor set file (read into the
    runtime), or fetched once from its reflection service (`descriptor_set: reflection`),
    until the next reload. A failed fetch is retried after REFLECTION_RETRY; meanwhile calls
    to that upstream are refused (UNAVAILABLE): policy may need their args."""

    def __init__(self, clock: Clock = SYSTEM) -> None:
        self._clock = clock
        self._methods: dict[str, Methods] = {}
        self._failed: dict[str, float] = {}
        self._lock = asyncio.Lock()

    def forget(self) -> None:
        """After a reload: the next call to each upstream fetches its descriptors again (a
        redeployed upstream may have new methods)."""
        self._methods.clear()
        self._failed.clear()

    def known(self, runtime: Runtime, upstream: Upstream) -> Methods | None:
        """The upstream's methods as far as known without fetching (None: not described)."""
        if upstream.reflection:
            return self._methods.get(upstream.url)
        return runtime.grpc_methods.get(upstream.name)

    async def methods(self, runtime: Runtime, upstream: Upstream) -> Methods | None:
        """The upstream's methods (None: it has no descriptor set). Raises Unavailable when
        its reflection service cannot be read."""
        if not upstream.reflection:
            return runtime.grpc_methods.get(upstream.name)
        return await self._reflect(upstream)

    async def _reflect(self, upstream: Upstream) -> Methods:
        key = upstream.url
        found = self._methods.get(key)
        if found is not None:
            return found
        async with self._lock:
            found = self._methods.get(key)
            if found is not None:
                return found
            failed = self._failed.get(key)
            if failed is not None and self._clock.monotonic() - failed < REFLECTION_RETRY:
                raise Unavailable(
                    f"the descriptors of upstream {upstream.name} could not be fetched by "
                    "reflection; retrying shortly",
                    component="descriptor",
                )
            try:
                files = await asyncio.to_thread(fetch_descriptors, upstream)
                found = adapter.methods_of(files)
            except (grpc.RpcError, adapter.DescriptorError) as exc:
                self._failed[key] = self._clock.monotonic()
                log.error("reflection on upstream %s failed: %s", upstream.name, exc)
                raise Unavailable(
                    f"the descriptors of upstream {upstream.name} could not be fetched by "
                    "reflection",
                    component="descriptor",
                ) from None
            self._methods[key] = found
            self._failed.pop(key, None)
            log.info("upstream %s: %d methods described by reflection", upstream.name, len(found))
            return found


def fetch_descriptors(upstream: Upstream) -> list[Any]:
    """Every file (with its imports) that defines a service the upstream's reflection
    service lists. Blocking: run it in a thread. Raises grpc.RpcError."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    target, tls = target_of(upstream.url)
    channel = (
        grpc.secure_channel(target, grpc.ssl_channel_credentials())
        if tls
        else grpc.insecure_channel(target)
    )
    try:
        database = ProtoReflectionDescriptorDatabase(channel)
        files: dict[str, Any] = {}
        wanted = [database.FindFileContainingSymbol(s) for s in database.get_services()]
        while wanted:
            file = wanted.pop()
            if file.name in files:
                continue
            files[file.name] = file
            wanted.extend(database.FindFileByName(d) for d in file.dependency if d not in files)
        return list(files.values())
    finally:
        channel.close()
