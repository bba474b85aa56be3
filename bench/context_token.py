"""What signing the context token costs per call, against the bare signature it wraps.

For an Ed25519 and a P-256 key: `ContextSigner.sign` (the header encoded at load, orjson,
`cryptography` directly), `jwt.encode` of the same claims and header (PyJWT: how the proxy
signed before), and the bare signature of a token-sized message, alternating, best of the
rounds. Writes bench/results/context_token.md.

    .venv/bin/python bench/context_token.py [--calls 5000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable

import jwt
from common import best, machine, table, write_result
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agentproxy.config.model import ContextToken
from agentproxy.core import Principal
from agentproxy.identity.context import ContextKey, ContextSigner

PRINCIPAL = Principal(agent="hr-bot", roles=frozenset({"hr"}))
CALL = {
    "principal": PRINCIPAL,
    "task": None,
    "rule": "read-employees",
    "upstream": "hr",
    "decision_id": "abcdef0123456789abcdef01",
    "action": "http:GET /v1/employees/42",
    "method": "GET",
    "path": "/v1/employees/42",
}


def contenders(key: ContextKey) -> dict[str, Callable[[], object]]:
    signer = ContextSigner(key, ContextToken(ttl=60.0, audience="tools"))
    token = signer.sign(now=time.time(), **CALL)  # type: ignore[arg-type]
    claims = jwt.decode(token, options={"verify_signature": False})
    message = token.rsplit(".", 1)[0].encode()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        bare: Callable[[], object] = lambda: key.sign(message)  # noqa: E731
    else:
        ecdsa = ec.ECDSA(hashes.SHA256())
        bare = lambda: key.sign(message, ecdsa)  # noqa: E731
    return {
        "bare signature (baseline)": bare,
        "ContextSigner.sign": lambda: signer.sign(now=time.time(), **CALL),  # type: ignore[arg-type]
        "jwt.encode, same claims (PyJWT)": lambda: jwt.encode(
            claims, key, algorithm=signer.algorithm, headers={"kid": signer.kid}
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--name", default="context_token")
    args = parser.parse_args()
    rows = []
    keys: dict[str, ContextKey] = {
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
    }
    for algorithm, key in keys.items():
        runs = contenders(key)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                times[name].append(timeit.timeit(fn, number=args.calls) / args.calls * 1e6)
        base = best(times["bare signature (baseline)"], high=False)
        for name, samples in times.items():
            us = best(samples, high=False)
            rows.append([algorithm, name, f"{us:.1f}", f"{us - base:+.1f}", f"{us / base:.2f}"])
    text = (
        f"# Signing the context token ({machine()})\n\n"
        f"`bench/context_token.py --calls {args.calls} --rounds {args.rounds}`: µs per token, "
        f"best of {args.rounds} alternating rounds of {args.calls}; around: what is spent "
        "beyond the bare signature of a token-sized message with the same key.\n\n"
        + table(["key", "how", "µs/token", "around", "× bare signature"], rows, "llrrr")
        + "\n"
    )
    write_result(args.name, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
