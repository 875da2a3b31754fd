"""Serverless handlers (AWS Lambda and the like): flush before the handler returns.

On Lambda the execution environment is frozen as soon as the handler returns, and the
background sender freezes with it. ``/tmp`` (where the outbox should live) survives
between warm invocations of one environment, so what a flush leaves behind is delivered by
the next invocation's sender; it vanishes when the environment is recycled, which happens
without warning. A bounded flush before returning is what makes delivery likely; the
outbox is a safety net there, not a guarantee::

    client = Whisperr(path="/tmp/whisperr.db")

    @flush_before_return(client, timeout=2.0)
    def handler(event, context):
        client.track(event["user_id"], "report_exported")
        return {"statusCode": 200}
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from typing import Any, Callable, Optional, TypeVar, cast

from .._client import DurableWhisperr
from .._sender import FlushResult

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# Seconds kept back from what Lambda says is left, for the handler's own return.
DEFAULT_SAFETY_MARGIN = 0.5


def flush_before_return(
    client: DurableWhisperr,
    timeout: float = 2.0,
    *,
    safety_margin: float = DEFAULT_SAFETY_MARGIN,
) -> Callable[[F], F]:
    """Decorate a handler so that ``client`` is flushed, for at most ``timeout`` seconds,
    before it returns (or raises).

    Works for ``def`` and ``async def`` handlers (``aflush()`` for the latter, so the loop
    keeps running). When the handler is given a Lambda-style ``context`` (the keyword
    ``context``, else the first positional argument with ``get_remaining_time_in_millis()``,
    so ``(event, context)`` and methods taking ``(self, event, context)`` both work), the
    flush also ends ``safety_margin`` seconds before the invocation's deadline. A flush that
    does not finish leaves the rest in the outbox; no flush problem reaches the handler's
    caller.
    """
    if timeout < 0 or safety_margin < 0:
        raise ValueError("timeout and safety_margin must not be negative")

    def decorate(handler: F) -> F:
        if inspect.iscoroutinefunction(handler):

            @functools.wraps(handler)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await handler(*args, **kwargs)
                finally:
                    budget = _budget(timeout, safety_margin, args, kwargs)
                    if budget > 0:
                        await _aflush(client, budget)

            return cast(F, async_wrapper)

        @functools.wraps(handler)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return handler(*args, **kwargs)
            finally:
                budget = _budget(timeout, safety_margin, args, kwargs)
                if budget > 0:
                    _flush(client, budget)

        return cast(F, wrapper)

    return decorate


def _budget(timeout: float, margin: float, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """``timeout``, cut to the invocation's remaining time less ``margin`` where known."""
    remaining = _remaining_time_getter(args, kwargs)
    if remaining is None:
        return timeout
    try:
        left = float(remaining()) / 1000.0 - margin
    except Exception:
        log.debug("get_remaining_time_in_millis() failed", exc_info=True)
        return timeout
    if left <= 0:
        log.info("no time left in the invocation; not flushing")
    return max(0.0, min(timeout, left))


def _remaining_time_getter(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Optional[Callable[[], Any]]:
    """The context's ``get_remaining_time_in_millis``: from the keyword ``context``, else
    from the first positional argument that has one (the second for ``(event, context)``,
    the third for a method)."""
    candidates = (kwargs["context"],) if "context" in kwargs else args
    for candidate in candidates:
        try:
            remaining = getattr(candidate, "get_remaining_time_in_millis", None)
        except Exception:  # an object whose attribute lookup fails is no context
            continue
        if callable(remaining):
            return cast(Callable[[], Any], remaining)
    return None


def _flush(client: DurableWhisperr, budget: float) -> None:
    try:
        result = client.flush(budget)
    except Exception:
        log.warning("flush before return failed", exc_info=True)
        return
    _report(client, result)


async def _aflush(client: DurableWhisperr, budget: float) -> None:
    try:
        # aflush() ends within the budget; wait_for also bounds the start of its thread.
        result = await asyncio.wait_for(client.aflush(budget), budget + 0.25)
    except asyncio.TimeoutError:
        log.info("flush before return did not start in time")
        return
    except Exception:
        log.warning("flush before return failed", exc_info=True)
        return
    _report(client, result)


def _report(client: DurableWhisperr, result: FlushResult) -> None:
    if not result.ok:
        log.info(
            "%d op(s) not delivered before return (%s); they stay in %s for the next invocation",
            result.pending,
            result.reason,
            client.path,
        )


__all__ = ["flush_before_return"]
