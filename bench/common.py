"""What the benchmark scripts share: ports, processes, the nginx upstream, tokens, agentproxy
configs, wrk and the open-loop load generator, process CPU and memory, and results tables.

Every contender runs as its own process on loopback; the load comes from another process.
The machine has 2 cores shared by upstream, proxy and load, so absolute numbers are noisy:
scripts alternate contenders and report ratios to a baseline measured in the same run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

RESULTS = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The upstream's answer to every GET: small, like a REST lookup.
BODY = '{"id": "42", "name": "Grace"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_result(name: str, text: str) -> None:
    """Prints a Markdown result and keeps it in bench/results/<name>.md."""
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)


def machine() -> str:
    """The line every results file starts with: when, what CPU, how many cores, which Python."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}"
        f"{' ' + model if model else ''}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Raises RuntimeError if nothing listens on `port` in time (or `proc` exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


class Processes:
    """Processes started for one run, stopped in reverse order (proxies before upstreams)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, cmd: Sequence[str], *, log: Path | None = None, **kw: Any
    ) -> subprocess.Popen[bytes]:
        out: IO[bytes] | int = subprocess.DEVNULL
        if log is not None:
            out = open(log, "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, **kw)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the upstream -------------------------------------------------------------------------------


def nginx_path() -> str | None:
    """nginx from Debian (`apt-get install nginx-light`); installed here when run as root."""
    found = shutil.which("nginx") or (Path("/usr/sbin/nginx").exists() and "/usr/sbin/nginx")
    if found:
        return str(found)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "nginx-light"],
            check=False,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    found = shutil.which("nginx") or (Path("/usr/sbin/nginx").exists() and "/usr/sbin/nginx")
    return str(found) if found else None


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log error;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=16384;
        # Any method, any body (read and discarded): a sink for uploads as well.
        client_max_body_size 0;
        default_type application/json;
        location / {{ return 200 '{body}'; }}
    }}
}}
"""

# The fallback upstream where nginx cannot be had: aiohttp's low-level server on uvloop.
AIOHTTP_UPSTREAM = """
import asyncio, sys, uvloop
from aiohttp import web
BODY = sys.argv[2].encode()
async def handle(request):
    await request.read()
    return web.Response(body=BODY, content_type="application/json")
async def main():
    runner = web.ServerRunner(web.Server(handle, client_max_size=0), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1])).start()
    await asyncio.Event().wait()
uvloop.run(main())
"""


def start_upstream(procs: Processes, d: Path, port: int) -> tuple[subprocess.Popen[bytes], str]:
    """nginx (one worker) answering BODY to everything; returns the process and its name."""
    nginx = nginx_path()
    if nginx is None:
        proc = procs.start([sys.executable, "-c", AIOHTTP_UPSTREAM, str(port), BODY])
        return proc, "aiohttp on uvloop (nginx could not be installed)"
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, port=port, body=BODY))
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
    proc = procs.start([nginx, "-c", str(conf), "-e", str(d / "nginx-error.log")])
    return proc, version.replace("nginx version: ", "") + " (one worker)"


# --- identity -----------------------------------------------------------------------------------


@dataclass
class Issuer:
    """An RS256 issuer for the run: its public key file and JWKS, and tokens it mints."""

    d: Path
    key: Any
    jwks: str

    @classmethod
    def create(cls, d: Path) -> Issuer:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from jwt.algorithms import RSAAlgorithm

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (d / "issuer.pem").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        return cls(d, key, json.dumps({"keys": [{**jwk, "alg": "RS256", "use": "sig"}]}))

    def mint(self, sub: str, **claims: object) -> str:
        import jwt

        now = int(time.time())
        payload = {"iss": "https://idp.bench", "aud": "agentproxy", "sub": sub, "iat": now}
        return jwt.encode({**payload, "exp": now + 7200, **claims}, self.key, algorithm="RS256")


def agentproxy_config(
    d: Path,
    name: str,
    *,
    port: int,
    admin: int,
    upstreams: str,
    policy: str,
    decision_log: str = "stdout",
    audit: bool = False,
    extra: str = "",
) -> Path:
    """Writes <name>.yaml and <name>-policy.yaml in `d` (the issuer's key is issuer.pem)."""
    (d / f"{name}-policy.yaml").write_text(policy)
    audit_section = f"audit: {{file: {d / (name + '-audit.jsonl')}}}\n" if audit else ""
    path = d / f"{name}.yaml"
    path.write_text(
        f"""
listen: {{http: "127.0.0.1:{port}", admin: "127.0.0.1:{admin}"}}
upstreams:
{upstreams}
identity:
  issuers: [{{issuer: "https://idp.bench", audiences: [agentproxy], public_key_file: issuer.pem, algorithms: [RS256]}}]
policy_files: [{name}-policy.yaml]
decision_log: {decision_log}
{audit_section}{extra}
"""
    )
    return path


