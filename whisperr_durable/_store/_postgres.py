"""The PostgreSQL store: the outbox's queues, leases, dead letters and counters as tables of
their own schema (``whisperr_durable``) in the application's database, through psycopg 3
(the ``postgres`` extra), for fleets whose local disks do not outlive their hosts.

The same contract as the SQLite file: an op is one row of the final wire JSON, a sender
claims a run from the head of its key's queue under a lease row, acknowledges it after a
2xx, and ``max_queue_size`` evicts the oldest ops first. What differs, and why:

- Ids come from one identity column for every key. An id is given when a row is inserted,
  not when its transaction commits, so a row may appear below ids already seen. A claim
  therefore remembers the ids it took, and acknowledgements, releases and dead letters name
  those ids, never a range that a late row could have joined.
- Eviction counts the key's rows (ids have gaps: rolled back inserts keep theirs) only when
  the ids say the queue may be over its bound, under a transaction-level advisory lock.
- Sender leadership is a session-level advisory lock per key (:class:`PgSenderLock`), which
  PostgreSQL releases when its holder's connection ends, however it ends.

Every statement runs on this object's own connection in autocommit mode, or in one explicit
transaction; a lost connection is dropped and made again on the next call. Errors leave this
module as :class:`StoreError`.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Callable, Optional

import psycopg

from .._wire import IDENTIFY, TRACK, utc_now_ms
from ._claims import DAMAGED, EXPIRED, NO_LEASE, Lease, Plan
from ._records import (
    Claim,
    DeadLetter,
    KeyReport,
    OutboxStats,
    Row,
    Run,
    StoreError,
    run_of,
    text_of,
)
from ._urls import redacted

log = logging.getLogger(__name__)

SCHEMA_NAME = "whisperr_durable"
# The tables' version (``meta``), and the oldest SDK schema that can use them: the same
# rule as the SQLite file's (see ``_schema.MIN_READER_VERSION``).
PG_SCHEMA_VERSION = 1
PG_MIN_READER_VERSION = 1

_S = SCHEMA_NAME
# Made once, by the first process, under a transaction-level advisory lock.
_DDL = (
    f"CREATE SCHEMA IF NOT EXISTS {_S}",
    f"""CREATE TABLE {_S}.meta (
        name text PRIMARY KEY,
        value bigint NOT NULL
    )""",
    # Deleted rows are dead tuples until vacuumed: autovacuum visits this table after 2%
    # of it changed rather than 20%, so a steady stream keeps it small.
    f"""CREATE TABLE {_S}.ops (
        key_fp text NOT NULL,
        id bigint GENERATED ALWAYS AS IDENTITY,
        kind smallint NOT NULL,
        body text NOT NULL,
        created_ms bigint NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        PRIMARY KEY (key_fp, id)
    ) WITH (autovacuum_vacuum_scale_factor = 0.02,
            autovacuum_vacuum_insert_scale_factor = 0.02)""",
    f"CREATE INDEX ops_identifies ON {_S}.ops (key_fp, id) WHERE kind = {IDENTIFY}",
    f"""CREATE TABLE {_S}.leases (
        key_fp text PRIMARY KEY,
        owner text NOT NULL,
        first_id bigint NOT NULL,
        last_id bigint NOT NULL,
        until_ms bigint NOT NULL
    )""",
    f"""CREATE TABLE {_S}.dead_letters (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        key_fp text NOT NULL,
        op_id bigint NOT NULL,
        kind smallint NOT NULL,
        body text NOT NULL,
        created_ms bigint NOT NULL,
        failed_ms bigint NOT NULL,
        attempts integer NOT NULL,
        status integer,
        reason text NOT NULL
    )""",
    f"CREATE INDEX dead_letters_by_key ON {_S}.dead_letters (key_fp, id)",
    f"""CREATE TABLE {_S}.counters (
        key_fp text NOT NULL,
        name text NOT NULL,
        n bigint NOT NULL,
        PRIMARY KEY (key_fp, name)
    )""",
    f"""CREATE TABLE {_S}.sender_state (
        key_fp text PRIMARY KEY,
        pid integer NOT NULL,
        last_attempt_ms bigint,
        last_success_ms bigint,
        last_error text,
        last_error_ms bigint
    )""",
)

# Advisory lock keys: one for making the schema, one per key for eviction and claims (in
# a transaction) and one per key for sender leadership (for a session).
_SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('whisperr_durable:schema', 0))"
_KEY_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('whisperr_durable:key:' || %s, 0))"
_LEAD = "hashtextextended('whisperr_durable:sender:' || %s, 0)"

# The most rows one append evicts; a bulk append of more rows evicts as many as it added.
_EVICT_PER_CALL = 1_000

_ROW = "id, kind, convert_to(body, 'UTF8'), created_ms, attempts"
# The head window of a key's queue summed up in one pass: its ids and bodies (joined for the
# wire) in id order, the range of kinds and creation times, whether every body is one
# braced ASCII object, and the joined size.
_WINDOW = (
    "SELECT count(*), array_agg(id ORDER BY id), string_agg(body, ', ' ORDER BY id), "
    "min(kind), max(kind), min(created_ms), "
    "bool_and(left(body, 1) = '{' AND right(body, 1) = '}' "
    "AND octet_length(body) = char_length(body)), "
    "coalesce(sum(octet_length(body) + 2), 0) - 2 "
    f"FROM (SELECT id, kind, body, created_ms FROM {_S}.ops WHERE key_fp = %s "
    "ORDER BY id LIMIT %s) AS head"
)
_APPEND = (
    f"INSERT INTO {_S}.ops (key_fp, kind, body, created_ms) VALUES (%s, %s, %s, %s) RETURNING id"
)

# Connections made in a process that has since forked: the child must neither use nor close
# them (closing would end the parent's session), so it keeps them referenced for ever.
_abandoned: list[Any] = []
_live: weakref.WeakSet[Any] = weakref.WeakSet()
# Database URLs whose schema this process has seen made.
_schema_ready: set[str] = set()


def connect(url: str, timeout: float) -> Any:
    """A new autocommit connection whose statements give up after ``timeout`` seconds.

    Its transactions last milliseconds: one left open for longer than ``timeout`` (its
    process stopped, frozen or gone silent in the middle of it) is ended by the server,
    so that the locks it holds never stop the other hosts for longer than that."""
    ms = max(1, int(timeout * 1000))
    idle = max(1000, ms)
    return psycopg.connect(
        url,
        autocommit=True,
        connect_timeout=max(1, int(timeout + 0.999)),
        options=(
            f"-c statement_timeout={ms} -c lock_timeout={ms} "
            f"-c idle_in_transaction_session_timeout={idle}"
        ),
        application_name="whisperr_durable",
    )


def store_error(url: str, exc: BaseException) -> StoreError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return StoreError(f"{type(exc).__name__}: {text} ({redacted(url)})")


class _Connected:
    """One connection to the database, made on first use and again after it is lost."""

    def __init__(self, url: str, timeout: float) -> None:
        self.path = url
        self._timeout = timeout
        self._conn: Any = None
        self._pid = 0
        self._guard = threading.RLock()
        _live.add(self)

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def _connection(self) -> Any:
        conn = self._conn
        if conn is not None and self._pid == os.getpid() and not conn.closed:
            return conn
        if conn is not None and self._pid != os.getpid():
            _abandoned.append(conn)  # the parent's: never used, never closed here
        self._conn = None
        conn = connect(self.path, self._timeout)
        self._conn, self._pid = conn, os.getpid()
        return conn

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            conn = self._conn
            if conn is not None and (conn.closed or conn.broken):
                self.close()
            raise store_error(self.path, exc) from exc

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._guard, self._errors():
            return list(self._connection().execute(sql, params).fetchall())

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self._read(sql, params)
        return rows[0] if rows else None

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """One transaction: committed on success, rolled back on error."""
        with self._guard, self._errors():
            conn = self._connection()
            with conn.transaction():
                yield conn

    def close(self) -> None:
        with self._guard:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            if self._pid != os.getpid():
                _abandoned.append(conn)
                return
            try:
                conn.close()
            except psycopg.Error:
                log.debug("closing a connection failed", exc_info=True)

    def after_fork_in_child(self) -> None:
        with self._guard:
            if self._conn is not None:
                _abandoned.append(self._conn)
                self._conn = None


class PgOutbox(_Connected):
    """One key's queue in a PostgreSQL database (``path`` is its URL), and the views of the
    whole store for operators: the SQLite ``Outbox``'s interface."""

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
        # fsync: every commit is durable in PostgreSQL already (synchronous_commit is the
        # server's to set); report: nothing here is moved aside or lost under the process.
        super().__init__(path, store_timeout)
        self.key_fp = key_fp
        self._max_dead_letters = max_dead_letters
        self._inspect_only = inspect_only
        self._version = 0
        # The ids of the run each owner last claimed here and has not settled yet.
        self._claimed: dict[str, list[int]] = {}
        # An append whose id is at most this needs no count of the queue (see _bound).
        self._room_until = 0
        self._room_bound = 0
        self._append_cursor: Any = None

    @property
    def lost(self) -> int:
        return 0

    def _connection(self) -> Any:
        fresh = self._conn is None or self._pid != os.getpid() or self._conn.closed
        conn = super()._connection()
        if fresh:
            try:
                self._version = self._ensure_schema(conn)
            except BaseException:
                self.close()
                raise
        return conn

    def _ensure_schema(self, conn: Any) -> int:
        """Make the tables if this is the first use of the database; the schema's version.
        Refuses tables of a later schema whose oldest reader is newer than this SDK."""
        if self.path not in _schema_ready:
            if self._inspect_only:
                row = conn.execute(f"SELECT to_regclass('{_S}.meta')").fetchone()
                if row[0] is None:
                    raise StoreError(f"no whisperr_durable tables in {redacted(self.path)}")
            else:
                with conn.transaction():
                    conn.execute(_SCHEMA_LOCK)
                    if conn.execute(f"SELECT to_regclass('{_S}.meta')").fetchone()[0] is None:
                        for statement in _DDL:
                            conn.execute(statement)
                        conn.execute(
                            f"INSERT INTO {_S}.meta (name, value) VALUES "
                            "('schema_version', %s), ('min_reader_version', %s)",
                            (PG_SCHEMA_VERSION, PG_MIN_READER_VERSION),
                        )
        meta = dict(conn.execute(f"SELECT name, value FROM {_S}.meta").fetchall())
        version = int(meta.get("schema_version", 0))
        min_reader = int(meta.get("min_reader_version", version))
        if min_reader > PG_SCHEMA_VERSION:
            raise StoreError(
                f"{redacted(self.path)} has whisperr_durable tables of schema {version}, "
                f"which SDKs of schema {min_reader} or later can use; this version of "
                f"whisperr_durable has schema {PG_SCHEMA_VERSION}"
            )
        _schema_ready.add(self.path)
        return version

    def open(self) -> None:
        self._read("SELECT 1")

    def schema_version(self) -> int:
        self._read("SELECT 1")
        return self._version

    # ---- the write path ----

    def append(self, kind: int, body: str, created_ms: int, max_queue_size: int) -> tuple[int, int]:
        """Store one op; evict the oldest beyond ``max_queue_size``. Returns ``(id, evicted)``.
        The hot path of ``track()``: one prepared statement on a cursor kept for it."""
        with self._guard, self._errors():
            conn = self._connection()
            cursor = self._append_cursor
            if cursor is None or cursor.connection is not conn:
                cursor = self._append_cursor = conn.cursor()
            cursor.execute(_APPEND, (self.key_fp, kind, body, created_ms), prepare=True)
            (op_id,) = cursor.fetchone()
        return op_id, self._bound(op_id, max_queue_size, 1)

    def append_in(self, connection: Any, kind: int, body: str, created_ms: int) -> int:
        """Insert one op in the caller's transaction on ``connection`` (psycopg 3), without
        committing: it can be sent once the caller commits, and is gone if the caller rolls
        back. Errors are the caller's transaction's, raised as psycopg raised them. The bound
        is kept by the appends after it."""
        if not isinstance(connection, psycopg.Connection):
            raise TypeError(
                "connection must be a psycopg 3 connection (SQLAlchemy: "
                "conn.connection.driver_connection; Django: django.db.connection.connection), "
                f"not {type(connection).__name__}"
            )
        if self.path not in _schema_ready:
            self.open()  # the tables, made and committed on a connection of our own
        ((op_id,),) = connection.execute(
            _APPEND, (self.key_fp, kind, body, created_ms), prepare=True
        ).fetchall()
        return int(op_id)

    def append_many(self, ops: Sequence[tuple[int, str, int]], max_queue_size: int) -> int:
        """Store ``(kind, body, created_ms)`` ops in one transaction; returns the evicted count."""
        if not ops:
            return 0
        with self._write() as conn:
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {_S}.ops (key_fp, kind, body, created_ms) "
                    "VALUES (%s, %s, %s, %s)",
                    [(self.key_fp, *op) for op in ops],
                )
            ((newest,),) = conn.execute(
                f"SELECT max(id) FROM {_S}.ops WHERE key_fp = %s", (self.key_fp,)
            ).fetchall()
        return self._bound(int(newest), max_queue_size, len(ops))

    def _bound(self, newest: int, max_queue_size: int, added: int) -> int:
        """Evict the oldest ops beyond ``max_queue_size`` (and the next 1% of it, so that a
        full queue counts once in a while, not at every append). The queue is counted only
        when ids allow more ops than the bound since it was last counted: every op takes a
        new id, so after a count of ``n`` at id ``i``, ids up to ``i + bound - n`` fit."""
        if max_queue_size == self._room_bound and newest <= self._room_until:
            return 0
        with self._write() as conn:
            conn.execute(_KEY_LOCK, (self.key_fp,))
            ((count,),) = conn.execute(
                f"SELECT count(*) FROM {_S}.ops WHERE key_fp = %s", (self.key_fp,)
            ).fetchall()
            evicted = 0
            if count > max_queue_size:
                lease = self._lease_row(conn)
                if not lease.live(utc_now_ms()):
                    lease = NO_LEASE
                excess = count - max_queue_size + max_queue_size // 100
                evicted = conn.execute(
                    f"DELETE FROM {_S}.ops WHERE key_fp = %s AND id IN (SELECT id FROM "
                    f"{_S}.ops WHERE key_fp = %s AND id NOT BETWEEN %s AND %s ORDER BY id "
                    "LIMIT %s)",
                    (
                        self.key_fp,
                        self.key_fp,
                        lease.first,
                        lease.last,
                        min(excess, max(added, _EVICT_PER_CALL)),
                    ),
                ).rowcount
                if evicted:
                    self._bump(conn, "evicted", evicted)
                count -= evicted
        self._room_bound = max_queue_size
        self._room_until = newest + max(0, max_queue_size - count)
        return int(evicted)

    def _lease_row(self, conn: Any) -> Lease:
        row = conn.execute(
            f"SELECT owner, first_id, last_id, until_ms FROM {_S}.leases WHERE key_fp = %s",
            (self.key_fp,),
        ).fetchone()
        return Lease(*row) if row else NO_LEASE

    def _bump(self, conn: Any, name: str, by: int) -> None:
        conn.execute(
            f"INSERT INTO {_S}.counters (key_fp, name, n) VALUES (%s, %s, %s) "
            "ON CONFLICT (key_fp, name) DO UPDATE SET n = counters.n + excluded.n",
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
        """Lease the next batch from the head of this key's queue (see ``Outbox.claim``)."""
        plan = Plan(owner, max_bytes, max_age_ms, now_ms, take_over)
        with self._write() as conn:
            conn.execute(_KEY_LOCK, (self.key_fp,))
            lease = self._lease_row(conn)
            # Mostly the head window is the run as it stands, summed up by the server;
            # otherwise its rows are read and planned here.
            summary = conn.execute(_WINDOW, (self.key_fp, max_rows), prepare=True).fetchone()
            if not summary[0]:
                return Claim(None)
            quick = self._quick(summary, plan, lease)
            run: Optional[Run]
            if quick is not None:
                run, ids = quick
                expired: list[int] = []
                damaged: list[int] = []
                pruned = 0
            else:
                head = conn.execute(
                    f"SELECT {_ROW} FROM {_S}.ops WHERE key_fp = %s ORDER BY id LIMIT %s",
                    (self.key_fp, max_rows),
                ).fetchall()
                batch, expired, damaged = plan.run(head, lease)
                pruned = 0
                for dead, reason in ((expired, EXPIRED), (damaged, DAMAGED)):
                    if dead:
                        pruned += self._move_to_dead_letters(conn, dead, None, reason, now_ms)[1]
                run, ids = (run_of(batch), [r.id for r in batch]) if batch else (None, [])
            if run is not None:
                conn.execute(
                    f"INSERT INTO {_S}.leases (key_fp, owner, first_id, last_id, until_ms) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key_fp) DO UPDATE SET "
                    "owner = excluded.owner, first_id = excluded.first_id, "
                    "last_id = excluded.last_id, until_ms = excluded.until_ms",
                    (self.key_fp, owner, run.first, run.last, now_ms + lease_ms),
                )
        if run is not None:
            self._claimed[owner] = ids
        return Claim(run, len(expired), len(damaged), pruned)

    @staticmethod
    def _quick(summary: Any, plan: Plan, lease: Lease) -> Optional[tuple[Run, list[int]]]:
        """The run and its ids, from the server's summary of the head window, when every
        row of it is a sound track young enough to send within ``max_bytes`` (the common
        case); ``None`` otherwise."""
        count, ids, joined, kind_lo, kind_hi, created_lo, sound_bodies, size = summary
        if (
            kind_lo != TRACK
            or kind_hi != TRACK
            or not sound_bodies
            or created_lo < plan.now_ms - plan.max_age_ms
            or size + 2 > plan.max_bytes
            or (plan.blocked_by(lease) and lease.first <= ids[-1] and ids[0] <= lease.last)
        ):
            return None
        return Run(ids[0], ids[-1], count, TRACK, joined.encode()), ids

    def _ours(self, owner: str, first_id: int, last_id: int) -> list[int]:
        return [i for i in self._claimed.get(owner, ()) if first_id <= i <= last_id]

    def _unsettled(self, owner: str, ids: list[int]) -> list[int]:
        """The ids of ``owner``'s run left once ``ids`` are settled, taken out of
        ``_claimed``: the caller puts them back while the run goes on."""
        settled = set(ids)
        return [i for i in self._claimed.pop(owner, ()) if i not in settled]

    def _settle(self, conn: Any, owner: str, ids: list[int], *, end: bool = False) -> None:
        """``ids`` of our run are settled; the lease ends with the last of them (or now)."""
        left = self._unsettled(owner, ids)
        if left and not end:
            self._claimed[owner] = left
        else:
            conn.execute(
                f"DELETE FROM {_S}.leases WHERE key_fp = %s AND owner = %s",
                (self.key_fp, owner),
            )

    def _still_ours(self, conn: Any, owner: str) -> bool:
        """Whether ``owner`` still holds this key's lease (locked until the commit)."""
        row = conn.execute(
            f"SELECT 1 FROM {_S}.leases WHERE key_fp = %s AND owner = %s FOR UPDATE",
            (self.key_fp, owner),
        ).fetchone()
        return row is not None

    def rows(self, first_id: int, last_id: int) -> list[Row]:
        """The rows of our run with ids ``first_id``..``last_id``, in order."""
        ids = [i for run in self._claimed.values() for i in run if first_id <= i <= last_id]
        rows = self._read(
            f"SELECT {_ROW} FROM {_S}.ops WHERE {_IDS} ORDER BY id", (self.key_fp, *_ids(ids))
        )
        return [Row(*row) for row in rows]

    def ack(self, first_id: int, last_id: int, owner: str) -> int:
        """Delete delivered rows of our run, if ``owner`` still holds its lease; the lease
        ends with the last of them. One statement: one round trip a batch."""
        ids = self._ours(owner, first_id, last_id)
        left = self._unsettled(owner, ids)
        ((held, deleted),) = self._read(
            f"WITH mine AS (SELECT 1 FROM {_S}.leases WHERE key_fp = %s AND owner = %s "
            "FOR UPDATE), "
            f"gone AS (DELETE FROM {_S}.ops WHERE {_IDS} AND EXISTS (SELECT 1 FROM mine) "
            "RETURNING 1), "
            f"ended AS (DELETE FROM {_S}.leases WHERE key_fp = %s AND owner = %s AND %s "
            "AND EXISTS (SELECT 1 FROM mine)) "
            "SELECT EXISTS (SELECT 1 FROM mine), (SELECT count(*) FROM gone)",
            (self.key_fp, owner, self.key_fp, *_ids(ids), self.key_fp, owner, not left),
        )
        if held and left:
            self._claimed[owner] = left
        return int(deleted)

    def renew(self, first_id: int, last_id: int, owner: str, until_ms: int) -> int:
        with self._write() as conn:
            return int(
                conn.execute(
                    f"UPDATE {_S}.leases SET until_ms = %s WHERE key_fp = %s AND owner = %s "
                    "AND first_id <= %s AND last_id >= %s",
                    (until_ms, self.key_fp, owner, first_id, last_id),
                ).rowcount
            )

    def release(self, first_id: int, last_id: int, owner: str, *, failed: bool) -> None:
        """Give back our run, counting one more failed attempt on its rows if ``failed``."""
        ids = self._ours(owner, first_id, last_id)
        with self._write() as conn:
            if self._still_ours(conn, owner) and failed:
                conn.execute(
                    f"UPDATE {_S}.ops SET attempts = attempts + 1 WHERE {_IDS}",
                    (self.key_fp, *_ids(ids)),
                )
            self._settle(conn, owner, ids, end=True)

    def dead_letter(
        self,
        first_id: int,
        last_id: int,
        owner: str,
        status: Optional[int],
        reason: str,
        now_ms: int,
    ) -> tuple[int, int]:
        """Move rows of our run the server refused to the (bounded) dead letters; returns
        ``(moved, pruned)``."""
        ids = self._ours(owner, first_id, last_id)
        with self._write() as conn:
            if not self._still_ours(conn, owner):
                self._claimed.pop(owner, None)
                return 0, 0
            moved = self._move_to_dead_letters(conn, ids, status, reason, now_ms)
            self._settle(conn, owner, ids)
        return moved

    def _move_to_dead_letters(
        self, conn: Any, ids: list[int], status: Optional[int], reason: str, now_ms: int
    ) -> tuple[int, int]:
        moved = conn.execute(
            f"WITH gone AS (DELETE FROM {_S}.ops WHERE {_IDS} "
            "RETURNING id, kind, body, created_ms, attempts) "
            f"INSERT INTO {_S}.dead_letters (key_fp, op_id, kind, body, created_ms, failed_ms, "
            "attempts, status, reason) SELECT %s, id, kind, body, created_ms, %s, attempts + 1, "
            "%s, %s FROM gone ORDER BY id",
            (self.key_fp, *_ids(ids), self.key_fp, now_ms, status, reason),
        ).rowcount
        if not moved:
            return 0, 0
        self._bump(conn, "refused", moved)
        pruned = conn.execute(
            f"DELETE FROM {_S}.dead_letters WHERE key_fp = %s AND id <= (SELECT id FROM "
            f"{_S}.dead_letters WHERE key_fp = %s ORDER BY id DESC LIMIT 1 OFFSET %s)",
            (self.key_fp, self.key_fp, self._max_dead_letters),
        ).rowcount
        if pruned:
            self._bump(conn, "pruned", pruned)
        return int(moved), int(pruned)

    # ---- reading ----

    def last_id(self) -> int:
        ((last,),) = self._read(f"SELECT max(id) FROM {_S}.ops WHERE key_fp = %s", (self.key_fp,))
        return int(last or 0)

    def pending_through(self, last_id: int, *, exact: bool = True) -> int:
        if exact:
            sql = f"SELECT count(*) FROM {_S}.ops WHERE key_fp = %s AND id <= %s"
        else:
            sql = (
                f"SELECT count(*) FROM (SELECT 1 FROM {_S}.ops WHERE key_fp = %s "
                "AND id <= %s LIMIT 1) AS s"
            )
        ((count,),) = self._read(sql, (self.key_fp, last_id))
        return int(count)

    def span(self) -> int:
        ((first, last),) = self._read(
            f"SELECT min(id), max(id) FROM {_S}.ops WHERE key_fp = %s", (self.key_fp,)
        )
        return int(last) - int(first) + 1 if first is not None else 0

    def has_pending(self) -> bool:
        ((any_row,),) = self._read(
            f"SELECT EXISTS (SELECT 1 FROM {_S}.ops WHERE key_fp = %s)", (self.key_fp,)
        )
        return bool(any_row)

    def head(self) -> Optional[tuple[int, Optional[str], int]]:
        row = self._one(
            f"SELECT h.id, l.owner, l.first_id, l.last_id, l.until_ms FROM (SELECT id FROM "
            f"{_S}.ops WHERE key_fp = %s ORDER BY id LIMIT 1) AS h LEFT JOIN {_S}.leases AS l "
            "ON l.key_fp = %s",
            (self.key_fp, self.key_fp),
        )
        if row is None:
            return None
        op_id, owner, first, last, until = row
        if owner is None or not first <= op_id <= last:
            return op_id, None, 0
        return op_id, owner, int(until)

    def counters(self) -> dict[str, int]:
        rows = self._read(f"SELECT name, n FROM {_S}.counters WHERE key_fp = %s", (self.key_fp,))
        return {str(name): int(n) for name, n in rows}

    def stats(self) -> OutboxStats:
        ((pending, identifies, oldest, dead),) = self._read(
            f"SELECT (SELECT count(*) FROM {_S}.ops WHERE key_fp = %s), "
            f"(SELECT count(*) FROM {_S}.ops WHERE key_fp = %s AND kind = {IDENTIFY}), "
            f"(SELECT created_ms FROM {_S}.ops WHERE key_fp = %s ORDER BY id LIMIT 1), "
            f"(SELECT count(*) FROM {_S}.dead_letters WHERE key_fp = %s)",
            (self.key_fp,) * 4,
        )
        counters = self.counters()
        return OutboxStats(
            pending_tracks=int(pending) - int(identifies),
            pending_identifies=int(identifies),
            oldest_created_ms=oldest,
            dead_letters=int(dead),
            evicted=counters.get("evicted", 0),
            schema_version=self._version,
            refused=counters.get("refused", 0),
            dead_letters_pruned=counters.get("pruned", 0),
        )

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return self.all_dead_letters(limit, self.key_fp)

    def record_sender(
        self, pid: int, attempt_ms: int, success_ms: Optional[int], error: Optional[str]
    ) -> None:
        with self._write() as conn:
            conn.execute(
                f"INSERT INTO {_S}.sender_state AS s (key_fp, pid, last_attempt_ms, "
                "last_success_ms, last_error, last_error_ms) VALUES (%s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (key_fp) DO UPDATE SET pid = excluded.pid, "
                "last_attempt_ms = excluded.last_attempt_ms, "
                "last_success_ms = coalesce(excluded.last_success_ms, s.last_success_ms), "
                "last_error = coalesce(excluded.last_error, s.last_error), "
                "last_error_ms = coalesce(excluded.last_error_ms, s.last_error_ms)",
                (self.key_fp, pid, attempt_ms, success_ms, error, attempt_ms if error else None),
            )

    # What the SQLite file does to its pages and its WAL has no counterpart here: the
    # server writes, checkpoints and vacuums its own files.

    def sync_wal(self) -> None:
        pass

    def checkpoint(self, *, truncate: bool = False) -> None:
        pass

    def reclaim(self, max_pages: int) -> None:
        pass

    # ---- the tables' size, for operators ----

    def file_bytes(self) -> int:
        """The size of the outbox's tables and their indexes, in bytes."""
        ((size,),) = self._read(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class AS c "
            "JOIN pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'r'",
            (SCHEMA_NAME,),
        )
        return int(size)

    def reclaimable(self) -> int:
        """Bytes held by deleted rows not yet vacuumed (PostgreSQL's estimate)."""
        ((dead,),) = self._read(
            "SELECT coalesce(sum(pg_relation_size(relid) * n_dead_tup "
            "/ greatest(n_live_tup + n_dead_tup, 1)), 0) FROM pg_stat_user_tables "
            "WHERE schemaname = %s",
            (SCHEMA_NAME,),
        )
        return int(dead)

    def compact(self) -> tuple[int, int]:
        """Rewrite the outbox's tables without their dead rows (``VACUUM FULL``): their size
        before and after, in bytes. Appends and claims wait while it runs (each table is
        locked in turn)."""
        before = self.file_bytes()
        with self._guard, self._errors():
            conn = self._connection()
            for table in ("ops", "dead_letters", "leases", "counters", "sender_state"):
                conn.execute(f"VACUUM FULL {_S}.{table}")
        return before, self.file_bytes()

    # ---- the whole store, for operators (``key_fp=None``: every key) ----

    def all_dead_letters(self, limit: Optional[int], key_fp: Optional[str]) -> list[DeadLetter]:
        where, params = _key_filter(key_fp)
        rows = self._read(
            "SELECT id, op_id, kind, body, created_ms, failed_ms, attempts, status, reason, "
            f"key_fp FROM {_S}.dead_letters {where} ORDER BY id LIMIT %s",
            (*params, limit),
        )
        return [DeadLetter(r[0], r[1], _kind_name(r[2]), text_of(r[3]), *r[4:]) for r in rows]

    def key_reports(self, key_fp: Optional[str], now_ms: int) -> list[KeyReport]:
        where, params = _key_filter(key_fp)
        reports: dict[str, dict[str, Any]] = {}

        def report(fp: str) -> dict[str, Any]:
            return reports.setdefault(fp, {"key_fp": fp})

        for fp, kind, count, oldest in self._read(
            f"SELECT key_fp, kind, count(*), min(created_ms) FROM {_S}.ops {where} "
            "GROUP BY key_fp, kind",
            params,
        ):
            r = report(fp)
            r["identifies" if kind == IDENTIFY else "tracks"] = count
            r["oldest_ms"] = min(oldest, r.get("oldest_ms", oldest))
        for fp, owner, until, count in self._read(
            f"SELECT l.key_fp, l.owner, l.until_ms, (SELECT count(*) FROM {_S}.ops AS o WHERE "
            "o.key_fp = l.key_fp AND o.id BETWEEN l.first_id AND l.last_id) "
            f"FROM {_S}.leases AS l {where.replace('key_fp', 'l.key_fp')} "
            f"{'AND' if where else 'WHERE'} l.until_ms > %s",
            (*params, now_ms),
        ):
            if count:
                report(fp).update(leased=count, lease_owner=owner, lease_until_ms=until)
        for fp, count in self._read(
            f"SELECT key_fp, count(*) FROM {_S}.dead_letters {where} GROUP BY key_fp", params
        ):
            report(fp)["dead_letters"] = count
        for fp, count in self._read(
            f"SELECT key_fp, n FROM {_S}.counters {where} "
            f"{'AND' if where else 'WHERE'} name = 'evicted'",
            params,
        ):
            report(fp)["evicted"] = count
        for fp, *state in self._read(
            "SELECT key_fp, pid, last_attempt_ms, last_success_ms, last_error, last_error_ms "
            f"FROM {_S}.sender_state {where}",
            params,
        ):
            report(fp)["sender"] = tuple(state)
        return [KeyReport.from_parts(r) for _, r in sorted(reports.items())]

    def queued(self, limit: int, key_fp: Optional[str]) -> list[Any]:
        """``(id, key_fp, kind, body, created_ms, attempts)`` of the next ops: each key's in
        delivery (id) order, the keys' merged by age."""
        where, params = _key_filter(key_fp)
        return self._read(
            f"SELECT id, key_fp, kind, convert_to(body, 'UTF8'), created_ms, attempts FROM "
            f"(SELECT *, row_number() OVER (PARTITION BY key_fp ORDER BY id) AS n FROM "
            f"{_S}.ops {where}) AS q WHERE n <= %s ORDER BY created_ms, id LIMIT %s",
            (*params, limit, limit),
        )

    def requeue(self, ids: Optional[Sequence[int]], key_fp: Optional[str]) -> int:
        """Put dead letters back at the end of their key's queue, bodies unchanged."""
        where, params = _dead_letter_filter(ids, key_fp)
        with self._write() as conn:
            return int(
                conn.execute(
                    f"WITH back AS (DELETE FROM {_S}.dead_letters {where} "
                    "RETURNING id, key_fp, kind, body, created_ms) "
                    f"INSERT INTO {_S}.ops (key_fp, kind, body, created_ms) "
                    "SELECT key_fp, kind, body, created_ms FROM back ORDER BY id",
                    params,
                ).rowcount
            )

    def purge(self, ids: Optional[Sequence[int]], key_fp: Optional[str]) -> int:
        where, params = _dead_letter_filter(ids, key_fp)
        with self._write() as conn:
            return int(conn.execute(f"DELETE FROM {_S}.dead_letters {where}", params).rowcount)


# Rows of one key named by their ids: the range bounds the index scan (a list alone can
# lead the planner to scan the key's whole queue and test each row against it).
_IDS = "key_fp = %s AND id BETWEEN %s AND %s AND id = ANY(%s)"


def _ids(ids: list[int]) -> tuple[int, int, list[int]]:
    return (min(ids), max(ids), ids) if ids else (1, 0, ids)


def _kind_name(kind: int) -> str:
    return "identify" if kind == IDENTIFY else "track"


def _key_filter(key_fp: Optional[str]) -> tuple[str, tuple[Any, ...]]:
    return ("WHERE key_fp = %s", (key_fp,)) if key_fp else ("", ())


def _dead_letter_filter(
    ids: Optional[Sequence[int]], key_fp: Optional[str]
) -> tuple[str, tuple[Any, ...]]:
    clauses: list[str] = ["TRUE"]
    params: list[Any] = []
    if ids is not None:
        clauses.append("id = ANY(%s)")
        params.append(list(ids))
    if key_fp:
        clauses.append("key_fp = %s")
        params.append(key_fp)
    return "WHERE " + " AND ".join(clauses), tuple(params)


class PgSenderLock:
    """Sender leadership for one key across every host: a session-level advisory lock, on a
    connection of its own, that PostgreSQL releases when that connection ends (its process
    died, its host went away). The same interface as the file lock (``_lock.SenderLock``)."""

    def __init__(self, url: str, key_fp: str, timeout: float = 5.0) -> None:
        self.path = f"the sender lock of key {key_fp} in {redacted(url)}"
        self._key_fp = key_fp
        self._conn = _Connected(url, timeout)
        self._held = False

    def try_acquire(self) -> Optional[bool]:
        """``True``: we lead. ``False``: another sender leads. ``None``: the database cannot
        be reached for the lock (the caller falls back to leases alone)."""
        try:
            ((taken,),) = self._conn._read(f"SELECT pg_try_advisory_lock({_LEAD})", (self._key_fp,))
        except StoreError as exc:
            log.debug("cannot take %s: %s", self.path, exc)
            self._held = False
            return None
        self._held = bool(taken)
        return self._held

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            self._conn._read(f"SELECT pg_advisory_unlock({_LEAD})", (self._key_fp,))
        except StoreError:
            # The connection is gone, and the lock with it.
            log.debug("releasing %s failed", self.path, exc_info=True)

    def after_fork_in_child(self) -> None:
        """Forget the parent's connection (and its lock) without touching it."""
        self._held = False
        self._conn.after_fork_in_child()

    def close(self) -> None:
        """End the lock's connection (and the lock, if held)."""
        self._held = False
        self._conn.close()


def _after_fork_in_child() -> None:
    for connected in list(_live):
        connected.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
