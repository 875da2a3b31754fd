"""The outbox: the only module that speaks SQL.

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
from typing import Any, Callable, NamedTuple, Optional, TypeVar, Union

from ._options import MAX_LEASE
from ._wire import IDENTIFY, TRACK

log = logging.getLogger("whisperr_durable")

_SCHEMA_V1 = (
    """CREATE TABLE ops (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key_fp TEXT NOT NULL,
        kind INTEGER NOT NULL,
        body TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_until_ms INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX ops_by_key ON ops (key_fp, id)",
    # Queue length per key, kept by triggers so that bounding the queue needs no COUNT(*).
    """CREATE TABLE queue_sizes (
        key_fp TEXT PRIMARY KEY,
        n INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TRIGGER ops_count_insert AFTER INSERT ON ops BEGIN
        INSERT INTO queue_sizes (key_fp, n) VALUES (NEW.key_fp, 1)
            ON CONFLICT (key_fp) DO UPDATE SET n = n + 1;
    END""",
    """CREATE TRIGGER ops_count_delete AFTER DELETE ON ops BEGIN
        UPDATE queue_sizes SET n = n - 1 WHERE key_fp = OLD.key_fp;
    END""",
    """CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key_fp TEXT NOT NULL,
        op_id INTEGER NOT NULL,
        kind INTEGER NOT NULL,
        body TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        failed_ms INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        status INTEGER,
        reason TEXT NOT NULL
    )""",
    "CREATE INDEX dead_letters_by_key ON dead_letters (key_fp, id)",
    """CREATE TABLE counters (
        key_fp TEXT NOT NULL,
        name TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (key_fp, name)
    ) WITHOUT ROWID""",
)

# What each key's sender last did, for operators (``whisperr-durable status``).
_SCHEMA_V2 = (
    """CREATE TABLE sender_state (
        key_fp TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        last_attempt_ms INTEGER,
        last_success_ms INTEGER,
        last_error TEXT,
        last_error_ms INTEGER
    ) WITHOUT ROWID""",
)

# One table per key, so that an append writes one page: no index on the key, no trigger
# kept count, no AUTOINCREMENT sequence. A new id is one above the newest queued row, so ids
# grow by one per op and the id window bounds the queue; the id of a deleted newest row can
# come back, so the sender names rows by id and lease owner, never by id alone.
_CREATE_QUEUE = """CREATE TABLE IF NOT EXISTS {table} (
    id INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until_ms INTEGER NOT NULL DEFAULT 0
)"""
_QUEUE_PREFIX = "ops:"


def _queue_table(key_fp: str) -> str:
    """The quoted name of one key's queue table."""
    return '"' + (_QUEUE_PREFIX + key_fp).replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _to_v3(conn: sqlite3.Connection) -> None:
    """From one ``ops`` table for all keys to a table per key, ids renumbered 1..n in order
    (so that the id window of each key starts dense)."""
    for (key_fp,) in conn.execute("SELECT DISTINCT key_fp FROM ops").fetchall():
        table = _queue_table(key_fp)
        conn.execute(_CREATE_QUEUE.format(table=table))
        conn.execute(
            f"INSERT INTO {table} (kind, body, created_ms, attempts, lease_owner, "
            "lease_until_ms) SELECT kind, body, created_ms, attempts, lease_owner, "
            "lease_until_ms FROM ops WHERE key_fp = ? ORDER BY id",
            (key_fp,),
        )
    conn.execute("DROP TABLE ops")  # with its index and triggers
    conn.execute("DROP TABLE queue_sizes")


# _MIGRATIONS[n] takes a file from schema version n to n + 1, in one transaction.
_MIGRATIONS: tuple[Union[tuple[str, ...], Callable[[sqlite3.Connection], None]], ...] = (
    _SCHEMA_V1,
    _SCHEMA_V2,
    _to_v3,
)
SCHEMA_VERSION = len(_MIGRATIONS)

# SQLite's words for a file that is not (or no longer) a usable database.
_CORRUPT = ("file is not a database", "database disk image is malformed")

# No commit checkpoints in the normal run of things: the sender does, after its commits and
# when callers ask it to, outside any transaction. This bound only stops the WAL growing
# without end if the sender cannot.
_AUTOCHECKPOINT_PAGES = 10_000
# A checkpoint completes (and the WAL starts again) once the WAL holds this many pages, and
# the WAL file keeps the size that takes: cutting it back would be paid by the next commit.
_RESTART_WAL_FRAMES = 4_000
_WAL_SIZE_LIMIT = 24 * 1024 * 1024
# The most rows one append evicts; a bulk append of more rows evicts as many as it added.
_EVICT_PER_CALL = 1_000

