"""Kill -9 during writes: a writer in a separate process is killed mid-stream. The log is at
worst missing its last incomplete line, and the next writer recovers it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentproxy.audit.settings import AuditSettings
from agentproxy.audit.trail import AuditTrail
from agentproxy.audit.verify import verify
from tests.audit.conftest import decision, read, records, write

WRITER = """
import asyncio, sys
from pathlib import Path
from agentproxy.audit.settings import AuditSettings
from agentproxy.audit.trail import AuditTrail

async def main() -> None:
    settings = AuditSettings(
        file=Path(sys.argv[1]), signing_key_file=Path(sys.argv[2]), checkpoint_every=100,
        replica="crashy", max_file_bytes=10**9,
    )
    trail = AuditTrail(settings)
    await trail.start()
    n = 0
    while True:
        record = {"kind": "decision", "pad": "x" * 300}
        batch = [trail.submit({**record, "n": n + i}) for i in range(64)]
        n += 64
        await asyncio.gather(*batch)

asyncio.run(main())
"""


def start_writer(log_path: Path, key_file: Path) -> subprocess.Popen[bytes]:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(log_path), str(key_file)], env=env)


def wait_for_lines(path: Path, count: int, writer: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert writer.poll() is None, "the writer exited by itself"
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.01)
    pytest.fail("the writer wrote too little")


@pytest.mark.parametrize("round_", range(2))
async def test_kill_9_during_writes(
    log_path: Path, key_file: Path, signing_key: Ed25519PrivateKey, round_: int
) -> None:
    writer = start_writer(log_path, key_file)
    try:
        wait_for_lines(log_path, 2000 + 700 * round_, writer)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    problems = verify([log_path], signing_key.public_key()).problems
    assert len(problems) <= 1, problems
    if problems:  # killed inside a write(): only the last line may be incomplete
        assert problems[0].endswith(": last line is incomplete (the writer stopped mid-record)")
    killed_size = len(read(log_path))

    settings = AuditSettings(
        file=log_path, signing_key_file=key_file, checkpoint_every=100, replica="crashy"
    )
    trail = AuditTrail(settings)
    await trail.start()
    await trail.submit(decision(0))
    await trail.close()
    report = verify(sorted(log_path.parent.iterdir()), signing_key.public_key())
    assert report.ok, report.problems
    assert list(report.chains) == ["crashy"]
    if problems:
        assert any(": recovered: " in note for note in report.notes)
        assert records(log_path)[-3]["kind"] == "recovered"
    else:
        assert read(log_path)[killed_size:].count(b"\n") == 2  # decision, checkpoint


async def test_a_torn_write_is_recovered_exactly(
    log_path: Path, key_file: Path, signing_key: Ed25519PrivateKey
) -> None:
    """A kill inside a write() of a regular file rarely tears a line, so tear one by hand the
    way a full disk or a power cut would: half of a batch's last line."""
    writer = start_writer(log_path, key_file)
    try:
        wait_for_lines(log_path, 500, writer)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    data = read(log_path).rstrip(b"\n")
    cut = data.rfind(b"\n") + 1 + 40
    write(log_path, data[:cut])
    lines_before = data[:cut].count(b"\n")
    assert verify([log_path], signing_key.public_key()).problems == [
        f"audit.jsonl:{lines_before + 1}: last line is incomplete (the writer stopped mid-record)"
    ]
    trail = AuditTrail(AuditSettings(file=log_path, signing_key_file=key_file, replica="crashy"))
    await trail.start()
    await trail.close()
    report = verify(sorted(log_path.parent.iterdir()), signing_key.public_key())
    assert report.ok, report.problems
    assert [n for n in report.notes if "recovered" in n] == [
        f"audit.jsonl:{lines_before + 1}: recovered: audit.jsonl ended in an incomplete line "
        f"(40 bytes after byte {cut - 40}: the previous writer stopped mid-record); moved to "
        f"{next(log_path.parent.glob('*.fragment')).name}"
    ]
