"""The example HR gRPC service, with the standard reflection service (the proxy reads its
descriptors from there). Code is generated from hr.proto at start by grpcio-tools.

    python examples/grpc/upstream.py [--port 50061]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from grpc import aio
from grpc_reflection.v1alpha import reflection
from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PEOPLE = {"1": ("Ada (CEO)", 9), "42": ("Grace", 5), "7": ("Linus", 4)}


def generate() -> tuple[ModuleType, ModuleType]:
    """hr_pb2 and hr_pb2_grpc, generated from hr.proto into a temporary directory."""
    out = tempfile.mkdtemp(prefix="hr-grpc-")
    code = protoc.main(
        ["protoc", f"-I{HERE}", f"--python_out={out}", f"--grpc_python_out={out}", "hr.proto"]
    )
    if code != 0:
        raise SystemExit("protoc failed on hr.proto")
    sys.path.insert(0, out)
    return importlib.import_module("hr_pb2"), importlib.import_module("hr_pb2_grpc")


async def serve(port: int) -> None:
    pb2, pb2_grpc = generate()

    class Employees(pb2_grpc.EmployeesServicer):  # type: ignore[misc,name-defined]
        async def Get(self, request: Any, context: Any) -> Any:
            name, band = PEOPLE.get(request.id, ("unknown", 0))
            agent = dict(context.invocation_metadata()).get("x-agentproxy-agent", "?")
            print(f"hr: Get {request.id} for agent {agent}", flush=True)
            return pb2.Employee(id=request.id, name=name, salary_band=band)

        async def Raise(self, request: Any, context: Any) -> Any:
            name, band = PEOPLE.get(request.id, ("unknown", 0))
            print(f"hr: Raise {request.id} by {request.percent}%", flush=True)
            return pb2.Employee(id=request.id, name=name, salary_band=band + 1)

        async def Watch(self, request: Any, context: Any) -> Any:
            for person_id, (name, band) in PEOPLE.items():
                yield pb2.Employee(id=person_id, name=name, salary_band=band)

    server = aio.server()
    pb2_grpc.add_EmployeesServicer_to_server(Employees(), server)
    service = pb2.DESCRIPTOR.services_by_name["Employees"].full_name
    reflection.enable_server_reflection((service, reflection.SERVICE_NAME), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"hr gRPC service on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=50061)
    asyncio.run(serve(parser.parse_args().port))