# Connections left behind by fork, or to a file since moved aside. Closing one could
# checkpoint into or delete a WAL that is not its own, and garbage collection would close
# it: keep them referenced, never use them.
_ABANDONED: list[sqlite3.Connection] = []

T = TypeVar("T")

_MAX_LEASE_MS = int(MAX_LEASE * 1000)
_EXPIRED = "expired: older than the server's 30-day window"


class StoreError(Exception):
    """The outbox file could not be read or written (disk full, read-only, locked, ...)."""


class Row(NamedTuple):
    id: int
    kind: int
    body: str
    created_ms: int
    attempts: int


class Claim(NamedTuple):
    """What one claim took: rows to send now, and expired rows it dead-lettered instead."""

    rows: list[Row]
    expired: int = 0


class DeadLetter(NamedTuple):
    id: int
    op_id: int
    kind: str
    body: str
    created_ms: int
    failed_ms: int
    attempts: int
    status: Optional[int]
    reason: str
    key_fingerprint: str = ""


class KeyReport(NamedTuple):
    """One key's part of an outbox file, as ``key_reports`` reads it."""

    key_fp: str
    pending_tracks: int = 0
    pending_identifies: int = 0
    oldest_created_ms: Optional[int] = None
    leased: int = 0
    lease_owner: Optional[str] = None
    lease_until_ms: Optional[int] = None
    dead_letters: int = 0
    evicted: int = 0
    sender_pid: Optional[int] = None
    last_attempt_ms: Optional[int] = None
    last_success_ms: Optional[int] = None
    last_error: Optional[str] = None
    last_error_ms: Optional[int] = None

    @classmethod
    def from_parts(cls, parts: dict[str, Any]) -> KeyReport:
        sender = parts.get("sender") or (None, None, None, None, None)
        return cls(
            key_fp=parts["key_fp"],
            pending_tracks=parts.get("tracks", 0),
            pending_identifies=parts.get("identifies", 0),
            oldest_created_ms=parts.get("oldest_ms"),
            leased=parts.get("leased", 0),
            lease_owner=parts.get("lease_owner"),
            lease_until_ms=parts.get("lease_until_ms"),
            dead_letters=parts.get("dead_letters", 0),
            evicted=parts.get("evicted", 0),
            sender_pid=sender[0],
            last_attempt_ms=sender[1],
            last_success_ms=sender[2],
            last_error=sender[3],
            last_error_ms=sender[4],
        )


