"""DurableWhisperr: validate, encode, append to the outbox; start the sender; flush/shutdown."""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Union

from ._errors import WhisperrError
from ._options import (
    DEFAULT_BASE_URL,
    DEFAULT_FLUSH_AT,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_DEAD_LETTERS,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_MAX_RETRIES,
    DEFAULT_PATH,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_STORE_TIMEOUT,
    MAX_OVERFLOW,
    Options,
)
from ._outbox import DeadLetter, Outbox, Stats, StoreError
from ._sender import FlushResult, Sender
from ._version import __version__
from ._wire import (
    IDENTIFY,
    SDK_NAME,
    TRACK,
    InvalidOp,
    encode_identify,
    encode_track,
    message_id,
    shortcut_channels,
    utc_now_ms,
)

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("whisperr_durable")

OnError = Callable[[WhisperrError], None]

_TRACK_FIELDS = ("external_user_id", "event_type", "properties", "context")
# Ops per transaction in track_many(): large enough to make a commit's cost negligible.
_BULK_CHUNK = 1_000
# Ops appended between two checkpoints asked of the sender (about a page each in the WAL).
_CHECKPOINT_EVERY = 1_000


def key_fingerprint(api_key: str) -> str:
    """What the outbox stores instead of the key: enough to tell keys apart, nothing more."""
    return hashlib.sha256(b"whisperr_durable:" + api_key.encode("utf-8")).hexdigest()[:16]


class _Stored(NamedTuple):
    """What one write to the outbox came to, reported once the lock is released."""

    stored: int
    error: Optional[str]
    evicted: int
    lost: int
    wake: bool
    checkpoint: bool


