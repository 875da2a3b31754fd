"""The caller's side of the outbox: its connection, group commit, and the ops held in memory
while the file cannot be written.

``track()`` hands its op here. Normally it is committed at once (with the ops other threads
hand over at the same moment: group commit). When a write fails (disk full, a read-only or
unwritable file, a lock held past ``store_timeout``, a file that is not ours), an *episode*
begins: the op, and every op after it, is held in memory, in order, without touching the
disk again, so that no later call waits for a failing disk. The sender thread tries to store
the held ops every ``STORE_RETRY_INTERVAL`` and ends the episode when the file takes them;
until then it delivers them from memory (``take_held``), so that an outbox nobody can write
never does worse than the in-memory SDK. Beyond ``MAX_OVERFLOW`` held ops the oldest are
dropped, counted, logged and reported.

A signal handler that calls ``track()`` while its thread is inside the client (gunicorn's
``worker_int`` runs in one) would deadlock on a lock its own thread holds: the client hands
such an op to ``set_aside``, which takes no lock; the next write or the sender's next pass
stores it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple, Optional

from ._errors import WhisperrError
from ._options import MAX_OVERFLOW, STORE_RETRY_INTERVAL, Options
from ._store import DeadLetter, OutboxStats, StoreError, is_database_url, open_store
from ._wire import IDENTIFY

log = logging.getLogger(__name__)

# (kind, body, created_ms): an op as the client encoded it.
Op = tuple[int, str, int]
# Ops appended between two checkpoints asked of the sender (two or three WAL pages each).
# Each checkpoint slows the commits that overlap its fsyncs: fewer, larger ones leave fewer
# slow calls (the slowest 0.1% of track() calls, idle, were nearly all beside one).
_CHECKPOINT_EVERY = 4_000
# A full queue or a full memory buffer drops on every call: say so once a minute.
_LOG_QUIET = 60.0


class Written(NamedTuple):
    """What one write came to, for the client to wake the sender."""

    stored: int = 0  # committed to the file now
    held: int = 0  # held in memory (the file cannot be written)
    wake: bool = False  # flush_at ops since the sender was last woken
    checkpoint: bool = False  # enough appended for the sender to checkpoint the WAL
    evicted: int = 0  # the oldest ops of the queue, evicted to keep max_queue_size


class Barrier(NamedTuple):
    """Where the queue stood when a flush began, and the running totals then."""

    last_id: Optional[int]  # newest queued id; None if the file could not be read
    held_seq: int  # newest op held in memory
    totals: tuple[int, int, int, int]  # see Writer._totals
    error: Optional[str] = None


class Writer:
    """Writes a client's ops to its outbox, or holds them while the outbox fails."""

    def __init__(
        self, options: Options, key_fp: str, emit: Callable[[WhisperrError], None]
    ) -> None:
        self._options = options
        self._emit = emit
        self._outbox = open_store(
            options.path,
            key_fp,
            fsync=options.fsync,
            store_timeout=options.store_timeout,
            max_dead_letters=options.max_dead_letters,
            report=self.report_incident,
        )
        self._reset()

    def _reset(self) -> None:
        """Fresh state: at construction and in a forked child."""
        # The connection: one transaction at a time. May be held across disk waits.
        self._lock = threading.Lock()
        # The hold, the episode and the counters below: never held across I/O.
        self._hold_lock = threading.Lock()
        self._held: deque[tuple[int, Op]] = deque()  # (seq, op), oldest first
        self._in_flight: list[int] = []  # seqs of held ops the sender is delivering
        self._seq = 0  # of the newest op ever held
        self._failing: Optional[str] = None  # the episode's error, while one lasts
        self._next_store_try = 0.0
        self._episode_dropped = 0
        # Whether the failure of the file was reported (by this writer or by the sender,
        # which shares it): once until the file works again.
        self._store_reported = False
        # (first seq, newest id in the file after): each batch of held ops store_held wrote,
        # so that a flush that began while they were held waits for them in the file.
        self._moved: deque[tuple[int, int]] = deque(maxlen=256)
        # Ops of calls made by a signal handler that interrupted the client (set_aside).
        self._reentered: deque[Op] = deque()
        self._deferred: deque[WhisperrError] = deque()
        # Group commit: ops of calls waiting for a transaction, and how many were added
        # and taken into one, in all.
        self._group_done = threading.Condition(threading.Lock())
        self._group: list[Op] = []
        self._group_added = self._group_stored = 0
        self._group_leading = False
        self._since_wake = self._since_checkpoint = 0
        self.store_errors = 0
        self._dropped = 0  # held ops dropped, in all
        self._refused_in_memory = 0  # held ops the server refused (no file to keep them in)
        self._drops_unlogged = 0
        self._drop_quiet_until = 0.0
        self._evicted_unlogged = 0
        self._eviction_quiet_until = 0.0

    def after_fork_in_child(self) -> None:
        # Another thread may have held a lock at fork time; it never unlocks in the child.
        # The parent still holds its held ops and stores them: the child forgets them.
        self._reset()

    def report_incident(self, kind: str, message: str) -> None:
        """The outbox's report of an incident (a file moved aside, ops left in a replaced
        file): emitted once this writer's locks are released, since the callback may track."""
        self._deferred.append(WhisperrError(kind, message))

    # ---- writing ----

    def write(self, ops: list[Op], *, group: bool = False) -> Written:
        """Store ``ops`` in one transaction, or hold them in memory; never raises StoreError.
        Reports are left for ``emit_deferred``.

        ``group``: commit them together with the ops other threads are writing at the same
        moment (one transaction, one fsync with ``fsync=True``, for all of them).
        """
        if self._reentered:  # set aside by a signal handler: older than these
            ops = self._take_reentered() + ops
        if not ops:
            return Written()
        if self._failing is None and self._lock.acquire(blocking=False):
            # Nobody else is writing: no group to gather (the common case, one thread).
            # _store_locked looks at the episode again, under its lock.
            try:
                return self._store_locked(ops)
            finally:
                self._lock.release()
        with self._hold_lock:
            if self._failing is not None:  # an episode: never wait for the file again
                return self._hold_locked(ops)
        return self._write_group(ops) if group else self._write_locked(ops)

    def write_in(self, connection: Any, op: Op) -> None:
        """Insert ``op`` in the caller's transaction on ``connection``: a PostgreSQL outbox
        only. Raises what the caller's database raises."""
        if not is_database_url(self._options.path):
            raise ValueError(
                "connection= joins a PostgreSQL transaction: it needs a PostgreSQL outbox "
                "(path='postgresql://...'), not a file"
            )
        from ._store._postgres import PgOutbox

        outbox = self._outbox
        assert isinstance(outbox, PgOutbox)
        outbox.append_in(connection, *op)  # the caller's connection: no lock of ours

    def set_aside(self, ops: list[Op]) -> None:
        """Keep the ops of a call made by a signal handler that interrupted the client, with
        no lock taken (the interrupted thread may hold any): stored by the next write or the
        sender's next pass."""
        self._reentered.extend(ops)

    def _take_reentered(self) -> list[Op]:
        ops = []
        while self._reentered:
            try:
                ops.append(self._reentered.popleft())
            except IndexError:  # taken by the sender meanwhile
                break
        return ops

    def _write_group(self, ops: list[Op]) -> Written:
        """One thread at a time leads: once the commit before it is done, it takes every op
        waiting and stores them; the others wait until a transaction holding theirs is done."""
        with self._group_done:
            self._group.extend(ops)
            self._group_added += len(ops)
            ticket = self._group_added
            while self._group_stored < ticket and self._group_leading:
                self._group_done.wait()
            if self._group_stored >= ticket:
                return Written(stored=len(ops))  # another thread's transaction took them
            self._group_leading = True
        through = 0
        try:
            with self._lock:
                with self._group_done:
                    ops, self._group = self._group, []
                    through = self._group_added
                try:
                    return self._store_locked(ops)
                except BaseException:  # not stored: the next thread to lead takes them
                    with self._group_done:
                        self._group[:0] = ops
                        through = 0
                    raise
        finally:
            with self._group_done:
                self._group_stored = max(self._group_stored, through)
                self._group_leading = False
                self._group_done.notify_all()

    def _write_locked(self, ops: list[Op]) -> Written:
        with self._lock:
            return self._store_locked(ops)

    def _store_locked(self, ops: list[Op]) -> Written:
        """Write ``ops`` (the lock held): to the outbox, or, during an episode, to memory."""
        with self._hold_lock:
            if self._failing is not None:
                return self._hold_locked(ops)
        try:
            if len(ops) == 1:
                _, evicted = self._outbox.append(*ops[0], self._options.max_queue_size)
            else:
                evicted = self._outbox.append_many(ops, self._options.max_queue_size)
        except StoreError as exc:
            with self._hold_lock:
                self._begin_episode(str(exc))
                return self._hold_locked(ops)
        if evicted:
            self._note_eviction(evicted)
        with self._hold_lock:
            return self._count_written(stored=len(ops), evicted=evicted)

    def _count_written(self, *, stored: int = 0, held: int = 0, evicted: int = 0) -> Written:
        self._since_wake += stored + held
        self._since_checkpoint += stored
        wake = self._since_wake >= self._options.flush_at
        if wake:
            self._since_wake = 0
        checkpoint = self._since_checkpoint >= _CHECKPOINT_EVERY
        if checkpoint:
            self._since_checkpoint = 0
        return Written(stored, held, wake, checkpoint, evicted)

    # ---- the hold (hold lock held) ----

    def _begin_episode(self, error: str) -> None:
        self._failing = error
        self._next_store_try = time.monotonic() + STORE_RETRY_INTERVAL
        self._episode_dropped = 0
        log.warning(
            "the outbox cannot be written (%s); holding up to %d ops in "
            "memory, delivered from there while the file fails",
            error,
            MAX_OVERFLOW,
        )
        if not self._store_reported:
            self._store_reported = True
            self._deferred.append(
                WhisperrError("store_error", f"the outbox cannot be written: {error}")
            )

    def _hold_locked(self, ops: list[Op]) -> Written:
        self.store_errors += len(ops)
        for op in ops:
            self._seq += 1
            self._held.append((self._seq, op))
        dropped = 0
        while len(self._held) > MAX_OVERFLOW:
            self._held.popleft()
            dropped += 1
        if dropped:
            self._note_drops(dropped)
        return self._count_written(held=len(ops))

    def _note_drops(self, dropped: int) -> None:
        self._dropped += dropped
        self._episode_dropped += dropped
        self._drops_unlogged += dropped
        now = time.monotonic()
        if now >= self._drop_quiet_until:
            log.warning(
                "the outbox cannot be written and %d ops are held in memory: dropped the %d oldest",
                MAX_OVERFLOW,
                self._drops_unlogged,
            )
            self._drops_unlogged = 0
            self._drop_quiet_until = now + _LOG_QUIET
        self._deferred.append(
            WhisperrError(
                "dropped",
                "the outbox cannot be written and the memory buffer is full: "
                f"dropped the {dropped} oldest op(s)",
            )
        )

    def _note_eviction(self, evicted: int) -> None:
        with self._hold_lock:
            self._evicted_unlogged += evicted
            now = time.monotonic()
            if now >= self._eviction_quiet_until:
                log.warning(
                    "queue full (max_queue_size=%d): evicted %d oldest op(s)",
                    self._options.max_queue_size,
                    self._evicted_unlogged,
                )
                self._evicted_unlogged = 0
                self._eviction_quiet_until = now + _LOG_QUIET
            self._deferred.append(
                WhisperrError("dropped", f"queue full: evicted {evicted} oldest op(s)")
            )

    # ---- for the sender ----

    @property
    def failing(self) -> bool:
        """Whether an episode lasts: ops are held because the file cannot be written."""
        return self._failing is not None

    def next_store_try(self) -> Optional[float]:
        """When (monotonic) the sender should next try to store held ops; None if none are."""
        if self._failing is None and not self._reentered:
            return None
        return self._next_store_try

    def store_held(self, *, now: bool = False) -> None:
        """Write the held ops to the file, oldest first; the episode ends once none is left.

        Called by the sender (at most every ``STORE_RETRY_INTERVAL``, or at once with
        ``now``), never by a caller of ``track()``: the wait for a failing disk is paid once
        per episode, by the call that found it failing.
        """
        if self._reentered:
            self.write([])
        if self._failing is None or (not now and time.monotonic() < self._next_store_try):
            return
        stored = 0
        with self._lock:
            # Callers add to the hold while this writes; a few passes take what they added.
            for _ in range(3):
                with self._hold_lock:
                    batch = list(self._held)
                    if not batch and not self._in_flight:
                        self._end_episode(stored)
                        break
                if not batch:
                    break
                try:
                    evicted = self._outbox.append_many(
                        [op for _, op in batch], self._options.max_queue_size
                    )
                    newest_id = self._outbox.last_id()
                except StoreError as exc:
                    with self._hold_lock:
                        self._next_store_try = time.monotonic() + STORE_RETRY_INTERVAL
                        changed = str(exc) != self._failing
                        self._failing = str(exc)
                    if changed:
                        log.warning("the outbox still fails: %s", exc)
                    break
                stored += len(batch)
                if evicted:
                    self._note_eviction(evicted)
                with self._hold_lock:
                    newest = batch[-1][0]
                    while self._held and self._held[0][0] <= newest:
                        self._held.popleft()
                    self._moved.append((batch[0][0], newest_id))
        self.emit_deferred()

    def report_store_trouble(self) -> bool:
        """For the sender, which found the file failing: whether to report it (``False``
        when this writer already did, in the same failure of the file)."""
        with self._hold_lock:
            first, self._store_reported = not self._store_reported, True
            return first

    def store_works(self) -> None:
        """The sender used the file: a later failure is a new one, reported again."""
        if self._failing is None:
            self._store_reported = False

    def _end_episode(self, stored: int) -> None:
        dropped = self._episode_dropped
        self._failing = None
        self._store_reported = False
        log.warning(
            "the outbox takes writes again; stored %d held op(s)%s",
            stored,
            f" ({dropped} dropped while it failed)" if dropped else "",
        )

    def take_held(self, max_rows: int, max_bytes: int) -> list[tuple[int, Op]]:
        """The next batch to deliver from memory while the file cannot be written: one
        identify alone, or a leading run of tracks. Settle it with ``settle_held``."""
        with self._hold_lock:
            if self._failing is None:
                return []  # no episode: held ops go to the file, and are sent from there
            taken: list[tuple[int, Op]] = []
            size = 0
            while self._held and len(taken) < max_rows:
                op = self._held[0][1]
                if op[0] == IDENTIFY and taken:
                    break
                if taken and size + len(op[1]) + 2 > max_bytes:
                    break
                taken.append(self._held.popleft())
                size += len(op[1]) + 2
                if op[0] == IDENTIFY:
                    break
            self._in_flight.extend(seq for seq, _ in taken)
            return taken

    def settle_held(
        self, taken: Sequence[tuple[int, Op]], *, delivered: bool, refused: bool = False
    ) -> None:
        """What became of ops from ``take_held``: delivered, refused by the server (they
        cannot be kept as dead letters: the file cannot be written), or given back to the
        front of the hold for a later attempt."""
        with self._hold_lock:
            for seq, _ in taken:
                self._in_flight.remove(seq)
            if refused:
                self._refused_in_memory += len(taken)
            elif not delivered:
                self._held.extendleft(reversed(taken))

    # ---- reading ----

    def barrier(self) -> Barrier:
        """Where the queue stands now: what a flush waits for, and the totals to compare
        against when it ends."""
        with self._hold_lock:
            held_seq = self._seq
        # Counted before the file is looked at: a file found replaced just now is counted
        # as lost during this flush.
        own = self._own_totals()
        error = None
        try:
            with self._lock:
                last_id: Optional[int] = self._outbox.last_id()
                counters = self._outbox.counters()
        except StoreError as exc:
            last_id, counters, error = None, {}, str(exc)
        self.emit_deferred()
        return Barrier(last_id, held_seq, self._totals(counters, own), error)

    def since(self, barrier: Barrier) -> tuple[int, int]:
        """``(refused, lost)``: ops refused by the server, and ops lost for good, since
        ``barrier``."""
        try:
            with self._lock:
                counters = self._outbox.counters()
        except StoreError:
            counters = {}
        now = self._totals(counters, self._own_totals())
        then = barrier.totals
        # The file's totals start again in a file that replaced the one counted then.
        refused = max(0, now[0] - then[0]) + now[2] - then[2]
        lost = max(0, now[1] - then[1]) + now[3] - then[3]
        return refused, lost

    def _own_totals(self) -> tuple[int, int]:
        return self._refused_in_memory, self._dropped + self._outbox.lost

    @staticmethod
    def _totals(counters: dict[str, int], own: tuple[int, int]) -> tuple[int, int, int, int]:
        """(refused and evicted in the file, refused and lost in this process)."""
        return counters.get("refused", 0), counters.get("evicted", 0), own[0], own[1]

    def pending(self, barrier: Barrier, exact: bool) -> int:
        """How many ops enqueued before ``barrier`` are not yet delivered or refused
        (``exact=False``: any non-zero number will do)."""
        with self._hold_lock:
            held = sum(1 for seq, _ in self._held if seq <= barrier.held_seq)
            held += sum(1 for seq in self._in_flight if seq <= barrier.held_seq)
            # Held then, in the file now: their ids are past the barrier's.
            last_id = max(
                [id_ for first, id_ in self._moved if first <= barrier.held_seq],
                default=barrier.last_id or 0,
            )
        held += len(self._reentered)
        if barrier.last_id is None or (held and not exact):
            return held
        with self._lock:
            last_id = max(last_id, barrier.last_id)
            return held + self._outbox.pending_through(last_id, exact=exact)

    def room(self) -> int:
        """How many more ops the file's queue takes before max_queue_size evicts (at least;
        a queue that cannot be read has room: the write will say what is wrong)."""
        try:
            with self._lock:
                return self._options.max_queue_size - self._outbox.span()
        except StoreError:
            return self._options.max_queue_size

    @property
    def used(self) -> bool:
        """Whether this process has the file open, or ops waiting in memory."""
        return self._outbox.is_open or self.held > 0

    @property
    def held(self) -> int:
        return len(self._held) + len(self._in_flight) + len(self._reentered)

    def drop_held(self) -> int:
        """Forget every op held in memory (at shutdown, the file still failing): returns how
        many, counted as lost."""
        with self._hold_lock:
            lost = len(self._held) + len(self._reentered)
            self._held.clear()
            self._reentered.clear()
            self._dropped += lost
            self._failing = None  # a later write tries the file again
        return lost

    def stats(self) -> OutboxStats:
        """The outbox's stats for this key, with this process's own counts; the file's
        counts are 0 (and ``error`` says why) when it cannot be read."""
        try:
            with self._lock:
                stats = self._outbox.stats()
        except StoreError as exc:
            stats = OutboxStats(0, 0, None, 0, 0, 0, error=str(exc), lost=self._outbox.lost)
        self.emit_deferred()
        return stats._replace(
            store_errors=self.store_errors,
            held=self.held,
            lost=stats.lost + self._dropped,
            error=stats.error or self._failing,
        )

    def dead_letters(self, limit: int) -> list[DeadLetter]:
        with self._lock:
            letters = self._outbox.dead_letters(limit)
        self.emit_deferred()
        return letters

    def has_pending(self) -> bool:
        """Whether the file holds ops of this key (raises StoreError)."""
        with self._lock:
            return self._outbox.has_pending()

    def close(self) -> None:
        with self._lock:
            self._outbox.close()

    def emit_deferred(self) -> None:
        """Report what happened under the locks, now that none is held: the callback may
        call track()."""
        while self._deferred:
            try:
                error = self._deferred.popleft()
            except IndexError:  # another thread emitted it
                return
            self._emit(error)