def start_agentproxy(procs: Processes, config: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [str(BIN / "agentproxy"), "run", "--config", str(config), "--log-level", "warning"]
    return procs.start(cmd, log=log)


# --- load ---------------------------------------------------------------------------------------


@dataclass
class Closed:
    """One closed-loop wrk run: throughput, latency, and the proxy's CPU per call."""

    rps: float
    p50: float
    p99: float
    cpu_us: float | None
    failed: int = 0  # non-2xx answers and socket errors (only with expect_ok=False)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of a process in KiB (`VmHWM`: its peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def wrk_script(d: Path, method: str, body: str | None, headers: dict[str, str]) -> Path:
    """A wrk Lua script for one request shape (wrk's own options only cover GET)."""
    lines = [f"wrk.method = {json.dumps(method)}"]
    if body is not None:
        lines.append(f"wrk.body = {json.dumps(body)}")
    for name, value in headers.items():
        lines.append(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}")
    fd, path = tempfile.mkstemp(suffix=".lua", dir=d)
    os.write(fd, ("\n".join(lines) + "\n").encode())
    os.close(fd)
    return Path(path)


def wrk(
    url: str,
    *,
    seconds: float,
    connections: int,
    headers: dict[str, str] | None = None,
    script: Path | None = None,
    cpu_pid: int | None = None,
    expect_ok: bool = True,
    timeout: float = 2.0,
) -> Closed:
    """Closed-loop max throughput with wrk (one thread). Raises RuntimeError on refusals,
    errors, or calls slower than `timeout` seconds."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    cmd.append(f"--timeout={timeout:g}s")
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    before = cpu_seconds(cpu_pid) if cpu_pid else 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = cpu_seconds(cpu_pid) if cpu_pid else 0.0
    total = re.search(r"(\d+) requests in", out)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if expect_ok and (non2xx or (errors and "timeout 0" not in errors.group(1))):
        raise RuntimeError(f"{url}: the benchmark is misconfigured or failing:\n{out}")
    requests = int(total.group(1)) if total else 0
    cpu_us = (after - before) / requests * 1e6 if cpu_pid and requests else None
    failed = int(non2xx.group(1)) if non2xx else 0
    if errors:
        failed += sum(int(n) for n in re.findall(r"\d+", errors.group(1)))
    return Closed(rps, _wrk_latency(out, "50%"), _wrk_latency(out, "99%"), cpu_us, failed)


def _wrk_latency(out: str, pct: str) -> float:
    m = re.search(rf"{re.escape(pct)}\s+([\d.]+)(us|ms|s)", out)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


@dataclass
class Open:
    """One fixed-rate run of bench/loadgen.py: latency percentiles in ms."""

    rate: float
    achieved: float
    p50: float
    p90: float
    p99: float
    p999: float
    errors: int
    lag_p99: float
    cpu_us: float | None = None  # the contender's CPU per call during the run, when measured

    @classmethod
    def parse(cls, text: str) -> Open:
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def fixed_rate(
    url: str,
    *,
    rate: float,
    seconds: float,
    connections: int = 64,
    headers: dict[str, str] | None = None,
    cpu_pid: int | None = None,
) -> Open:
    """Latency at a fixed request rate, from bench/loadgen.py in its own process; with
    `cpu_pid`, also that process's CPU time per call sent."""
    cmd = [sys.executable, str(HERE / "loadgen.py"), url, "--rate", str(rate)]
    cmd += ["--seconds", str(seconds), "--connections", str(connections)]
    for name, value in (headers or {}).items():
        cmd += ["--header", f"{name}: {value}"]
    before = cpu_seconds(cpu_pid) if cpu_pid is not None else 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = Open.parse(out.strip().splitlines()[-1])
    if cpu_pid is not None:
        result.cpu_us = (cpu_seconds(cpu_pid) - before) / int(rate * seconds) * 1e6
    if result.errors:
        raise RuntimeError(f"{url}: {result.errors} failed calls at {rate:.0f}/s")
    return result


def best(values: Iterator[float] | list[float], *, high: bool = True) -> float:
    """The best of the alternating rounds (max for throughput, min for latency and CPU):
    on a shared machine noise only ever makes a run slower."""
    items = [v for v in values if v == v]  # drop NaN
    if not items:
        return float("nan")
    return max(items) if high else min(items)


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted samples, nearest rank."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A Markdown table; `align` is one letter per column (l or r), default l then r."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
