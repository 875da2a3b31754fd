"""The outbox: one SQLite file, its connections and its queues.

One SQLite file in WAL mode holds a queue of ops per API key (table ``"ops:<fingerprint>"``),
the ops the server refused (``dead_letters``, bounded) and a few counters. Each row of a queue
is the final wire JSON of one op; a client only ever sees and sends its own key's queue. Rows
are claimed for sending with a lease (owner + wall clock expiry) so that no two senders,
threads or processes, send the same rows at once.

Every public method raises :class:`StoreError` (never ``sqlite3.Error``) on failure.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from typing import Any, Callable, Optional, TypeVar

from .._options import MAX_LEASE
from .._wire import IDENTIFY, TRACK, utc_now_ms
from ._errors import is_busy, is_corrupt, is_sticky
from ._paths import access_note, check_ours, prepare_path, sidecars, sync_directory
from ._records import (
    Claim,
    DeadLetter,
    KeyReport,
    Row,
    Stats,
    StoreError,
    dead_letter_filters,
    int_or_zero,
    sound,
    text_of,
)
from ._schema import (
    APPLICATION_ID,
    CREATE_QUEUE,
    MIN_READER_VERSION,
    QUEUE_PREFIX,
    SCHEMA,
    SCHEMA_VERSION,
    queue_table,
)

log = logging.getLogger("whisperr_durable")

# No commit checkpoints in the normal run of things: the sender does, after its commits and
# when callers ask it to, outside any transaction. This bound only stops the WAL growing
# without end if the sender cannot.
_AUTOCHECKPOINT_PAGES = 10_000
# A checkpoint completes (and the WAL starts again) once the WAL holds this many pages, and
# the WAL file keeps the size that takes: cutting it back would be paid by the next commit.
_RESTART_WAL_FRAMES = 4_000
_WAL_SIZE_LIMIT = 64 * 1024 * 1024
# The most rows one append evicts; a bulk append of more rows evicts as many as it added.
_EVICT_PER_CALL = 1_000
# A busy file is tried again after this, then after twice as long each time up to the
# last: another connection's write usually ends within a millisecond, and the caller
# should not sleep long past its end.
_FIRST_BUSY_WAIT = 0.00002
_LAST_BUSY_WAIT = 0.0005
# How long an append trusts the oldest id it last saw as a lower bound of the queue's.
_TRUST_OLDEST = 1.0

# Connections left behind by fork, or to a file since moved aside. Closing one could
# checkpoint into or delete a WAL that is not its own, and garbage collection would close
# it: keep them referenced, never use them.
_ABANDONED: list[sqlite3.Connection] = []

T = TypeVar("T")

_MAX_LEASE_MS = int(MAX_LEASE * 1000)
_EXPIRED = "expired: older than the server's 30-day window"
_DAMAGED = "damaged: the stored row is not the wire JSON of an op"


# Files whose -shm was replaced under this process, and what to say about them: this
# process never uses them again (see Outbox._shm_replaced).
_UNSAFE: dict[str, str] = {}
# Per file, how many times a connection of this process hit an error connections keep
# (opened while the file was read-only, say). SQLite shares one mapping of the -shm among
# all connections of a process to a file, and a mapping made read-only would follow a fresh
# connection: so every connection of the process to that file starts afresh.
_GENERATION: dict[str, int] = {}
# Forks survived by this process: a connection opened before the last one is the parent's.
_FORKS = 0
# How often an append checks that the path still names the file it has open.
_LOOK_EVERY = 0.1
_CLOSE_WAIT = 0.1


def _close_others(path: str) -> None:
    """Close now the other connections of this process to ``path``: while one of them holds
    the -shm mapping, a fresh connection would share it. One in use for longer than a short
    wait (a write waiting out a busy file) closes at its next use instead."""
    for outbox in list(_live_outboxes):
        if outbox.path != path or outbox._pid != os.getpid():
            continue
        if outbox._guard.acquire(timeout=_CLOSE_WAIT):
            try:
                outbox.close()
            finally:
                outbox._guard.release()


# Ops left in an outbox file that was replaced or moved under this process, counted once
# per (path, key, file) however many connections of this process notice it.
_LOST: dict[tuple[str, str], int] = {}
_STRANDED_SEEN: dict[tuple[str, str, int], int] = {}
_LOST_LOCK = threading.Lock()


class _HeadMoved(Exception):
    """The head of the queue changed between a claim's read and its lease."""


class _Plan:
    """Which of the rows at the head of a queue one claim takes: the leading run of tracks
    (or one identify alone) not under another owner's live lease, within ``max_bytes``;
    and the rows to move to the dead letters on the way (expired, damaged)."""

    def __init__(
        self, owner: str, max_bytes: int, max_age_ms: int, now_ms: int, take_over: bool
    ) -> None:
        self.owner = owner
        self.max_bytes = max_bytes
        self.max_age_ms = max_age_ms
        self.now_ms = now_ms
        self.take_over = take_over

    def run(self, head: list[Any]) -> tuple[list[Row], list[int], list[int]]:
        owner, now_ms, take_over = self.owner, self.now_ms, self.take_over
        # A lease further ahead than any sender gives means the clock went back.
        horizon = now_ms + _MAX_LEASE_MS
        oldest_allowed = now_ms - self.max_age_ms
        room = self.max_bytes
        batch: list[Row] = []
        expired: list[int] = []
        damaged: list[int] = []
        for op_id, kind, body, created_ms, attempts, lease_owner, lease_until in head:
            if (
                lease_owner is not None
                and lease_owner != owner
                and not take_over
                and now_ms < (lease_until if type(lease_until) is int else 0) <= horizon
            ):
                break  # under another owner's live lease
            if (
                kind == TRACK
                and type(body) is bytes
                and type(created_ms) is int
                and type(attempts) is int
                and body.isascii()
                and body.startswith(b"{")
                and body.endswith(b"}")
            ):
                if created_ms < oldest_allowed:
                    expired.append(op_id)
                    continue
                room -= len(body) + 2
                if batch and room < 0:
                    break
                batch.append(Row(op_id, kind, body, created_ms, attempts))
                continue
            if not sound(kind, body, created_ms, attempts):
                damaged.append(op_id)
                continue
            # An identify goes alone.
            if not batch:
                batch.append(Row(op_id, kind, body, created_ms, attempts))
            break
        return batch, expired, damaged


