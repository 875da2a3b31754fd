"""DurableWhisperr: validate, encode, append to the outbox; start the sender; flush/shutdown."""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Union

from ._errors import Reporter, WhisperrError
from ._options import SETTINGS, Options, setting
from ._sender import FlushResult, Sender, end_all_before_exit
from ._store import (
    DRIVER_MISSING,
    DeadLetter,
    OutboxStats,
    StoreError,
    check_usable,
    is_database_url,
)
from ._version import __version__
from ._wire import (
    IDENTIFY,
    SDK_NAME,
    TRACK,
    InvalidOp,
    TrackEncoder,
    describe_error,
    encode_identify,
    message_id,
    message_ids,
    shortcut_channels,
    utc_now_ms,
)
from ._writer import Writer, Written

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

OnError = Callable[[WhisperrError], None]

_TRACK_FIELDS = ("external_user_id", "event_type", "properties", "context")
# Ops per transaction in track_many(): large enough to make a commit's cost negligible.
_BULK_CHUNK = 1_000
# What a write came to when a signal handler made it: set aside, stored by the next one.
_SET_ASIDE = Written()


class BulkResult(NamedTuple):
    """What one ``track_many()`` came to: events committed to the file when it returned,
    events held in memory (the file could not be written; the sender delivers them from
    there), and the oldest queued ops evicted meanwhile to keep ``max_queue_size`` (this
    call's own, or older ones) because delivery could not keep up."""

    stored: int = 0
    held: int = 0
    evicted: int = 0


# A timeout this long (or infinite) is no limit: threading refuses waits beyond a bound.
_NO_LIMIT = 1e9


def key_fingerprint(api_key: str) -> str:
    """What the outbox stores instead of the key: enough to tell keys apart, nothing more."""
    return hashlib.sha256(b"whisperr_durable:" + api_key.encode("utf-8")).hexdigest()[:16]


def _as_timeout(timeout: Optional[float]) -> Optional[float]:
    """A caller's timeout in seconds: ``None``, ``inf`` or an enormous number is no limit."""
    if timeout is None:
        return None
    if timeout != timeout:  # NaN
        raise ValueError("timeout must be a number of seconds or None")
    return None if timeout >= _NO_LIMIT else float(timeout)


