"""Reading a large request body off the event loop that serves every agent.

A body of more than `INLINE_BYTES`, or any compressed one (a few bytes of gzip can inflate to
the decoded cap), is inflated and parsed on one worker thread, process-wide. One, because
CPython runs one thread at a time: a second worker would not parse faster, only take more of
the loop's turns. The worker yields: the strict parser calls back into Python often for a
large document (`strict_json`), and the interpreter is told to hand the GIL to a waiting loop
within `SWITCH_INTERVAL`, so other agents' calls go on, slower but not frozen. What a parse
may cost is bounded by the body caps (`max_body_bytes`, the inflation ratio, `MAX_ELEMENTS`,
at which the parse stops); its turn on the worker is bounded per agent: at most
`MAX_PER_AGENT` of an agent's bodies wait for or hold the worker, and another is refused with
429, so one agent's flood queues in front of nobody else's body but its own.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

from agentproxy.errors import LimitRefused, Refusal
from agentproxy.protocols.strict_json import YIELDING_ABOVE

__all__ = ["INLINE_BYTES", "MAX_PER_AGENT", "BodyReader", "parse_off_loop", "shape_off_loop"]

T = TypeVar("T")

# Read on the loop: about 1 ms of the strict parser's worst case at most (dense objects,
# ~15 MB/s on a 2-core machine); an MCP tool call or a short chat is far below it. Larger
# documents are also the ones strict_json parses so that they yield.
INLINE_BYTES: Final = YIELDING_ABOVE
MAX_PER_AGENT: Final = 2
# How long the worker may hold the GIL while the loop waits for it (CPython's default is
# 5 ms). A call through the proxy wakes the loop several times; at 5 ms a wake-up, a parse on
# the worker made every other agent's call ~20x slower. Only matters while both want the GIL.
SWITCH_INTERVAL: Final = 0.0005


class BodyReader:
    """The worker thread and each agent's share of it."""

    def __init__(self, max_per_agent: int | None = MAX_PER_AGENT, name: str = "body") -> None:
        """`max_per_agent`: None for no refusal (the work waits its turn)."""
        self._max_per_agent = max_per_agent
        self._name = name
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._executor: ThreadPoolExecutor | None = None

    def held(self, agent: str) -> int:
        """How many of `agent`'s bodies are waiting for or on the worker now."""
        with self._lock:
            return self._held.get(agent, 0)

    async def run(self, agent: str, read: Callable[[], T]) -> T:
        """`read()` on the worker thread, for `agent`. Raises what `read` raises, or
        LimitRefused when `agent` already has MAX_PER_AGENT bodies there."""
        with self._lock:
            held = self._held.get(agent, 0)
            if self._max_per_agent is not None and held >= self._max_per_agent:
                raise LimitRefused(
                    f"{held} large request bodies of this agent are already being read; "
                    "send the next one when one is answered",
                    limit="large-bodies-in-flight",
                    retry_after=1,
                )
            self._held[agent] = held + 1
        try:
            executor = self._executor
            if executor is None:
                sys.setswitchinterval(SWITCH_INTERVAL)
                executor = self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"agentproxy-{self._name}"
                )
            future = executor.submit(_read, read)
        except BaseException:
            self._release(agent)
            raise
        # The share is freed when the parse ends, or when it is cancelled before it started: a
        # caller that hangs up mid-parse does not free it (the parse runs to its end), so
        # hanging up and sending again queues no more work.
        future.add_done_callback(lambda _: self._release(agent))
        return await asyncio.wrap_future(future)

    def _release(self, agent: str) -> None:
        with self._lock:
            left = self._held.pop(agent) - 1
            if left:
                self._held[agent] = left

    def forget(self) -> None:
        """A forked child has no worker thread: it starts its own when first needed."""
        self._lock = threading.Lock()
        self._held = {}
        self._executor = None


def _read(read: Callable[[], T]) -> T:
    try:
        return read()
    except Refusal as refusal:
        # The tracebacks of a refused body hold the frames that parsed it, and so the parsed
        # document: dropped here, it is freed on this thread, not on the loop that handles
        # the refusal (freeing a million values took the loop tens of milliseconds).
        cause: BaseException | None = refusal
        while cause is not None:
            cause.__traceback__ = None
            cause = cause.__context__
        raise refusal from None


# The process's one worker for request bodies, shared by every upstream and every reload's
# pipeline.
_READER: Final = BodyReader()
os.register_at_fork(after_in_child=_READER.forget)
# And one for answers an obligation shapes: they arrive after the upstream acted, so they are
# never refused (a retry would repeat the call) but wait their turn, and on a worker of their
# own, so that shaping one agent's large answers never queues in front of another agent's
# request body (the two threads and the loop take turns at SWITCH_INTERVAL).
_ANSWERS: Final = BodyReader(max_per_agent=None, name="answers")
os.register_at_fork(after_in_child=_ANSWERS.forget)


async def parse_off_loop(
    agent: str, body: bytes, content_encoding: str | None, read: Callable[[], T]
) -> T:
    """`read()` (which decodes and parses `body`): on the loop when the body is small and
    not compressed, else on the worker thread. Raises what `read` raises, or LimitRefused
    (BodyReader.run)."""
    compressed = content_encoding is not None and content_encoding.strip().lower() != "identity"
    if len(body) <= INLINE_BYTES and not compressed:
        return read()
    return await _READER.run(agent, read)


async def shape_off_loop(agent: str, answer: bytes, compressed: bool, work: Callable[[], T]) -> T:
    """`work()` (which decodes, parses, shapes and writes an answer): on the loop when the
    answer is small and not compressed, else on the answers' worker, waiting its turn."""
    if len(answer) <= INLINE_BYTES and not compressed:
        return work()
    return await _ANSWERS.run(agent, work)
