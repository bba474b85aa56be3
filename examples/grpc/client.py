"""Calls the example service through agentproxy and shows what came back.

python examples/grpc/client.py --token "$TOKEN" get 42
python examples/grpc/client.py --token "$TOKEN" raise 42 3 "annual review"
python examples/grpc/client.py --token "$TOKEN" watch
"""

from __future__ import annotations

import argparse
import asyncio

from grpc import aio
from upstream import generate


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--token", default="")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("call", choices=["get", "raise", "watch"])
    parser.add_argument("args", nargs="*")
    a = parser.parse_args()
    pb2, pb2_grpc = generate()
    metadata = (("authorization", f"Bearer {a.token}"),) if a.token else ()
    async with aio.insecure_channel(a.target) as channel:
        stub = pb2_grpc.EmployeesStub(channel)
        try:
            if a.call == "get":
                print(await stub.Get(pb2.GetEmployeeRequest(id=a.args[0]), metadata=metadata))
            elif a.call == "raise":
                request = pb2.RaiseRequest(id=a.args[0], percent=int(a.args[1]), reason=a.args[2])
                print(await stub.Raise(request, metadata=metadata))
            else:
                async for employee in stub.Watch(pb2.WatchRequest(), metadata=metadata):
                    print(employee)
        except aio.AioRpcError as error:
            print(f"{error.code().name}: {error.details()}")
            for key, value in error.trailing_metadata() or ():
                print(f"  {key}: {value}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
