"""Defaults, limits and the frozen set of options one client runs with."""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_BASE_URL = "https://api.whisperr.net"
DEFAULT_PATH = "~/.whisperr.db"

# The official server SDKs' defaults.
DEFAULT_FLUSH_AT = 20
DEFAULT_FLUSH_INTERVAL = 10.0
DEFAULT_MAX_QUEUE_SIZE = 10_000
DEFAULT_MAX_BATCH_SIZE = 500
DEFAULT_MAX_RETRIES = 6
DEFAULT_REQUEST_TIMEOUT = 10.0

# What durability adds.
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
DEFAULT_STORE_TIMEOUT = 5.0
DEFAULT_MAX_DEAD_LETTERS = 1_000

# The server takes at most 500 events per batch.
MAX_BATCH_SIZE = 500
# One op's encoded JSON may be at most this long; larger ops are dropped before queueing.
MAX_OP_BYTES = 32 * 1024
# A batch body is kept under this many bytes (fewer events go in one request if needed).
MAX_BATCH_BYTES = 512 * 1024
# Ops held in memory while the outbox cannot be written (disk full, read-only, locked);
# beyond this many the oldest are dropped.
MAX_OVERFLOW = 1_000
# The server rejects events older than this; we dead-letter them this much sooner, so that
# one does not expire on its way (or through a few minutes of clock skew).
MAX_EVENT_AGE = 30 * 24 * 3600.0
EXPIRY_MARGIN = 300.0
# No lease we give is longer; one further ahead than this means the clock went back.
MAX_LEASE = 600.0

# Backoff: min(BACKOFF_CAP, 2**n) seconds plus up to BACKOFF_JITTER, as the official SDKs.
BACKOFF_CAP = 30.0
BACKOFF_JITTER = 0.25
# A Retry-After header is honoured up to this many seconds.
RETRY_AFTER_CAP = 60.0
# After an auth rejection or exhausted retries, the sender waits this long before it
# tries again on its own (an explicit flush() tries at once).
PAUSE_AFTER_FAILURE = 60.0


class Options(NamedTuple):
    """Everything a client was configured with (``checked()`` validates and clamps)."""

    api_key: str
    path: str
    base_url: str = DEFAULT_BASE_URL
    app_version: str | None = None
    flush_at: int = DEFAULT_FLUSH_AT
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_retries: int = DEFAULT_MAX_RETRIES
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    store_timeout: float = DEFAULT_STORE_TIMEOUT
    max_dead_letters: int = DEFAULT_MAX_DEAD_LETTERS
    fsync: bool = False

    def checked(self) -> Options:
        """These options, validated (``ValueError``) and clamped."""
        positive = {
            "flush_at": self.flush_at,
            "flush_interval": self.flush_interval,
            "max_queue_size": self.max_queue_size,
            "max_batch_size": self.max_batch_size,
            "request_timeout": self.request_timeout,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        non_negative = {
            "max_retries": self.max_retries,
            "shutdown_timeout": self.shutdown_timeout,
            "store_timeout": self.store_timeout,
            "max_dead_letters": self.max_dead_letters,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {value!r}")
        return self._replace(
            max_batch_size=min(self.max_batch_size, MAX_BATCH_SIZE),
            base_url=self.base_url.rstrip("/"),
        )

    def __repr__(self) -> str:
        # Never show the key.
        return f"Options(path={self.path!r}, base_url={self.base_url!r})"
