"""`verify` on real logs: each way of tampering is caught and named by file and line."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentproxy.audit.chain import Chain, checkpoint
from agentproxy.audit.settings import AuditSettings
from agentproxy.audit.trail import AuditTrail
from agentproxy.audit.verify import verify
from tests.audit.conftest import decision, lines, rechain, write_chain


@pytest.fixture
async def log(settings: AuditSettings) -> Path:
    """50 decisions through a real trail: a checkpoint after every 10 (lines 11, 22, 33, 44,
    55) and a closing one (line 56), and `audit.jsonl.checkpoint` beside it."""
    trail = AuditTrail(settings)
    await trail.start()
    for n in range(50):
        await trail.submit(decision(n, note="é ✓"))
    await trail.close()
    assert settings.file is not None
    return settings.file


def test_a_clean_log_verifies(log: Path, signing_key: Ed25519PrivateKey) -> None:
    report = verify([log], signing_key.public_key())
    assert report.ok, report.problems
    assert (report.records, report.checkpoints, report.chains) == (56, 6, {"r1": 55})
    assert report.notes == []
    assert Path(f"{log}.checkpoint").is_file()


def test_without_a_key_signatures_are_noted_as_unchecked(log: Path) -> None:
    report = verify([log], None)
    assert report.ok
    assert report.notes == ["checkpoint signatures not checked (no public key given)"]


def test_every_flipped_byte_is_caught_at_its_line(
    log: Path, signing_key: Ed25519PrivateKey
) -> None:
    original = lines(log)
    line = original[19]
    for offset in range(len(line) - 1):
        edited = bytearray(line)
        edited[offset] ^= 0x01
        log.write_bytes(b"".join([*original[:19], bytes(edited), *original[20:]]))
        report = verify([log], signing_key.public_key())
        assert not report.ok, f"flipping byte {offset} of line 20 went unnoticed"
        assert report.problems[0].startswith("audit.jsonl:20: "), (offset, report.problems)


def test_an_edited_value(log: Path, signing_key: Ed25519PrivateKey) -> None:
    raw = lines(log)
    raw[19] = raw[19].replace(b'"effect":"allow"', b'"effect":"deny"')
    log.write_bytes(b"".join(raw))
    assert verify([log], signing_key.public_key()).problems == [
        "audit.jsonl:20: hash does not match its content (edited?)"
    ]


def test_a_deleted_line(log: Path, signing_key: Ed25519PrivateKey) -> None:
    raw = lines(log)
    del raw[19]
    log.write_bytes(b"".join(raw))
    assert verify([log], signing_key.public_key()).problems == [
        "audit.jsonl:20: sequence jumps from 18 to 20 (a record is missing)"
    ]


def test_two_swapped_lines(log: Path, signing_key: Ed25519PrivateKey) -> None:
    raw = lines(log)
    raw[19], raw[20] = raw[20], raw[19]
    log.write_bytes(b"".join(raw))
    assert verify([log], signing_key.public_key()).problems == [
        "audit.jsonl:20: sequence jumps from 18 to 20 (a record is missing)",
        "audit.jsonl:21: seq 19 comes after seq 20 (line 20): "
        "a record was duplicated, inserted or reordered",
    ]


def test_an_inserted_forged_line(log: Path, signing_key: Ed25519PrivateKey) -> None:
    raw = lines(log)
    before = orjson.loads(raw[19])
    forger = Chain("r1", before["seq"] + 1, before["hash"])
    forged = forger.seal_line(decision(999, effect="allow", agent="mallory")).line + b"\n"
    log.write_bytes(b"".join([*raw[:20], forged, *raw[20:]]))
    problems = verify([log], signing_key.public_key()).problems
    assert problems == [
        "audit.jsonl:22: seq 20 comes after seq 20 (line 21): "
        "a record was duplicated, inserted or reordered",
        "audit.jsonl:23: prev does not match the hash of line 21 "
        "(record removed, inserted or reordered)",
    ]


def test_an_inserted_line_with_a_made_up_hash(log: Path, signing_key: Ed25519PrivateKey) -> None:
    raw = lines(log)
    forged = {**orjson.loads(raw[19]), "agent": "mallory"}
    log.write_bytes(b"".join([*raw[:20], orjson.dumps(forged) + b"\n", *raw[20:]]))
    problems = verify([log], signing_key.public_key()).problems
    assert problems[0] == "audit.jsonl:21: hash does not match its content (edited?)"
    assert all(p.startswith(("audit.jsonl:21:", "audit.jsonl:22:")) for p in problems)


def test_a_rewritten_tail_is_caught_by_the_next_signature(
    log: Path, signing_key: Ed25519PrivateKey
) -> None:
    raw = lines(log)
    raw[45] = raw[45].replace(b'"effect":"allow"', b'"effect":"deny"')
    log.write_bytes(b"".join(rechain(raw, 45)))
    assert verify([log], signing_key.public_key()).problems == [
        "audit.jsonl:55: checkpoint at seq 54 signature invalid",
        "audit.jsonl:56: checkpoint at seq 55 signature invalid",
        "audit.jsonl:56: the record at seq 55 is not the checkpoint "
        "audit.jsonl.checkpoint holds (rewritten)",
    ]


def test_a_bad_checkpoint_signature(log: Path, signing_key: Ed25519PrivateKey) -> None:
    raw = lines(log)
    record = orjson.loads(raw[21])
    assert record["kind"] == "checkpoint"
    other = Ed25519PrivateKey.generate()
    chain = Chain("r1", record["seq"], record["head"])
    raw[21] = orjson.dumps({**record, "signature": checkpoint(chain, other)["signature"]}) + b"\n"
    log.write_bytes(b"".join(rechain(raw, 21)))
    problems = verify([log], signing_key.public_key()).problems
    assert problems[0] == "audit.jsonl:22: checkpoint at seq 21 signature invalid"
    assert "audit.jsonl:11: checkpoint at seq 10 signature invalid" in (
        verify([log], other.public_key()).problems
    )


def drop_tail_after_checkpoint(log: Path) -> None:
    raw = lines(log)
    log.write_bytes(b"".join(raw[:33]))  # ends with the checkpoint at seq 32


def test_a_dropped_tail_is_caught_by_the_checkpoint_file(
    log: Path, signing_key: Ed25519PrivateKey
) -> None:
    drop_tail_after_checkpoint(log)
    report = verify([log], signing_key.public_key())
    assert report.problems == [
        "audit.jsonl.checkpoint: log ends at seq 32 but the checkpoint file says 55 (truncated)"
    ]


def test_a_dropped_tail_without_the_checkpoint_file(
    log: Path, signing_key: Ed25519PrivateKey
) -> None:
    """Without the checkpoint file a cut after a checkpoint looks like a killed writer: a note,
    and a problem when the writer is known to have closed."""
    drop_tail_after_checkpoint(log)
    Path(f"{log}.checkpoint").unlink()
    ending = (
        "audit.jsonl:33: chain 'r1' ends at seq 32 without a closing checkpoint (its last "
        "checkpoint is at seq 32): the writer is still running or stopped abruptly, or its "
        "tail was cut off"
    )
    report = verify([log], signing_key.public_key())
    assert report.ok and report.notes == [ending]
    assert verify([log], signing_key.public_key(), closed=True).problems == [ending]


def test_a_dropped_tail_with_a_stale_checkpoint_file(
    log: Path, signing_key: Ed25519PrivateKey
) -> None:
    """The log cut back to a checkpoint, and the checkpoint file replaced by an older copy
    that matches it: as without the file, only the missing closing checkpoint tells."""
    saved = Path(f"{log}.checkpoint")
    drop_tail_after_checkpoint(log)
    saved.write_bytes(orjson.dumps({"r1": orjson.loads(lines(log)[32])}))
    assert verify([log], signing_key.public_key()).ok
    problems = verify([log], signing_key.public_key(), closed=True).problems
    assert len(problems) == 1 and "ends at seq 32 without a closing checkpoint" in problems[0]


def test_a_deleted_log_with_its_checkpoint_file_left(
    log: Path, signing_key: Ed25519PrivateKey
) -> None:
    log.write_bytes(b"")
    assert verify([log], signing_key.public_key()).problems == [
        "audit.jsonl.checkpoint: holds chain 'r1' at seq 55, but no record of that chain is "
        "in the log (deleted?)"
    ]


def test_a_forged_checkpoint_file(log: Path, signing_key: Ed25519PrivateKey) -> None:
    saved = Path(f"{log}.checkpoint")
    entry = orjson.loads(saved.read_bytes())
    entry["r1"]["seq"] = 20
    saved.write_bytes(orjson.dumps(entry))
    problems = verify([log], signing_key.public_key()).problems
    assert "audit.jsonl.checkpoint: chain 'r1': checkpoint at seq 20: hash does not match" in (
        problems
    )
    assert "audit.jsonl.checkpoint: chain 'r1': checkpoint at seq 20 signature invalid" in problems


def test_an_incomplete_last_line(log: Path, signing_key: Ed25519PrivateKey) -> None:
    with log.open("ab") as f:
        f.write(b'{"agent":"hr-bot","chain":"r1","kind":"deci')
    assert verify([log], signing_key.public_key()).problems == [
        "audit.jsonl:57: last line is incomplete (the writer stopped mid-record)"
    ]


def test_lines_that_are_not_records(log: Path, signing_key: Ed25519PrivateKey) -> None:
    raw = lines(log)
    log.write_bytes(b"".join([*raw[:5], b"\n", b"[1, 2]\n", b'{"kind": "decision"}\n', *raw[5:]]))
    assert verify([log], signing_key.public_key()).problems == [
        "audit.jsonl:6: not valid JSON (edited or corrupted)",
        "audit.jsonl:7: not an audit record (not a JSON object)",
        "audit.jsonl:8: not an audit record (chain, seq, prev or hash missing)",
    ]


def test_a_chain_must_start_at_zero(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_chain(path, 10)
    path.write_bytes(b"".join(lines(path)[3:]))
    assert verify([path], None).problems == [
        "audit.jsonl:1: the chain starts at seq 3: records 0..2 are not in these files"
    ]


def test_files_are_put_in_chain_order_whatever_the_arguments(
    tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    chain = Chain("r1")
    parts = [tmp_path / f"part-{name}.jsonl" for name in "cab"]
    for n, part in enumerate(parts):
        write_chain(part, 100, chain=chain, key=signing_key, every=30, closing=n == 2)
    shuffled = parts[:]
    random.Random(7).shuffle(shuffled)
    report = verify(shuffled, signing_key.public_key())
    assert report.ok, report.problems
    assert report.chains == {"r1": chain.next_seq - 1}
    parts[1].unlink()
    assert verify(parts[::2], signing_key.public_key()).problems == [
        "part-b.jsonl:1: sequence jumps from 102 to 206 (a record is missing)"
    ]


def test_replicas_chains_are_verified_independently(
    tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """Two replicas' records interleaved in one file (as in a shared stream)."""
    a, b = Chain("replica-a"), Chain("replica-b")
    path = tmp_path / "stream.jsonl"
    with path.open("wb") as f:
        for n in range(200):
            chain = a if n % 3 else b
            f.write(chain.seal_line(decision(n)).line + b"\n")
        for chain in (a, b):
            f.write(chain.seal_line(checkpoint(chain, signing_key, closing=True)).line + b"\n")
    report = verify([path], signing_key.public_key())
    assert report.ok, report.problems
    assert report.chains == {"replica-a": a.next_seq - 1, "replica-b": b.next_seq - 1}
    raw = lines(path)
    victim = next(i for i, line in enumerate(raw) if b'"chain":"replica-b"' in line and i > 50)
    del raw[victim]
    path.write_bytes(b"".join(raw))
    problems = verify([path], signing_key.public_key()).problems
    assert len(problems) == 1 and "jumps" in problems[0]


