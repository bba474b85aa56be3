"""A refused gRPC call, answered on its servicer context: the status, the details and the
trailing metadata the adapter renders (`protocols/grpc.render`). Shared by the gRPC shell
and the reflection shell, which grpc.py imports."""

from __future__ import annotations

from typing import Any

import grpc
from grpc import aio

from agentproxy.core import Call
from agentproxy.protocols import grpc as adapter

# grpcio's StatusCode by number.
STATUS = {code.value[0]: code for code in grpc.StatusCode}


def answer_refusal(context: aio.ServicerContext[Any, Any], call: Call) -> None:
    """Ends `call` with its refusal's status. Raises ValueError without one."""
    refusal = call.refusal
    if refusal is None:
        raise ValueError("refuse() needs call.refusal")
    reply = adapter.render(refusal, decision_id=call.id)
    context.set_trailing_metadata(reply.trailers)
    context.set_code(STATUS[reply.code])
    context.set_details(reply.message)
    call.status = reply.http_status
    call.grpc_status = reply.code.value
