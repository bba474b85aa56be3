"""What the gRPC path costs: unary calls direct, through Envoy (plain HTTP/2 proxy) and through
agentproxy (JWT from metadata, CEL policy, context metadata, decision log), in the same run.

The upstream is a grpc.aio server answering one method with fixed bytes; the load comes from
a separate grpc.aio process keeping `--concurrency` calls in flight on one channel. A Python
gRPC client is slower than wrk, so the direct figure is bounded by the load generator: read
the Envoy ratio, and the per-call latency added.

    .venv/bin/python bench/grpc_overhead.py [--seconds 5 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    BIN,
    Issuer,
    Processes,
    cpu_seconds,
    free_port,
    machine,
    table,
    wait_port,
    write_result,
)
from http_overhead import envoy_config, envoy_version, start_envoy

METHOD = "/bench.v1.Employees/Get"
ANSWER = b"\n\x0242\x12\x05Grace"  # an Employee{id: "42", name: "Grace"} on the wire

UPSTREAM = """
import asyncio, sys, grpc
from grpc import aio
ANSWER = bytes.fromhex(sys.argv[2])
async def get(request, context):
    return ANSWER
class Handler(grpc.GenericRpcHandler):
    def service(self, details):
        return grpc.unary_unary_rpc_method_handler(get)
async def main():
    server = aio.server()
    server.add_generic_rpc_handlers((Handler(),))
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""

LOAD = """
import asyncio, json, sys, time
from grpc import aio
target, seconds, concurrency, token, method = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
async def main():
    metadata = (("authorization", "Bearer " + token),) if token else ()
    latencies, errors = [], {}
    async with aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)
        await call(b"", metadata=metadata)  # connected, token cached
        deadline = time.perf_counter() + seconds
        async def worker():
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    await call(b"\\n\\x0242", metadata=metadata)
                    latencies.append(time.perf_counter() - started)
                except aio.AioRpcError as error:
                    errors[error.code().name] = errors.get(error.code().name, 0) + 1
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
    print(json.dumps({"rps": len(latencies) / elapsed, "p50": pick(0.5), "p99": pick(0.99), "errors": errors}))
asyncio.run(main())
"""

POLICY = """
default: deny
rules:
  - id: read-employees
    agents: [hr-bot]
    actions: ["grpc:/bench.v1.Employees/Get"]
    when: 'principal.claims.dept == "hr"'
    effect: allow
"""

DIRECT = "direct to upstream"
ENVOY = "Envoy, plain HTTP/2 proxy"
AGENTPROXY = "agentproxy, descriptor set (unary path, args decoded)"
STREAM = "agentproxy, no descriptor set (stream path)"


def descriptor_set() -> bytes:
    """bench.v1.Employees/Get(GetRequest{id}) -> Employee{id, name}, built without protoc."""
    from google.protobuf import descriptor_pb2

    string = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    file = descriptor_pb2.FileDescriptorProto(
        name="bench.proto", package="bench.v1", syntax="proto3"
    )
    request = file.message_type.add(name="GetRequest")
    request.field.add(name="id", number=1, type=string, label=optional)
    employee = file.message_type.add(name="Employee")
    employee.field.add(name="id", number=1, type=string, label=optional)
    employee.field.add(name="name", number=2, type=string, label=optional)
    service = file.service.add(name="Employees")
    service.method.add(
        name="Get", input_type=".bench.v1.GetRequest", output_type=".bench.v1.Employee"
    )
    return descriptor_pb2.FileDescriptorSet(file=[file]).SerializeToString()


def envoy_grpc(listen: int, upstream: int) -> dict[str, object]:
    """The HTTP bootstrap of http_overhead, with an HTTP/2 (h2c) upstream cluster."""
    config = envoy_config(listen, upstream, [], [])
    cluster = config["static_resources"]["clusters"][0]  # type: ignore[index]
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return config


def agentproxy_grpc_config(
    d: Path, port: int, admin: int, grpc_port: int, upstream: int, *, descriptors: bool = True
) -> Path:
    (d / "policy.yaml").write_text(POLICY)
    (d / "bench.binpb").write_bytes(descriptor_set())
    path = d / f"agentproxy-grpc-{descriptors}.yaml"
    path.write_text(
        f"""
listen: {{http: "127.0.0.1:{port}", admin: "127.0.0.1:{admin}", grpc: "127.0.0.1:{grpc_port}"}}
upstreams:
  - name: hr
    url: "grpc://127.0.0.1:{upstream}"
    protocol: grpc
{"    descriptor_set: bench.binpb" if descriptors else ""}
identity:
  issuers: [{{issuer: "https://idp.bench", audiences: [agentproxy], public_key_file: issuer.pem, algorithms: [RS256]}}]
policy_files: [policy.yaml]
decision_log: stdout
"""
    )
    return path