class DurableWhisperr:
    """A Whisperr client whose queue is a SQLite file on disk.

    A drop-in for the official ``whisperr.Whisperr``: the same methods, options and
    defaults. ``track()`` and ``identify()`` return once the op is committed to the outbox at
    ``path``; a background thread delivers it, and whatever is not delivered when the
    process ends is delivered by the next client that opens the same file with the same key.
    """

    _group: list[tuple[int, str, int]]
    _group_added: int
    _group_stored: int
    _group_leading: bool

    def __init__(
        self,
        api_key: Optional[str] = None,
        *,
        path: str = DEFAULT_PATH,
        base_url: str = DEFAULT_BASE_URL,
        app_version: Optional[str] = None,
        flush_at: int = DEFAULT_FLUSH_AT,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_retries: int = DEFAULT_MAX_RETRIES,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        disabled: bool = False,
        debug: bool = False,
        on_error: Optional[OnError] = None,
        transport: Optional[httpx.BaseTransport] = None,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        store_timeout: float = DEFAULT_STORE_TIMEOUT,
        max_dead_letters: int = DEFAULT_MAX_DEAD_LETTERS,
        fsync: bool = False,
        strict: bool = False,
    ) -> None:
        # A key read from a file often ends with a newline.
        key = (api_key or os.environ.get("WHISPERR_API_KEY", "")).strip()
        if not key and not disabled:
            raise ValueError("api_key is required (pass it or set WHISPERR_API_KEY)")
        if not (key.isascii() and key.isprintable()):
            raise ValueError("api_key has characters that cannot be sent in an HTTP header")
        self._disabled = bool(disabled)
        self._on_error = on_error
        self._strict = strict
        if debug:
            _enable_debug_logging()
        if self._disabled:
            return
        self._options = Options(
            api_key=key,
            path=os.path.abspath(os.path.expanduser(os.fspath(path))),
            base_url=base_url,
            app_version=app_version,
            flush_at=flush_at,
            flush_interval=flush_interval,
            max_queue_size=max_queue_size,
            max_batch_size=max_batch_size,
            max_retries=max_retries,
            request_timeout=request_timeout,
            shutdown_timeout=shutdown_timeout,
            store_timeout=store_timeout,
            max_dead_letters=max_dead_letters,
            fsync=fsync,
        ).checked()
        # Context keys added to every event, under the caller's keys.
        self._environment = {"sdk_name": SDK_NAME, "sdk_version": __version__}
        if app_version and app_version.strip():
            self._environment["app_version"] = app_version.strip()
        fingerprint = key_fingerprint(key)
        self._lock = threading.Lock()  # guards the callers' connection and the counters
        self._outbox = Outbox(
            self._options.path,
            fingerprint,
            fsync=fsync,
            store_timeout=store_timeout,
            max_dead_letters=max_dead_letters,
            report=self._report_store_incident,
        )
        # httpx and filelock are imported here, not with the package: a process that only
        # imports whisperr_durable does not pay for them.
        from ._lock import SenderLock, lock_path
        from ._transport import Transport

        self._sender = Sender(
            self._options,
            fingerprint,
            Transport(self._options.base_url, key, transport),
            SenderLock(lock_path(self._options.path, fingerprint)),
            self._emit,
            on_wake=self._store_overflow,
            report_store=lambda message: self._emit(WhisperrError("store_error", message)),
        )
        self._deferred: deque[WhisperrError] = deque()
        self._since_wake = self._since_checkpoint = 0
        self._store_errors = 0
        self._evicted_unlogged = 0
        self._eviction_quiet_until = 0.0
        # Ops that could not be stored (disk full, read-only, locked), oldest first; written
        # before any newer op as soon as the outbox takes writes again.
        self._overflow: deque[tuple[int, str, int]] = deque()
        self._reset_group()
        self._closed = False
        self._clock_ms: Callable[[], int] = utc_now_ms
        _live_clients.add(self)

    @property
    def ready(self) -> bool:
        """``False`` for a disabled client, which records nothing."""
        return not self._disabled

    @property
    def path(self) -> Optional[str]:
        """The outbox file, or ``None`` for a disabled client."""
        return None if self._disabled else self._options.path

    def track(
        self,
        external_user_id: str,
        event_type: str,
        properties: Optional[Mapping[str, Any]] = None,
        context: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Record an event for a known user, durably, and return.

        Every event carries ``context.sdk_name``, ``context.sdk_version`` and, when
        configured, ``context.app_version``; a key in ``context`` wins over those three,
        never over ``$message_id``. An invalid call is not queued: it is reported as
        ``dropped`` (or raises ``ValueError`` with ``strict=True``).
        """
        if self._disabled:
            return
        now_ms = self._clock_ms()
        try:
            body = encode_track(
                self._environment,
                external_user_id,
                event_type,
                properties,
                context,
                message_id(),
                now_ms,
            )
        except Exception as exc:  # a caller's object can fail in any way while encoded
            self._invalid("track", exc)
            return
        self._append([(TRACK, body, now_ms)], group=True)

    def identify(
        self,
        external_user_id: str,
        *,
        traits: Optional[Mapping[str, Any]] = None,
        email: Optional[str] = None,
        phone: Optional[str] = None,
        push_token: Optional[str] = None,
        preferred_channel: Optional[str] = None,
        channels: Optional[Iterable[Mapping[str, Any]]] = None,
    ) -> None:
        """Associate traits and contact channels with a user, durably, and return.

        ``email``, ``phone`` and ``push_token`` become opted-in channels; an explicit
        ``channels`` list replaces them. Channel dicts take ``type`` (or ``channel``),
        ``address``, ``opted_in`` (default true) and ``verified``.
        """
        if self._disabled:
            return
        try:
            if channels is None:
                channels = shortcut_channels(email, phone, push_token)
            body = encode_identify(external_user_id, traits, preferred_channel, channels)
        except Exception as exc:
            self._invalid("identify", exc)
            return
        self._append([(IDENTIFY, body, self._clock_ms())], group=True)

    def track_many(self, events: Iterable[Union[Sequence[Any], Mapping[str, Any]]]) -> int:
        """Record many events at a fraction of the cost of one ``track()`` each: the bulk path.

        Each item is ``(external_user_id, event_type[, properties[, context]])`` or a dict
        with those keys. Events are encoded as ``track()`` would, and stored up to
        1,000 to a transaction; invalid items are skipped and reported as for ``track()``.
        Returns how many were stored; when it returns, they are all committed.
        """
        if self._disabled:
            return 0
        stored = 0
        chunk: list[tuple[int, str, int]] = []
        for item in events:
            now_ms = self._clock_ms()
            try:
                if isinstance(item, Mapping):
                    args: list[Any] = [item.get(k) for k in _TRACK_FIELDS]
                elif isinstance(item, (str, bytes)):
                    raise InvalidOp("an item must be a tuple or a dict, not a string")
                else:
                    if not 2 <= len(item) <= 4:
                        raise InvalidOp(
                            "an item needs a user id, an event type and at most "
                            "properties and context"
                        )
                    args = [*item, None, None][:4]
                user, event_type, properties, context = args
                body = encode_track(
                    self._environment,
                    user,
                    event_type,
                    properties,
                    context,
                    message_id(),
                    now_ms,
                )
            except Exception as exc:
                self._invalid("track_many", exc)
                continue
            chunk.append((TRACK, body, now_ms))
            if len(chunk) >= _BULK_CHUNK:
                stored += self._append(chunk)
                chunk = []
        if chunk:
            stored += self._append(chunk)
        return stored

    def flush(self, timeout: Optional[float] = None) -> FlushResult:
        """Deliver everything enqueued before this call, and wait for it.

        Returns when those ops are delivered or dead-lettered, when delivery cannot proceed
        (key rejected, retries exhausted), or after ``timeout`` seconds (``None``: no limit).
        The result tells how many of them are still pending and why.
        """
        return self._flush(timeout, retry=True)

    async def aflush(self, timeout: Optional[float] = None) -> FlushResult:
        """``flush()`` for asyncio code: the wait happens on a thread of its own, so the
        event loop keeps running (and the loop's default executor stays free). ``timeout``
        bounds it as for ``flush()``; ``None`` waits until delivery completes or cannot
        proceed. Cancelling the await does not stop the flush, which ends by itself."""
        import asyncio

        loop = asyncio.get_running_loop()
        done: asyncio.Future[FlushResult] = loop.create_future()

        def settle(result: FlushResult, error: Optional[BaseException]) -> None:
            if done.cancelled():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        def run() -> None:
            try:
                result = self.flush(timeout)
            except Exception as exc:
                loop.call_soon_threadsafe(settle, FlushResult(), exc)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        threading.Thread(target=run, name="whisperr-durable-aflush", daemon=True).start()
        return await done

    def _flush(self, timeout: Optional[float], *, retry: bool) -> FlushResult:
        if self._disabled or not (self._overflow or os.path.exists(self._options.path)):
            return FlushResult()  # nothing was ever stored: do not create the file for this
        try:
            with self._lock:
                if self._overflow:
                    with suppress(StoreError):
                        self._store_overflow_locked()
                last_id = self._outbox.last_id()
            self._emit_deferred()

            def pending(exact: bool) -> int:
                with self._lock:
                    return self._outbox.pending_through(last_id, exact=exact)

            result = self._sender.flush(pending, timeout, retry=retry)
        except StoreError as exc:
            self._emit_deferred()
            log.warning("whisperr_durable: flush could not use the outbox: %s", exc)
            return FlushResult(len(self._overflow), "store")
        if self._overflow:  # held in memory: not delivered, whatever the sender did
            return FlushResult(result.pending + len(self._overflow), "store")
        return result

    def shutdown(self, timeout: Optional[float] = None) -> FlushResult:
        """Flush for at most ``timeout`` seconds (default ``shutdown_timeout``), then stop.

        The final flush stops at the first failed request; whatever is not delivered stays in
        the outbox for the next client. Also run at interpreter exit. Idempotent.
        """
        if self._disabled or self._closed:
            return FlushResult()
        self._closed = True
        budget = self._options.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        # One pass, as the official SDK's shutdown: after a failed request what is left stays
        # on disk for the next process, and exit is not held up by backoff.
        result = self._flush(budget, retry=False)
        self._sender.stop(max(0.0, min(1.0, deadline - time.monotonic())))
        if self._overflow:
            lost = len(self._overflow)
            self._overflow.clear()
            log.warning("whisperr_durable: %d op(s) that could not be stored are lost", lost)
            self._emit(WhisperrError("dropped", f"{lost} op(s) that could not be stored are lost"))
        with self._lock:
            self._outbox.close()
        _live_clients.discard(self)
        return result

    def stats(self) -> Stats:
        """What is in the outbox for this client's key (raises ``StoreError`` if unreadable)."""
        if self._disabled:
            return Stats(0, 0, None, 0, 0, 0)
        try:
            with self._lock:
                return self._outbox.stats()._replace(store_errors=self._store_errors)
        finally:
            self._emit_deferred()

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` ops the server refused, for this client's key."""
        if self._disabled:
            return []
        try:
            with self._lock:
                return self._outbox.dead_letters(limit)
        finally:
            self._emit_deferred()

    # ---- internals ----

    def _append(self, ops: list[tuple[int, str, int]], *, group: bool = False) -> int:
        """Store ``(kind, body, created_ms)`` ops in one transaction; returns how many.

        ``group``: commit them together with the ops other threads are appending at the same
        moment (group commit: one transaction, one fsync with ``fsync=True``, for all of
        them). One thread at a time leads: once the commit before it is done, it takes every
        op waiting and stores them; the others wait until a transaction holding theirs is
        done, then return.
        """
        if group:
            with self._group_done:
                self._group.extend(ops)
                self._group_added += len(ops)
                ticket = self._group_added
                while self._group_stored < ticket and self._group_leading:
                    self._group_done.wait()
                if self._group_stored >= ticket:
                    return len(ops)  # another thread's transaction took them
                self._group_leading = True
        through = 0
        try:
            with self._lock:
                if group:
                    with self._group_done:
                        ops, self._group = self._group, []
                        through = self._group_added
                try:
                    outcome = self._store_locked(ops)
                except BaseException:  # not stored: the next thread to lead takes them
                    if group:
                        with self._group_done:
                            self._group[:0] = ops
                            through = 0
                    raise
        finally:
            if group:
                with self._group_done:
                    self._group_stored = max(self._group_stored, through)
                    self._group_leading = False
                    self._group_done.notify_all()
        self._after_store(outcome)
        return outcome.stored

    def _store_locked(self, ops: list[tuple[int, str, int]]) -> _Stored:
        """Write ``ops`` (the lock held): to the outbox, or, while it fails, to memory."""
        error: Optional[str] = None
        stored = evicted = lost = 0
        wake = checkpoint = False
        held = bool(self._overflow)
        try:
            if held:  # older ops wait in memory: they go first
                self._overflow.extend(ops)
                evicted = self._store_overflow_locked()
            elif len(ops) == 1:
                _, evicted = self._outbox.append(*ops[0], self._options.max_queue_size)
            else:
                evicted = self._outbox.append_many(ops, self._options.max_queue_size)
        except StoreError as exc:
            self._store_errors += len(ops)
            if not held:  # the first failure of an episode is reported
                error = str(exc)
                self._overflow.extend(ops)
            while len(self._overflow) > MAX_OVERFLOW:
                self._overflow.popleft()
                lost += 1
        else:
            stored = len(ops)
            self._since_wake += stored
            self._since_checkpoint += stored
            wake = self._since_wake >= self._options.flush_at
            if wake:
                self._since_wake = self._since_checkpoint = 0
            checkpoint = self._since_checkpoint >= _CHECKPOINT_EVERY
            if checkpoint:
                self._since_checkpoint = 0
        return _Stored(stored, error, evicted, lost, wake, checkpoint)

    def _after_store(self, outcome: _Stored) -> None:
        """Report and wake the sender, with no lock held: a callback may track."""
        if outcome.error is not None:
            log.warning(
                "whisperr_durable: the outbox cannot be written (%s); holding up to %d ops in "
                "memory until it can",
                outcome.error,
                MAX_OVERFLOW,
            )
            self._emit(
                WhisperrError("store_error", f"the outbox cannot be written: {outcome.error}")
            )
        if outcome.lost:
            self._emit(
                WhisperrError(
                    "dropped",
                    "the outbox cannot be written and the memory buffer "
                    f"is full: dropped the {outcome.lost} oldest op(s)",
                )
            )
        if outcome.evicted:
            self._note_eviction(outcome.evicted)
            self._emit(
                WhisperrError("dropped", f"queue full: evicted {outcome.evicted} oldest op(s)")
            )
        self._emit_deferred()
        if not self._closed:
            self._sender.start()
            if outcome.wake:
                self._sender.wake()
            elif outcome.checkpoint:
                self._sender.checkpoint_soon()

    def _note_eviction(self, evicted: int) -> None:
        # A full queue evicts on every call: warn once a minute, with the count since.
        self._evicted_unlogged += evicted
        now = time.monotonic()
        if now >= self._eviction_quiet_until:
            log.warning(
                "whisperr_durable: queue full (max_queue_size=%d): evicted %d oldest op(s)",
                self._options.max_queue_size,
                self._evicted_unlogged,
            )
            self._evicted_unlogged = 0
            self._eviction_quiet_until = now + 60.0

    def _store_overflow_locked(self) -> int:
        """Write the ops held in memory, oldest first, in one transaction (raises StoreError)."""
        evicted = self._outbox.append_many(list(self._overflow), self._options.max_queue_size)
        log.info(
            "whisperr_durable: the outbox takes writes again; stored %d held op(s)",
            len(self._overflow),
        )
        self._overflow.clear()
        return evicted

    def _store_overflow(self) -> None:
        # Called by the sender on every wake-up, so held ops are written even if no new
        # call comes.
        if not self._overflow:
            return
        with self._lock:
            if self._overflow:
                with suppress(StoreError):
                    self._store_overflow_locked()
        self._emit_deferred()

    def _report_store_incident(self, message: str) -> None:
        # Called with the lock held: a callback that tracks must find it free, so the
        # report waits for _emit_deferred().
        self._deferred.append(WhisperrError("store_error", message))

    def _emit_deferred(self) -> None:
        while self._deferred:
            try:
                error = self._deferred.popleft()
            except IndexError:  # another thread emitted it
                return
            self._emit(error)

    def _invalid(self, method: str, exc: Exception) -> None:
        if not isinstance(exc, InvalidOp):
            exc = InvalidOp(f"{type(exc).__name__}: {exc}")
        if self._strict:
            raise exc
        log.warning("whisperr_durable: %s call not queued: %s", method, exc)
        self._emit(WhisperrError("dropped", f"{method} not queued: {exc}"))

    def _emit(self, error: WhisperrError) -> None:
        if self._on_error is None:
            return
        try:
            self._on_error(error)
        except Exception:  # the host's callback must never break delivery
            log.debug("on_error raised", exc_info=True)

    def _reset_group(self) -> None:
        # Ops of track()/identify() calls waiting for a transaction, and how many were
        # added and taken into one, in all.
        self._group_done = threading.Condition(threading.Lock())
        self._group = []
        self._group_added = self._group_stored = 0
        self._group_leading = False

    def _after_fork_in_child(self) -> None:
        # Another thread may have held the lock at fork time; it never unlocks in the child.
        self._lock = threading.Lock()
        self._reset_group()  # the parent's threads store what they added
        self._since_wake = self._since_checkpoint = 0
        self._overflow.clear()  # the parent still holds these and will store them
        self._sender.after_fork()


Whisperr = DurableWhisperr

_live_clients: weakref.WeakSet[DurableWhisperr] = weakref.WeakSet()


def _shutdown_all() -> None:
    # One budget for all clients, not one each: exit takes at most the longest
    # shutdown_timeout (plus a moment to stop each thread).
    clients = list(_live_clients)
    budget = max((c._options.shutdown_timeout for c in clients), default=0.0)
    deadline = time.monotonic() + budget
    for client in clients:
        try:
            client.shutdown(min(client._options.shutdown_timeout, deadline - time.monotonic()))
        except Exception:
            log.debug("shutdown at exit failed", exc_info=True)


def _after_fork_in_child() -> None:
    for client in list(_live_clients):
        client._after_fork_in_child()


def _enable_debug_logging() -> None:
    log.setLevel(logging.DEBUG)
    if not any(not isinstance(h, logging.NullHandler) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[whisperr_durable] %(levelname)s %(message)s"))
        log.addHandler(handler)


atexit.register(_shutdown_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
