"""What the benchmark scripts share: free loopback ports and writing a results table."""

from __future__ import annotations

import socket
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_result(name: str, text: str) -> None:
    """Prints a Markdown result and keeps it in bench/results/<name>.md."""
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
