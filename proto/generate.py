"""Generates the Python code of agentproxy's own gRPC APIs (proto/agentproxy/v1/*.proto) into
src/agentproxy/v1/ with grpcio-tools. Run by every package build (setup.py) and by `make proto`;
the output is never committed or edited by hand.

    python proto/generate.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "proto"
OUT = ROOT / "src"
PACKAGE = OUT / "agentproxy" / "v1"


def generate() -> list[Path]:
    """Raises RuntimeError when protoc fails (its messages are on stderr)."""
    from grpc_tools import protoc  # a build requirement (pyproject build-system.requires)

    sources = sorted((PROTOS / "agentproxy" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    PACKAGE.mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={OUT}",
            f"--pyi_out={OUT}",
            f"--grpc_python_out={OUT}",
            *(str(s) for s in sources),
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed ({code}) on {', '.join(s.name for s in sources)}")
    init = PACKAGE / "__init__.py"
    init.write_text('"""Generated from proto/agentproxy/v1 by proto/generate.py: do not edit."""\n')
    return sources


if __name__ == "__main__":
    done = generate()
    print(f"generated {PACKAGE.relative_to(ROOT)} from {len(done)} proto file(s)", file=sys.stderr)
