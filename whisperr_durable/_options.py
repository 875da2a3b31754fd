"""Defaults, limits and the frozen set of options one client runs with."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional
from urllib.parse import urlsplit

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
# Without fsync=True a commit reaches the disk only when something syncs the WAL: the sender
# does at least this often while ops arrive, which bounds what a power cut can take.
DEFAULT_SYNC_INTERVAL = 1.0

# The options a setting can give, each with the variable that sets it (in the environment, or
# in Django's settings or Flask's config) and its default. The client reads the environment
# for any of them not passed; the integrations read their framework's settings; the command
# line reads the same names. The key (WHISPERR_API_KEY) is read by each where it is needed.
SETTINGS: dict[str, tuple[str, Any]] = {
    "base_url": ("WHISPERR_BASE_URL", DEFAULT_BASE_URL),
    "disabled": ("WHISPERR_DISABLED", False),
    "debug": ("WHISPERR_DEBUG", False),
    "app_version": ("WHISPERR_APP_VERSION", None),
    "path": ("WHISPERR_DB_PATH", DEFAULT_PATH),
    "flush_at": ("WHISPERR_FLUSH_AT", DEFAULT_FLUSH_AT),
    "flush_interval": ("WHISPERR_FLUSH_INTERVAL", DEFAULT_FLUSH_INTERVAL),
    "max_queue_size": ("WHISPERR_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE_SIZE),
    "max_batch_size": ("WHISPERR_MAX_BATCH_SIZE", DEFAULT_MAX_BATCH_SIZE),
    "max_retries": ("WHISPERR_MAX_RETRIES", DEFAULT_MAX_RETRIES),
    "request_timeout": ("WHISPERR_REQUEST_TIMEOUT", DEFAULT_REQUEST_TIMEOUT),
    "shutdown_timeout": ("WHISPERR_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT),
    "store_timeout": ("WHISPERR_STORE_TIMEOUT", DEFAULT_STORE_TIMEOUT),
    "max_dead_letters": ("WHISPERR_MAX_DEAD_LETTERS", DEFAULT_MAX_DEAD_LETTERS),
    "fsync": ("WHISPERR_FSYNC", False),
    "sync_interval": ("WHISPERR_SYNC_INTERVAL", DEFAULT_SYNC_INTERVAL),
    "strict": ("WHISPERR_STRICT", False),
    "flush_on_sigterm": ("WHISPERR_FLUSH_ON_SIGTERM", False),
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def from_text(option: str, text: str, source: str = "") -> Any:
    """A setting given as text (an environment variable, say) as ``option``'s type, from
    its default's: ``ValueError`` naming the setting if it is not one."""
    name = source or SETTINGS[option][0]
    default = SETTINGS[option][1]
    value = text.strip()
    try:
        if isinstance(default, bool):
            if value.lower() in _TRUE:
                return True
            if value.lower() in _FALSE:
                return False
            raise ValueError
        if isinstance(default, (int, float)):
            return type(default)(value)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a valid value for {option}") from None
    return value


def setting(option: str, given: Any, environ: Optional[Mapping[str, str]] = None) -> Any:
    """An option's value: ``given`` unless it is ``None``, else its environment variable,
    else its default."""
    if given is not None:
        return given
    name, default = SETTINGS[option]
    text = (os.environ if environ is None else environ).get(name)
    return default if text is None else from_text(option, text)


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
# While the outbox cannot be written, the sender tries to store the ops held in memory this
# often (callers never wait for the disk again during such an episode).
STORE_RETRY_INTERVAL = 1.0


def wait_seconds(seconds: float) -> float:
    """``seconds`` as a timeout that ``threading`` accepts: huge values wait "for ever"."""
    return min(seconds, threading.TIMEOUT_MAX)


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
    sync_interval: float = DEFAULT_SYNC_INTERVAL

    def checked(self) -> Options:
        """These options, validated (``ValueError``) and clamped.

        Counts must be whole numbers; durations finite numbers of seconds, except
        ``shutdown_timeout``, which may be ``inf`` (no limit). The integrations parse options
        from text, so ``"inf"`` or ``"nan"`` can arrive here: they are refused now rather than
        failing later in the sender thread.
        """
        for name in ("flush_at", "max_queue_size", "max_batch_size"):
            _require_int(name, getattr(self, name), minimum=1)
        for name in ("max_retries", "max_dead_letters"):
            _require_int(name, getattr(self, name), minimum=0)
        for name in ("flush_interval", "request_timeout", "sync_interval"):
            _require_seconds(name, getattr(self, name), positive=True)
        _require_seconds("store_timeout", self.store_timeout, positive=False)
        _require_seconds("shutdown_timeout", self.shutdown_timeout, positive=False, inf=True)
        _require_base_url(self.base_url)
        return self._replace(
            max_batch_size=min(self.max_batch_size, MAX_BATCH_SIZE),
            base_url=self.base_url.rstrip("/"),
        )

    def __repr__(self) -> str:
        # Never show the key.
        return f"Options(path={self.path!r}, base_url={self.base_url!r})"


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        rule = "must be positive" if minimum > 0 else "must not be negative"
        raise ValueError(f"{name} {rule}, got {value!r}")


def _require_base_url(value: object) -> None:
    """An http or https URL with a host, and nothing the request paths could not follow: a
    wrong one fails here, at once, instead of in every request."""
    if not isinstance(value, str):
        raise ValueError(f"base_url must be a URL, got {value!r}")
    problem = ""
    try:
        url = urlsplit(value)
        _ = url.port  # raises on a port that is not a number from 0 to 65535
    except ValueError as exc:
        problem = str(exc)
    else:
        if url.scheme not in ("http", "https"):
            problem = "the scheme must be http or https"
        elif not url.hostname:
            problem = "it names no host"
        elif url.query or url.fragment or "?" in value or "#" in value:
            problem = "a query or a fragment cannot be followed by the API's paths"
        elif not (value.isascii() and value.isprintable()) or " " in value:
            problem = "it has spaces or characters that cannot be sent"
    if problem:
        raise ValueError(f"base_url {value!r} is not usable: {problem}")


def _require_seconds(name: str, value: object, *, positive: bool, inf: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if math.isnan(value) or (math.isinf(value) and not (inf and value > 0)):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
