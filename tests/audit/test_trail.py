"""The trail on real files: ordering, batching, checkpoints, rotation, restarts, recovery and
failing sinks. Every log it leaves must verify."""

from __future__ import annotations

import asyncio
import io
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentproxy.audit.chain import hmac_value
from agentproxy.audit.settings import AuditSettings
from agentproxy.audit.sinks import AuditError, FileSink, rotated_files
from agentproxy.audit.trail import SEAL_CHUNK, AuditTrail
from agentproxy.audit.verify import verify
from tests.audit.conftest import append, decision, lines, make_directory, read, records, write
from tests.harness.clock import FakeClock


async def run(settings: AuditSettings, count: int, start: int = 0) -> AuditTrail:
    trail = AuditTrail(settings)
    await trail.start()
    await asyncio.gather(*(trail.submit(decision(n)) for n in range(start, start + count)))
    await trail.close()
    return trail


def all_files(log_path: Path) -> list[Path]:
    return [*rotated_files(log_path), log_path]


async def test_records_are_chained_in_submit_order(
    settings: AuditSettings, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    await run(settings, 25)
    written = records(log_path)
    assert [r["n"] for r in written if r["kind"] == "decision"] == list(range(25))
    assert [r["seq"] for r in written] == list(range(len(written)))
    assert [r["seq"] for r in written if r["kind"] == "checkpoint"] == [10, 21, 27]
    assert written[-1]["closing"] is True
    assert verify([log_path], signing_key.public_key()).ok


async def test_the_checkpoint_file_holds_the_latest_checkpoint(
    settings: AuditSettings, log_path: Path
) -> None:
    await run(settings, 15)
    saved = orjson.loads(read(Path(f"{log_path}.checkpoint")))
    assert saved == {"r1": records(log_path)[-1]}


async def test_a_restart_continues_the_chain(
    settings: AuditSettings, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    await run(settings, 12)
    first_run = len(lines(log_path))
    await run(settings, 12, start=12)
    written = records(log_path)
    assert written[first_run]["seq"] == first_run
    assert written[first_run]["prev"] == written[first_run - 1]["hash"]
    report = verify([log_path], signing_key.public_key())
    assert report.ok and report.notes == [], (report.problems, report.notes)
    assert report.chains == {"r1": len(written) - 1}


async def test_another_replica_starts_its_own_chain_in_the_same_file(
    settings: AuditSettings, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    await run(settings, 5)
    await run(replace(settings, replica="r2"), 5)
    await run(settings, 5)
    report = verify([log_path], signing_key.public_key())
    assert report.ok, report.problems
    assert set(report.chains) == {"r1", "r2"}


async def test_the_replica_defaults_to_host_and_pid(settings: AuditSettings) -> None:
    trail = AuditTrail(replace(settings, replica=""))
    await trail.start()
    assert trail.chain_id is not None and trail.chain_id.endswith(f"-{os.getpid()}")
    await trail.close()


async def test_size_rotation_keeps_one_chain_across_files(
    settings: AuditSettings, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    small = replace(settings, max_file_bytes=4096)
    trail = AuditTrail(small)
    await trail.start()
    for n in range(120):
        await trail.submit(decision(n))
    await trail.close()
    rotated = rotated_files(log_path)
    assert len(rotated) >= 3
    assert all(path.stat().st_size <= 4096 for path in rotated)
    firsts = [orjson.loads(lines(path)[0])["seq"] for path in all_files(log_path)]
    assert firsts == sorted(firsts)  # names sort in chain order
    report = verify(all_files(log_path)[::-1], signing_key.public_key())
    assert report.ok, report.problems
    assert list(report.chains) == ["r1"]
    assert report.records == sum(len(lines(p)) for p in all_files(log_path))


async def test_a_restart_right_after_a_rotation_continues_from_the_rotated_file(
    settings: AuditSettings, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    await run(settings, 12)
    await asyncio.to_thread(
        log_path.rename, log_path.with_name("audit.jsonl.20250101T000000.000000Z")
    )
    await run(settings, 12, start=12)
    report = verify(all_files(log_path), signing_key.public_key())
    assert report.ok and report.notes == [], (report.problems, report.notes)
    assert records(log_path)[0]["seq"] > 0


async def test_time_rotation_on_utc_aligned_periods(
    settings: AuditSettings, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    clock = FakeClock(1_800_000_000.0)  # 2027-01-15T08:00:00Z
    hourly = replace(settings, rotate_every=3600)
    trail = AuditTrail(hourly, clock=clock)
    await trail.start()
    await trail.submit(decision(0))
    clock.advance(3599)
    await trail.submit(decision(1))
    assert rotated_files(log_path) == []
    clock.advance(2)
    await trail.submit(decision(2))
    await trail.close()
    assert [p.name for p in rotated_files(log_path)] == ["audit.jsonl.20270115T090001.000000Z"]
    assert verify(all_files(log_path), signing_key.public_key()).ok


async def test_a_second_writer_on_the_same_file_is_refused(settings: AuditSettings) -> None:
    first = AuditTrail(settings)
    await first.start()
    with pytest.raises(AuditError, match=r"another process writes it .*audit\.jsonl\.lock"):
        await AuditTrail(settings).start()
    await first.close()
    second = AuditTrail(settings)
    await second.start()
    await second.close()


async def test_an_incomplete_last_line_is_moved_aside_and_recorded(
    settings: AuditSettings, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    await run(settings, 12)
    complete = read(log_path)
    fragment = b'{"agent":"hr-bot","chain":"r1","kind":"decision","n":1'
    append(log_path, fragment)
    assert verify([log_path], signing_key.public_key()).problems == [
        f"audit.jsonl:{len(lines(log_path))}: last line is incomplete "
        f"(the writer stopped mid-record)"
    ]
    await run(settings, 3, start=12)
    assert read(log_path).startswith(complete)
    (moved,) = log_path.parent.glob("audit.jsonl.*.fragment")
    assert moved.read_bytes() == fragment
    recovered = records(log_path)[len(complete.splitlines())]
    assert recovered["kind"] == "recovered"
    assert recovered["fragment"] == moved.name
    assert recovered["fragment_bytes"] == len(fragment)
    report = verify(sorted(log_path.parent.iterdir()), signing_key.public_key())
    assert report.ok, report.problems
    assert len(report.notes) == 1 and report.notes[0].startswith(
        f"audit.jsonl:{len(complete.splitlines()) + 1}: recovered: audit.jsonl ended in an "
        f"incomplete line ({len(fragment)} bytes"
    )


async def test_a_truncated_log_continues_after_its_checkpoint_file(
    settings: AuditSettings, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """The log lost its tail (and last checkpoint) while the writer was down: the next writer
    continues after the checkpoint file, says so, and verify still reports the loss."""
    await run(settings, 30)
    raw = lines(log_path)
    write(log_path, b"".join(raw[:15]))
    await run(settings, 3, start=30)
    written = records(log_path)
    assert written[15]["kind"] == "recovered"
    assert written[15]["seq"] == len(raw)
    assert "continuing after the checkpoint" in written[15]["detail"]
    assert verify([log_path], signing_key.public_key()).problems == [
        f"audit.jsonl:16: sequence jumps from 14 to {len(raw)} (a record is missing)"
    ]


async def test_a_file_that_becomes_a_directory_fails_the_futures(
    settings: AuditSettings, log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dropped: list[int] = []
    copy = io.BytesIO()
    both = replace(settings, stdout=True)
    trail = AuditTrail(both, on_drop=dropped.append, stdout=copy)
    await trail.start()
    await trail.submit(decision(0))
    make_directory(log_path)
    with caplog.at_level(logging.ERROR, logger="agentproxy.audit"):
        futures = [trail.submit(decision(n)) for n in range(1, 4)]
        for future in futures:
            with pytest.raises(AuditError, match=r"audit file .*audit\.jsonl: write failed"):
                await future
    assert trail.dropped == 3 and sum(dropped) == 3
    assert "did not take" in caplog.text and "dropped 3 record(s)" in caplog.text
    await asyncio.to_thread(log_path.rmdir)
    await trail.submit(decision(4))  # the path is writable again
    await trail.close()
    gap = records(log_path)[0]
    assert gap["kind"] == "gap"
    assert (gap["missing_from"], gap["missing_to"]) == (1, 3)
    assert list(gap["sinks"]) == [f"file:{log_path}"]
    # stdout took every record: its copy verifies, the gap a note
    stream = log_path.parent / "stdout.jsonl"
    stream.write_bytes(copy.getvalue())
    report = verify([stream], None)
    assert report.ok, report.problems
    assert any("records 1..3 were not written to every sink" in note for note in report.notes)


async def test_a_failed_batch_is_a_declared_gap_in_that_file(
    settings: AuditSettings,
    log_path: Path,
    signing_key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trail = AuditTrail(settings)
    await trail.start()
    await trail.submit(decision(0))
    real_write = FileSink.write

    async def disk_full(self: FileSink, batch: list[bytes]) -> None:
        raise AuditError("disk full")

    monkeypatch.setattr(FileSink, "write", disk_full)
    with pytest.raises(AuditError, match="disk full"):
        await asyncio.gather(*(trail.submit(decision(n)) for n in range(1, 5)))
    monkeypatch.setattr(FileSink, "write", real_write)
    await trail.submit(decision(5))
    await trail.close()
    assert trail.dropped == 4
    report = verify([log_path], signing_key.public_key())
    assert report.ok, report.problems
    assert report.notes == [
        "audit.jsonl:2: records 1..4 were not written to every sink, as the writer "
        f"recorded: file:{log_path}: disk full"
    ]


async def test_an_unwritable_file_fails_start(settings: AuditSettings, log_path: Path) -> None:
    make_directory(log_path)
    with pytest.raises(AuditError, match=r"audit file .*audit\.jsonl: cannot open"):
        await AuditTrail(settings).start()


async def test_a_full_queue_fails_at_once_and_counts(settings: AuditSettings) -> None:
    dropped: list[int] = []
    trail = AuditTrail(replace(settings, queue_size=2), on_drop=dropped.append)
    await trail.start()
    futures = [trail.submit(decision(n)) for n in range(5)]
    assert [f.done() for f in futures] == [False, False, True, True, True]
    for future in futures[2:]:
        with pytest.raises(AuditError, match="queue full"):
            future.result()
    await asyncio.gather(*futures[:2])
    assert trail.dropped == 3 and dropped == [1, 1, 1]
    await trail.close()


async def test_unusable_records_are_refused(settings: AuditSettings) -> None:
    trail = AuditTrail(settings)
    refused = trail.submit(decision(0))
    with pytest.raises(AuditError, match="not running"):
        await refused
    await trail.start()
    for record, reason in [
        ({**decision(0), "seq": 3}, "seq"),
        ({"kind": "checkpoint"}, "kind 'checkpoint'"),
        ({**decision(0), "x": object()}, "not JSON-serializable"),
    ]:
        with pytest.raises(AuditError, match=reason):
            await trail.submit(record)
    await trail.close()
    assert trail.dropped == 4


async def test_the_record_is_a_snapshot_redacted_as_configured(
    settings: AuditSettings, log_path: Path
) -> None:
    key = b"hmac-key"
    trail = AuditTrail(replace(settings, redact=("args.ssn",), hmac_key=key))
    await trail.start()
    record = decision(0, args={"ssn": "123-45-6789", "name": "Bob"})
    future = trail.submit(record)
    record["args"]["name"] = "changed after submit"
    record["effect"] = "deny"
    await future
    await trail.close()
    written = records(log_path)[0]
    assert written["args"] == {"ssn": hmac_value(key, "123-45-6789"), "name": "Bob"}
    assert written["effect"] == "allow"
    assert b"123-45-6789" not in read(log_path)


async def test_many_concurrent_submits_are_batched(
    settings: AuditSettings, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    await run(replace(settings, checkpoint_every=1000), 5000)
    assert len(lines(log_path)) == 5000 + 5 + 1
    assert verify([log_path], signing_key.public_key()).ok


async def test_stdout_only_chains_are_named_by_their_start(key_file: Path) -> None:
    copy = io.BytesIO()
    settings = AuditSettings(stdout=True, replica="r1", signing_key_file=key_file)
    trail = AuditTrail(settings, stdout=copy, clock=FakeClock(1_800_000_000.0))
    await trail.start()
    await trail.submit(decision(0))
    await trail.close()
    assert trail.chain_id == "r1@20270115T080000.000000Z"
    assert [orjson.loads(line)["kind"] for line in copy.getvalue().splitlines()] == [
        "decision",
        "checkpoint",
    ]


def test_settings_hide_the_hmac_key_and_check_bounds(tmp_path: Path) -> None:
    settings = AuditSettings(file=tmp_path / "a.jsonl", hmac_key=b"very-secret-key")
    assert "very-secret-key" not in repr(settings) and "hmac_key=***" in repr(settings)
    for wrong in (
        {"checkpoint_every": 0},
        {"queue_size": 0},
        {"rotate_every": 0.0},
        {"redis_stream": "s"},
    ):
        with pytest.raises(ValueError):
            AuditSettings(file=tmp_path / "a.jsonl", **wrong)
    with pytest.raises(ValueError, match="no sink"):
        AuditTrail(AuditSettings())


def test_a_signing_key_that_is_not_ed25519_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "ec.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    settings = AuditSettings(stdout=True, signing_key_file=path)
    with pytest.raises(ValueError, match=rf"{path}: not an Ed25519 private key"):
        AuditTrail(settings)
    with pytest.raises(ValueError, match="cannot read"):
        AuditTrail(replace(settings, signing_key_file=tmp_path / "missing.pem"))


@pytest.mark.parametrize("required", [False, True])
async def test_without_required_the_writer_lingers_to_batch(
    settings: AuditSettings, log_path: Path, required: bool
) -> None:
    """Records 1 ms apart share a write (and its fsync) unless calls wait for them."""
    trail = AuditTrail(replace(settings, required=required, signing_key_file=None))
    await trail.start()
    sizes: list[int] = []
    write = trail._write

    async def counting(sealed: list[object]) -> list[str]:
        sizes.append(len(sealed))
        return await write(sealed)  # type: ignore[arg-type]

    trail._write = counting  # type: ignore[method-assign,assignment]
    futures = []
    for n in range(3):
        futures.append(trail.submit(decision(n)))
        await asyncio.sleep(0.001)
    await asyncio.gather(*futures)
    await trail.close()
    # The first record: alone when calls wait for it; joined by the one submitted 1 ms later
    # (its timer fires before the writer's linger ends) when nobody waits.
    assert sizes[0] == 1 if required else sizes[0] >= 2
    assert sum(sizes) == 3
    assert verify([log_path], None).ok


async def test_a_large_batch_is_sealed_in_chunks_with_the_loop_served_between(
    settings: AuditSettings, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """A lingered batch can hold hundreds of records: calls arriving while it is sealed are
    served between chunks, and what they post joins the next batch, the chain unbroken."""
    trail = AuditTrail(replace(settings, signing_key_file=None))
    await trail.start()
    ticks = 0
    sealed_at: list[int] = []
    seal = trail._seal

    both_batches = asyncio.Event()

    def counting(record: dict[str, object]) -> list[object]:
        sealed_at.append(ticks)
        if len(sealed_at) > 5 * SEAL_CHUNK:  # the batch, then the next one
            both_batches.set()
        return seal(record)  # type: ignore[return-value]

    trail._seal = counting  # type: ignore[method-assign,assignment]

    async def ticker() -> None:
        nonlocal ticks
        posted = False
        while True:
            await asyncio.sleep(0)
            ticks += 1
            if sealed_at and not posted:  # a call arriving mid-batch
                trail.post(decision(999))
                posted = True

    for n in range(5 * SEAL_CHUNK):
        trail.post(decision(n))
    task = asyncio.create_task(ticker())
    await asyncio.wait_for(both_batches.wait(), 5)
    task.cancel()
    await trail.close()
    batch = sealed_at[: 5 * SEAL_CHUNK]
    assert max(batch.count(tick) for tick in set(batch)) <= SEAL_CHUNK
    assert batch == sorted(batch) and batch[-1] > batch[0]
    written = [r["n"] for r in records(log_path) if r["kind"] == "decision"]
    assert written == [*range(5 * SEAL_CHUNK), 999]
    assert verify([log_path], None).ok


async def test_posted_records_are_chained_with_submitted_ones_in_order(
    settings: AuditSettings, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    trail = AuditTrail(settings)
    await trail.start()
    for n in range(6):
        if n % 2:
            trail.post(decision(n))
        else:
            trail.submit(decision(n))
    await trail.close()
    assert [r["n"] for r in records(log_path) if r["kind"] == "decision"] == list(range(6))
    assert trail.dropped == 0
    assert verify([log_path], signing_key.public_key()).ok


async def test_an_unusable_posted_record_is_dropped_alone_at_sealing(
    settings: AuditSettings, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """`post` takes no snapshot: what cannot be sealed is found by the writer, counted, and
    leaves no hole in the chain; the rest of its batch is written."""

    @dataclass
    class Unsorted:  # orjson would write these fields unsorted: a hash nobody could check
        zeta: int = 1
        alpha: int = 2

    dropped: list[int] = []
    trail = AuditTrail(settings, on_drop=dropped.append)
    trail.post(decision(0))  # not started yet
    await trail.start()
    trail.post(decision(1))
    trail.post({**decision(2), "x": object()})
    trail.post({**decision(3), "x": Unsorted()})
    trail.post({**decision(4), "seq": 9})
    trail.post({"kind": "gap", "missing_from": 0})
    trail.post(decision(5))
    await trail.close()
    assert [r["n"] for r in records(log_path) if r["kind"] == "decision"] == [1, 5]
    assert trail.dropped == 5 and sum(dropped) == 5
    assert verify([log_path], signing_key.public_key()).ok


async def test_a_posted_record_is_redacted_as_configured(
    settings: AuditSettings, log_path: Path
) -> None:
    key = b"hmac-key"
    trail = AuditTrail(replace(settings, redact=("args.ssn",), hmac_key=key))
    await trail.start()
    record = decision(0, args={"ssn": "123-45-6789", "name": "Bob"})
    trail.post(record)
    await trail.close()
    assert records(log_path)[0]["args"] == {"ssn": hmac_value(key, "123-45-6789"), "name": "Bob"}
    assert record["args"]["ssn"] == "123-45-6789"  # the caller's record is left as it was
    assert b"123-45-6789" not in read(log_path)


async def test_a_full_queue_drops_posted_records_at_once(settings: AuditSettings) -> None:
    trail = AuditTrail(replace(settings, queue_size=2))
    await trail.start()
    for n in range(5):
        trail.post(decision(n))
    assert trail.dropped == 3
    await trail.close()


async def test_a_record_the_trail_cannot_take_is_sealed_as_a_gap_that_verify_reports(
    settings: AuditSettings, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """A record refused before it was sealed (a member only the trail writes, a value that is
    not JSON) leaves a sealed `gap` record saying how many and why: the loss is in the chain,
    and `verify` names it."""
    trail = AuditTrail(settings)
    await trail.start()
    await trail.submit(decision(0))
    refused = [
        trail.submit({"kind": "approval", "chain": ["alice"]}),
        trail.submit({"kind": "decision", "n": 1, "bad": {1, 2}}),
    ]
    for future in refused:
        with pytest.raises(AuditError):
            await future
    await trail.submit(decision(2))
    await trail.close()
    written = records(log_path)
    (gap,) = [r for r in written if r["kind"] == "gap"]
    assert gap["dropped"] == 2
    assert "only the trail may write" in gap["reason"] and "JSON" in gap["reason"]
    report = verify([log_path], signing_key.public_key())
    assert report.ok  # the chain is whole; what it lacks, it says
    assert any("2 record(s) were lost before they were sealed" in n for n in report.notes)
