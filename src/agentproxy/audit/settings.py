"""What the audit trail is told: its sinks, keys, checkpoint cadence and bounds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agentproxy.config.model import RedisSettings


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """`hmac_key` (for `redact`) never shows in `repr`; `redis` is the store's connection, used
    for `redis_stream`. `replica` names this writer's chain; empty: `<hostname>-<pid>`, fixed at
    start. Keep it stable across restarts (a pod name) for the chain to continue, and unique
    among the writers of one stream. `rotate_every` (seconds) rotates the file at UTC-aligned
    boundaries (3600: on the hour). Raises ValueError when a bound is out of range."""

    file: Path | None = None
    stdout: bool = False
    redis_stream: str | None = None
    redis: RedisSettings | None = None
    hmac_key: bytes | None = None
    signing_key_file: Path | None = None
    checkpoint_every: int = 1000
    required: bool = False
    max_file_bytes: int = 100 * 2**20
    rotate_every: float | None = None
    queue_size: int = 10_000
    replica: str = ""
    redact: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ValueError("audit checkpoint_every must be at least 1")
        if self.max_file_bytes < 1:
            raise ValueError("audit max_file_bytes must be positive")
        if self.rotate_every is not None and not self.rotate_every > 0:
            raise ValueError("audit rotate_every must be positive")
        if self.queue_size < 1:
            raise ValueError("audit queue_size must be at least 1")
        if self.redis_stream is not None and self.redis is None:
            raise ValueError("audit redis_stream needs the store's redis settings")

    @property
    def enabled(self) -> bool:
        return self.file is not None or self.stdout or self.redis_stream is not None

    def __repr__(self) -> str:
        return (
            f"AuditSettings(file={self.file!r}, stdout={self.stdout!r}, "
            f"redis_stream={self.redis_stream!r}, redis={self.redis!r}, "
            f"hmac_key={'***' if self.hmac_key else None}, "
            f"signing_key_file={self.signing_key_file!r}, "
            f"checkpoint_every={self.checkpoint_every!r}, required={self.required!r}, "
            f"max_file_bytes={self.max_file_bytes!r}, rotate_every={self.rotate_every!r}, "
            f"queue_size={self.queue_size!r}, replica={self.replica!r}, redact={self.redact!r})"
        )

    __str__ = __repr__
