"""Delivery decisions as pure functions: status classes, backoff, Retry-After."""

from __future__ import annotations

import random
from datetime import timezone
from typing import Callable, Optional

from ._options import BACKOFF_CAP, BACKOFF_JITTER, RETRY_AFTER_CAP

OK = "ok"  # delivered: remove for good
RETRY = "retry"  # 429, 5xx, network error, timeout: try again later
AUTH = "auth"  # 401, 403: stop delivering, keep everything
CONFIG = "config"  # 404, 405: the URL is wrong, not the events: pause, keep everything
DROP = "drop"  # any other 4xx: the server will never take it


def classify(status: int) -> str:
    """The contract's class of an HTTP status; the body is never looked at."""
    if 200 <= status < 300:
        return OK
    if status in (401, 403):
        return AUTH
    if status in (404, 405):
        # The ingestion routes exist and take POST: such an answer comes from a wrong
        # base_url or a gateway in front of the API (during a deploy, say). Dropping the
        # ops would empty the queue into the dead letters in a fraction of a second.
        return CONFIG
    if status == 429 or status >= 500:
        return RETRY
    if 400 <= status < 500:
        return DROP
    # 1xx and 3xx are not answers the ingestion API gives: try again rather than lose data.
    return RETRY


def backoff(retry: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number ``retry`` (1, 2, ...): min(30, 2**n) + jitter."""
    return min(BACKOFF_CAP, 2.0 ** min(retry, 16)) + rand() * BACKOFF_JITTER


# The statuses whose Retry-After is honoured (the contract's rule); any other answer's is
# ignored, and the normal backoff applies.
RETRY_AFTER_STATUSES = (429, 503)


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` value: whole seconds (delta-seconds) or an
    HTTP date.

    ``now`` is the wall-clock time (epoch seconds) to measure a date against. The result is
    capped at :data:`RETRY_AFTER_CAP`; anything else (a fraction, a sign, words) gives
    ``None``, and the normal backoff applies.
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(min(int(value[:12]), 10**9))
    else:
        # Imported here: an HTTP date is rare, and email.utils costs every process 7 ms.
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000": UTC with no claim about the origin's zone
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - now
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)
