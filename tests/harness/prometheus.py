"""A real Prometheus (Debian's `prometheus` package) for tests: scrapes one target every second.

    async with run_prometheus("127.0.0.1:9901", tmp_path) as prometheus:
        result = await prometheus.wait_for('sum by (agent) (agentproxy_cost_total)', bool)
        assert sample_value(result) == 0.0123

The first scrape comes about 5 s after start (see FAST_RELOAD), then one a second. Each
instance has its own config, TSDB directory and free loopback port, and logs to
`<directory>/prometheus.log` (quoted in every failure). Without the binary the calling test
fails, naming the package to install: a metering suite that silently skips its scrape test
proves nothing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
import yaml

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
BIND_ATTEMPTS = 3
# Prometheus's discovery manager hands targets to the scrape manager every 5 s, and the scrape
# manager applies them on its own ticker (5 s unless this hidden flag shortens it): so the
# first scrape comes about 5 s after start, not 10. Dropped if a release no longer has it.
FAST_RELOAD = ("--scrape.discovery-reload-interval=100ms",)

Result = list[dict[str, Any]]


class PrometheusError(RuntimeError):
    """The Prometheus HTTP API answered with an error (bad PromQL, server trouble)."""


def find_prometheus() -> Path:
    """The binary: `$PROMETHEUS`, else `prometheus` on PATH. Fails the test when missing."""
    candidate = os.environ.get("PROMETHEUS") or shutil.which("prometheus")
    if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
        return Path(candidate)
    pytest.fail(
        "prometheus is missing: install Debian's prometheus package "
        "(apt-get install prometheus, or `make system-deps`), or set $PROMETHEUS",
        pytrace=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample_value(result: Result) -> float:
    """The value of a one-sample instant-vector result. Raises AssertionError otherwise."""
    assert len(result) == 1, f"expected one sample, got {result}"
    return float(result[0]["value"][1])


def write_config(directory: Path, target: str, metrics_path: str, scrape_interval: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    scrape = {
        "job_name": "agentproxy",
        "metrics_path": metrics_path,
        "static_configs": [{"targets": [target]}],
    }
    # The timeout may not exceed the interval (a config error otherwise).
    timing = {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval}
    config.write_text(yaml.safe_dump({"global": timing, "scrape_configs": [scrape]}))
    return config


def open_log(directory: Path) -> IO[bytes]:
    return (directory / "prometheus.log").open("ab")


class Prometheus:
    """A running Prometheus. Build it with `start` (or `run_prometheus`); `stop` it once."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        url: str,
        directory: Path,
        log: IO[bytes],
        session: aiohttp.ClientSession,
    ) -> None:
        self.process = process
        self.url = url
        self.directory = directory
        self._log = log
        self._session = session

    @classmethod
    async def start(
        cls,
        target: str,
        directory: Path,
        *,
        metrics_path: str = "/metrics",
        scrape_interval: str = "1s",
    ) -> Prometheus:
        """Start scraping `target` ("host:port") and return once `/-/ready` answers 200.

        Fails the test when the binary is missing; raises RuntimeError when it exits or is
        not ready within READY_TIMEOUT (with the log's tail)."""
        binary = find_prometheus()
        config = write_config(directory, target, metrics_path, scrape_interval)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            tuning = list(FAST_RELOAD)
            # free_port() can race another process for the port: retry on a bind failure.
            for attempt in range(1, BIND_ATTEMPTS + 1):
                port = free_port()
                log = open_log(directory)
                try:
                    process = await asyncio.create_subprocess_exec(
                        str(binary),
                        f"--config.file={config}",
                        f"--storage.tsdb.path={directory / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--log.level=warn",
                        *tuning,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                    )
                except BaseException:
                    log.close()
                    raise
                prometheus = cls(process, f"http://127.0.0.1:{port}", directory, log, session)
                ready = False
                try:
                    ready = await prometheus._wait_ready()
                finally:
                    if not ready:
                        await prometheus._terminate()
                        log.close()
                if ready:
                    return prometheus
                log_text = prometheus.log()
                if tuning and "unknown long flag" in log_text:
                    tuning = []
                elif attempt == BIND_ATTEMPTS or "address already in use" not in log_text:
                    raise RuntimeError(f"prometheus did not become ready:\n{prometheus.log()}")
        except BaseException:
            await session.close()
            raise
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and self.process.returncode is None:
            try:
                async with self._session.get(f"{self.url}/-/ready") as response:
                    if response.status == 200:
                        return True
            except aiohttp.ClientError:
                pass  # not listening yet
            await asyncio.sleep(0.05)
        return False

    def log(self) -> str:
        path = self.directory / "prometheus.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    async def query(self, promql: str) -> Result:
        """An instant query (`/api/v1/query`): the `result` list of a vector, or a scalar or
        string wrapped as `[{"metric": {}, "value": [t, v]}]`. Raises PrometheusError when
        the API reports an error (bad PromQL included)."""
        async with self._session.get(
            f"{self.url}/api/v1/query", params={"query": promql}
        ) as response:
            answer = await response.json()
        if answer.get("status") != "success":
            raise PrometheusError(f"{promql!r}: {answer.get('errorType')}: {answer.get('error')}")
        data: dict[str, Any] = answer["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: Result = data["result"]
        return result

    async def wait_for(
        self,
        promql: str,
        predicate: Callable[[Result], bool] = bool,
        # Not asyncio.timeout: the AssertionError below carries the last result and the scrape's
        # health, which a bare TimeoutError would lose.
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> Result:
        """Query every 0.2 s until `predicate(result)` holds, and return that result.

        Raises AssertionError on timeout, with the last result and the scrape's health."""
        deadline = time.monotonic() + timeout
        while True:
            result = await self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{promql!r} did not satisfy the predicate within {timeout}s; last result: "
                    f"{result}; targets: {await self.targets()}"
                )
            await asyncio.sleep(0.2)

    async def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their health and last error (`/api/v1/targets`)."""
        async with self._session.get(f"{self.url}/api/v1/targets") as response:
            answer = await response.json()
        targets: list[dict[str, Any]] = answer["data"]["activeTargets"]
        return [
            {k: t.get(k) for k in ("scrapeUrl", "health", "lastError", "lastScrape")}
            for t in targets
        ]

    async def _terminate(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM (SIGKILL after STOP_TIMEOUT), then release the HTTP session and log."""
        try:
            await self._terminate()
        finally:
            await self._session.close()
            self._log.close()


@asynccontextmanager
async def run_prometheus(
    target: str, directory: Path, *, metrics_path: str = "/metrics"
) -> AsyncIterator[Prometheus]:
    """A Prometheus scraping `target` for the length of the block; see `Prometheus.start`."""
    prometheus = await Prometheus.start(target, directory, metrics_path=metrics_path)
    try:
        yield prometheus
    finally:
        await prometheus.stop()