def _dead_letter_filters(
    ids: Optional[Sequence[int]], key_fp: Optional[str]
) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """WHERE clauses that select the given dead letters (in chunks SQLite can take)."""
    key_clause, key_params = (" AND key_fp = ?", (key_fp,)) if key_fp else ("", ())
    if ids is None:
        yield (f"WHERE 1{key_clause}", key_params)
        return
    ids = list(ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        yield (f"WHERE id IN ({marks}){key_clause}", (*chunk, *key_params))


class Stats(NamedTuple):
    """What the outbox holds for one key; ``store_errors`` counts this process's failures."""

    pending_tracks: int
    pending_identifies: int
    oldest_created_ms: Optional[int]
    dead_letters: int
    evicted: int
    schema_version: int
    store_errors: int = 0

    @property
    def pending(self) -> int:
        return self.pending_tracks + self.pending_identifies


def _is_corrupt(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and any(m in str(exc) for m in _CORRUPT)


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc)
    return "database is locked" in text or "database table is locked" in text


def _create_private_file(path: str) -> None:
    # Every directory we create is 0700 (os.makedirs would give only the last one the mode).
    missing = []
    parent = os.path.dirname(path)
    while parent and not os.path.isdir(parent) and parent != os.path.dirname(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(missing):
        with suppress(FileExistsError):
            os.mkdir(directory, 0o700)
    # Created 0600 before SQLite opens it; an existing file keeps its mode, and is never
    # opened here: closing any descriptor of a file drops every POSIX lock this process
    # holds on it, SQLite's included, and another process could then checkpoint and delete
    # the WAL our connections still write to.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class Outbox:
    """One connection to the outbox file, for one thread at a time (callers lock around it).

    The connection is opened on first use, and opened afresh in a forked child.
    """

    def __init__(
        self,
        path: str,
        key_fp: str,
        *,
        fsync: bool = False,
        store_timeout: float = 5.0,
        max_dead_letters: int = 1000,
        report: Optional[Callable[[str], None]] = None,
        inspect_only: bool = False,
    ) -> None:
        """``inspect_only``: for looking at a file from outside: never create one, never
        make an outbox of a file that is not one, never move a corrupt one aside."""
        self.path = path
        self.key_fp = key_fp
        self._table = _queue_table(key_fp)
        self._fsync = fsync
        self._store_timeout = store_timeout
        self._max_dead_letters = max_dead_letters
        self._report = report
        self._inspect_only = inspect_only
        self._version = 0
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = 0
        self._inode = 0
        # Held around every use of the connection, so that a fork can wait for it to be idle.
        self._guard = threading.RLock()
        _live_outboxes.add(self)

    # ---- connection ----

    def _connection(self, *, same_file: bool = False) -> sqlite3.Connection:
        """The open connection, (re)opened if needed.

        ``same_file``: the caller names rows by the ids of an earlier claim, which mean
        nothing in another file: if the file was replaced since, raise instead of reopening.
        """
        if self._conn is not None:
            if self._pid == os.getpid() and self._same_file():
                return self._conn
            # Inherited through fork, or the file was moved aside under us: never use it
            # again, and never close it (closing can checkpoint into, or delete, the WAL
            # that now belongs to another process or another file).
            _ABANDONED.append(self._conn)
            self._conn = None
        if same_file and self._inode and not self._same_file():
            raise StoreError(f"{self.path} was replaced; rows claimed from the old file are gone")
        try:
            conn = self._open()
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc) or self._inspect_only:
                raise
            self._move_aside(str(exc))
            conn = self._open()
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _open(self) -> sqlite3.Connection:
        if sqlite3.sqlite_version_info < (3, 24, 0):  # UPSERT, used by the schema
            raise StoreError(f"SQLite {sqlite3.sqlite_version} is too old: 3.24 or newer needed")
        if self._inspect_only:
            if not os.path.isfile(self.path):
                raise FileNotFoundError(f"no outbox at {self.path}")
        else:
            _create_private_file(self.path)
        # timeout=0: SQLite's own busy handler sleeps up to 100 ms a step; ours retries sooner.
        conn = sqlite3.connect(
            self.path, timeout=0, isolation_level=None, check_same_thread=False
        )
        self._inode = os.stat(self.path).st_ino
        try:
            version = self._retry_busy(lambda: self._check_version(conn))
            if self._inspect_only:
                # Looked at, not managed: an older file keeps its version for older SDKs.
                if version == 0:
                    raise StoreError(f"{self.path} is not a whisperr_durable outbox")
                self._version = version
                return conn
            self._retry_busy(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone())
            conn.execute(f"PRAGMA synchronous={'FULL' if self._fsync else 'NORMAL'}")
            conn.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
            # A WAL file that grew during a burst is cut back to this after a checkpoint.
            conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
            self._migrate(conn)
            self._version = SCHEMA_VERSION
            self._retry_busy(lambda: conn.execute(_CREATE_QUEUE.format(table=self._table)))
        except BaseException:
            conn.close()
            raise
        return conn

    def _move_aside(self, why: str) -> None:
        """Rename a corrupt outbox (and its WAL) out of the way, once, whoever sees it first."""
        import filelock

        with filelock.FileLock(f"{self.path}.repair.lock", timeout=self._store_timeout, mode=0o600):
            if self._inode and os.stat(self.path).st_ino != self._inode:
                return  # another process moved it aside already
            if self._checks_out():
                # One bad read is not a bad file: never move a file others are using well.
                log.warning("whisperr_durable: SQLite said %r, but %s checks out", why, self.path)
                return
            aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            os.rename(self.path, aside)
            with suppress(FileNotFoundError):
                os.rename(self.path + "-wal", aside + "-wal")
            with suppress(FileNotFoundError):
                os.unlink(self.path + "-shm")  # an index of the WAL, rebuilt on open
        message = f"{self.path} was not a usable outbox ({why}); moved aside to {aside}"
        log.warning("whisperr_durable: %s", message)
        if self._report is not None:
            self._report(message)

    def _checks_out(self) -> bool:
        """Whether a fresh connection finds the file sound (a cost paid only on suspicion)."""
        try:
            with closing(sqlite3.connect(self.path, timeout=self._store_timeout)) as conn:
                return bool(conn.execute("PRAGMA quick_check(1)").fetchone()[0] == "ok")
        except sqlite3.Error:
            return False

    def _same_file(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self._inode
        except FileNotFoundError:
            return False

    def _check_version(self, conn: sqlite3.Connection) -> int:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has outbox schema version {version}; this version of "
                f"whisperr_durable reads up to {SCHEMA_VERSION}"
            )
        return version

    def _migrate(self, conn: sqlite3.Connection) -> None:
        if self._retry_busy(lambda: self._check_version(conn)) == SCHEMA_VERSION:
            return
        # Under the write lock: of several processes opening the file at once, the first
        # migrates and the others find the work done.
        self._retry_busy(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            version = self._check_version(conn)
            for step in _MIGRATIONS[version:]:
                if callable(step):
                    step(conn)
                else:
                    for statement in step:
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _retry_busy(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying on SQLITE_BUSY with short sleeps until ``store_timeout``."""
        deadline = time.monotonic() + self._store_timeout
        delay = 0.0001
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.005)

    @contextmanager
    def _write(self, *, same_file: bool = False) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on error."""
        with self._guard:
            try:
                conn = self._connection(same_file=same_file)
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    if not _is_busy(exc):
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
        if _is_corrupt(exc) and self._conn is not None and not self._inspect_only:
            # Found corrupt in use: set it aside so that the next call starts afresh.
            self.close()
            try:
                self._move_aside(str(exc))
            except OSError as move_error:  # filelock.Timeout is an OSError too
                log.warning("whisperr_durable: could not move %s aside: %s", self.path, move_error)
        return StoreError(f"{type(exc).__name__}: {exc}")

    def open(self) -> None:
        """Open (and create or migrate) the file now rather than on first use."""
        self._read("SELECT 1")

    def close(self) -> None:
        with self._guard:
            conn, self._conn = self._conn, None
            if conn is not None and self._pid == os.getpid():
                try:
                    conn.close()
                except sqlite3.Error:
                    log.debug("closing the outbox failed", exc_info=True)

    # ---- the write path ----

    def append(self, kind: int, body: str, created_ms: int, max_queue_size: int) -> tuple[int, int]:
        """Store one op; evict the oldest beyond ``max_queue_size`` in the same transaction.

        Returns ``(id, evicted)``.
        """
        with self._write() as conn:
            op_id = conn.execute(
                f"INSERT INTO {self._table} (kind, body, created_ms) VALUES (?, ?, ?)",
                (kind, body, created_ms),
            ).lastrowid
            return op_id or 0, self._bound(conn, op_id or 0, max_queue_size, 1)

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
        cutoff = newest - max_queue_size
        if cutoff <= 0:
            return 0
        ((oldest,),) = conn.execute(f"SELECT min(id) FROM {self._table}").fetchall()
        if oldest is None or oldest > cutoff:
            return 0
        top = min(cutoff + max_queue_size // 100, oldest + max(added, _EVICT_PER_CALL) - 1)
        evicted = conn.execute(f"DELETE FROM {self._table} WHERE id <= ?", (top,)).rowcount
        if evicted:
            self._bump(conn, "evicted", evicted)
        return evicted

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
        with self._write() as conn:
            head = conn.execute(
                "SELECT id, kind, body, created_ms, attempts, lease_owner, lease_until_ms "
                f"FROM {self._table} ORDER BY id LIMIT ?",
                (max_rows,),
            ).fetchall()
            batch: list[Row] = []
            expired: list[int] = []
            size = 0
            for op_id, kind, body, created_ms, attempts, lease_owner, lease_until in head:
                # A lease further ahead than any sender gives means the clock went back.
                leased = (
                    not take_over
                    and lease_owner not in (None, owner)
                    and now_ms < lease_until <= now_ms + _MAX_LEASE_MS
                )
                if leased:
                    break
                if kind == TRACK and created_ms < now_ms - max_age_ms:
                    expired.append(op_id)
                    continue
                if kind == IDENTIFY:
                    if not batch:
                        batch.append(Row(op_id, kind, body, created_ms, attempts))
                    break
                if batch and size + len(body) + 2 > max_bytes:
                    break
                batch.append(Row(op_id, kind, body, created_ms, attempts))
                size += len(body) + 2
            for op_id in expired:
                self._move_to_dead_letters(conn, op_id, op_id, None, None, _EXPIRED, now_ms)
            if batch:
                conn.execute(
                    f"UPDATE {self._table} SET lease_owner = ?, lease_until_ms = ? "
                    "WHERE id BETWEEN ? AND ?",
                    (owner, now_ms + lease_ms, batch[0].id, batch[-1].id),
                )
        return Claim(batch, len(expired))

    def ack(self, first_id: int, last_id: int, owner: str) -> int:
        """Delete a delivered run of rows that ``owner`` still holds (rows evicted since, or
        taken over by another sender, are not touched)."""
        with self._write(same_file=True) as conn:
            return conn.execute(
                f"DELETE FROM {self._table} WHERE id BETWEEN ? AND ? AND lease_owner = ?",
                (first_id, last_id, owner),
            ).rowcount

    def renew(self, first_id: int, last_id: int, owner: str, until_ms: int) -> int:
        """Extend our lease on a run of rows; returns how many rows we still hold."""
        with self._write(same_file=True) as conn:
            return conn.execute(
                f"UPDATE {self._table} SET lease_until_ms = ? "
                "WHERE id BETWEEN ? AND ? AND lease_owner = ?",
                (until_ms, first_id, last_id, owner),
            ).rowcount

    def release(self, first_id: int, last_id: int, owner: str, *, failed: bool) -> None:
        """Give back a leased run, counting one more failed attempt if ``failed``."""
        with self._write(same_file=True) as conn:
            conn.execute(
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
    ) -> int:
        """Move a run of rows the server refused, that ``owner`` holds, to the (bounded)
        dead-letter table."""
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
    ) -> int:
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
        # Keep this key's newest max_dead_letters.
        conn.execute(
            "DELETE FROM dead_letters WHERE key_fp = ? AND id <= (SELECT id FROM dead_letters "
            "WHERE key_fp = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (self.key_fp, self.key_fp, self._max_dead_letters),
        )
        return moved

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

    def stats(self) -> Stats:
        kinds = dict(self._read(f"SELECT kind, count(*) FROM {self._table} GROUP BY kind"))
        ((oldest,),) = self._read(f"SELECT min(created_ms) FROM {self._table}")
        ((dead,),) = self._read(
            "SELECT count(*) FROM dead_letters WHERE key_fp = ?", (self.key_fp,)
        )
        evicted = self._read(
            "SELECT n FROM counters WHERE key_fp = ? AND name = 'evicted'", (self.key_fp,)
        )
        return Stats(
            pending_tracks=int(kinds.get(TRACK, 0)),
            pending_identifies=int(kinds.get(IDENTIFY, 0)),
            oldest_created_ms=oldest,
            dead_letters=int(dead),
            evicted=int(evicted[0][0]) if evicted else 0,
            schema_version=self.schema_version(),
        )

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
        if self._version < 3:  # a file of an older SDK, looked at: one table for all keys
            fps = self._read(
                "SELECT DISTINCT key_fp FROM ops" + (" WHERE key_fp = ?" if key_fp else ""),
                (key_fp,) if key_fp else (),
            )
            return [(fp, f"(SELECT * FROM ops WHERE key_fp = {_literal(fp)})") for (fp,) in fps]
        names = self._read(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, ?) = ? "
            "ORDER BY name",
            (len(_QUEUE_PREFIX), _QUEUE_PREFIX),
        )
        fps = [name[len(_QUEUE_PREFIX) :] for (name,) in names]
        return [(fp, _queue_table(fp)) for fp in fps if key_fp is None or fp == key_fp]

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
            self._read(
                f"SELECT id, ?, kind, body, created_ms, attempts FROM {table} "
                "ORDER BY id LIMIT ?",
                (fp, limit),
            )
            for fp, table in self._queues(key_fp)
        ]
        return list(itertools.islice(heapq.merge(*queues, key=lambda r: r[4]), limit))

    def all_dead_letters(self, limit: Optional[int], key_fp: Optional[str]) -> list[DeadLetter]:
        where, params = ("WHERE key_fp = ?", (key_fp,)) if key_fp else ("", ())
        rows = self._read(
            "SELECT id, op_id, kind, body, created_ms, failed_ms, attempts, status, reason, "
            f"key_fp FROM dead_letters {where} ORDER BY id LIMIT ?",
            (*params, -1 if limit is None else limit),
        )
        return [
            DeadLetter(r[0], r[1], "identify" if r[2] == IDENTIFY else "track", *r[3:])
            for r in rows
        ]

    def requeue(self, ids: Optional[Sequence[int]], key_fp: Optional[str]) -> int:
        """Put dead letters back at the end of their key's queue, bodies (and ids) unchanged."""
        with self._write() as conn:
            moved = 0
            for where, params in _dead_letter_filters(ids, key_fp):
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
                    table = _queue_table(fp)
                    conn.execute(_CREATE_QUEUE.format(table=table))
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
                for where, params in _dead_letter_filters(ids, key_fp)
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
    for outbox in list(_live_outboxes):
        outbox._guard = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