def load(target: str, seconds: float, concurrency: int, token: str, pid: int) -> dict[str, float]:
    """Calls/s and latency from the load process; CPU µs per call of the process `pid`."""
    before = cpu_seconds(pid)
    out = subprocess.run(
        [sys.executable, "-c", LOAD, target, str(seconds), str(concurrency), token, METHOD],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(out)
    if result["errors"]:
        raise RuntimeError(f"{target}: calls failed: {result['errors']}")
    result["cpu_us"] = (cpu_seconds(pid) - before) / (result["rps"] * seconds) * 1e6
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--name", default="grpc_overhead", help="results file name")
    args = parser.parse_args()
    d = Path(tempfile.mkdtemp(prefix="ap-grpc-bench-"))
    issuer = Issuer.create(d)
    token = issuer.mint("hr-bot", dept="hr")
    up, ep, hp, ap, gp, hp2, ap2, gp2 = (free_port() for _ in range(8))
    with Processes() as procs:
        upstream = procs.start([sys.executable, "-c", UPSTREAM, str(up), ANSWER.hex()])
        wait_port(up, proc=upstream)
        envoy = start_envoy(procs, d, "envoy-grpc", envoy_grpc(ep, up))
        wait_port(ep, proc=envoy)
        config = agentproxy_grpc_config(d, hp, ap, gp, up)
        proxy = procs.start(
            [str(BIN / "agentproxy"), "run", "--config", str(config), "--log-level", "warning"],
            log=d / "agentproxy.log",
        )
        wait_port(gp, proc=proxy)
        config2 = agentproxy_grpc_config(d, hp2, ap2, gp2, up, descriptors=False)
        streaming = procs.start(
            [str(BIN / "agentproxy"), "run", "--config", str(config2), "--log-level", "warning"],
            log=d / "agentproxy-stream.log",
        )
        wait_port(gp2, proc=streaming)
        targets = {
            DIRECT: (f"127.0.0.1:{up}", ""),
            ENVOY: (f"127.0.0.1:{ep}", ""),
            AGENTPROXY: (f"127.0.0.1:{gp}", token),
            STREAM: (f"127.0.0.1:{gp2}", token),
        }
        pids = {
            DIRECT: upstream.pid,
            ENVOY: envoy.pid,
            AGENTPROXY: proxy.pid,
            STREAM: streaming.pid,
        }
        # Checked first: agentproxy refuses another agent (so the policy really runs).
        refused = subprocess.run(
            [
                sys.executable,
                "-c",
                LOAD,
                targets[AGENTPROXY][0],
                "0.2",
                "1",
                issuer.mint("intern", dept="hr"),
                METHOD,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if refused.returncode == 0 or "PERMISSION_DENIED" not in refused.stderr:
            raise RuntimeError("agentproxy did not refuse another agent: the benchmark is wrong")
        results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, (target, bearer) in targets.items():
                results[name].append(
                    load(target, args.seconds, args.concurrency, bearer, pids[name])
                )
                time.sleep(0.5)
    best = {name: max(runs, key=lambda r: r["rps"]) for name, runs in results.items()}
    p50 = {name: min(r["p50"] for r in runs) for name, runs in results.items()}
    p99 = {name: min(r["p99"] for r in runs) for name, runs in results.items()}
    rows = [
        [
            name,
            f"{best[name]['rps']:,.0f}",
            f"{best[name]['rps'] / best[DIRECT]['rps']:.2f}",
            f"{best[name]['rps'] / best[ENVOY]['rps']:.2f}",
            f"{p50[name]:.2f}",
            f"{p99[name]:.2f}",
            f"{p50[name] - p50[DIRECT]:+.2f}",
            f"{min(r['cpu_us'] for r in results[name]):,.0f}",
        ]
        for name in targets
    ]
    text = (
        f"# gRPC path overhead ({machine()})\n\n"
        f"Unary calls from a grpc.aio load generator ({args.concurrency} in flight on one "
        f"channel, its own process), {args.seconds:g} s runs, best of {args.rounds} alternating "
        f"rounds. Envoy {envoy_version()} with one worker. agentproxy verifies the JWT from the "
        "`authorization` metadata, decides with a CEL condition on a claim, adds the context "
        "metadata (signed context token included) and writes the decision log; checked first "
        "to refuse another agent. The Python load generator bounds the direct and Envoy figures "
        "(both well below what they can serve), so compare CPU per call: the contender's own "
        "user + system CPU during the run divided by the calls it served (direct: the "
        "upstream's).\n\n"
        + table(
            [
                "contender",
                "calls/s",
                "× direct",
                "× Envoy",
                "p50 ms",
                "p99 ms",
                "added p50 ms",
                "CPU µs/call",
            ],
            rows,
        )
        + "\n"
    )
    write_result(args.name, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
