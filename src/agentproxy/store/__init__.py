"""The decision store: `MemoryStore` (embedded default) and `RedisStore` (a fleet)."""

from agentproxy.store.base import (
    ApprovalGrant,
    ApprovalPage,
    LimitExceeded,
    Reservation,
    Revocation,
    Store,
    StoreError,
    TaskHistory,
)
from agentproxy.store.memory import MemoryStore

__all__ = [
    "ApprovalGrant",
    "ApprovalPage",
    "LimitExceeded",
    "MemoryStore",
    "Reservation",
    "Revocation",
    "Store",
    "StoreError",
    "TaskHistory",
]