class Outbox:
    """One connection to the outbox file, for one thread at a time (callers lock around it).

    The connection is opened on first use, and opened afresh in a forked child, after any
    error that is not a busy file (SQLite connections remember "readonly" and the like), and
    when the file or its ``-shm`` was replaced under it.
    """

    def __init__(
        self,
        path: str,
        key_fp: str,
        *,
        fsync: bool = False,
        store_timeout: float = 5.0,
        max_dead_letters: int = 1000,
        report: Optional[Callable[[str, str], None]] = None,
        inspect_only: bool = False,
    ) -> None:
        """``report(type, message)``: told of incidents that no call returns (a file moved
        aside, ops lost with a replaced file), with an ``on_error`` type.
        ``inspect_only``: for looking at a file from outside: never create one, never
        make an outbox of a file that is not one, never move a corrupt one aside."""
        self.path = path
        self.key_fp = key_fp
        self._table = queue_table(key_fp)
        self._insert = f"INSERT INTO {self._table} (kind, body, created_ms) VALUES (?, ?, ?)"
        # The body as bytes: a row that is not valid UTF-8 must not fail the whole read.
        self._head_sql = (
            "SELECT id, kind, CAST(body AS BLOB), created_ms, attempts, lease_owner, "
            f"lease_until_ms FROM {self._table} ORDER BY id LIMIT ?"
        )
        self._fsync = fsync
        self._store_timeout = store_timeout
        self._max_dead_letters = max_dead_letters
        self._report = report
        self._inspect_only = inspect_only
        self._version = 0
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = 0
        self._forks = 0
        self._inode = 0
        self._shm_inode = 0
        self._generation = 0
        self._look_after = 0.0  # when an append next checks the file is still the path's
        # A lower bound on the oldest id of the queue, for as long as it is trusted: an
        # append whose id is within max_queue_size of it cannot need to evict.
        self._oldest_seen = 0
        self._oldest_until = 0.0
        self._last_id = 0  # of this connection's last append
        # Eviction's memory of rows it had to leave (leased when it ran): the lease on the
        # oldest row then (id, owner, expiry) and how far it evicted, so that a full queue
        # does not rescan them on every append. An id can come back (a queue that empties
        # starts again at 1), with the same owner: the expiry tells one lease from another.
        self._evict_hint: tuple[tuple[int, Optional[str], Any], int] = ((0, None, 0), 0)
        # Held around every use of the connection, so that a fork can wait for it to be idle.
        self._guard = threading.RLock()
        _live_outboxes.add(self)

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    @property
    def lost(self) -> int:
        """Ops of this key known lost with a file replaced or moved under this process."""
        return _LOST.get((self.path, self.key_fp), 0)

    # ---- connection ----

    def _connection(self, *, same_file: bool = False, look: bool = True) -> sqlite3.Connection:
        """The open connection, (re)opened if needed.

        ``same_file``: the caller names rows by the ids of an earlier claim, which mean
        nothing in another file: if the file was replaced since, raise instead of reopening.
        ``look=False`` (an append): check that the path still names our file (two stat
        calls) at most every ``_LOOK_EVERY`` seconds, or at once when another connection of
        the process found it replaced. What is appended to a replaced file meanwhile is
        counted as lost once seen.
        """
        conn = self._conn
        if conn is not None:
            if self._forks != _FORKS:
                # Inherited through fork: never use it, and never close it (closing could
                # checkpoint into, or delete, the WAL that belongs to the parent).
                _ABANDONED.append(conn)
                self._conn = None
            else:
                current = self._generation == _GENERATION.get(self.path, 0)
                if current and not look:
                    now = time.monotonic()
                    if now < self._look_after:
                        return conn
                    self._look_after = now + _LOOK_EVERY
                replaced = self._replaced()
                if replaced is None:
                    if current:
                        return conn
                    self._close_connection(conn)  # another connection's error: afresh too
                    self._conn = None
                    return self._connection(same_file=same_file)
                with _LOST_LOCK:  # the other connections of the process look at once
                    _GENERATION[self.path] = _GENERATION.get(self.path, 0) + 1
                self._conn = None
                # Never used again, and never closed: closing could checkpoint into, or
                # delete, the WAL of the file now at the path.
                _ABANDONED.append(conn)
                if replaced == "file":
                    # Moved aside or replaced: this connection still sees the old file. Count
                    # what it leaves there.
                    self._count_stranded(
                        self._stranded(conn), "was moved or replaced under this process"
                    )
                else:
                    self._shm_replaced()
        unsafe = _UNSAFE.get(self.path)
        if unsafe is not None:
            raise StoreError(unsafe)
        if same_file and self._inode and not self._same_file():
            raise StoreError(f"{self.path} was replaced; rows claimed from the old file are gone")
        try:
            conn = self._open()
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc) or self._inspect_only:
                raise
            self._move_aside(str(exc))
            conn = self._open()
        self._conn, self._pid, self._forks = conn, os.getpid(), _FORKS
        self._look_after = time.monotonic() + _LOOK_EVERY
        self._oldest_until = 0.0
        return conn

    def _replaced(self) -> Optional[str]:
        """``"file"`` if the path no longer names the file we opened, ``"shm"`` if its
        ``-shm`` (the WAL's index, which SQLite maps in memory) is not the one we mapped."""
        if not self._same_file():
            return "file"
        if self._shm_inode and self._inode_of(self.path + "-shm") != self._shm_inode:
            return "shm"
        return None

    def _shm_replaced(self) -> None:
        # Another process that opened the file after its -shm was deleted built a new index
        # of the WAL, while this process still maps the old one: each would write frames at
        # the same places of the WAL, overwriting what the other committed, and this process
        # cannot map the new index while any of its connections holds the old one (closing
        # the last one could even checkpoint from the stale index and delete the WAL). So it
        # stops using the file: its ops are held in memory and delivered from there.
        message = (
            f"the -shm file of {self.path} was deleted or replaced while this process used "
            "it: ops that other processes wrote since may be lost, and this process no "
            "longer writes to the file (restart it to use the file again)"
        )
        with _LOST_LOCK:
            first = self.path not in _UNSAFE
            _UNSAFE[self.path] = message
        if first:
            log.warning("whisperr_durable: %s", message)
            if self._report is not None:
                self._report("store_error", message)

    def _stranded(self, conn: sqlite3.Connection) -> Optional[int]:
        """How many of this key's ops the file ``conn`` sees holds (None: unreadable)."""
        try:
            ((count,),) = conn.execute(f"SELECT count(*) FROM {self._table}").fetchall()
        except sqlite3.Error:
            return None
        return int(count)

    def _count_stranded(self, count: Optional[int], how: str) -> None:
        """Count, once per process and file, ops of this key left in a file that is no
        longer at the path: no sender will ever see them."""
        seen = (self.path, self.key_fp, self._inode)
        with _LOST_LOCK:
            # Counted once for all connections of the process, and again only for what a
            # later look finds added (an append that had not looked yet).
            before = _STRANDED_SEEN.get(seen)
            if count is None:
                if before is not None:
                    return
                _STRANDED_SEEN[seen] = 0
            else:
                if count <= (before or 0):
                    return
                _STRANDED_SEEN[seen] = count
                count -= before or 0
                key = (self.path, self.key_fp)
                _LOST[key] = _LOST.get(key, 0) + count
        what = "an unknown number of ops" if count is None else f"{count} op(s)"
        message = f"{self.path} {how}: {what} of this key queued in it will not be delivered"
        log.warning("whisperr_durable: %s", message)
        if self._report is not None:
            self._report("dropped", message)

    def _open(self) -> sqlite3.Connection:
        if sqlite3.sqlite_version_info < (3, 24, 0):  # UPSERT, used by the schema
            raise StoreError(f"SQLite {sqlite3.sqlite_version} is too old: 3.24 or newer needed")
        created = False
        if self._inspect_only:
            if not os.path.isfile(self.path):
                raise FileNotFoundError(f"no outbox at {self.path}")
        else:
            created = prepare_path(self.path)
        # timeout=0: SQLite's own busy handler sleeps up to 100 ms a step; ours retries sooner.
        self._generation = _GENERATION.get(self.path, 0)
        conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        self._inode = self._inode_of(self.path)
        try:
            version = self._retry_busy(lambda: self._check_identity(conn))
            if self._inspect_only:
                # Looked at, not managed: an older file keeps its version for older SDKs.
                self._version = version
                self._shm_inode = self._inode_of(self.path + "-shm")
                return conn
            writable = os.access(self.path, os.W_OK)
            for name in sidecars(self.path):  # made by SQLite on that first read, if missing
                check_ours(name, writable=writable)
            self._retry_busy(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone())
            conn.execute(f"PRAGMA synchronous={'FULL' if self._fsync else 'NORMAL'}")
            conn.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
            # A WAL file that grew during a burst is cut back to this after a checkpoint.
            conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
            self._version = self._create(conn, version)
            self._retry_busy(lambda: conn.execute(CREATE_QUEUE.format(table=self._table)))
            if created:
                # The schema reaches the disk now, not at some later checkpoint: a power cut
                # must not leave a file that no longer reads as an outbox.
                self._retry_busy(lambda: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())
                sync_directory(self.path)
            self._shm_inode = self._inode_of(self.path + "-shm")
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_identity(self, conn: sqlite3.Connection) -> int:
        """The file's schema version, once it is known to be an outbox this SDK can read.

        Read in one transaction: another process may be making the outbox at this moment,
        and the marker, the version and the tables must come from one snapshot of it.
        """
        conn.execute("BEGIN")
        try:
            ((version,),) = conn.execute("PRAGMA user_version").fetchall()
            self._check_is_outbox(conn, version)  # first: another program's, whatever its version
            version = self._check_version(conn)
        finally:
            conn.execute("COMMIT")
        return version

    def _check_is_outbox(self, conn: sqlite3.Connection, version: int) -> None:
        """Refuse a database that is not an outbox: it belongs to another program."""
        ((app_id,),) = conn.execute("PRAGMA application_id").fetchall()
        if app_id == APPLICATION_ID:
            return
        if app_id == 0 and version == 0 and not self._inspect_only:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not rows.fetchall():
                return  # empty: a new outbox
        raise StoreError(
            f"{self.path} is not a whisperr_durable outbox (another program's database?); "
            "it is left untouched"
        )

    def _move_aside(self, why: str, stranded: Optional[int] = 0) -> None:
        """Rename a corrupt outbox (and its WAL) out of the way, once, whoever sees it first.

        ``stranded``: how many ops of this key it held, as the connection that found it
        corrupt could count them (None: unknown), counted as lost once it is moved.
        """
        import filelock

        message = None
        with filelock.FileLock(f"{self.path}.repair.lock", timeout=self._store_timeout, mode=0o600):
            if self._inode and self._inode_of(self.path) != self._inode:
                aside = "another name, by another process"
            elif self._checks_out():
                # One bad read is not a bad file: never move a file others are using well.
                log.warning("whisperr_durable: SQLite said %r, but %s checks out", why, self.path)
                return
            else:
                aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
                os.rename(self.path, aside)
                with suppress(FileNotFoundError):
                    os.rename(self.path + "-wal", aside + "-wal")
                with suppress(FileNotFoundError):
                    os.unlink(self.path + "-shm")  # an index of the WAL, rebuilt on open
                message = f"{self.path} was not a usable outbox ({why}); moved aside to {aside}"
        if message is not None:
            log.warning("whisperr_durable: %s", message)
            if self._report is not None:
                self._report("store_error", message)
        self._count_stranded(stranded, f"was found corrupt and moved aside to {aside}")

    def _checks_out(self) -> bool:
        """Whether a fresh connection finds the file sound (a cost paid only on suspicion)."""
        try:
            with closing(sqlite3.connect(self.path, timeout=self._store_timeout)) as conn:
                return bool(conn.execute("PRAGMA quick_check(1)").fetchone()[0] == "ok")
        except sqlite3.Error:
            return False

    @staticmethod
    def _inode_of(name: str) -> int:
        try:
            return os.stat(name).st_ino
        except FileNotFoundError:
            return 0

    def _same_file(self) -> bool:
        return self._inode_of(self.path) == self._inode

    def _check_version(self, conn: sqlite3.Connection) -> int:
        """The file's schema version, if this SDK can use the file: its own, no schema yet
        (0), or a later one whose oldest reader this SDK is."""
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            min_reader = version  # unless the file says older SDKs can use it
            has_meta = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            if has_meta:
                row = conn.execute(
                    "SELECT value FROM meta WHERE name = 'min_reader_version'"
                ).fetchone()
                if row and isinstance(row[0], int):
                    min_reader = row[0]
            if min_reader > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has outbox schema version {version}, which SDKs of schema "
                    f"{min_reader} or later can use; this version of whisperr_durable has "
                    f"schema {SCHEMA_VERSION}"
                )
        elif 0 < version < SCHEMA_VERSION:  # none was ever released: not made by us
            raise StoreError(f"{self.path} has outbox schema version {version}, never released")
        return version

    def _create(self, conn: sqlite3.Connection, version: int) -> int:
        """Make the schema in a new file; the file's schema version."""
        if version:
            return version
        # Under the write lock: of several processes opening a new file at once, the first
        # makes the schema and the others find it made.
        self._retry_busy(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            version = self._check_version(conn)
            self._check_is_outbox(conn, version)
            if not version:
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO meta (name, value) VALUES ('min_reader_version', ?)",
                    (MIN_READER_VERSION,),
                )
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                version = SCHEMA_VERSION
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return version

    def _retry_busy(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying on SQLITE_BUSY with short sleeps until ``store_timeout``."""
        deadline = time.monotonic() + self._store_timeout
        delay = _FIRST_BUSY_WAIT
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, _LAST_BUSY_WAIT)

    @contextmanager
    def _write(self, *, same_file: bool = False) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on error."""
        with self._guard:
            try:
                conn = self._connection(same_file=same_file)
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    if not is_busy(exc):
                        raise
                    self._retry_busy(lambda: conn.execute("BEGIN IMMEDIATE"))
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as exc:
                raise self._store_error(exc) from exc

    def _write_one(self, sql: str, params: tuple[Any, ...]) -> int:
        """One statement on rows of an earlier claim, committed on its own (it holds the
        write lock for no longer than it runs); how many rows it changed."""
        with self._guard, self._sqlite_errors():
            conn = self._connection(same_file=True)
            return int(self._retry_busy(lambda: conn.execute(sql, params).rowcount))

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._guard, self._sqlite_errors():
            conn = self._connection()
            return self._retry_busy(lambda: conn.execute(sql, params).fetchall())

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        """sqlite3 and OS errors leave this module as :class:`StoreError`."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise self._store_error(exc) from exc

    def _store_error(self, exc: BaseException) -> StoreError:
        conn = self._conn
        if is_corrupt(exc) and conn is not None and not self._inspect_only:
            # Found corrupt in use: set it aside so that the next call starts afresh. The
            # connection is closed first: once the file is renamed, closing it could delete
            # the WAL of a new file by its name.
            stranded = self._stranded(conn)
            self.close()
            try:
                self._move_aside(str(exc), stranded)
            except OSError as move_error:  # filelock.Timeout is an OSError too
                log.warning("whisperr_durable: could not move %s aside: %s", self.path, move_error)
        elif is_sticky(exc):
            # A connection remembers some failures ("attempt to write a readonly database"
            # lasts as long as it does): the next attempt starts on a fresh one, and so do
            # the other connections of this process to the file.
            self.close()
            with _LOST_LOCK:
                _GENERATION[self.path] = _GENERATION.get(self.path, 0) + 1
            _close_others(self.path)
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (sqlite3.OperationalError, PermissionError)) and not is_busy(exc):
            text += f" ({access_note(self.path)})"
        return StoreError(text)

    def open(self) -> None:
        """Open (and create) the file now rather than on first use."""
        self._read("SELECT 1")

    def close(self) -> None:
        with self._guard:
            conn, self._conn = self._conn, None
            if conn is not None and self._pid == os.getpid():
                self._close_connection(conn)

    def _close_connection(self, conn: sqlite3.Connection) -> None:
        try:
            conn.close()
        except sqlite3.Error:
            log.debug("closing the outbox failed", exc_info=True)

    # ---- the write path ----

    def append(self, kind: int, body: str, created_ms: int, max_queue_size: int) -> tuple[int, int]:
        """Store one op; evict the oldest beyond ``max_queue_size``.

        Returns ``(id, evicted)``.
        """
        # Where the op surely stays within the bound, one autocommit statement (the op is
        # as durable as the WAL when it returns); otherwise one transaction that also
        # evicts, so that a kill leaves the queue within its bound.
        with self._guard:
            if not self._within_bound(self._last_id + 1, max_queue_size):
                with self._write() as conn:
                    op_id = conn.execute(self._insert, (kind, body, created_ms)).lastrowid or 0
                    self._last_id = op_id
                    return op_id, self._bound(conn, op_id, max_queue_size, 1)
            try:
                conn = self._connection(look=False)
                params = (kind, body, created_ms)
                try:
                    row_id = conn.execute(self._insert, params).lastrowid
                except sqlite3.OperationalError as exc:
                    if not is_busy(exc):
                        raise
                    row_id = self._retry_busy(lambda: conn.execute(self._insert, params).lastrowid)
            except (sqlite3.Error, OSError) as exc:
                raise self._store_error(exc) from exc
            op_id = self._last_id = row_id or 0
            if op_id <= self._oldest_seen:
                self._oldest_until = 0.0  # the queue emptied and its ids started again
            if self._within_bound(op_id, max_queue_size):
                return op_id, 0
            # Other processes appended meanwhile: evict now, in a transaction of its own.
            with self._write() as conn:
                return op_id, self._bound(conn, op_id, max_queue_size, 1)

    def _within_bound(self, op_id: int, max_queue_size: int) -> bool:
        """Whether an op of id ``op_id`` surely leaves nothing to evict."""
        if op_id <= max_queue_size:
            return True  # fewer ids than the bound so far
        oldest = self._oldest_seen
        # An id at or below the oldest seen: the queue emptied and its ids started again.
        return oldest < op_id < oldest + max_queue_size and time.monotonic() < self._oldest_until

    def append_many(self, ops: Sequence[tuple[int, str, int]], max_queue_size: int) -> int:
        """Store ``(kind, body, created_ms)`` ops in one transaction; returns the evicted count."""
        with self._write() as conn:
            conn.executemany(
                f"INSERT INTO {self._table} (kind, body, created_ms) VALUES (?, ?, ?)", ops
            )
            ((newest,),) = conn.execute(f"SELECT max(id) FROM {self._table}").fetchall()
            return self._bound(conn, newest or 0, max_queue_size, len(ops))

    def _bound(self, conn: sqlite3.Connection, newest: int, max_queue_size: int, added: int) -> int:
        # The newest max_queue_size ops have ids above newest - max_queue_size; anything at or
        # below is older than the bound keeps. A full queue also makes room for the next 1%
        # of max_queue_size at once, so that calls at a full queue cost about what calls at
        # an empty one do. A queue far over this client's bound (left by a client with a
        # larger one) shrinks over several calls, so that no one call holds the caller long.
        if newest <= self._oldest_seen:
            self._oldest_until = 0.0  # the queue emptied and its ids started again
        cutoff = newest - max_queue_size
        if cutoff <= 0:
            return 0
        head = conn.execute(
            f"SELECT id, lease_owner, lease_until_ms FROM {self._table} ORDER BY id LIMIT 1"
        ).fetchall()
        if not head or head[0][0] > cutoff:
            self._see_oldest(head[0][0] if head else None, newest)
            return 0
        oldest, owner, until = head[0]
        lease = (oldest, owner, until)
        hint_lease, hint_through = self._evict_hint
        if owner is not None and lease == hint_lease and cutoff <= hint_through:
            return 0  # what is left at or below the bound is what a sender is delivering
        top = min(cutoff + max_queue_size // 100, oldest + max(added, _EVICT_PER_CALL) - 1)
        # Rows under a live lease are on their way to the server: evicting them would count
        # as lost ops that are delivered. They go only if their sender gives them back.
        now_ms = utc_now_ms()
        evicted = conn.execute(
            f"DELETE FROM {self._table} WHERE id <= ? AND NOT (lease_owner IS NOT NULL "
            "AND lease_until_ms > ? AND lease_until_ms <= ?)",
            (top, now_ms, now_ms + _MAX_LEASE_MS),
        ).rowcount
        self._evict_hint = (lease, top)
        if evicted:
            self._bump(conn, "evicted", evicted)
            (oldest,) = conn.execute(f"SELECT min(id) FROM {self._table}").fetchone()
            self._see_oldest(oldest, newest)
        return evicted

    def _see_oldest(self, head: Optional[int], newest: int) -> None:
        if head is not None and head <= newest:
            # Rows leave a queue only at or after its head and new ones come after its
            # newest, so the head stays a lower bound: until the queue empties and its ids
            # start again (an append then gets an id at or below it), or another process
            # fills it again meanwhile (hence the time limit).
            self._oldest_seen = head
            self._oldest_until = time.monotonic() + _TRUST_OLDEST

    def _bump(self, conn: sqlite3.Connection, name: str, by: int) -> None:
        conn.execute(
            "INSERT INTO counters (key_fp, name, n) VALUES (?, ?, ?) "
            "ON CONFLICT (key_fp, name) DO UPDATE SET n = n + excluded.n",
            (self.key_fp, name, by),
        )

    # ---- the send path ----

    def claim(
        self,
        owner: str,
        *,
        max_rows: int,
        max_bytes: int,
        lease_ms: int,
        max_age_ms: int,
        now_ms: int,
        take_over: bool = False,
    ) -> Claim:
        """Lease the next batch from the head of this key's queue.

        The batch is one identify alone, or the leading run of tracks (at most ``max_rows``,
        at most ``max_bytes`` of JSON). Nothing is claimed while the head is leased by another
        owner whose lease is still running, unless ``take_over``: the caller holds the sender
        lock that owner needed, so that owner is gone. Tracks older than ``max_age_ms`` are
        moved to the dead letters on the way, since the server would refuse them.
        """
        plan = _Plan(owner, max_bytes, max_age_ms, now_ms, take_over)
        with self._guard:
            # Read outside any write transaction (appends go on meanwhile), then lease the
            # batch in a short one, if the head is still as read; anything to move to the
            # dead letters, or a head that moved, takes one transaction for the whole claim.
            head = self._read(self._head_sql, (max_rows,))
            batch, expired, damaged = plan.run(head)
            if not expired and not damaged and (not batch or self._lease(batch, plan, lease_ms)):
                return Claim(batch)
            with self._write() as conn:
                head = conn.execute(self._head_sql, (max_rows,)).fetchall()
                batch, expired, damaged = plan.run(head)
                pruned = 0
                for ids, reason in ((expired, _EXPIRED), (damaged, _DAMAGED)):
                    for op_id in ids:
                        pruned += self._move_to_dead_letters(
                            conn, op_id, op_id, None, None, reason, now_ms
                        )[1]
                if batch:
                    conn.execute(
                        f"UPDATE {self._table} SET lease_owner = ?, lease_until_ms = ? "
                        "WHERE id BETWEEN ? AND ?",
                        (owner, now_ms + lease_ms, batch[0].id, batch[-1].id),
                    )
            return Claim(batch, len(expired), len(damaged), pruned)

    def _lease(self, batch: list[Row], plan: _Plan, lease_ms: int) -> bool:
        """Lease ``batch``, read before, in one short transaction; ``False`` if the head is
        not as read any more (rows evicted, leased by another sender, or gone and made
        again with the same ids: a row's id comes back only once every row after it is
        gone, so the last one of the run tells)."""
        first, last = batch[0].id, batch[-1].id
        args: tuple[Any, ...] = ()
        free = ""
        if not plan.take_over:
            # The rows the plan may take: not under another owner's live lease.
            free = (
                " AND NOT (lease_owner IS NOT NULL AND lease_owner != ? AND lease_until_ms > ? "
                "AND lease_until_ms <= ?)"
            )
            args = (plan.owner, plan.now_ms, plan.now_ms + _MAX_LEASE_MS)
        try:
            with self._write() as conn:
                leased = conn.execute(
                    f"UPDATE {self._table} SET lease_owner = ?, lease_until_ms = ? "
                    f"WHERE id BETWEEN ? AND ?{free}",
                    (plan.owner, plan.now_ms + lease_ms, first, last, *args),
                ).rowcount
                (same,) = conn.execute(
                    f"SELECT CAST(body AS BLOB) = ? FROM {self._table} WHERE id = ?",
                    (batch[-1].body, last),
                ).fetchone() or (0,)
                if leased != len(batch) or not same:
                    raise _HeadMoved
        except _HeadMoved:
            return False
        return True

    def ack(self, first_id: int, last_id: int, owner: str) -> int:
        """Delete a delivered run of rows that ``owner`` still holds (rows evicted since, or
        taken over by another sender, are not touched)."""
        return self._write_one(
            f"DELETE FROM {self._table} WHERE id BETWEEN ? AND ? AND lease_owner = ?",
            (first_id, last_id, owner),
        )

    def renew(self, first_id: int, last_id: int, owner: str, until_ms: int) -> int:
        """Extend our lease on a run of rows; returns how many rows we still hold."""
        return self._write_one(
            f"UPDATE {self._table} SET lease_until_ms = ? "
            "WHERE id BETWEEN ? AND ? AND lease_owner = ?",
            (until_ms, first_id, last_id, owner),
        )

    def release(self, first_id: int, last_id: int, owner: str, *, failed: bool) -> None:
        """Give back a leased run, counting one more failed attempt if ``failed``."""
        self._write_one(
            f"UPDATE {self._table} SET lease_owner = NULL, lease_until_ms = 0, "
            "attempts = attempts + ? WHERE id BETWEEN ? AND ? AND lease_owner = ?",
            (int(failed), first_id, last_id, owner),
        )

    def dead_letter(
        self,
        first_id: int,
        last_id: int,
        owner: str,
        status: Optional[int],
        reason: str,
        now_ms: int,
    ) -> tuple[int, int]:
        """Move a run of rows the server refused, that ``owner`` holds, to the (bounded)
        dead-letter table. Returns ``(moved, pruned)``: how many rows moved, and how many of
        the oldest dead letters the bound removed to make room."""
        with self._write(same_file=True) as conn:
            return self._move_to_dead_letters(
                conn, first_id, last_id, owner, status, reason, now_ms
            )

    def _move_to_dead_letters(
        self,
        conn: sqlite3.Connection,
        first_id: int,
        last_id: int,
        owner: Optional[str],
        status: Optional[int],
        reason: str,
        now_ms: int,
    ) -> tuple[int, int]:
        held = owner is not None
        where = "WHERE id BETWEEN ? AND ?" + (" AND lease_owner = ?" if held else "")
        rows = (first_id, last_id, owner) if held else (first_id, last_id)
        conn.execute(
            "INSERT INTO dead_letters "
            "(key_fp, op_id, kind, body, created_ms, failed_ms, attempts, status, reason) "
            f"SELECT ?, id, kind, body, created_ms, ?, attempts + 1, ?, ? FROM {self._table} "
            f"{where} ORDER BY id",
            (self.key_fp, now_ms, status, reason, *rows),
        )
        moved = conn.execute(f"DELETE FROM {self._table} {where}", rows).rowcount
        if not moved:
            return 0, 0
        self._bump(conn, "refused", moved)
        # Keep this key's newest max_dead_letters; what goes is counted, never silent.
        pruned = conn.execute(
            "DELETE FROM dead_letters WHERE key_fp = ? AND id <= (SELECT id FROM dead_letters "
            "WHERE key_fp = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (self.key_fp, self.key_fp, self._max_dead_letters),
        ).rowcount
        if pruned:
            self._bump(conn, "pruned", pruned)
        return moved, pruned

    # ---- reading ----

    def last_id(self) -> int:
        """The id of this key's newest queued op (0 if none): a barrier for flush()."""
        ((last,),) = self._read(f"SELECT max(id) FROM {self._table}")
        return int(last or 0)

    def pending_through(self, last_id: int, *, exact: bool = True) -> int:
        """How many of this key's ops with ids up to ``last_id`` are still queued
        (``exact=False``: 0 or 1, whether there is any, at no cost on a large backlog)."""
        if exact:
            sql = f"SELECT count(*) FROM {self._table} WHERE id <= ?"
        else:
            sql = f"SELECT EXISTS (SELECT 1 FROM {self._table} WHERE id <= ?)"
        ((count,),) = self._read(sql, (last_id,))
        return int(count)

    def schema_version(self) -> int:
        ((version,),) = self._read("PRAGMA user_version")
        return int(version)

    def has_pending(self) -> bool:
        """Whether this key has any op queued (one look at the head of the index)."""
        ((any_row,),) = self._read(f"SELECT EXISTS (SELECT 1 FROM {self._table})")
        return bool(any_row)

    def head(self) -> Optional[tuple[int, Optional[str], int]]:
        """``(id, lease_owner, lease_until_ms)`` of this key's oldest queued op."""
        rows = self._read(
            f"SELECT id, lease_owner, lease_until_ms FROM {self._table} ORDER BY id LIMIT 1"
        )
        return (rows[0][0], rows[0][1], int(rows[0][2] or 0)) if rows else None

    def counters(self) -> dict[str, int]:
        """This key's running totals: ``evicted``, ``refused`` (moved to the dead letters)
        and ``pruned`` (dead letters removed by ``max_dead_letters``)."""
        rows = self._read("SELECT name, n FROM counters WHERE key_fp = ?", (self.key_fp,))
        return {str(name): int(n) for name, n in rows}

    def stats(self) -> Stats:
        kinds = dict(self._read(f"SELECT kind, count(*) FROM {self._table} GROUP BY kind"))
        ((oldest,),) = self._read(f"SELECT min(created_ms) FROM {self._table}")
        ((dead,),) = self._read(
            "SELECT count(*) FROM dead_letters WHERE key_fp = ?", (self.key_fp,)
        )
        counters = self.counters()
        return Stats(
            pending_tracks=int(kinds.get(TRACK, 0)),
            pending_identifies=int(kinds.get(IDENTIFY, 0)),
            oldest_created_ms=oldest,
            dead_letters=int(dead),
            evicted=counters.get("evicted", 0),
            schema_version=self.schema_version(),
            refused=counters.get("refused", 0),
            dead_letters_pruned=counters.get("pruned", 0),
            lost=self.lost,
        )

    def sync_wal(self) -> None:
        """fsync the WAL: with ``synchronous=NORMAL`` a commit reaches the disk only when a
        checkpoint syncs it, so this bounds what a power cut can take. (SQLite holds no lock
        on the ``-wal`` file, so opening and closing a descriptor of it is harmless.)"""
        with self._sqlite_errors():
            try:
                fd = os.open(self.path + "-wal", os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                return
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return self.all_dead_letters(limit, self.key_fp)

    def record_sender(
        self, pid: int, attempt_ms: int, success_ms: Optional[int], error: Optional[str]
    ) -> None:
        """Note what this key's delivery cycle came to, for operators."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO sender_state (key_fp, pid, last_attempt_ms, last_success_ms, "
                "last_error, last_error_ms) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (key_fp) DO UPDATE SET pid = excluded.pid, "
                "last_attempt_ms = excluded.last_attempt_ms, "
                "last_success_ms = coalesce(excluded.last_success_ms, last_success_ms), "
                "last_error = coalesce(excluded.last_error, last_error), "
                "last_error_ms = coalesce(excluded.last_error_ms, last_error_ms)",
                (self.key_fp, pid, attempt_ms, success_ms, error, attempt_ms if error else None),
            )

    # ---- the whole file, for operators (``key_fp=None``: every key) ----

    def _queues(self, key_fp: Optional[str]) -> list[tuple[str, str]]:
        """``(key_fp, quoted table name)`` of the queues in the file, or of one key's."""
        names = self._read(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, ?) = ? "
            "ORDER BY name",
            (len(QUEUE_PREFIX), QUEUE_PREFIX),
        )
        fps = [name[len(QUEUE_PREFIX) :] for (name,) in names]
        return [(fp, queue_table(fp)) for fp in fps if key_fp is None or fp == key_fp]

    def key_reports(self, key_fp: Optional[str], now_ms: int) -> list[KeyReport]:
        where, params = ("WHERE key_fp = ?", (key_fp,)) if key_fp else ("", ())
        reports: dict[str, dict[str, Any]] = {}

        def report(fp: str) -> dict[str, Any]:
            return reports.setdefault(fp, {"key_fp": fp})

        for fp, table in self._queues(key_fp):
            for kind, count, oldest in self._read(
                f"SELECT kind, count(*), min(created_ms) FROM {table} GROUP BY kind"
            ):
                r = report(fp)
                r["identifies" if kind == IDENTIFY else "tracks"] = count
                r["oldest_ms"] = min(oldest, r.get("oldest_ms", oldest))
            ((count, owner, until),) = self._read(
                f"SELECT count(*), max(lease_owner), max(lease_until_ms) FROM {table} "
                "WHERE lease_owner IS NOT NULL AND lease_until_ms > ?",
                (now_ms,),
            )
            if count:
                report(fp).update(leased=count, lease_owner=owner, lease_until_ms=until)
        for fp, count in self._read(
            f"SELECT key_fp, count(*) FROM dead_letters {where} GROUP BY key_fp", params
        ):
            report(fp)["dead_letters"] = count
        for fp, count in self._read(
            f"SELECT key_fp, n FROM counters {where} "
            f"{'AND' if where else 'WHERE'} name = 'evicted'",
            params,
        ):
            report(fp)["evicted"] = count
        senders = (
            self._read(
                "SELECT key_fp, pid, last_attempt_ms, last_success_ms, last_error, "
                f"last_error_ms FROM sender_state {where}",
                params,
            )
            if self._version >= 2  # a version 1 file has no record of its senders
            else []
        )
        for fp, *state in senders:
            report(fp)["sender"] = tuple(state)
        return [KeyReport.from_parts(r) for _, r in sorted(reports.items())]

    def queued(self, limit: int, key_fp: Optional[str]) -> list[Any]:
        """``(id, key_fp, kind, body, created_ms, attempts)`` of the next ops: each key's in
        delivery (id) order, the keys' merged by age."""
        queues = [
            [
                (op_id, fp, kind, text_of(body), created_ms, attempts)
                for op_id, kind, body, created_ms, attempts in self._read(
                    f"SELECT id, kind, CAST(body AS BLOB), created_ms, attempts FROM {table} "
                    "ORDER BY id LIMIT ?",
                    (limit,),
                )
            ]
            for fp, table in self._queues(key_fp)
        ]
        return list(itertools.islice(heapq.merge(*queues, key=lambda r: int_or_zero(r[4])), limit))

    def all_dead_letters(self, limit: Optional[int], key_fp: Optional[str]) -> list[DeadLetter]:
        where, params = ("WHERE key_fp = ?", (key_fp,)) if key_fp else ("", ())
        rows = self._read(
            "SELECT id, op_id, kind, CAST(body AS BLOB), created_ms, failed_ms, attempts, "
            f"status, reason, key_fp FROM dead_letters {where} ORDER BY id LIMIT ?",
            (*params, -1 if limit is None else limit),
        )
        return [
            DeadLetter(
                r[0], r[1], "identify" if r[2] == IDENTIFY else "track", text_of(r[3]), *r[4:]
            )
            for r in rows
        ]

    def requeue(self, ids: Optional[Sequence[int]], key_fp: Optional[str]) -> int:
        """Put dead letters back at the end of their key's queue, bodies (and ids) unchanged."""
        with self._write() as conn:
            moved = 0
            for where, params in dead_letter_filters(ids, key_fp):
                if self._version < 3:  # a file of an older SDK, looked at
                    conn.execute(
                        "INSERT INTO ops (key_fp, kind, body, created_ms) SELECT key_fp, kind, "
                        f"body, created_ms FROM dead_letters {where} ORDER BY id",
                        params,
                    )
                    keys = []
                else:
                    keys = conn.execute(
                        f"SELECT DISTINCT key_fp FROM dead_letters {where}", params
                    ).fetchall()
                for (fp,) in keys:
                    table = queue_table(fp)
                    conn.execute(CREATE_QUEUE.format(table=table))
                    conn.execute(
                        f"INSERT INTO {table} (kind, body, created_ms) SELECT kind, body, "
                        f"created_ms FROM dead_letters {where} AND key_fp = ? ORDER BY id",
                        (*params, fp),
                    )
                moved += conn.execute(f"DELETE FROM dead_letters {where}", params).rowcount
            return moved

    def purge(self, ids: Optional[Sequence[int]], key_fp: Optional[str]) -> int:
        """Delete dead letters for good."""
        with self._write() as conn:
            return sum(
                conn.execute(f"DELETE FROM dead_letters {where}", params).rowcount
                for where, params in dead_letter_filters(ids, key_fp)
            )

    def checkpoint(self, *, truncate: bool = False) -> None:
        """Copy the WAL back into the database file, while writers go on.

        Under a steady stream of commits such a checkpoint never catches up, and the WAL
        file only grows until some caller's commit runs the automatic checkpoint (for
        milliseconds). So once the WAL holds ``_RESTART_WAL_FRAMES``, the last few pages are
        copied holding the write lock for a moment (RESTART): the checkpoint completes and
        the next commit starts the WAL again from its beginning. If a writer holds the lock
        just then, that waits for the next call. ``truncate``: do that now, and also empty
        the WAL file.
        """
        ((_, frames, _),) = self._read("PRAGMA wal_checkpoint(PASSIVE)")
        if frames >= _RESTART_WAL_FRAMES or truncate:
            self._read(f"PRAGMA wal_checkpoint({'TRUNCATE' if truncate else 'RESTART'})")


# Fork: SQLite must not have a connection to the file open across fork(), or the child's
# new connection inherits the parent's lock bookkeeping and runs without real locks. Before
# a fork, wait for every outbox to be idle and close its connection; each reopens on use.
_live_outboxes: weakref.WeakSet[Outbox] = weakref.WeakSet()
_held_for_fork: list[Outbox] = []
_FORK_WAIT = 1.0


def _before_fork() -> None:
    # Bounded, for all outboxes together: a fork must never hang on us. One we cannot
    # wait for keeps its connection, which the child only abandons (the pid check).
    deadline = time.monotonic() + _FORK_WAIT
    for outbox in list(_live_outboxes):
        if outbox._guard.acquire(timeout=max(0.0, deadline - time.monotonic())):
            _held_for_fork.append(outbox)
            outbox.close()


def _after_fork_in_parent() -> None:
    while _held_for_fork:
        _held_for_fork.pop()._guard.release()


def _after_fork_in_child() -> None:
    # Every guard afresh: one we could not take is held by a thread the child does not have.
    _held_for_fork.clear()
    # The child's connections are its own, opened afresh, and so are its counts.
    global _LOST_LOCK, _FORKS
    _FORKS += 1
    _LOST_LOCK = threading.Lock()
    _UNSAFE.clear()
    _GENERATION.clear()
    _LOST.clear()
    _STRANDED_SEEN.clear()
    for outbox in list(_live_outboxes):
        outbox._guard = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
