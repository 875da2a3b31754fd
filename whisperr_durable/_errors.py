"""What ``on_error`` receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
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
    """

    type: str
    message: str
    status: Optional[int] = None
