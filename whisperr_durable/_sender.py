"""The background sender: wake, claim, send, ack or release. The only module with a thread.

One daemon thread per client and process. It wakes when ``flush_at`` ops have been added,
every ``flush_interval``, and on ``flush()``; it then drains the outbox from the head until
it is empty or delivery cannot proceed. Backoff is a time before which the thread does not
send (it never sleeps with a batch in hand), so a flush or a shutdown is never stuck behind
it. A flush reports progress to its waiters through a condition variable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

from . import _retry
from ._errors import WhisperrError
from ._options import (
    EXPIRY_MARGIN,
    MAX_BATCH_BYTES,
    MAX_EVENT_AGE,
    MAX_LEASE,
    PAUSE_AFTER_FAILURE,
    Options,
)
from ._outbox import Outbox, Row, StoreError
from ._wire import IDENTIFY, batch_body, utc_now_ms

if TYPE_CHECKING:
    from ._lock import SenderLock
    from ._transport import Outcome, Transport

log = logging.getLogger("whisperr_durable")

# Sent when the server answers 400 or 413 to a batch of several events: split it to find
# the bad ones and deliver the rest.
_SPLIT_STATUSES = (400, 413)
# How often a flush waiter looks again while another process holds the head of the queue.
_POLL_WHILE_WAITING = 0.1
# A lease outlives one request's timeout by this much.
_LEASE_SLACK = 5.0
# A long drain checkpoints after this many batches (the end of each cycle does too).
_CHECKPOINT_EVERY_BATCHES = 8
# The soonest a failed request is tried again, whatever Retry-After says.
_MIN_RETRY_DELAY = 0.01


# pending(exact): how many ops the flush waits for; with exact=False, any non-zero number
# will do (it is asked often while waiting, and a count is not cheap on a large backlog).
Pending = Callable[[bool], int]


class FlushResult(NamedTuple):
    """What ``flush()`` came to.

    ``pending`` ops enqueued before the flush are still in the outbox (0 means all were
    delivered or dead-lettered); ``reason`` says why it stopped short: ``"auth"``,
    ``"retry_exhausted"``, ``"timeout"``, ``"store"`` (the outbox could not be read) or
    ``"stopped"`` (the sender is not running).
    """

    pending: int = 0
    reason: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.pending == 0 and self.reason is None

    def __bool__(self) -> bool:
        return self.ok


class Sender:
    """Delivers one key's ops from one outbox file."""

    def __init__(
        self,
        options: Options,
        key_fp: str,
        transport: Transport,
        lock: SenderLock,
        report: Callable[[WhisperrError], None],
        on_wake: Callable[[], None] = lambda: None,
        report_store: Optional[Callable[[str], None]] = None,
    ) -> None:
        self._options = options
        self._key_fp = key_fp
        self._lease_ms = int(min(options.request_timeout + _LEASE_SLACK, MAX_LEASE) * 1000)
        self._transport = transport
        self._lock = lock
        self._report = report
        self._on_wake = on_wake
        self._report_store = report_store
        self._reset()

    def _reset(self) -> None:
        """Fresh thread state: at construction and in a forked child."""
        self._pid = os.getpid()
        self._owner = f"{self._pid}-{os.urandom(6).hex()}"
        self._wake = threading.Event()
        self._send_wanted = False
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._failures = 0
        self._not_before = 0.0
        self._retry_after_until = 0.0
        self._progress = 0
        self._blocked = 0
        self._blocked_reason: Optional[str] = None
        self._waiters = 0
        self._store_error_logged = ""
        self._store_error_quiet_until = 0.0
        # Per request of the current batch: None for a success, else what went wrong.
        self._noted: list[Optional[str]] = []

    def after_fork(self) -> None:
        self._lock.after_fork_in_child()
        self._reset()

    # ---- control, from caller threads ----

    def wake(self) -> None:
        self._send_wanted = True
        self._wake.set()

    def checkpoint_soon(self) -> None:
        """Wake the thread to checkpoint the WAL (and not to send), so that no caller's
        commit ever has to."""
        self._wake.set()

    def start(self) -> bool:
        """Start the thread if it is not running; ``False`` if it cannot be started."""
        if self._pid != os.getpid():
            self._reset()
        if self._thread is not None or self._stop.is_set():
            return self._thread is not None
        with self._cond:
            if self._thread is not None:
                return True
            thread = threading.Thread(target=self._run, name="whisperr-durable-sender", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # interpreter shutdown
                return False
            self._thread = thread
        return True

    def flush(
        self, pending: Pending, timeout: Optional[float], *, retry: bool = True
    ) -> FlushResult:
        """Wait until nothing is pending, delivery is blocked, or ``timeout`` passes.

        ``retry=False``: also stop at the first failed request (as at shutdown: what is left
        stays on disk, so waiting out a backoff buys nothing).
        """
        if timeout is not None and timeout <= 0:  # only asks how things stand
            left = pending(True)
            return FlushResult(left, "timeout" if left else None)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            # An explicit flush tries now, with a fresh retry budget, unless the server
            # asked for a pause with Retry-After.
            self._failures = 0
            self._not_before = self._retry_after_until
            blocked_at_start = self._blocked
            self._waiters += 1
        try:
            if not self.start():
                return self._flush_inline(pending, deadline, retry)
            self.wake()
            while True:
                with self._cond:
                    seen = self._progress
                    blocked = self._blocked != blocked_at_start
                # Counted after the block was seen, so the count is not older than it.
                left = pending(False)
                if left == 0:
                    return FlushResult()
                if blocked:
                    return FlushResult(pending(True), self._blocked_reason)
                if not retry and self._failures:
                    return FlushResult(pending(True), "retry_exhausted")
                with self._cond:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return FlushResult(pending(True), "timeout")
                    if self._thread is None or not self._thread.is_alive():
                        return FlushResult(pending(True), "stopped")
                    if self._progress == seen:
                        self._cond.wait(remaining)
        finally:
            with self._cond:
                self._waiters -= 1

    def _flush_inline(
        self, pending: Pending, deadline: Optional[float], retry: bool
    ) -> FlushResult:
        # No thread can be started (interpreter shutdown): deliver from the caller's thread.
        outbox = self._open_outbox()
        try:
            while True:
                if self._stop.is_set():
                    return FlushResult(pending(True), "stopped")
                blocked = self._blocked
                self._on_wake()
                self._cycle(outbox, deadline)
                left = pending(False)
                if left == 0:
                    return FlushResult()
                if self._blocked != blocked:
                    return FlushResult(pending(True), self._blocked_reason)
                if not retry and self._failures:
                    return FlushResult(pending(True), "retry_exhausted")
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return FlushResult(pending(True), "timeout")
                wait = max(self._not_before - now, _POLL_WHILE_WAITING)
                self._stop.wait(wait if deadline is None else min(wait, deadline - now))
        finally:
            outbox.close()

    def stop(self, timeout: float) -> None:
        """Stop the thread; wait at most ``timeout`` for a request in flight to end."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._transport.close()

    # ---- the thread ----

    def _open_outbox(self) -> Outbox:
        return Outbox(
            self._options.path,
            self._key_fp,
            fsync=self._options.fsync,
            store_timeout=self._options.store_timeout,
            max_dead_letters=self._options.max_dead_letters,
            report=self._report_store,
        )

    def _run(self) -> None:
        outbox = self._open_outbox()
        try:
            while not self._stop.is_set():
                woken = self._wake.wait(self._next_wait())
                self._wake.clear()
                send, self._send_wanted = not woken or self._send_wanted, False
                if self._stop.is_set():
                    break
                try:
                    if send:
                        self._on_wake()
                        self._cycle(outbox)
                    outbox.checkpoint()
                except StoreError as exc:
                    self._log_store_error(str(exc))
                except Exception:  # the thread must outlive any bug in one cycle
                    log.exception("whisperr_durable: the sender hit an unexpected error")
                with self._cond:
                    self._progress += 1
                    self._cond.notify_all()
        finally:
            outbox.close()

    def _log_store_error(self, text: str) -> None:
        # A failing disk fails every cycle: say so once a minute, not ten times a second.
        now = time.monotonic()
        if text != self._store_error_logged or now >= self._store_error_quiet_until:
            log.warning("whisperr_durable: the outbox is not usable: %s", text)
            self._store_error_logged = text
            self._store_error_quiet_until = now + 60.0
        else:
            log.debug("the outbox is not usable: %s", text)

    def _next_wait(self) -> float:
        with self._cond:
            until = self._not_before - time.monotonic()
            if until > 0 and self._failures:  # a retry is due then
                return until
            wait = self._options.flush_interval
            if self._waiters:
                wait = min(wait, _POLL_WHILE_WAITING)
        return min(wait, until) if until > 0 else wait

    def _cycle(self, outbox: Outbox, deadline: Optional[float] = None) -> None:
        """Lead, if no other process does, and drain from the head."""
        if time.monotonic() < self._not_before:
            return
        lead = self._lock.try_acquire()
        if lead is False:
            return  # another process is sending this key's ops; a flush waiter polls
        try:
            # Holding the lock, any lease we find is a dead sender's: take its rows at once.
            self._drain(outbox, lead is True, deadline)
        finally:
            if lead:
                self._lock.release()

    def _record(self, outbox: Outbox) -> None:
        """Leave what a batch came to in the file, for ``whisperr-durable status``."""
        noted, self._noted = self._noted, []
        if not noted:
            return
        now_ms = utc_now_ms()
        success_ms = now_ms if None in noted else None
        error = next((e for e in reversed(noted) if e is not None), None)
        try:
            outbox.record_sender(os.getpid(), now_ms, success_ms, error)
        except StoreError:
            log.debug("could not record the sender's state", exc_info=True)

    def _drain(self, outbox: Outbox, take_over: bool, deadline: Optional[float]) -> None:
        """Send from the head until the queue is empty, backed off, blocked, or out of time."""
        options = self._options
        batches = 0
        while not self._stop.is_set():
            now = time.monotonic()
            if now < self._not_before or (deadline is not None and now >= deadline):
                return
            claim = outbox.claim(
                self._owner,
                max_rows=options.max_batch_size,
                max_bytes=MAX_BATCH_BYTES,
                lease_ms=self._lease_ms,
                max_age_ms=int((MAX_EVENT_AGE - EXPIRY_MARGIN) * 1000),
                now_ms=utc_now_ms(),
                take_over=take_over,
            )
            if claim.expired:
                self._report(
                    WhisperrError(
                        "dropped",
                        f"{claim.expired} event(s) older than the server's 30-day window "
                        "moved to the dead letters",
                    )
                )
            if not claim.rows:
                if claim.expired:
                    continue  # more may be behind them
                return
            outcome = self._deliver(outbox, claim.rows, deadline)
            self._record(outbox)  # before a flush waiter hears of it
            batches += 1
            if batches % _CHECKPOINT_EVERY_BATCHES == 0:  # keeps a long drain's WAL short
                outbox.checkpoint()
            if outcome is None:
                self._failures = 0
            else:
                self._after_failure(outcome)
            with self._cond:
                self._progress += 1
                self._cond.notify_all()
            if outcome is not None:
                return

    def _after_failure(self, outcome: Outcome) -> None:
        now = time.monotonic()
        with self._cond:
            if outcome.retry_after is not None:
                self._retry_after_until = now + outcome.retry_after
            if outcome.kind == _retry.AUTH:
                self._not_before = now + PAUSE_AFTER_FAILURE
                error = WhisperrError("auth", "delivery paused: API key rejected", outcome.status)
            else:
                self._failures += 1
                if self._failures <= self._options.max_retries:
                    delay = outcome.retry_after
                    if delay is None:
                        delay = _retry.backoff(self._failures)
                    self._not_before = now + max(delay, _MIN_RETRY_DELAY)
                    log.debug("delivery failed (%s); retry %d", outcome.detail, self._failures)
                    return
                self._failures = 0
                self._not_before = now + max(PAUSE_AFTER_FAILURE, outcome.retry_after or 0.0)
                error = WhisperrError(
                    "retry_exhausted",
                    f"delivery failed after retries ({outcome.detail}); the ops stay queued",
                    outcome.status,
                )
        # Report first, so that a flush() that returns "blocked" finds on_error already run.
        self._report(error)
        with self._cond:
            self._blocked += 1
            self._blocked_reason = error.type
            self._progress += 1
            self._cond.notify_all()

    def _deliver(
        self, outbox: Outbox, rows: list[Row], deadline: Optional[float]
    ) -> Optional[Outcome]:
        """Send claimed rows; ``None`` when all were delivered or dead-lettered.

        A 400 or 413 on several events splits the batch in halves until the bad events are
        alone; those go to the dead letters and the rest are delivered.
        """
        todo = [rows]
        while todo:
            part = todo.pop()
            first, last = part[0].id, part[-1].id
            if part is not rows and not outbox.renew(
                first, rows[-1].id, self._owner, utc_now_ms() + self._lease_ms
            ):
                return None  # the rows were evicted or taken over: nothing left to send
            outcome = self._post(part, deadline)
            self._noted.append(None if outcome.kind == _retry.OK else outcome.detail)
            if outcome.kind == _retry.OK:
                outbox.ack(first, last, self._owner)
                log.debug("delivered %d op(s)", len(part))
            elif outcome.kind == _retry.DROP:
                if len(part) > 1 and outcome.status in _SPLIT_STATUSES:
                    half = len(part) // 2
                    todo += [part[half:], part[:half]]
                    continue
                now_ms = utc_now_ms()
                moved = outbox.dead_letter(
                    first, last, self._owner, outcome.status, outcome.detail, now_ms
                )
                if moved:  # none if they were evicted while in flight (reported then)
                    log.warning(
                        "whisperr_durable: the server refused %d op(s) (%s); "
                        "moved to the dead letters",
                        moved,
                        outcome.detail,
                    )
                    self._report(
                        WhisperrError(
                            "dropped",
                            f"the server refused {moved} op(s) ({outcome.detail})",
                            outcome.status,
                        )
                    )
            else:
                # Everything from here on is given back, in order, for a later attempt.
                outbox.release(first, rows[-1].id, self._owner, failed=True)
                return outcome
        return None

    def _post(self, part: list[Row], deadline: Optional[float]) -> Outcome:
        timeout = self._options.request_timeout
        if deadline is not None:  # an inline flush at exit must not overrun its budget
            timeout = max(0.001, min(timeout, deadline - time.monotonic()))
        if part[0].kind == IDENTIFY:
            return self._transport.post("/v1/identify", part[0].body.encode("ascii"), timeout)
        return self._transport.post("/v1/events/batch", batch_body([r.body for r in part]), timeout)
