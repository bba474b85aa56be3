"""How a `RedisStore` reaches Redis: a single server (`url`), the master that Redis Sentinel
names, or a Redis Cluster. Valkey speaks the same protocol and needs nothing of its own.

Every topology gives the store the same two things: `commands`, the pooled client its calls
use, and `listener()`, a client for its one approval subscription, which never takes a
connection from the calls.

- Sentinel: redis-py asks the sentinels for the master's address whenever a connection opens
  (and drops idle ones when it changes), and a connection that meets `READONLY` (the old
  master, demoted) is closed; so a failover costs the calls in flight and those of the next
  few seconds (refused closed, `StoreError`), and nothing more.
- Cluster: calls are routed by key slot; `MOVED`/`ASK` redirections are followed (the command
  did not run), connection errors are not retried (it may have). Classic `PUBLISH` is
  broadcast to every node of a Cluster, so the subscription may live on any node: each
  (re)subscription takes the next known node, so losing one moves it elsewhere. The store
  keeps the keys a script touches together in one slot (see `store/redis.py`).

No retries anywhere: a command may already have run when its reply is lost, and a retried
`INCRBYFLOAT` would count twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from agentproxy.config.model import RedisSettings


def parse_node(node: str) -> tuple[str, int]:
    """ "host:port" (the loader has checked it) as a pair; raises ValueError."""
    host, _, port = node.rpartition(":")
    return host.strip("[]"), int(port)


class Topology:
    """The clients of one store. Builds nothing that connects: the first command does.

    Raises ValueError if the settings cannot be turned into clients (a bad URL).
    """

    def __init__(self, settings: RedisSettings, pool_wait: float) -> None:
        self.cluster = bool(settings.cluster_nodes)
        password = None if settings.password is None else settings.password.value.decode()
        common: dict[str, Any] = {
            "socket_timeout": settings.timeout,
            "socket_connect_timeout": settings.timeout,
            "retry": Retry(NoBackoff(), 0),
            # With maintenance notifications (on by default for RESP3), redis-py stops
            # checking a pooled connection for the server's close before reusing it, so the
            # first calls after a Redis restart would fail; it also relaxes timeouts to
            # seconds during a "maintenance". We need neither.
            "maint_notifications_config": MaintNotificationsConfig(enabled=False),
            "decode_responses": True,
        }
        self._common = common
        self._password = password
        self._seeds = [parse_node(n) for n in settings.cluster_nodes]
        self._next = 0
        self._sentinel: Sentinel | None = None
        self._service: str | None = None
        self._listener: Redis | None = None
        self.commands: Redis | RedisCluster
        if settings.sentinel is not None:
            spassword = settings.sentinel.password
            self._sentinel = Sentinel(
                [parse_node(n) for n in settings.sentinel.nodes],
                sentinel_kwargs={
                    "password": None if spassword is None else spassword.value.decode(),
                    "socket_timeout": settings.timeout,
                    "socket_connect_timeout": settings.timeout,
                    "retry": Retry(NoBackoff(), 0),
                    "decode_responses": True,
                },
                password=password,
                **common,
            )
            service = settings.sentinel.service
            self._service = service
            self.commands = self._sentinel.master_for(service, max_connections=settings.pool_size)
            self._listener = self._sentinel.master_for(service, max_connections=1)
        elif self.cluster:
            self.commands = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in self._seeds],
                max_connections=settings.pool_size,
                password=password,
                require_full_coverage=True,
                **common,
            )
        else:
            self.commands = Redis.from_pool(self._pool(settings.url, settings.pool_size, pool_wait))
            self._listener = Redis.from_pool(self._pool(settings.url, 1, pool_wait))

    def _pool(self, url: str, size: int, wait: float) -> BlockingConnectionPool:
        """Raises ValueError if the URL cannot be parsed."""
        return BlockingConnectionPool.from_url(
            url, max_connections=size, timeout=wait, **self._common
        )

    @asynccontextmanager
    async def listener(self) -> AsyncIterator[Redis]:
        """A client for one subscription. On a Cluster, a new one on the next known node
        (closed after); otherwise the store's one listener."""
        if self._listener is not None:
            yield self._listener
            return
        assert isinstance(self.commands, RedisCluster)
        known = [(n.host, int(n.port)) for n in self.commands.get_nodes()] or self._seeds
        host, port = known[self._next % len(known)]
        self._next += 1
        client = Redis(
            host=host,
            port=port,
            password=self._password,
            single_connection_client=True,
            **self._common,
        )
        try:
            yield client
        finally:
            await client.aclose()

    async def moved(self, pubsub: Any) -> bool:
        """Whether the subscription's connection is no longer on the master Sentinel names
        (a failover demoted it: it stays connected and hears only what reaches a replica).
        False off Sentinel, and when the sentinels cannot say (the master may be fine)."""
        if self._sentinel is None or self._service is None:
            return False
        connection = pubsub.connection
        if connection is None:
            return False
        try:
            host, port = await self._sentinel.discover_master(self._service)
        except (RedisError, OSError):
            return False
        return (connection.host, int(connection.port)) != (host, int(port))

    async def aclose(self) -> None:
        if self._listener is not None:
            await self._listener.aclose()
        await self.commands.aclose()
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()