class DurableWhisperr:
    """A Whisperr client whose queue is a SQLite file on disk.

    A drop-in for the official ``whisperr.Whisperr``: the same methods, options and
    defaults. ``track()`` and ``identify()`` return once the op is committed to the outbox at
    ``path``; a background thread delivers it, and whatever is not delivered when the
    process ends is delivered by the next client that opens the same file with the same key.
    """

    def __init__(
        self,
        api_key: Optional[str] = None,
        *,
        path: Optional[str] = None,
        base_url: Optional[str] = None,
        app_version: Optional[str] = None,
        flush_at: Optional[int] = None,
        flush_interval: Optional[float] = None,
        max_queue_size: Optional[int] = None,
        max_batch_size: Optional[int] = None,
        max_retries: Optional[int] = None,
        request_timeout: Optional[float] = None,
        disabled: Optional[bool] = None,
        debug: Optional[bool] = None,
        on_error: Optional[OnError] = None,
        transport: Optional[httpx.BaseTransport] = None,
        shutdown_timeout: Optional[float] = None,
        store_timeout: Optional[float] = None,
        max_dead_letters: Optional[int] = None,
        fsync: Optional[bool] = None,
        sync_interval: Optional[float] = None,
        strict: Optional[bool] = None,
        flush_on_sigterm: Optional[bool] = None,
    ) -> None:
        """Options not passed (``None``) come from their ``WHISPERR_<OPTION>`` environment
        variable (``WHISPERR_DB_PATH`` for ``path``), else from their default: see the
        README's table. An argument always wins."""
        given = dict(locals())
        key, o, options = _resolve(api_key, given)
        self._disabled = bool(o["disabled"])
        self._emit = Reporter(on_error)
        self._strict = o["strict"]
        if o["debug"]:
            _enable_debug_logging()
        if options is None:
            return
        self._options = options
        app_version = o["app_version"]
        # Context keys added to every event, under the caller's keys.
        environment = {"sdk_name": SDK_NAME, "sdk_version": __version__}
        if app_version and app_version.strip():
            environment["app_version"] = app_version.strip()
        self._encoder = TrackEncoder(environment)
        fingerprint = key_fingerprint(key)
        self._writer = Writer(self._options, fingerprint, self._emit)
        # httpx and filelock are imported here, not with the package: a process that only
        # imports whisperr_durable does not pay for them.
        from ._lock import sender_lock
        from ._transport import Transport

        self._sender = Sender(
            self._options,
            fingerprint,
            Transport(self._options.base_url, key, transport),
            sender_lock(self._options.path, fingerprint, self._options.store_timeout),
            self._writer,
            self._emit,
        )
        self._closed = False
        self._clock_ms: Callable[[], int] = utc_now_ms
        # Threads inside a method of this client right now. A signal handler runs on a
        # thread that may be inside one, holding a lock (the writer's, a condition's, an
        # Event's) that nothing may take again: such a call takes none (see _guarded).
        self._inside: set[int] = set()
        _live_clients.add(self)
        if o["flush_on_sigterm"]:
            _flush_on_sigterm()
        self._deliver_what_was_left()

    def _deliver_what_was_left(self) -> None:
        # The next process that opens the file delivers what earlier ones left, even if it
        # never tracks anything itself.
        if not self._store_exists():
            return
        try:
            left = self._writer.has_pending()
        except StoreError as exc:
            log.debug("could not look for ops left in the outbox: %s", exc)
            return
        if left and self._sender.start():
            self._sender.wake()

    @property
    def shutdown_timeout(self) -> float:
        """Seconds ``shutdown()``, the exit handler and the integrations' shutdown hooks
        may spend flushing."""
        return 0.0 if self._disabled else self._options.shutdown_timeout

    def _store_exists(self) -> bool:
        """Whether the outbox may hold ops already: its file exists, or it is a database."""
        path = self._options.path
        return is_database_url(path) or os.path.exists(path)

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
        *,
        connection: Any = None,
    ) -> None:
        """Record an event for a known user, durably, and return.

        Every event carries ``context.sdk_name``, ``context.sdk_version`` and, when
        configured, ``context.app_version``; a key in ``context`` wins over those three,
        never over ``$message_id``. An invalid call is not queued: it is reported as
        ``dropped`` (or raises ``ValueError`` with ``strict=True``).

        ``connection`` (a PostgreSQL outbox only): a psycopg 3 connection whose current
        transaction the event joins, uncommitted: it is sent once that transaction commits,
        and never if it rolls back. Errors of that insert are raised, as the caller's
        transaction's own.
        """
        if self._disabled:
            return
        now_ms = self._clock_ms()
        try:
            body = self._encoder.encode(
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
        if connection is not None:
            self._write_in(connection, (TRACK, body, now_ms))
            return
        self._write([(TRACK, body, now_ms)], group=True)

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
        connection: Any = None,
    ) -> None:
        """Associate traits and contact channels with a user, durably, and return.

        ``email``, ``phone`` and ``push_token`` become opted-in channels; an explicit
        ``channels`` list replaces them. Channel dicts take ``type`` (or ``channel``),
        ``address``, ``opted_in`` (default true) and ``verified``. ``connection``: as for
        :meth:`track`.
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
        if connection is not None:
            self._write_in(connection, (IDENTIFY, body, self._clock_ms()))
            return
        self._write([(IDENTIFY, body, self._clock_ms())], group=True)

    def track_many(self, events: Iterable[Union[Sequence[Any], Mapping[str, Any]]]) -> BulkResult:
        """Record many events at a fraction of the cost of one ``track()`` each: the bulk path.

        Each item is ``(external_user_id, event_type[, properties[, context]])`` or a dict
        with those keys. Events are encoded as ``track()`` would, and stored up to
        1,000 to a transaction; invalid items are skipped and reported as for ``track()``.
        An iterable that raises ends the call: what came before it is stored, and the
        failure is reported as ``dropped`` (raised with ``strict=True``).

        A load larger than ``max_queue_size`` does not evict its own events while delivery
        keeps up: before each transaction that would not fit, the call waits for the sender
        to make room. Once delivery cannot (the server down or refusing the key, the queue
        not shrinking for a request's time), the rest is stored at once and the oldest ops
        are evicted, as the contract says. The result counts what was committed to the
        file, held in memory (the file could not be written), and evicted meanwhile.
        """
        if self._disabled:
            return BulkResult()
        stored = held = evicted = 0
        bound = self._options.max_queue_size
        size = min(_BULK_CHUNK, bound)  # a transaction that fits the queue once it has room
        waiting = True  # for room, until delivery cannot make it
        chunk: list[tuple[int, str, int]] = []
        ids: list[str] = []  # drawn for a chunk at a time: one read of the random source

        def write() -> None:
            nonlocal stored, held, evicted, waiting, chunk
            if waiting and self._writer.room() < len(chunk):
                waiting = self._sender.wait_for_room(self._writer.room, len(chunk))
            written = self._write(chunk)
            chunk = []
            stored += written.stored
            held += written.held
            evicted += written.evicted

        try:
            iterator = iter(events)
            while True:
                try:
                    item = next(iterator)
                except StopIteration:
                    break
                except Exception as exc:  # the caller's generator failed: stop there
                    self._invalid("track_many", exc, what="the events iterable")
                    break
                if not ids:
                    ids = message_ids(_BULK_CHUNK)
                body = self._encode_item(item, ids[-1])
                if body is None:
                    continue
                ids.pop()
                chunk.append(body)
                if len(chunk) >= size:
                    write()
        except TypeError as exc:  # not iterable at all
            self._invalid("track_many", exc, what="events")
        finally:
            # Whatever happened above (strict mode raising included), the valid items
            # already taken are stored.
            if chunk:
                write()
        return BulkResult(stored, held, evicted)

    def _encode_item(self, item: Any, msg_id: str) -> Optional[tuple[int, str, int]]:
        now_ms = self._clock_ms()
        try:
            if type(item) is tuple and len(item) == 3:  # the common item, unpacked at once
                user, event_type, properties = item
                body = self._encoder.encode(user, event_type, properties, None, msg_id, now_ms)
                return (TRACK, body, now_ms)
            if isinstance(item, Mapping):
                args: list[Any] = [item.get(k) for k in _TRACK_FIELDS]
            elif isinstance(item, (str, bytes)):
                raise InvalidOp("an item must be a tuple or a dict, not a string")
            else:
                if not 2 <= len(item) <= 4:
                    raise InvalidOp(
                        "an item needs a user id, an event type and at most properties and context"
                    )
                args = [*item, None, None][:4]
            user, event_type, properties, context = args
            body = self._encoder.encode(user, event_type, properties, context, msg_id, now_ms)
        except Exception as exc:
            self._invalid("track_many", exc)
            return None
        return (TRACK, body, now_ms)

    def flush(self, timeout: Optional[float] = None) -> FlushResult:
        """Deliver everything enqueued before this call, and wait for it.

        Returns when those ops are delivered or refused, when delivery cannot proceed
        (key rejected, wrong URL, retries exhausted, the file unusable), or after ``timeout``
        seconds (``None`` or ``inf``: no limit). The result tells how many of them are still
        pending and why, and how many were refused or lost meanwhile; it is truthy only if
        every one was delivered.
        """
        return self._flush(_as_timeout(timeout), retry=True)

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
        if self._disabled or not (self._writer.used or self._store_exists()):
            return FlushResult()  # nothing was ever stored: do not create the file for this
        with self._guarded() as entered:
            if not entered:
                # A signal handler interrupted this thread inside the client: nothing here
                # may wait for it. The sender delivers on its own.
                return FlushResult(self._writer.held, "reentered")
            return self._flush_entered(timeout, retry=retry)

    def _flush_entered(self, timeout: Optional[float], *, retry: bool) -> FlushResult:
        try:
            barrier = self._writer.barrier()
            result = self._sender.flush(
                lambda exact: self._writer.pending(barrier, exact), timeout, retry=retry
            )
        except StoreError as exc:
            log.warning("flush could not use the outbox: %s", exc)
            result = FlushResult(self._writer.held, "store")
        if barrier.error is not None and result.reason is None:
            result = result._replace(reason="store")  # the file's ops were not looked at
        refused, lost = self._writer.since(barrier)
        return result._replace(refused=refused, lost=lost)

    def shutdown(self, timeout: Optional[float] = None) -> FlushResult:
        """Flush for at most ``timeout`` seconds (default ``shutdown_timeout``; ``inf``: no
        limit), then stop.

        The final flush stops at the first failed request; whatever is not delivered stays in
        the outbox for the next client. Also run at interpreter exit. Idempotent.
        """
        if self._disabled or self._closed:
            return FlushResult()
        if threading.get_ident() in self._inside:
            # From a signal handler that interrupted this client: nothing here may wait.
            # Left open, so the exit handler still runs the final flush.
            return FlushResult(self._writer.held, "reentered")
        self._closed = True
        budget = _as_timeout(self._options.shutdown_timeout if timeout is None else timeout)
        started = time.monotonic()
        # One pass, as the official SDK's shutdown: after a failed request what is left stays
        # on disk for the next process, and exit is not held up by backoff.
        result = self._flush(budget, retry=False)
        left = 1.0 if budget is None else budget - (time.monotonic() - started)
        self._sender.stop(max(0.0, min(1.0, left)))
        lost = self._writer.drop_held()
        if lost:
            message = f"{lost} op(s) that could not be stored or delivered are lost"
            log.warning("%s", message)
            self._emit(WhisperrError("dropped", message))
            result = result._replace(lost=result.lost + lost)
        with self._guarded() as entered:
            if entered:
                self._writer.close()
        _live_clients.discard(self)
        return result

    def stats(self) -> OutboxStats:
        """What is in the outbox for this key, and what became of this key's ops. Never
        raises: if the file cannot be read, ``error`` says why."""
        if self._disabled:
            return OutboxStats(0, 0, None, 0, 0, 0)
        with self._guarded() as entered:
            if entered:
                return self._writer.stats()._replace(delivered=self._sender.delivered)
        held = self._writer.held
        return OutboxStats(0, 0, None, 0, 0, 0, held=held, error="called from a signal handler")

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` ops the server refused, for this client's key (raises
        ``StoreError`` if the file cannot be read)."""
        if self._disabled:
            return []
        with self._guarded() as entered:
            if entered:
                return self._writer.dead_letters(limit)
        raise StoreError("dead_letters() called from a signal handler that interrupted it")

    # ---- internals ----

    @contextmanager
    def _guarded(self) -> Iterator[bool]:
        """Yields whether this thread may use the client's locks: ``False`` if it is inside
        this client already (a signal handler interrupted it there)."""
        ident = threading.get_ident()
        if ident in self._inside:
            yield False
            return
        # A signal between the check and this line finds the thread not yet inside, and so
        # runs a whole call of its own before this one takes any lock: safe.
        self._inside.add(ident)
        try:
            yield True
        finally:
            self._inside.discard(ident)

    def _write(self, ops: list[tuple[int, str, int]], *, group: bool = False) -> Written:
        """Hand ops to the writer and wake the sender for them; what the write came to. The
        hot path of track(): the guard is spelled out."""
        ident = threading.get_ident()
        if ident in self._inside:  # a signal handler interrupted this thread in the client
            self._writer.set_aside(ops)
            return _SET_ASIDE
        self._inside.add(ident)
        try:
            written = self._writer.write(ops, group=group)
            self._after_write(written)
        finally:
            self._inside.discard(ident)
        self._writer.emit_deferred()  # outside: the callback may track
        return written

    def _write_in(self, connection: Any, op: tuple[int, str, int]) -> None:
        """Insert ``op`` in the caller's transaction. The sender finds it once committed, at
        its next cycle (``flush_interval``, ``flush_at`` ops, a ``flush()``)."""
        self._writer.write_in(connection, op)
        if not self._closed:
            self._sender.start()

    def _after_write(self, written: Written) -> None:
        """Wake the sender for what was written: ops tracked after shutdown() stay in the
        file for the next client."""
        if self._closed:
            return
        sender = self._sender
        sender.start()
        if written.wake:
            sender.wake()
        elif written.checkpoint:
            sender.checkpoint_soon()
        if written.stored:
            sender.sync_soon()
        elif written.held:
            sender.store_soon()

    def _invalid(self, method: str, exc: Exception, *, what: str = "") -> None:
        if isinstance(exc, InvalidOp):
            error = exc
        else:
            # The text of a caller's exception can carry user data (KeyError: 'ada@...'),
            # and its __str__ can itself raise: say what it was and where it came from.
            error = InvalidOp(f"{what + ': ' if what else ''}{describe_error(exc)}")
        if self._strict:
            raise error from (None if error is exc else exc)
        log.warning("%s call not queued: %s", method, error)
        self._emit(WhisperrError("dropped", f"{method} not queued: {error}"))

    def _after_fork_in_child(self) -> None:
        self._writer.after_fork_in_child()
        self._sender.after_fork()


Whisperr = DurableWhisperr

_live_clients: weakref.WeakSet[DurableWhisperr] = weakref.WeakSet()


def _each_within_one_budget(act: Callable[[DurableWhisperr, float], object], what: str) -> None:
    """``act(client, seconds left)`` for every live client, within one budget for all, not
    one each: the longest shutdown_timeout."""
    clients = list(_live_clients)
    deadline = time.monotonic() + max((c.shutdown_timeout for c in clients), default=0.0)
    for client in clients:
        try:
            act(client, max(0.0, deadline - time.monotonic()))
        except Exception:
            log.debug("%s failed", what, exc_info=True)


def _shutdown_all() -> None:
    # Exit takes at most the longest shutdown_timeout (plus a moment to stop each thread).
    _each_within_one_budget(
        lambda client, left: client.shutdown(min(client.shutdown_timeout, left)),
        "shutdown at exit",
    )
    end_all_before_exit()


def _resolve(
    api_key: Optional[str], given: dict[str, Any]
) -> tuple[str, dict[str, Any], Optional[Options]]:
    """The key, each setting's value (argument, else variable, else default) and the checked
    options (``None`` for a disabled client); ``ValueError`` for what cannot work."""
    o = {name: setting(name, given.get(name)) for name in SETTINGS}
    # A key read from a file often ends with a newline.
    key = (api_key or os.environ.get("WHISPERR_API_KEY", "")).strip()
    if not key and not o["disabled"]:
        raise ValueError("api_key is required (pass it or set WHISPERR_API_KEY)")
    if not (key.isascii() and key.isprintable()):
        raise ValueError("api_key has characters that cannot be sent in an HTTP header")
    if o["disabled"]:
        return key, o, None
    # Every field but the key is a setting; the path is made absolute.
    fields = {name: o[name] for name in Options._fields if name in o}
    path = os.fspath(o["path"])
    if is_database_url(path):
        _check_database_driver()
    else:
        path = os.path.abspath(os.path.expanduser(path))
    options = Options(
        **{**fields, "api_key": key, "path": path, "fsync": bool(o["fsync"])}
    ).checked()
    return key, o, options


def _check_database_driver() -> None:
    if importlib.util.find_spec("psycopg") is None:
        raise ValueError(f"path: {DRIVER_MISSING}")


def check_options(api_key: Optional[str] = None, **options: Any) -> None:
    """Raise ``ValueError`` if a client with these options could not work, as the
    constructor would, or could not make or write its outbox file, without making one (no
    file, no thread): for a check at startup, also in a process that must not send (a
    server's master process, say)."""
    _, _, checked = _resolve(api_key, options)
    if checked is not None and not is_database_url(checked.path):
        try:
            check_usable(checked.path)
        except StoreError as exc:
            raise ValueError(f"the outbox file (path, WHISPERR_DB_PATH): {exc}") from None


# The SIGTERM handler this module installed (flush_on_sigterm=True), and the one it replaced.
_sigterm: dict[str, Any] = {}


def _flush_on_sigterm() -> None:
    """Install, once per process, a SIGTERM handler that flushes every client within one
    shutdown_timeout budget, then does what the handler it replaced would have done."""
    if _sigterm:
        return
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread of the main interpreter
        log.warning(
            "flush_on_sigterm needs the client made in the main thread: SIGTERM not handled"
        )
        return
    _sigterm["previous"] = previous


def _on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
    # A client this signal interrupted inside one of its calls returns at once
    # ("reentered"): what it holds stays on disk for the next process.
    _each_within_one_budget(lambda client, left: client.flush(left), "flush on SIGTERM")
    previous = _sigterm.get("previous")
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        # The default action: end the process as SIGTERM does (no exit handlers run).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _after_fork_in_child() -> None:
    for client in list(_live_clients):
        client._after_fork_in_child()


def _enable_debug_logging() -> None:
    package = logging.getLogger("whisperr_durable")  # every module's logger is under it
    package.setLevel(logging.DEBUG)
    if not any(not isinstance(h, logging.NullHandler) for h in package.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        package.addHandler(handler)


atexit.register(_shutdown_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
