"""Call ids come from the OS's randomness, read ahead in blocks: never repeated, not even
across a fork (a worker must not hand out the ids its parent holds)."""

from __future__ import annotations

import os

from agentproxy.core import Action
from agentproxy.proxy.pipeline import start_call


def new_call_ids() -> tuple[str, str, str]:
    call = start_call(
        Action("http", "GET", "/"),
        "-",
        started=0.0,
        now=0.0,
        bearer=None,
        declared_task=None,
        refusal=None,
    )
    return call.id, call.trace.trace_id, call.trace.span_id


def test_ids_are_unique_across_blocks() -> None:
    seen = [new_call_ids() for _ in range(3000)]
    flat = [part for ids in seen for part in ids]
    assert len(set(flat)) == len(flat)
    assert all(len(d) == 24 and len(t) == 32 and len(s) == 16 for d, t, s in seen)
    assert all(int(part, 16) >= 0 for part in flat)


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    new_call_ids()  # the parent now holds a block it has not used up
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, "".join(new_call_ids()).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 200).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 72
    assert child != "".join(new_call_ids())
