"""What ``on_error`` receives."""

from __future__ import annotations

import logging
from typing import Callable, Optional

log = logging.getLogger(__name__)


class WhisperrError:
    """Passed to the ``on_error`` callback (the official SDK's shape).

    ``type`` is one of:

    - ``"auth"``: the server rejected the API key (401/403). Delivery pauses; ops stay queued.
    - ``"retry_exhausted"``: the server or network kept failing; ops stay queued and are
      retried later.
    - ``"dropped"``: ops that will never be delivered: invalid calls (never queued), ops the
      server refused (moved to the dead letters), events past the server's 30-day window,
      and the oldest ops evicted by ``max_queue_size``.
    - ``"store_error"``: the outbox file could not be written (disk full, read-only, locked
      past ``store_timeout``); the op of that call was not stored.
    - ``"config"``: the server answered 404 or 405 for a whole batch: the URL is wrong.
      Delivery pauses; ops stay queued.
    """

    __slots__ = ("message", "status", "type")
    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __init__(self, type: str, message: str, status: Optional[int] = None) -> None:
        self.type = type
        self.message = message
        self.status = status

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WhisperrError):
            return NotImplemented
        return (self.type, self.message, self.status) == (other.type, other.message, other.status)

    def __repr__(self) -> str:
        return (
            f"WhisperrError(type={self.type!r}, message={self.message!r}, status={self.status!r})"
        )


class Reporter:
    """Hands reports to the host's ``on_error`` (if any) from the client, its writer and its
    sender alike; whatever the callback raises stays here, logged at DEBUG."""

    __slots__ = ("_on_error",)

    def __init__(self, on_error: Optional[Callable[[WhisperrError], None]]) -> None:
        self._on_error = on_error

    def __call__(self, error: WhisperrError) -> None:
        if self._on_error is None:
            return
        try:
            self._on_error(error)
        except Exception:  # the host's callback must never break delivery
            log.debug("on_error raised", exc_info=True)