def test_a_declared_gap_is_a_note_and_an_undeclared_one_a_problem(tmp_path: Path) -> None:
    chain = Chain("r1")
    path = tmp_path / "audit.jsonl"
    write_chain(path, 5, chain=chain)
    missed = [chain.seal_line(decision(n)) for n in range(5, 8)]  # sealed, never written
    gap = {
        "kind": "gap",
        "missing_from": missed[0].seq,
        "missing_to": missed[-1].seq,
        "reason": "file: disk full",
        "sinks": {"file": {"missing_from": missed[0].seq, "reason": "disk full"}},
    }
    with path.open("ab") as f:
        f.write(chain.seal_line(gap).line + b"\n")
    write_chain(path, 3, chain=chain)
    report = verify([path], None)
    assert report.ok, report.problems
    assert report.notes[0] == (
        "audit.jsonl:6: records 5..7 were not written to every sink, as the writer recorded: "
        "file: disk full"
    )
    raw = lines(path)
    del raw[2]  # a deletion hidden behind the declared gap is still a problem
    path.write_bytes(b"".join(raw))
    assert verify([path], None).problems == [
        "audit.jsonl:3: sequence jumps from 1 to 3 (a record is missing)"
    ]


def test_the_copy_of_a_file_given_twice_overlaps(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_chain(path, 5)
    copy = tmp_path / "copy.jsonl"
    shutil.copy(path, copy)
    problems = verify([path, copy], None).problems
    assert len(problems) == 1 and "comes after seq 4" in problems[0]
    assert verify([path, path], None).ok  # the same file twice is read once


def test_100k_records_verify_in_seconds(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    write_chain(path, 100_000, key=signing_key, every=1000)
    started = time.perf_counter()
    report = verify([path], signing_key.public_key())
    elapsed = time.perf_counter() - started
    print(f"verified {report.records} records in {elapsed:.2f}s")
    assert report.ok, report.problems[:3]
    assert report.records == 100_101
    assert elapsed < 10
