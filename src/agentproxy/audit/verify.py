"""`verify`: is this audit log whole and unedited? Every problem names its file and line.

Each chain (one per replica) is checked on its own, in `seq` order, whatever the order of the
files given or how chains interleave within them: within a file, each record must hash to its
`hash` and link to the chain's previous record there (`seq` + 1, `prev` = its hash); across
files, the pieces of a chain are put in order by their first `seq` and linked the same way.

Problems (`ok` is False): a hash that does not match its content, a broken link (a record
removed, inserted, replayed or reordered), a chain that does not start at seq 0, an incomplete
last line, a line that is not an audit record, a checkpoint whose signature is bad, and a log
that ends before, or disagrees with, its `.checkpoint` file (the log of `audit.jsonl` has its
checkpoint file at `audit.jsonl.checkpoint`; it is found by itself or may be given).

Notes (informational): a `gap` record the writer sealed for records a sink never got (a jump
is accepted only where such a record declares exactly it), a `recovered` record (the writer
moved an incomplete line aside at start), and a chain that does not end with a closing
checkpoint. The last cannot be a problem by default: a cut-off tail looks exactly like a
writer that is still running or was killed, unless the checkpoint file or another sink says
otherwise. Pass `closed=True` when the writer is known to have stopped cleanly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agentproxy.audit.chain import GENESIS, checkpoint_valid
from agentproxy.audit.keys import load_public_key

__all__ = ["VerifyReport", "load_public_key", "verify"]

MAX_PROBLEMS = 1000
SIDECAR_SUFFIXES = (".lock", ".tmp", ".fragment")
_SORTED = orjson.OPT_SORT_KEYS


@dataclass(slots=True)
class VerifyReport:
    """`records`: parsed records; `chains`: each chain's highest seq; `checkpoints`: checkpoint
    records seen (their signatures checked when a key was given)."""

    records: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chains: dict[str, int] = field(default_factory=dict)
    checkpoints: int = 0
    omitted: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.omitted

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self.omitted += 1


@dataclass(slots=True)
class _Tail:
    """A chain's last record so far (its highest seq) in one file."""

    seq: int
    hash: str
    file: str
    line: int
    closing: bool = False


@dataclass(slots=True)
class _Head:
    """What links a chain's first record in a file to the record before it."""

    seq: int
    prev: str
    file: str
    line: int
    gap_from: frozenset[int] = frozenset()
    gap_to: int | None = None


@dataclass(slots=True)
class _Segment:
    head: _Head
    tail: _Tail


@dataclass(slots=True)
class _Checkpoint:
    source: str
    seq: int
    hash: str


def verify(
    files: Sequence[Path], public_key: Ed25519PublicKey | None, *, closed: bool = False
) -> VerifyReport:
    """Checks the chains in `files` (rotated files, current file, checkpoint files; lock,
    temporary and fragment files are skipped). Never raises for what it reads: an unreadable
    file is a problem in the report."""
    return _Verifier(public_key, closed).run(files)


