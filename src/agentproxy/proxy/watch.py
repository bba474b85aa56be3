"""Reload when the config or a policy file changes, including Kubernetes ConfigMap swaps.

A ConfigMap volume is updated by pointing its `..data` symlink at a new directory: the file
paths the proxy was given never change, their targets do, and watchers on the files
themselves miss it (cerbos/cerbos#969). So we poll: every second, the resolved target, inode,
size and mtime of the config file and of every file the policy globs match now (globs are
expanded again, so added and removed policy files count too).
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from agentproxy.config import Config

log = logging.getLogger("agentproxy.watch")

Fingerprint = tuple[tuple[str, str, int, int, int], ...]


def fingerprint(config_path: Path, policy_globs: tuple[str, ...]) -> Fingerprint:
    """What the files look like now; any difference means something changed."""
    base = config_path.parent
    paths = [str(config_path)]
    for pattern in policy_globs:
        paths.extend(sorted(glob.glob(str(base / pattern), recursive=True)))
    out = []
    for path in paths:
        try:
            target = os.path.realpath(path)
            st = os.stat(target)
        except OSError:
            out.append((path, "", 0, 0, 0))
            continue
        out.append((path, target, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


async def watch(
    current: Callable[[], Config],
    globs: Callable[[], tuple[str, ...]],
    reload: Callable[[], Awaitable[bool]],
    interval: float = 1.0,
) -> None:
    """Calls `reload` after a change has been stable for one interval, until cancelled.

    Waiting for a stable fingerprint avoids reading a file an editor is still writing;
    a failed reload is retried only when the files change again.
    """
    seen = await asyncio.to_thread(fingerprint, current().source, globs())
    while True:
        await asyncio.sleep(interval)
        now = await asyncio.to_thread(fingerprint, current().source, globs())
        if now == seen:
            continue
        await asyncio.sleep(interval)
        settled = await asyncio.to_thread(fingerprint, current().source, globs())
        if settled != now:
            continue
        seen = settled
        log.info("config or policy files changed; reloading")
        await reload()
