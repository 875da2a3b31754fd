"""The background sender: wake, lead, claim, send, ack or release. The module with the threads.

One daemon thread per client and process. It wakes when ``flush_at`` ops have been added,
every ``flush_interval``, on ``flush()``, to retry after a failure, to store ops held in
memory while the file failed, and to fsync the WAL ``sync_interval`` after ops arrive. A
send cycle drains the outbox from the head until it is empty or delivery cannot proceed,
then delivers from memory what the file could not take. Backoff is a time before which the
thread does not send (it never sleeps with a batch in hand), so a flush or a shutdown is
never stuck behind it. A flush reports progress to its waiters through a condition variable.

A second, idle daemon thread, the watchdog, cuts a request that overruns its deadline:
httpx's timeouts bound each read, so a server that trickles a byte at a time would otherwise
hold a request (and the sender lock, which every other process waits for) for ever.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional, Union

from . import _retry
from ._errors import WhisperrError
from ._options import (
    EXPIRY_MARGIN,
    MAX_BATCH_BYTES,
    MAX_EVENT_AGE,
    MAX_LEASE,
    PAUSE_AFTER_FAILURE,
    STORE_RETRY_INTERVAL,
    Options,
    wait_seconds,
)
from ._store import Row, Run, Store, StoreError, open_store, run_of
from ._wire import IDENTIFY, batch_body, utc_now_ms
from ._writer import Op, Writer

if TYPE_CHECKING:
    from ._lock import SenderLock
    from ._transport import Outcome, Transport

log = logging.getLogger(__name__)

# Sent when the server answers 400 or 413 to a batch of several events: split it to find
# the bad ones and deliver the rest.
_SPLIT_STATUSES = (400, 413)
# Refused requests in a row that go out at full speed: enough for the halving search for
# one bad event in a batch of 500. Beyond, each request waits a backoff, so that a server
# (or a gateway) that refuses everything does not get hundreds of requests a second.
_FREE_REFUSALS = 16
# How often a flush waiter looks again while another process holds the head of the queue.
_POLL_WHILE_WAITING = 0.1
# A lease outlives one request's timeout by this much.
_LEASE_SLACK = 5.0
# A request ends at most this long after its timeout, however the server trickles.
_REQUEST_SLACK = 0.5
# A long drain checkpoints after this many batches (the end of each cycle does too).
_CHECKPOINT_EVERY_BATCHES = 8
# After a batch of fewer rows than this (or than max_batch_size), with no flush waiting, the
# sender lets ops gather for a moment, and goes on if flush_at was reached meanwhile: a
# request costs most of a millisecond of CPU however few events it carries, and a busy
# producer would otherwise get a request every few ops (and share its GIL with them).
_LINGER_BELOW = 500
_LINGER = 0.02
# The most free pages one drain gives back to the file system when it empties the queue
# (16 MB of 4 KiB pages; the rest at the next drain, or with compact()).
_RECLAIM_PAGES = 4096
# How often a bulk write that waits for room looks at the queue again (progress wakes it
# sooner).
_ROOM_POLL = 0.01
# How often a long drain records the sender's state in the file.
_RECORD_EVERY = 1.0
# The soonest a failed request is tried again, whatever Retry-After says.
_MIN_RETRY_DELAY = 0.01
# A failing disk fails every cycle: its log line is repeated at most this often.
_LOG_QUIET = 60.0


# pending(exact): how many ops the flush waits for; with exact=False, any non-zero number
# will do (it is asked often while waiting, and a count is not cheap on a large backlog).
Pending = Callable[[bool], int]


class FlushResult(NamedTuple):
    """What ``flush()`` came to.

    ``pending`` ops enqueued before the flush are still queued (0 means none is); ``reason``
    says why it stopped short: ``"auth"``, ``"config"`` (the server answered 404 or 405: a
    wrong ``base_url``), ``"retry_exhausted"``, ``"timeout"``, ``"store"`` (the outbox could
    not be used), ``"stopped"`` (the sender is not running) or ``"reentered"`` (called from a
    signal handler that interrupted this client in the same thread). ``refused``: ops of
    this key the server refused (moved to the dead letters) while it ran; ``lost``: ops of
    this key that will never be delivered (evicted, dropped from memory, left in a replaced
    file) while it ran. Both count every such op of the key, by any process, not only the
    ops enqueued before the flush. It is truthy only when nothing is pending and nothing was
    refused or lost.
    """

    pending: int = 0
    reason: Optional[str] = None
    refused: int = 0
    lost: int = 0

    @property
    def ok(self) -> bool:
        return self.pending == 0 and self.reason is None and not self.refused and not self.lost

    def __bool__(self) -> bool:
        return self.ok


class _FileBatch:
    """Rows claimed from the outbox under our lease."""

    def __init__(self, outbox: Store, owner: str, lease_ms: int, run: Run) -> None:
        self._outbox, self._owner, self._lease_ms = outbox, owner, lease_ms
        self._last = run.last

    def rows(self, first: int, last: int) -> list[Row]:
        return self._outbox.rows(first, last)

    def renew(self, first: int) -> bool:
        until = utc_now_ms() + self._lease_ms
        return self._outbox.renew(first, self._last, self._owner, until) > 0

    def ack(self, first: int, last: int) -> None:
        self._outbox.ack(first, last, self._owner)

    def refuse(self, first: int, last: int, status: Optional[int], why: str) -> tuple[int, int]:
        return self._outbox.dead_letter(first, last, self._owner, status, why, utc_now_ms())

    def give_back(self, first: int, *, failed: bool) -> None:
        self._outbox.release(first, self._last, self._owner, failed=failed)


class _HeldBatch:
    """Ops delivered from memory, while the outbox cannot be written (ids are their seqs)."""

    def __init__(self, writer: Writer, taken: list[tuple[int, Op]]) -> None:
        self._writer = writer
        self._left = dict(taken)  # not yet settled

    def _take(self, first: int, last: int) -> list[tuple[int, Op]]:
        part = [(seq, op) for seq, op in self._left.items() if first <= seq <= last]
        for seq, _ in part:
            del self._left[seq]
        return part

    def rows(self, first: int, last: int) -> list[Row]:
        return [
            Row(seq, kind, body.encode("ascii"), created_ms, 0)
            for seq, (kind, body, created_ms) in self._left.items()
            if first <= seq <= last
        ]

    def renew(self, first: int) -> bool:
        return True

    def ack(self, first: int, last: int) -> None:
        self._writer.settle_held(self._take(first, last), delivered=True)

    def refuse(self, first: int, last: int, status: Optional[int], why: str) -> tuple[int, int]:
        part = self._take(first, last)
        # No dead letters can be written: the refusal is reported, the ops are gone.
        self._writer.settle_held(part, delivered=False, refused=True)
        return len(part), 0

    def give_back(self, first: int, *, failed: bool) -> None:
        if self._left:
            self._writer.settle_held(self._take(first, max(self._left)), delivered=False)


_Batch = Union[_FileBatch, _HeldBatch]


class _Watchdog:
    """Cuts (``Transport.abort``) a request still running at its deadline. Its thread is
    made on the first request and ends with the sender (``close``)."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._cond = threading.Condition()
        self._deadline: Optional[float] = None
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.fired = False

    def arm(self, seconds: float) -> None:
        with self._cond:
            self.fired = False
            if self._thread is None and not self._closed:
                thread = threading.Thread(
                    target=self._run, name="whisperr-durable-watchdog", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:  # interpreter shutdown: the read timeout alone bounds it
                    return
                self._thread = thread
            self._deadline = time.monotonic() + seconds
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._deadline = None
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self._deadline = None
                self.fired = True
                self._transport.abort()


class Sender:
    """Delivers one key's ops from one outbox file (and, while it fails, from memory)."""

    def __init__(
        self,
        options: Options,
        key_fp: str,
        transport: Transport,
        lock: SenderLock,
        writer: Writer,
        report: Callable[[WhisperrError], None],
    ) -> None:
        self._options = options
        self._key_fp = key_fp
        self._lease_ms = int(min(options.request_timeout + _LEASE_SLACK, MAX_LEASE) * 1000)
        self._transport = transport
        self._lock = lock
        self._writer = writer
        self._report = report
        self._reset()

    def _reset(self) -> None:
        """Fresh thread state: at construction and in a forked child."""
        self._pid = os.getpid()
        self._owner = f"{self._pid}-{os.urandom(6).hex()}"
        self._wake = threading.Event()
        self._send_wanted = False
        self._checkpoint_wanted = False
        self._stop = threading.Event()
        self._hurry = threading.Event()  # a flush waits, or the thread is to stop: no lingering
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._watchdog = _Watchdog(self._transport)
        self._interval_due = time.monotonic() + self._options.flush_interval
        self._sync_due: Optional[float] = None
        self._failures = 0
        self._failed = 0  # requests that failed and may be retried, in all
        self._fresh_attempt = False  # a flush asked for one: no backoff, a new retry budget
        self._refusals = 0  # refused requests in a row
        self.delivered = 0  # ops delivered (2xx) by this process, in all
        self._not_before = 0.0
        self._retry_pending = False  # a send is due at _not_before
        self._retry_after_until = 0.0
        self._progress = 0
        # Why delivery last could not proceed. A flush heeds a block by the server (auth,
        # config, exhausted retries: how many so far) met after it began, even by a cycle
        # begun before it: the answer is fresh. It heeds a failure of the file only if met
        # by a cycle begun after it did (``_store_blocked_in``): the file may have
        # recovered since an earlier cycle looked.
        self._cycles = 0
        self._blocked = 0
        self._store_blocked_in = 0
        self._blocked_reason: Optional[str] = None
        self._waiters = 0
        # The trouble of the moment, logged once when it begins and once when it ends.
        self._trouble: Optional[str] = None
        self._trouble_since = 0.0
        self._store_trouble: Optional[str] = None
        self._store_logged_at = 0.0
        # Who held the sender lock without progress, and since when (monotonic).
        self._stalled_head: Optional[tuple[int, Optional[str], int]] = None
        self._stalled_since = 0.0
        # Per request of the current batch: None for a success, else what went wrong.
        self._noted: list[Optional[str]] = []
        self._record_due = 0.0

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
        self._checkpoint_wanted = True
        self._wake.set()

    def store_soon(self) -> None:
        """Ops are held in memory: wake the thread to plan its next try at the file."""
        self._wake.set()

    def sync_soon(self) -> None:
        """Ops were committed: have the WAL fsynced within ``sync_interval``."""
        if self._sync_due is None and not self._options.fsync:
            self._sync_due = time.monotonic() + self._options.sync_interval
            self._wake.set()

    def start(self) -> bool:
        """Start the thread if it is not running; ``False`` if it cannot be started."""
        if self._pid != os.getpid():
            self._reset()
        if self._thread is not None or self._stop.is_set():
            return self._thread is not None
        # Not blocking: a signal handler that tracks while its thread is starting the sender
        # here would otherwise wait for itself. Whoever holds the lock is starting it.
        if not self._cond.acquire(blocking=False):
            return True
        try:
            if self._thread is not None:
                return True
            thread = threading.Thread(target=self._run, name="whisperr-durable-sender", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # interpreter shutdown
                return False
            self._thread = thread
            _started.add(self)
        finally:
            self._cond.release()
        return True

    def wait_for_room(self, room: Callable[[], int], needed: int) -> bool:
        """For a bulk write: wait until the queue takes ``needed`` more ops (``room()``)
        without evicting. ``True`` once it does; ``False`` as soon as delivery cannot make
        room: this process's sender is stopped, backing off after a failure or paused (key
        rejected, wrong URL), or the queue has not shrunk for a request's time (another
        process that leads may be failing)."""
        if not self.start():
            return False
        stall = self._options.request_timeout + _REQUEST_SLACK
        best = room()
        moved = time.monotonic()
        while best < needed:
            self.wake()
            now = time.monotonic()
            if self._stop.is_set() or now < self._not_before or now - moved >= stall:
                return False
            with self._cond:
                self._cond.wait(_ROOM_POLL)
            left = room()
            if left > best:
                best, moved = left, time.monotonic()
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
            # asked for a pause with Retry-After (the next cycle to begin sees to it: a
            # cycle still running may yet back off).
            self._fresh_attempt = True
            self._not_before = self._retry_after_until
            first_cycle = self._cycles + 1
            blocked_at_start, failed_at_start = self._blocked, self._failed
            self._waiters += 1
        self._hurry.set()
        try:
            if not self.start():
                return self._flush_inline(pending, deadline, retry)
            self.wake()
            while True:
                with self._cond:
                    seen = self._progress
                    blocked = (
                        self._blocked != blocked_at_start or self._store_blocked_in >= first_cycle
                    )
                # Counted after the block was seen, so the count is not older than it.
                left = pending(False)
                if left == 0:
                    return FlushResult()
                if blocked:
                    return FlushResult(pending(True), self._blocked_reason)
                if not retry and self._failed != failed_at_start:
                    return FlushResult(pending(True), "retry_exhausted")
                with self._cond:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return FlushResult(pending(True), "timeout")
                    if self._thread is None or not self._thread.is_alive():
                        return FlushResult(pending(True), "stopped")
                    if self._progress == seen:
                        self._cond.wait(None if remaining is None else wait_seconds(remaining))
        finally:
            with self._cond:
                self._waiters -= 1
                self._fresh_attempt = False  # not for a cycle after this flush

    def _flush_inline(
        self, pending: Pending, deadline: Optional[float], retry: bool
    ) -> FlushResult:
        # No thread can be started (interpreter shutdown): deliver from the caller's thread.
        outbox = self._open_outbox()
        try:
            while True:
                if self._stop.is_set():
                    return FlushResult(pending(True), "stopped")
                blocked, failed = self._blocked, self._failed
                first_cycle = self._cycles + 1
                self._send_cycle(outbox, deadline, store_now=True)
                left = pending(False)
                if left == 0:
                    return FlushResult()
                if self._blocked != blocked or self._store_blocked_in >= first_cycle:
                    return FlushResult(pending(True), self._blocked_reason)
                if not retry and self._failed != failed:
                    return FlushResult(pending(True), "retry_exhausted")
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return FlushResult(pending(True), "timeout")
                wait = max(self._not_before - now, _POLL_WHILE_WAITING)
                if deadline is not None:
                    wait = min(wait, deadline - now)
                self._stop.wait(wait_seconds(wait))
        finally:
            outbox.close()

    def stop(self, timeout: float) -> None:
        """Stop the thread; wait at most ``timeout`` for a request in flight to end."""
        self._stop.set()
        self._hurry.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait_seconds(timeout))
        if thread is None or not thread.is_alive():
            self._watchdog.close()
            self._transport.close()

    def end_before_exit(self, deadline: float) -> None:
        """At interpreter exit: end the thread for good, whatever ``stop`` allowed. A daemon
        thread left inside a C call that runs without the GIL (OpenSSL loading certificates
        or reading a TLS socket) would run on while the C exit handlers free what it uses,
        and crash the process."""
        thread = self._thread
        if thread is None or not thread.is_alive() or self._pid != os.getpid():
            return
        self._stop.set()
        self._hurry.set()
        self._wake.set()
        while thread.is_alive():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._transport.abort()  # again and again: a request may begin after a cut
            thread.join(min(left, _EXIT_STEP))

    # ---- the thread ----

    def _open_outbox(self) -> Store:
        return open_store(
            self._options.path,
            self._key_fp,
            fsync=self._options.fsync,
            store_timeout=self._options.store_timeout,
            max_dead_letters=self._options.max_dead_letters,
            report=lambda kind, message: self._report(WhisperrError(kind, message)),
        )

    def _run(self) -> None:
        outbox = self._open_outbox()
        try:
            while not self._stop.is_set():
                woken = self._wake.wait(self._next_wait())
                self._wake.clear()
                if self._stop.is_set():
                    break
                now = time.monotonic()
                send = (
                    self._send_wanted
                    or now >= self._interval_due
                    or (self._retry_pending and now >= self._not_before)
                    # A flush waits: look again (another process may lead, or have stalled).
                    or (self._waiters > 0 and not woken)
                )
                checkpoint = send or self._checkpoint_wanted
                self._send_wanted = self._checkpoint_wanted = False
                try:
                    if send:
                        self._interval_due = now + self._options.flush_interval
                        self._send_cycle(outbox)
                    else:
                        self._writer.store_held()  # due every STORE_RETRY_INTERVAL
                    self._sync_if_due(outbox)
                    if checkpoint:
                        outbox.checkpoint()
                except StoreError as exc:
                    self._store_failed(str(exc))
                except Exception:  # the thread must outlive any bug in one cycle
                    log.exception("the sender hit an unexpected error")
                with self._cond:
                    self._progress += 1
                    self._cond.notify_all()
        finally:
            self._sync_if_due(outbox, now=True)
            outbox.close()
            self._watchdog.close()

    def _next_wait(self) -> float:
        now = time.monotonic()
        due = [self._interval_due]
        if self._retry_pending:
            due.append(self._not_before)
        if self._sync_due is not None:
            due.append(self._sync_due)
        store_try = self._writer.next_store_try()
        if store_try is not None:
            due.append(store_try)
        # At least once a second: ops a signal handler set aside wake nothing (it may not
        # take the lock an Event.set() needs), and wait here for the next pass.
        wait = min(min(due) - now, STORE_RETRY_INTERVAL)
        if self._waiters:
            wait = min(wait, _POLL_WHILE_WAITING)
        return wait_seconds(max(wait, 0.0))

    def _sync_if_due(self, outbox: Store, *, now: bool = False) -> None:
        due = self._sync_due
        if due is None or (not now and time.monotonic() < due):
            return
        self._sync_due = None  # before the sync: an op committed from here on asks again
        try:
            outbox.sync_wal()
        except StoreError as exc:
            log.debug("syncing the WAL failed: %s", exc)

    def _send_cycle(
        self, outbox: Store, deadline: Optional[float] = None, *, store_now: bool = False
    ) -> None:
        """Held ops to the file if it takes them, the file's queue, then from memory what
        the file could not take."""
        with self._cond:
            self._cycles += 1
            if self._fresh_attempt:
                self._fresh_attempt = False
                self._failures = 0
                self._not_before = self._retry_after_until
        self._retry_pending = False
        self._writer.store_held(now=store_now or self._waiters > 0)
        failed: Optional[str] = None
        for attempt in range(2):
            try:
                self._cycle(outbox, deadline)
            except StoreError as exc:
                failed = str(exc)
                # After an error a connection keeps, the outbox closed it (and every other
                # connection of the process to the file starts afresh): once more on a
                # fresh one, since the file may well work now. A busy file is not retried.
                if outbox.is_open or attempt:
                    break
            else:
                failed = None
                break
        self._deliver_held(deadline)
        # Told after the held ops went: a flush waiting on the file returns once they did.
        if failed is None:
            self._store_works()
        else:
            self._store_failed(failed)

    def _store_failed(self, text: str) -> None:
        """The sender cannot use the file: report it once per episode (unless the writer
        already did: it is the same file), log it once a minute, and let a flush waiting on
        the file know."""
        now = time.monotonic()
        first = self._store_trouble is None
        if first or text != self._store_trouble or now >= self._store_logged_at + _LOG_QUIET:
            log.warning("the sender cannot use the outbox: %s", text)
            self._store_logged_at = now
        else:
            log.debug("the sender cannot use the outbox: %s", text)
        self._store_trouble = text
        if first and self._writer.report_store_trouble():
            self._report(WhisperrError("store_error", f"the sender cannot use the outbox: {text}"))
        with self._cond:
            self._store_blocked_in = self._cycles
            self._blocked_reason = "store"
            self._cond.notify_all()

    def _store_works(self) -> None:
        self._writer.store_works()
        if self._store_trouble is not None:
            self._store_trouble = None
            log.warning("the sender can use the outbox again")

    def _cycle(self, outbox: Store, deadline: Optional[float] = None) -> None:
        """Lead, if no other process does (or the one that does has stalled), and drain."""
        if time.monotonic() < self._not_before:
            return
        lead = self._lock.try_acquire()
        if lead is False:
            if not self._leader_stalled(outbox):
                return  # another process is sending this key's ops; a flush waiter polls
            lead = None  # deliver with the leases alone, as where locking is unavailable
        try:
            # Holding the lock, any lease we find is a dead sender's: take its rows at once.
            self._drain(outbox, lead is True, deadline)
        finally:
            if lead:
                self._lock.release()

    def _leader_stalled(self, outbox: Store) -> bool:
        """Whether the process holding the sender lock has made no progress for longer than a
        lease: stopped (SIGSTOP), or frozen. A live sender's request ends within its timeout,
        and its lease is renewed or its rows acked; the head of the queue then changes."""
        head = outbox.head()
        now = time.monotonic()
        if head is None:
            self._stalled_head = None
            return False
        if head != self._stalled_head:
            self._stalled_head, self._stalled_since = head, now
            return False
        _, owner, until_ms = head
        now_ms = utc_now_ms()
        if owner is not None and now_ms < until_ms <= now_ms + int(MAX_LEASE * 1000):
            return False  # a lease still runs: its holder may yet deliver
        if now - self._stalled_since < self._lease_ms / 1000:
            return False
        log.warning(
            "the process holding %s has made no progress for %.0f s; "
            "delivering with the outbox's leases alone",
            self._lock.path,
            now - self._stalled_since,
        )
        self._stalled_since = now  # said once per lease period
        return True

    def _record(self, outbox: Store, *, now: bool = False) -> None:
        """Leave what the batches came to in the file, for ``whisperr-durable status``: at
        the end of a drain, at once when a flush waits or a batch failed, and otherwise at
        most once a second (a write of its own each time)."""
        noted = self._noted
        if not noted:
            return
        urgent = now or self._waiters or noted[-1] is not None
        if not urgent and time.monotonic() < self._record_due:
            return
        self._record_due = time.monotonic() + _RECORD_EVERY
        self._noted = []
        now_ms = utc_now_ms()
        success_ms = now_ms if None in noted else None
        error = next((e for e in reversed(noted) if e is not None), None)
        try:
            outbox.record_sender(os.getpid(), now_ms, success_ms, error)
        except StoreError:
            log.debug("could not record the sender's state", exc_info=True)

    def _drain(self, outbox: Store, take_over: bool, deadline: Optional[float]) -> None:
        """Send from the head until the queue is empty, backed off, blocked, or out of time."""
        try:
            self._drain_batches(outbox, take_over, deadline)
        finally:
            self._record(outbox, now=True)

    def _drain_batches(self, outbox: Store, take_over: bool, deadline: Optional[float]) -> None:
        options = self._options
        batches = 0
        while not self._stop.is_set():
            now = time.monotonic()
            if now < self._not_before or (deadline is not None and now >= deadline):
                return
            claim = outbox.claim(
                self._owner,
                # While the server refuses everything, one op a request: each refusal is
                # then final, and the backoff between them paces the whole queue.
                max_rows=1 if self._refusals >= _FREE_REFUSALS else options.max_batch_size,
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
            if claim.damaged:
                log.warning(
                    "%d queued row(s) of %s are damaged (not an op's wire "
                    "JSON); moved to the dead letters",
                    claim.damaged,
                    outbox.path,
                )
                self._report(
                    WhisperrError(
                        "dropped",
                        f"{claim.damaged} damaged row(s) moved to the dead letters",
                    )
                )
            self._note_pruned(claim.pruned)
            run = claim.run
            if run is None:
                if claim.expired or claim.damaged:
                    continue  # more may be behind them
                if batches:  # this drain emptied the queue: give the freed space back
                    try:
                        outbox.reclaim(_RECLAIM_PAGES)
                    except StoreError:  # a busy file, say: the next drain tries again
                        log.debug("could not reclaim free pages", exc_info=True)
                return
            batch = _FileBatch(outbox, self._owner, self._lease_ms, run)
            outcome = self._deliver(batch, run, deadline)
            self._record(outbox)  # before a flush waiter hears of it
            batches += 1
            if batches % _CHECKPOINT_EVERY_BATCHES == 0:  # keeps a long drain's WAL short
                outbox.checkpoint()
            if self._settled(outcome):
                return
            if run.ops < min(_LINGER_BELOW, options.max_batch_size) and deadline is None:
                self._hurry.clear()
                if not self._waiters and not self._stop.is_set():
                    self._hurry.wait(_LINGER)
                    # Go on only for what would have started a cycle anyway: flush_at
                    # reached meanwhile, or a flush waiting.
                    if not self._send_wanted and not self._waiters:
                        return
                    self._send_wanted = False

    def _deliver_held(self, deadline: Optional[float]) -> None:
        """While the file cannot be written, deliver the ops held in memory, in order: the
        durable SDK must never do worse than the in-memory one."""
        while not self._stop.is_set():
            now = time.monotonic()
            if now < self._not_before or (deadline is not None and now >= deadline):
                return
            taken = self._writer.take_held(self._options.max_batch_size, MAX_BATCH_BYTES)
            if not taken:
                return
            batch = _HeldBatch(self._writer, taken)
            first = taken[0][0]
            try:
                outcome = self._deliver(batch, run_of(batch.rows(first, taken[-1][0])), deadline)
            finally:
                batch.give_back(first, failed=False)  # whatever is left, if anything
            if self._settled(outcome):
                return

    def _settled(self, outcome: Optional[Outcome]) -> bool:
        """Note what a batch came to and tell the waiters; whether to stop sending."""
        if outcome is None:
            self._failures = 0
        else:
            self._after_failure(outcome)
        with self._cond:
            self._progress += 1
            self._cond.notify_all()
        return outcome is not None or time.monotonic() < self._not_before

    def _note_pruned(self, pruned: int) -> None:
        if pruned:
            log.warning(
                "the dead letters are full (max_dead_letters=%d): removed the %d oldest",
                self._options.max_dead_letters,
                pruned,
            )
            self._report(
                WhisperrError(
                    "dropped",
                    f"dead letters full: removed the {pruned} oldest "
                    f"(max_dead_letters={self._options.max_dead_letters})",
                )
            )

    def _trouble_begins(self, cause: str) -> None:
        if self._trouble is None:
            log.warning("%s", cause)
            self._trouble_since = time.monotonic()
        self._trouble = cause

    def _trouble_over(self) -> None:
        if self._trouble is not None:
            log.warning(
                "delivery works again after %.0f s",
                time.monotonic() - self._trouble_since,
            )
            self._trouble = None

    def _after_failure(self, outcome: Outcome) -> None:
        now = time.monotonic()
        with self._cond:
            self._retry_pending = True
            if outcome.retry_after is not None:
                self._retry_after_until = now + outcome.retry_after
            if outcome.kind in (_retry.AUTH, _retry.CONFIG):
                self._not_before = now + PAUSE_AFTER_FAILURE
                if outcome.kind == _retry.AUTH:
                    cause = f"the server rejected the API key (HTTP {outcome.status})"
                else:
                    cause = (
                        f"the server answered HTTP {outcome.status} to "
                        f"{self._options.base_url}: the base_url is probably wrong (or a "
                        "gateway in front of the API fails)"
                    )
                error = WhisperrError(
                    outcome.kind, f"delivery paused: {cause}; the ops stay queued", outcome.status
                )
            else:
                self._failures += 1
                self._failed += 1  # a failed attempt: a flush with retry=False stops
                if self._failures <= self._options.max_retries:
                    delay = outcome.retry_after
                    if delay is None:
                        delay = _retry.backoff(self._failures)
                    self._not_before = now + max(delay, _MIN_RETRY_DELAY)
                    log.debug("delivery failed (%s); retry %d", outcome.detail, self._failures)
                    return
                self._failures = 0
                self._not_before = now + max(PAUSE_AFTER_FAILURE, outcome.retry_after or 0.0)
                cause = f"the API is unreachable or failing ({outcome.detail})"
                error = WhisperrError(
                    "retry_exhausted",
                    f"delivery failed after retries ({outcome.detail}); the ops stay queued",
                    outcome.status,
                )
        self._trouble_begins(f"{cause}; delivery paused, the ops stay queued")
        # Report first, so that a flush() that returns "blocked" finds on_error already run.
        self._report(error)
        with self._cond:
            self._blocked += 1
            self._blocked_reason = error.type
            self._progress += 1
            self._cond.notify_all()

    def _deliver(self, batch: _Batch, run: Run, deadline: Optional[float]) -> Optional[Outcome]:
        """Send claimed rows; ``None`` when all were delivered or refused, or the rest were
        given back to slow down (``_not_before`` then says until when).

        A 400 or 413 on several events splits the batch in halves until the bad events are
        alone; those are refused and the rest are delivered.
        """
        todo = [run]
        while todo:
            part = todo.pop()
            first, last = part.first, part.last
            if part is not run and not batch.renew(first):
                return None  # the rows were taken over: nothing left to send
            outcome = self._post(part, deadline)
            self._noted.append(None if outcome.kind == _retry.OK else outcome.detail)
            if outcome.kind == _retry.OK:
                batch.ack(first, last)
                self.delivered += part.ops
                self._refusals = 0
                self._trouble_over()
                log.debug("delivered %d op(s)", len(part))
            elif outcome.kind == _retry.DROP:
                self._refusals += 1
                split = part.ops > 1 and outcome.status in _SPLIT_STATUSES
                rows = batch.rows(first, last) if split else []
                if len(rows) > 1:
                    half = len(rows) // 2
                    todo += [run_of(rows[half:]), run_of(rows[:half])]
                else:
                    moved, pruned = batch.refuse(first, last, outcome.status, outcome.detail)
                    self._note_refused(moved, outcome, kept=isinstance(batch, _FileBatch))
                    self._note_pruned(pruned)
                if self._refusals >= _FREE_REFUSALS:
                    self._slow_down(batch, todo[-1].first if todo else None)
                    return None
            else:
                # Everything from here on is given back, in order, for a later attempt.
                batch.give_back(first, failed=True)
                return outcome
        return None

    def _slow_down(self, batch: _Batch, first: Optional[int]) -> None:
        """Too many refusals in a row: give the rest (from ``first``) back and wait before
        the next request."""
        delay = _retry.backoff(self._refusals - _FREE_REFUSALS + 1)
        if first is not None:
            batch.give_back(first, failed=False)
        with self._cond:
            self._not_before = time.monotonic() + max(delay, _MIN_RETRY_DELAY)
            self._retry_pending = True
        self._trouble_begins(f"the server refused {self._refusals} requests in a row; slowing down")

    def _note_refused(self, moved: int, outcome: Outcome, *, kept: bool) -> None:
        if not moved:  # taken over by another sender meanwhile (it reports them)
            return
        where = "moved to the dead letters" if kept else "not kept: the outbox cannot be written"
        log.warning("the server refused %d op(s) (%s); %s", moved, outcome.detail, where)
        self._report(
            WhisperrError(
                "dropped", f"the server refused {moved} op(s) ({outcome.detail})", outcome.status
            )
        )

    def _post(self, part: Run, deadline: Optional[float]) -> Outcome:
        timeout = self._options.request_timeout
        if deadline is not None:  # an inline flush at exit must not overrun its budget
            timeout = max(0.001, min(timeout, deadline - time.monotonic()))
        if part.kind == IDENTIFY:
            path, body = "/v1/identify", part.body
        else:
            path, body = "/v1/events/batch", batch_body(part.body)
        self._watchdog.arm(timeout + _REQUEST_SLACK)
        try:
            outcome = self._transport.post(path, body, timeout)
        finally:
            self._watchdog.disarm()
        if self._watchdog.fired and outcome.kind == _retry.RETRY:
            return outcome._replace(
                detail=f"no complete answer within {timeout:g}s (the server kept the request open)"
            )
        return outcome


# Senders of this process that started a thread: at exit, each thread still running is
# ended (see Sender.end_before_exit).
_started: weakref.WeakSet[Sender] = weakref.WeakSet()
# How long exit waits for those threads, all together, after the final flush.
EXIT_GRACE = 1.0
_EXIT_STEP = 0.02


def end_all_before_exit() -> None:
    deadline = time.monotonic() + EXIT_GRACE
    for sender in list(_started):
        sender.end_before_exit(deadline)