class _Verifier:
    def __init__(self, public_key: Ed25519PublicKey | None, closed: bool) -> None:
        self.key = public_key
        self.closed = closed
        self.report = VerifyReport()
        self.segments: dict[str, list[_Segment]] = {}
        self.last_checkpoint: dict[str, int] = {}
        self.wanted: dict[tuple[str, int], list[_Checkpoint]] = {}
        self.found: dict[tuple[str, int], tuple[str, str]] = {}

    def run(self, files: Sequence[Path]) -> VerifyReport:
        logs: list[Path] = []
        checkpoint_files: list[Path] = []
        for path in dict.fromkeys(Path(f) for f in files):
            if path.name.endswith(".checkpoint"):
                checkpoint_files.append(path)
            elif not path.name.endswith(SIDECAR_SUFFIXES):
                logs.append(path)
                beside = path.with_name(path.name + ".checkpoint")
                if beside.is_file():
                    checkpoint_files.append(beside)
        names = [p.name for p in logs]
        for path in dict.fromkeys(checkpoint_files):
            self.read_checkpoint_file(path)
        for path in logs:
            self.scan(path, path.name if names.count(path.name) == 1 else str(path))
        for chain, segments in self.segments.items():
            self.link_segments(chain, segments)
        self.compare_checkpoint_files()
        if self.report.checkpoints and self.key is None:
            self.report.notes.append("checkpoint signatures not checked (no public key given)")
        if self.report.omitted:
            self.report.problems.append(f"… and {self.report.omitted} more problems")
        return self.report

    def scan(self, path: Path, name: str) -> None:
        report = self.report
        loads, dumps, sha256 = orjson.loads, orjson.dumps, hashlib.sha256
        here: dict[str, _Segment] = {}
        try:
            f = path.open("rb")
        except OSError as exc:
            report.problem(f"{name}: cannot read: {exc.strerror or exc}")
            return
        with f:
            for number, raw in enumerate(f, 1):
                if raw[-1:] != b"\n":
                    report.problem(
                        f"{name}:{number}: last line is incomplete (the writer stopped mid-record)"
                    )
                    break
                try:
                    record = loads(raw)
                except orjson.JSONDecodeError:
                    report.problem(f"{name}:{number}: not valid JSON (edited or corrupted)")
                    continue
                if type(record) is not dict:
                    report.problem(f"{name}:{number}: not an audit record (not a JSON object)")
                    continue
                stored = record.pop("hash", None)
                chain, seq, prev = record.get("chain"), record.get("seq"), record.get("prev")
                if not (
                    type(stored) is str
                    and type(chain) is str
                    and type(seq) is int
                    and type(prev) is str
                ):
                    report.problem(
                        f"{name}:{number}: not an audit record (chain, seq, prev or hash missing)"
                    )
                    continue
                report.records += 1
                digest = sha256(dumps(record, option=_SORTED)).hexdigest()
                if digest != stored:
                    report.problem(f"{name}:{number}: hash does not match its content (edited?)")
                    # The stored hash, so that the next link is not blamed for the same edit.
                    digest = stored
                kind = record.get("kind")
                closing = False
                if kind is not None and kind in ("checkpoint", "gap", "recovered"):
                    closing = self.control(record, name, number)
                if (chain, seq) in self.wanted:
                    self.found[(chain, seq)] = (digest, f"{name}:{number}")
                segment = here.get(chain)
                if segment is None:
                    head = _Head(seq, prev, name, number, *_declared_gap(record))
                    segment = _Segment(head, _Tail(seq, digest, name, number, closing))
                    here[chain] = segment
                    self.segments.setdefault(chain, []).append(segment)
                    continue
                tail = segment.tail
                if seq == tail.seq + 1 and prev == tail.hash:
                    tail.seq, tail.hash, tail.line, tail.closing = seq, digest, number, closing
                    continue
                head = _Head(seq, prev, name, number, *_declared_gap(record))
                if self.link(tail, head):
                    tail.seq, tail.hash, tail.line, tail.closing = seq, digest, number, closing

    def control(self, record: dict[str, Any], name: str, number: int) -> bool:
        """Checks a checkpoint, notes a gap or a recovery; True for a good closing checkpoint."""
        report, kind, seq = self.report, record["kind"], record["seq"]
        where = f"{name}:{number}"
        if kind == "gap" and "dropped" in record:
            report.notes.append(
                f"{where}: {record.get('dropped')} record(s) were lost before they were sealed, "
                f"as the writer recorded: {record.get('reason', '')}"
            )
            return False
        if kind == "gap":
            report.notes.append(
                f"{where}: records {record.get('missing_from')}..{record.get('missing_to')} "
                f"were not written to every sink, as the writer recorded: "
                f"{record.get('reason', '')}"
            )
            return False
        if kind == "recovered":
            report.notes.append(f"{where}: recovered: {record.get('detail', '')}")
            return False
        report.checkpoints += 1
        self.last_checkpoint[record["chain"]] = seq
        good = True
        if record.get("head") != record["prev"]:
            report.problem(f"{where}: checkpoint at seq {seq}: head is not the previous hash")
            good = False
        if self.key is not None and not checkpoint_valid(record, self.key):
            report.problem(f"{where}: checkpoint at seq {seq} signature invalid")
            good = False
        return good and record.get("closing") is True

    def link(self, tail: _Tail | None, head: _Head) -> bool:
        """Checks that `head` follows `tail` (None: the chain's first record). Returns whether
        the chain advances to it (not when it goes back: the highest seq stays the reference,
        so one swapped pair is two problems, not three)."""
        where = f"{head.file}:{head.line}"
        declared = head.gap_to == head.seq - 1
        if tail is None:
            if head.seq == 0:
                if head.prev != GENESIS:
                    self.report.problem(f"{where}: the first record's prev is not {GENESIS}")
            elif not (declared and 0 in head.gap_from):
                self.report.problem(
                    f"{where}: the chain starts at seq {head.seq}: "
                    f"records 0..{head.seq - 1} are not in these files"
                )
            return True
        before = f"line {tail.line}" if tail.file == head.file else f"{tail.file}:{tail.line}"
        if head.seq == tail.seq + 1:
            if head.prev != tail.hash:
                self.report.problem(
                    f"{where}: prev does not match the hash of {before} "
                    f"(record removed, inserted or reordered)"
                )
            return True
        if head.seq > tail.seq + 1:
            if not (declared and tail.seq + 1 in head.gap_from):
                self.report.problem(
                    f"{where}: sequence jumps from {tail.seq} to {head.seq} (a record is missing)"
                )
            return True
        self.report.problem(
            f"{where}: seq {head.seq} comes after seq {tail.seq} ({before}): "
            f"a record was duplicated, inserted or reordered"
        )
        return False

    def link_segments(self, chain: str, segments: list[_Segment]) -> None:
        segments.sort(key=lambda s: s.head.seq)
        tail: _Tail | None = None
        for segment in segments:
            advances = self.link(tail, segment.head)
            if tail is None or advances or segment.tail.seq > tail.seq:
                tail = segment.tail
        assert tail is not None
        self.report.chains[chain] = tail.seq
        if tail.closing:
            return
        last = self.last_checkpoint.get(chain)
        text = (
            f"{tail.file}:{tail.line}: chain {chain!r} ends at seq {tail.seq} without a "
            f"closing checkpoint"
            + ("" if last is None else f" (its last checkpoint is at seq {last})")
            + ": the writer is still running or stopped abruptly, or its tail was cut off"
        )
        if self.closed:
            self.report.problem(text)
        else:
            self.report.notes.append(text)

    def read_checkpoint_file(self, path: Path) -> None:
        try:
            saved = orjson.loads(path.read_bytes())
        except OSError as exc:
            self.report.problem(f"{path.name}: cannot read: {exc.strerror or exc}")
            return
        except orjson.JSONDecodeError:
            self.report.problem(f"{path.name}: not valid JSON (edited or corrupted)")
            return
        if not isinstance(saved, dict):
            self.report.problem(f"{path.name}: not a checkpoint file (not a JSON object)")
            return
        for chain, record in saved.items():
            where = f"{path.name}: chain {chain!r}"
            if not (
                isinstance(record, dict)
                and record.get("chain") == chain
                and type(record.get("seq")) is int
                and isinstance(record.get("hash"), str)
            ):
                self.report.problem(f"{where}: not a checkpoint record")
                continue
            seq = record["seq"]
            body = {k: v for k, v in record.items() if k != "hash"}
            if hashlib.sha256(orjson.dumps(body, option=_SORTED)).hexdigest() != record["hash"]:
                self.report.problem(f"{where}: checkpoint at seq {seq}: hash does not match")
            if self.key is not None and not checkpoint_valid(record, self.key):
                self.report.problem(f"{where}: checkpoint at seq {seq} signature invalid")
            self.wanted.setdefault((chain, seq), []).append(
                _Checkpoint(path.name, seq, record["hash"])
            )

    def compare_checkpoint_files(self) -> None:
        for (chain, seq), saved in self.wanted.items():
            for checkpoint in saved:
                end = self.report.chains.get(chain)
                if end is None:
                    self.report.problem(
                        f"{checkpoint.source}: holds chain {chain!r} at seq {seq}, but no "
                        f"record of that chain is in the log (deleted?)"
                    )
                elif end < seq:
                    self.report.problem(
                        f"{checkpoint.source}: log ends at seq {end} but the checkpoint file "
                        f"says {seq} (truncated)"
                    )
                elif (chain, seq) not in self.found:
                    self.report.notes.append(
                        f"{checkpoint.source}: the checkpoint at seq {seq} of chain {chain!r} "
                        f"is in files not given"
                    )
                elif self.found[(chain, seq)][0] != checkpoint.hash:
                    self.report.problem(
                        f"{self.found[(chain, seq)][1]}: the record at seq {seq} is not the "
                        f"checkpoint {checkpoint.source} holds (rewritten)"
                    )


def _declared_gap(record: dict[str, Any]) -> tuple[frozenset[int], int | None]:
    """The seqs a gap record says sinks started missing from, and the last it missed."""
    if record.get("kind") != "gap" or type(record.get("missing_to")) is not int:
        return frozenset(), None
    starts = {record.get("missing_from")}
    sinks = record.get("sinks")
    if isinstance(sinks, dict):
        starts |= {s.get("missing_from") for s in sinks.values() if isinstance(s, dict)}
    return frozenset(s for s in starts if type(s) is int), record["missing_to"]
