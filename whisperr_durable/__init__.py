"""Whisperr server-side SDK for Python whose event queue lives on disk.

    from whisperr_durable import Whisperr

    whisperr = Whisperr(api_key=os.environ["WHISPERR_API_KEY"], path="~/.whisperr.db")
    whisperr.track("user_8842", "payment_failed", {"amount_cents": 4900})

``track()`` returns once the event is committed to a SQLite outbox; a background thread
delivers it. Nothing that was not delivered is lost to a crash, a kill or a restart: the
next client to open the same file delivers it, with the same ``$message_id``.
"""

import logging
from typing import TYPE_CHECKING, Any

from ._billing import BillingEvent
from ._client import BulkResult, DurableWhisperr, Whisperr
from ._errors import WhisperrError
from ._sender import FlushResult
from ._store import DeadLetter, OutboxStats, StoreError
from ._version import __version__
from ._wire import SDK_NAME

__all__ = [
    "SDK_NAME",
    "BillingEvent",
    "BulkResult",
    "DeadLetter",
    "DurableWhisperr",
    "FlushResult",
    "KeyStatus",
    "OutboxFile",
    "OutboxStats",
    "OutboxStatus",
    "QueuedOp",
    "StoreError",
    "Whisperr",
    "WhisperrError",
    "__version__",
]

if TYPE_CHECKING:
    from ._admin import KeyStatus, OutboxFile, OutboxStatus, QueuedOp

# The operators' view of a file is imported on first use: a client does not need it.
_ADMIN = ("KeyStatus", "OutboxFile", "OutboxStatus", "QueuedOp")


def __getattr__(name: str) -> Any:
    if name in _ADMIN:
        from . import _admin

        return getattr(_admin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


logging.getLogger("whisperr_durable").addHandler(logging.NullHandler())
