"""A connection to the outbox file: opened on a trusted path, checked to be an outbox this
SDK can use (made if new), retried while busy, dropped after an error it would keep, and
watched for the file or its ``-shm`` being replaced under it. Every error leaves as
:class:`StoreError`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from typing import Any, Callable, Optional, TypeVar

from ._errors import is_busy, is_corrupt, is_sticky
from ._paths import access_note, check_ours, prepare_path, sidecars, sync_directory
from ._records import StoreError
from ._schema import (
    APPLICATION_ID,
    MIN_READER_VERSION,
    SCHEMA,
    SCHEMA_VERSION,
    queue_schema,
    queue_table,
)

log = logging.getLogger(__name__)

# No commit checkpoints in the normal run of things: the sender does, after its commits and
# when callers ask it to, outside any transaction. This bound only stops the WAL growing
# without end if the sender cannot.
_AUTOCHECKPOINT_PAGES = 10_000
# A checkpoint completes (and the WAL starts again) once the WAL holds this many pages, and
# the WAL file keeps the size that takes: cutting it back would be paid by the next commit.
_RESTART_WAL_FRAMES = 4_000
_WAL_SIZE_LIMIT = 64 * 1024 * 1024
# Fewer free pages than this are left for the next ops rather than given back.
_RECLAIM_AT_LEAST = 256

# A busy file is tried again after this, then after twice as long each time up to the
# last: another connection's write usually ends within a millisecond, and the caller
# should not sleep long past its end.
_FIRST_BUSY_WAIT = 0.00002
_LAST_BUSY_WAIT = 0.0005

# Connections left behind by fork, or to a file since moved aside. Closing one could
# checkpoint into or delete a WAL that is not its own, and garbage collection would close
# it: keep them referenced, never use them.
_ABANDONED: list[sqlite3.Connection] = []

T = TypeVar("T")

# Files whose -shm was replaced under this process, and what to say about them: this
# process never uses them again (see Connection._shm_replaced).
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


class Connection:
    """One connection to the outbox file, for one thread at a time (callers lock around it):
    opened, checked, kept or dropped; the queues are :class:`Outbox`'s.

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
        # Held around every use of the connection, so that a fork can wait for it to be idle.
        self._guard = threading.RLock()
        _live_outboxes.add(self)
        self._opened()

    def _opened(self) -> None:
        """Told at construction and of every new connection: a subclass (re)sets what it
        knows of the file."""

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
        self._opened()
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
            log.warning("%s", message)
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
        log.warning("%s", message)
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
            if created:
                # Free pages can go back to the file system (reclaim(), compact()): a file
                # takes this only while it is new, before its journal mode is set.
                self._retry_busy(lambda: conn.execute("PRAGMA auto_vacuum = INCREMENTAL"))
            self._retry_busy(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone())
            conn.execute(f"PRAGMA synchronous={'FULL' if self._fsync else 'NORMAL'}")
            conn.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
            # A WAL file that grew during a burst is cut back to this after a checkpoint.
            conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
            self._version = self._create(conn, version)
            queue = queue_schema(self.key_fp)
            self._retry_busy(lambda: [conn.execute(statement) for statement in queue])
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
                log.warning("SQLite said %r, but %s checks out", why, self.path)
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
            log.warning("%s", message)
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

    def _insert_one(self, sql: str, params: tuple[Any, ...]) -> int:
        """One INSERT committed on its own, the id of its row: an append, the hot path of
        ``track()`` (the path is checked against replacement at most every
        ``_LOOK_EVERY``)."""
        with self._guard:
            try:
                conn = self._connection(look=False)
                try:
                    row_id = conn.execute(sql, params).lastrowid
                except sqlite3.OperationalError as exc:
                    if not is_busy(exc):
                        raise
                    row_id = self._retry_busy(lambda: conn.execute(sql, params).lastrowid)
            except (sqlite3.Error, OSError) as exc:
                raise self._store_error(exc) from exc
        return row_id or 0

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
                log.warning("could not move %s aside: %s", self.path, move_error)
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

    def schema_version(self) -> int:
        ((version,),) = self._read("PRAGMA user_version")
        return int(version)

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

    def reclaimable(self) -> int:
        """Bytes of the file that hold nothing (free pages): what ``reclaim()`` and
        ``compact()`` give back."""
        ((free,),) = self._read("PRAGMA freelist_count")
        ((size,),) = self._read("PRAGMA page_size")
        return int(free) * int(size)

    def reclaim(self, max_pages: int) -> None:
        """After a drain: give at most ``max_pages`` free pages back to the file system (a
        file made with incremental auto-vacuum; others wait for ``compact()``), and cut the
        WAL back to nothing. Short: writes of a few milliseconds, under the write lock like
        any other."""
        ((mode,),) = self._read("PRAGMA auto_vacuum")
        ((free,),) = self._read("PRAGMA freelist_count")
        if mode != 2 or free < _RECLAIM_AT_LEAST:  # INCREMENTAL, and worth a write
            return
        with self._guard, self._sqlite_errors():
            conn = self._connection(same_file=True)
            # As a script: execute() steps a statement with no result columns once, and
            # each step of this one frees one page.
            vacuum = f"PRAGMA incremental_vacuum({int(max_pages)});"
            self._retry_busy(lambda: conn.executescript(vacuum))
        self.checkpoint(truncate=True)  # and the WAL back to nothing

    def compact(self) -> tuple[int, int]:
        """Rewrite the whole file without its free pages (``VACUUM``, which also makes it one
        whose later drains give pages back), and empty the WAL: the file's size before and
        after, in bytes. Writers wait while it runs."""
        before = self.file_bytes()
        with self._guard, self._sqlite_errors():
            conn = self._connection(same_file=True)
            self._retry_busy(lambda: conn.execute("PRAGMA auto_vacuum = INCREMENTAL"))
            self._retry_busy(lambda: conn.execute("VACUUM"))
        self.checkpoint(truncate=True)
        return before, self.file_bytes()

    def file_bytes(self) -> int:
        """The size of the file and its WAL, in bytes."""
        return sum(
            os.path.getsize(name)
            for name in (self.path, self.path + "-wal")
            if os.path.exists(name)
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
_live_outboxes: weakref.WeakSet[Connection] = weakref.WeakSet()
_held_for_fork: list[Connection] = []
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
