"""What must happen before anything else when the proxy process starts.

SIGHUP's default action ends the process, and an operator or a config watcher may send one
while the proxy starts (imports take a second): `remember_hups` installs, first thing, a
handler that only remembers it; the command reloads once it serves (`cli._serve`).
"""

from __future__ import annotations

import signal

HUPS: list[int] = []  # SIGHUPs that came before the event loop's own handler existed


def remember_hups() -> None:
    signal.signal(signal.SIGHUP, lambda signum, _frame: HUPS.append(signum))
