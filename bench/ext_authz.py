"""Envoy with agentproxy as its external authorizer, against agentproxy inline and Envoy's own
jwt_authn + rbac, in one run (issue 28).

The same nginx upstream and the same policy as bench/http_overhead.py; contenders alternate
round by round under wrk (closed loop, one thread): throughput, p50 and p99, and the CPU per
call of the processes that decide (agentproxy; Envoy and agentproxy together for ext_authz).
Ratios are to agentproxy inline in the same run. Not part of the test suite.

    .venv/bin/python bench/ext_authz.py [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import (
    Closed,
    Issuer,
    Processes,
    agentproxy_config,
    best,
    cpu_seconds,
    free_port,
    machine,
    start_agentproxy,
    start_upstream,
    table,
    wait_port,
    write_result,
    wrk,
)
from http_overhead import PATH, POLICY, envoy_authz_filters, envoy_config, expect, start_envoy

INLINE = "agentproxy inline"
EXT_AUTHZ = "Envoy + agentproxy ext_authz"
ENVOY_RBAC = "Envoy, jwt_authn + rbac"


def ext_authz_filter(port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ext_authz filter of examples/envoy/envoy.yaml, and the cluster it calls."""
    http_filter = {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "with_request_body": {
                "max_request_bytes": 1048576,
                "allow_partial_message": False,
                "pack_as_bytes": True,
            },
            "grpc_service": {"envoy_grpc": {"cluster_name": "agentproxy"}, "timeout": "5s"},
        },
    }
    cluster = {
        "name": "agentproxy",
        "type": "STATIC",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "agentproxy",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    return http_filter, cluster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--name", default="ext_authz")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is missing: apt-get install wrk", file=sys.stderr)
        return 1
    d = Path(tempfile.mkdtemp(prefix="ap-extauthz-"))
    (d / "secret").write_text("bench-secret\n")
    issuer = Issuer.create(d)
    up, ip, ia, xp, xa, xg, ep, rp = (free_port() for _ in range(8))
    upstreams = f'  - {{name: hr, url: "http://127.0.0.1:{up}", credentials: {{header: X-Api-Key, value_file: secret}}}}'
    inline = agentproxy_config(
        d, "inline", port=ip, admin=ia, upstreams=upstreams, policy=POLICY, decision_log="off"
    )
    decider = agentproxy_config(
        d,
        "decider",
        port=xp,
        admin=xa,
        upstreams=upstreams,
        policy=POLICY,
        decision_log="off",
        extra="",
    )
    text = decider.read_text().replace(
        f'admin: "127.0.0.1:{xa}"}}', f'admin: "127.0.0.1:{xa}", ext_authz: "127.0.0.1:{xg}"}}'
    )
    decider.write_text(text)
    token = issuer.mint("hr-bot", roles=["hr"], dept="hr")
    auth = {"Authorization": f"Bearer {token}"}
    credential = [{"header": {"key": "X-Api-Key", "value": "bench-secret"}}]
    with Processes() as procs:
        upstream, _ = start_upstream(procs, d, up)
        wait_port(up, proc=upstream)
        inline_proc = start_agentproxy(procs, inline, d / "inline.log")
        decider_proc = start_agentproxy(procs, decider, d / "decider.log")
        config = envoy_config(ep, up, [], [])
        http_filter, cluster = ext_authz_filter(xg)
        chain = config["static_resources"]["listeners"][0]["filter_chains"][0]
        hcm = chain["filters"][0]["typed_config"]
        hcm["http_filters"] = [http_filter, *hcm["http_filters"]]
        config["static_resources"]["clusters"].append(copy.deepcopy(cluster))
        envoy_ext = start_envoy(procs, d, "envoy-ext-authz", config)
        envoy_rbac = start_envoy(
            procs,
            d,
            "envoy-rbac",
            envoy_config(rp, up, envoy_authz_filters(issuer.jwks), credential),
        )
        for port in (ip, xg, ep, rp):
            wait_port(port)
        contenders = {
            INLINE: (f"http://127.0.0.1:{ip}{PATH}", [inline_proc.pid]),
            EXT_AUTHZ: (f"http://127.0.0.1:{ep}{PATH}", [envoy_ext.pid, decider_proc.pid]),
            ENVOY_RBAC: (f"http://127.0.0.1:{rp}{PATH}", [envoy_rbac.pid]),
        }
        for name, (url, _) in contenders.items():
            expect(url, token, 200, name)
            expect(url, None, 401, f"{name}, no token")
            expect(url.replace(PATH, "/v1/employees/13"), token, 403, f"{name}, employee 13")
        for url, _ in contenders.values():
            wrk(url, seconds=1, connections=args.connections, headers=auth)
        runs: dict[str, list[tuple[Closed, float]]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, (url, pids) in contenders.items():
                before = sum(cpu_seconds(pid) for pid in pids)
                run = wrk(url, seconds=args.seconds, connections=args.connections, headers=auth)
                spent = sum(cpu_seconds(pid) for pid in pids) - before
                calls = run.rps * max(1, round(args.seconds))
                runs[name].append((run, spent / calls * 1e6 if calls else 0.0))
                print(f"  {name}: {run.rps:,.0f}/s, p50 {run.p50:.2f} ms", flush=True)
    base = best(r.rps for r, _ in runs[INLINE])
    base_p50 = best((r.p50 for r, _ in runs[INLINE]), high=False)
    rows = []
    for name in contenders:
        rps = best(r.rps for r, _ in runs[name])
        p50 = best((r.p50 for r, _ in runs[name]), high=False)
        p99 = best((r.p99 for r, _ in runs[name]), high=False)
        cpu = best((c for _, c in runs[name]), high=False)
        rows.append(
            [
                name,
                f"{rps:,.0f}",
                f"{rps / base:.2f}x",
                f"{p50:.2f}",
                f"{p50 / base_p50:.2f}x",
                f"{p99:.2f}",
                f"{cpu:.0f}",
            ]
        )
    text = "\n".join(
        [
            "# Envoy + agentproxy ext_authz vs agentproxy inline vs Envoy jwt_authn + rbac",
            "",
            machine(),
            "",
            f"wrk, one thread, {args.connections} connections, {args.seconds:g} s x "
            f"{args.rounds} rounds alternating (best round); GET {PATH} allowed by the same "
            "policy; CPU per call of the deciding processes (Envoy and agentproxy for "
            "ext_authz).",
            "",
            table(
                ["contender", "calls/s", "vs inline", "p50 ms", "vs inline", "p99 ms", "CPU µs"],
                rows,
                "lrrrrrr",
            ),
            "",
        ]
    )
    write_result(args.name, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
