"""The queues: one table of wire rows per API key in the outbox file, appended to by the
writer, claimed, acknowledged and dead-lettered by the sender, and looked at by operators.

One SQLite file in WAL mode holds a queue of ops per API key (table ``"ops:<fingerprint>"``),
the ops the server refused (``dead_letters``, bounded) and a few counters. Each row of a queue
is the final wire JSON of one op; a client only ever sees and sends its own key's queue. A
sender claims a run of rows from the head of its queue with a lease (one row of ``leases``:
owner, ids, wall clock expiry) so that no two senders, threads or processes, send the same
rows at once.
"""

from __future__ import annotations

import heapq
import itertools
import sqlite3
import time
from collections.abc import Sequence
from typing import Any, Optional

from .._wire import EVENT_SEPARATOR, IDENTIFY, utc_now_ms
from ._claims import DAMAGED, EXPIRED, MAX_LEASE_MS, NO_LEASE, Lease, Plan
from ._connection import Connection
from ._records import (
    Claim,
    DeadLetter,
    KeyReport,
    OutboxStats,
    Row,
    Run,
    dead_letter_filters,
    int_or_zero,
    run_of,
    sound,
    text_of,
)
from ._schema import QUEUE_PREFIX, queue_schema, queue_table

# The most rows one append evicts; a bulk append of more rows evicts as many as it added.
_EVICT_PER_CALL = 1_000
# How long an append trusts the oldest id it last saw as a lower bound of the queue's.
_TRUST_OLDEST = 1.0


class Outbox(Connection):
    """One key's queue in the outbox file, and the file's views for operators."""

    def _opened(self) -> None:
        # At construction, and on every new connection (another file, maybe, or the same
        # one changed meanwhile): what the queue's appends remember of the file starts over.
        self._insert = f"INSERT INTO {self._table} (kind, body, created_ms) VALUES (?, ?, ?)"
        # The body as bytes: a row that is not valid UTF-8 must not fail the whole read.
        self._head_sql = (
            "SELECT id, kind, CAST(body AS BLOB), created_ms, attempts "
            f"FROM {self._table} ORDER BY id LIMIT ?"
        )
        # The head window summed up in one pass, in SQLite: how many rows, the first and
        # the last id, the bodies joined in id order (the subquery's ORDER BY, which an
        # aggregate over it keeps), the range of its kinds, ages and attempts, whether every
        # body is one braced object, and the last row's body (a lease checks it). A window
        # of sound tracks young enough to send is the claim's run as it stands.
        self._window_sql = (
            "SELECT *, "
            f"(SELECT CAST(body AS BLOB) FROM {self._table} WHERE id = last) FROM ("
            f"SELECT count(*), (SELECT min(id) FROM {self._table}) AS first, max(id) AS last, "
            f"CAST(group_concat(body, '{EVENT_SEPARATOR}') AS BLOB), min(kind), max(kind), "
            "min(created_ms), max(created_ms), max(attempts), min(braced) FROM ("
            "SELECT id, body, kind, created_ms, attempts, "
            "substr(CAST(body AS BLOB), 1, 1) = X'7B' "
            "AND substr(CAST(body AS BLOB), -1, 1) = X'7D' AS braced "
            f"FROM {self._table} ORDER BY id LIMIT ?))"
        )
        self._lease_sql = "SELECT owner, first_id, last_id, until_ms FROM leases WHERE key_fp = ?"
        # What stats() reads: the rows up to the end of the queue's gaps (counted), the
        # first id after it and the newest id, the identifies (their own index), the head
        # row's creation time and the key's dead letters.
        self._stats_sql = (
            f"SELECT (SELECT count(*) FROM {self._table} WHERE id <= g.through), "
            f"(SELECT min(id) FROM {self._table} WHERE id > g.through), "
            f"(SELECT max(id) FROM {self._table}), "
            f"(SELECT count(*) FROM {self._table} WHERE kind = {IDENTIFY}), "
            f"(SELECT created_ms FROM {self._table} ORDER BY id LIMIT 1), "
            "(SELECT count(*) FROM dead_letters WHERE key_fp = ?) "
            "FROM (SELECT coalesce(max(through_id), 0) AS through FROM gaps WHERE key_fp = ?) AS g"
        )
        # A lower bound on the oldest id of the queue, for as long as it is trusted: an
        # append whose id is within max_queue_size of it cannot need to evict.
        self._oldest_seen = 0
        self._oldest_until = 0.0
        self._last_id = 0  # of this connection's last append
        # Eviction's memory of rows it had to leave (leased when it ran): the lease on the
        # oldest row then (id, owner, expiry) and how far it evicted, so that a full queue
        # does not rescan them on every append. An id can come back (a queue that empties
        # starts again at 1), with the same owner: the expiry tells one lease from another.
        self._evict_hint: tuple[tuple[int, Optional[str], int], int] = ((0, None, 0), 0)

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
            op_id = self._last_id = self._insert_one(self._insert, (kind, body, created_ms))
            self._note_id(op_id)
            if self._within_bound(op_id, max_queue_size):
                return op_id, 0
            # Other processes appended meanwhile: evict now, in a transaction of its own.
            with self._write() as conn:
                return op_id, self._bound(conn, op_id, max_queue_size, 1)

    def _note_id(self, op_id: int) -> None:
        if op_id <= self._oldest_seen:
            self._oldest_until = 0.0  # the queue emptied and its ids started again

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
        self._note_id(newest)
        cutoff = newest - max_queue_size
        if cutoff <= 0:
            return 0
        head = conn.execute(f"SELECT id FROM {self._table} ORDER BY id LIMIT 1").fetchall()
        if not head or head[0][0] > cutoff:
            self._see_oldest(head[0][0] if head else None, newest)
            return 0
        oldest = head[0][0]
        # Rows under a live lease are on their way to the server: evicting them would count
        # as lost ops that are delivered. They go only if their sender gives them back.
        lease = self._lease_row(conn)
        if not lease.live(utc_now_ms()):
            lease = NO_LEASE
        held = (oldest, lease.owner, lease.until_ms) if lease.covers(oldest) else (oldest, None, 0)
        hint_lease, hint_through = self._evict_hint
        if held[1] is not None and held == hint_lease and cutoff <= hint_through:
            return 0  # what is left at or below the bound is what a sender is delivering
        top = min(cutoff + max_queue_size // 100, oldest + max(added, _EVICT_PER_CALL) - 1)
        evicted = conn.execute(
            f"DELETE FROM {self._table} WHERE id <= ? AND id NOT BETWEEN ? AND ?",
            (top, lease.first, lease.last),
        ).rowcount
        self._evict_hint = (held, top)
        if evicted:
            self._bump(conn, "evicted", evicted)
            oldest = self._deleted_through(conn, top)
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

    def _lease_row(self, conn: sqlite3.Connection) -> Lease:
        rows = conn.execute(self._lease_sql, (self.key_fp,)).fetchall()
        return Lease(*rows[0]) if rows else NO_LEASE

    def _deleted_through(self, conn: sqlite3.Connection, through: int) -> Optional[int]:
        """Rows with ids up to ``through`` have just left the queue: where an older row
        stayed, the queue may now have a gap at or below ``through`` (see ``gaps``).
        Returns the queue's oldest id (None: empty)."""
        (oldest,) = conn.execute(f"SELECT min(id) FROM {self._table}").fetchone()
        if oldest is None:
            conn.execute("DELETE FROM gaps WHERE key_fp = ?", (self.key_fp,))
        elif oldest < through:
            conn.execute(
                "INSERT INTO gaps (key_fp, through_id) VALUES (?, ?) ON CONFLICT (key_fp) "
                "DO UPDATE SET through_id = max(through_id, excluded.through_id)",
                (self.key_fp, through),
            )
        return None if oldest is None else int(oldest)

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
        plan = Plan(owner, max_bytes, max_age_ms, now_ms, take_over)
        with self._guard:
            # Read outside any write transaction (appends go on meanwhile), then lease the
            # run in one statement, if the head is still as read. Mostly the head window is
            # the run as it stands, summed up by SQLite; otherwise its rows are read and
            # planned here. Anything to move to the dead letters, or a head that moved,
            # takes one transaction for the whole claim.
            leases = self._read(self._lease_sql, (self.key_fp,))
            lease = Lease(*leases[0]) if leases else NO_LEASE
            ((*summary, last_body),) = self._read(self._window_sql, (max_rows,))
            if not summary[0]:
                return Claim(None)
            run = plan.quick(summary, lease)
            if run is not None and self._lease(run, last_body, plan, lease_ms):
                return Claim(run)
            batch, expired, damaged = plan.run(self._read(self._head_sql, (max_rows,)), lease)
            if (
                batch
                and not expired
                and not damaged
                and self._lease(run_of(batch), batch[-1].body, plan, lease_ms)
            ):
                return Claim(run_of(batch))
            with self._write() as conn:
                head = conn.execute(self._head_sql, (max_rows,)).fetchall()
                batch, expired, damaged = plan.run(head, self._lease_row(conn))
                pruned = 0
                for ids, reason in ((expired, EXPIRED), (damaged, DAMAGED)):
                    for op_id in ids:
                        pruned += self._move_to_dead_letters(
                            conn, op_id, op_id, None, None, reason, now_ms
                        )[1]
                if batch:
                    conn.execute(
                        "INSERT INTO leases (key_fp, owner, first_id, last_id, until_ms) "
                        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_fp) DO UPDATE SET "
                        "owner = excluded.owner, first_id = excluded.first_id, "
                        "last_id = excluded.last_id, until_ms = excluded.until_ms",
                        (self.key_fp, owner, batch[0].id, batch[-1].id, now_ms + lease_ms),
                    )
            return Claim(run_of(batch) if batch else None, len(expired), len(damaged), pruned)

    def _lease(self, run: Run, last_body: bytes, plan: Plan, lease_ms: int) -> bool:
        """Lease ``run``, read before, in one statement; ``False`` if the head is not as
        read any more (rows evicted, leased by another sender, or gone and made again with
        the same ids: a row's id comes back only once every row after it is gone, so the
        last one of the run tells)."""
        # The lease row is replaced only where this claim may take the rows: a lease of
        # our own, one that no longer runs, one over other rows, or one taken over.
        free = (
            ""
            if plan.take_over
            else (
                " WHERE leases.owner = excluded.owner OR NOT (leases.until_ms > ? "
                "AND leases.until_ms <= ?) OR leases.last_id < excluded.first_id "
                "OR leases.first_id > excluded.last_id"
            )
        )
        args = () if plan.take_over else (plan.now_ms, plan.now_ms + MAX_LEASE_MS)
        return (
            self._write_one(
                "INSERT INTO leases (key_fp, owner, first_id, last_id, until_ms) "
                f"SELECT ?, ?, ?, ?, ? WHERE (SELECT count(*) FROM {self._table} "
                "WHERE id BETWEEN ? AND ?) = ? AND (SELECT CAST(body AS BLOB) FROM "
                f"{self._table} WHERE id = ?) = ? "
                "ON CONFLICT (key_fp) DO UPDATE SET owner = excluded.owner, "
                "first_id = excluded.first_id, last_id = excluded.last_id, "
                f"until_ms = excluded.until_ms{free}",
                (
                    self.key_fp,
                    plan.owner,
                    run.first,
                    run.last,
                    plan.now_ms + lease_ms,
                    run.first,
                    run.last,
                    run.ops,
                    run.last,
                    last_body,
                    *args,
                ),
            )
            == 1
        )

    def rows(self, first_id: int, last_id: int) -> list[Row]:
        """The queued rows with ids ``first_id``..``last_id`` (of a run we leased), in order;
        a row no longer sound (damaged since) ends the list."""
        rows = []
        for row in self._read(
            f"SELECT id, kind, CAST(body AS BLOB), created_ms, attempts FROM {self._table} "
            "WHERE id BETWEEN ? AND ? ORDER BY id",
            (first_id, last_id),
        ):
            if not sound(*row[1:]):
                break
            rows.append(Row(*row))
        return rows

    def _ours(self, first_id: int, last_id: int, owner: str) -> tuple[str, tuple[Any, ...]]:
        """``WHERE`` the rows ``first_id``..``last_id`` that ``owner``'s lease still covers:
        what a sender does with the rows it leased names them by ids and by its lease, so
        that rows evicted since, or taken over by another sender, are not touched (no lease:
        the bounds are NULL, and no row is)."""
        lease = "(SELECT {} FROM leases WHERE key_fp = ? AND owner = ?)"
        return (
            f"WHERE id BETWEEN max(?, {lease.format('first_id')}) "
            f"AND min(?, {lease.format('last_id')})",
            (first_id, self.key_fp, owner, last_id, self.key_fp, owner),
        )

    def ack(self, first_id: int, last_id: int, owner: str) -> int:
        """Delete a delivered run of rows that ``owner`` still holds; the lease ends with
        the last of its rows."""
        with self._write(same_file=True) as conn:
            where, params = self._ours(first_id, last_id, owner)
            deleted = conn.execute(f"DELETE FROM {self._table} {where}", params).rowcount
            if deleted:
                self._deleted_through(conn, last_id)
            self._end_lease(conn, owner)
            return int(deleted)

    def _end_lease(self, conn: sqlite3.Connection, owner: str, *, settled: bool = True) -> None:
        """End ``owner``'s lease: once none of its rows is left (``settled``), or at once."""
        left = (
            f" AND NOT EXISTS (SELECT 1 FROM {self._table} "
            "WHERE id BETWEEN leases.first_id AND leases.last_id)"
        )
        conn.execute(
            f"DELETE FROM leases WHERE key_fp = ? AND owner = ?{left if settled else ''}",
            (self.key_fp, owner),
        )

    def renew(self, first_id: int, last_id: int, owner: str, until_ms: int) -> int:
        """Extend our lease on a run of rows; 0 if we no longer hold it."""
        return self._write_one(
            "UPDATE leases SET until_ms = ? WHERE key_fp = ? AND owner = ? "
            "AND first_id <= ? AND last_id >= ?",
            (until_ms, self.key_fp, owner, first_id, last_id),
        )

    def release(self, first_id: int, last_id: int, owner: str, *, failed: bool) -> None:
        """Give back a leased run, counting one more failed attempt if ``failed``."""
        with self._write(same_file=True) as conn:
            if failed:
                where, params = self._ours(first_id, last_id, owner)
                conn.execute(f"UPDATE {self._table} SET attempts = attempts + 1 {where}", params)
            self._end_lease(conn, owner, settled=False)

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
        if owner is None:
            where, rows = "WHERE id BETWEEN ? AND ?", (first_id, last_id)
        else:
            where, rows = self._ours(first_id, last_id, owner)
        conn.execute(
            "INSERT INTO dead_letters "
            "(key_fp, op_id, kind, body, created_ms, failed_ms, attempts, status, reason) "
            f"SELECT ?, id, kind, body, created_ms, ?, attempts + 1, ?, ? FROM {self._table} "
            f"{where} ORDER BY id",
            (self.key_fp, now_ms, status, reason, *rows),
        )
        moved = conn.execute(f"DELETE FROM {self._table} {where}", rows).rowcount
        if moved:
            self._deleted_through(conn, last_id)
        if owner is not None:
            self._end_lease(conn, owner)
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

    def span(self) -> int:
        """How many ids lie between this key's oldest and newest queued op, both counted:
        at no cost on any backlog, the number of queued ops, or more where rows in the
        middle left first (0: none queued)."""
        ((first, last),) = self._read(
            f"SELECT (SELECT min(id) FROM {self._table}), (SELECT max(id) FROM {self._table})"
        )
        return int(last) - int(first) + 1 if first is not None and last is not None else 0

    def has_pending(self) -> bool:
        """Whether this key has any op queued (one look at the head of the index)."""
        ((any_row,),) = self._read(f"SELECT EXISTS (SELECT 1 FROM {self._table})")
        return bool(any_row)

    def head(self) -> Optional[tuple[int, Optional[str], int]]:
        """``(id, lease owner, lease expiry)`` of this key's oldest queued op (``None, 0``:
        not leased)."""
        rows = self._read(
            f"SELECT h.id, l.owner, l.first_id, l.last_id, l.until_ms FROM (SELECT id FROM "
            f"{self._table} ORDER BY id LIMIT 1) AS h LEFT JOIN leases AS l ON l.key_fp = ?",
            (self.key_fp,),
        )
        if not rows:
            return None
        op_id, owner, first, last, until = rows[0]
        if owner is None or not first <= op_id <= last:
            return op_id, None, 0
        return op_id, owner, int(until)

    def counters(self) -> dict[str, int]:
        """This key's running totals: ``evicted``, ``refused`` (moved to the dead letters)
        and ``pruned`` (dead letters removed by ``max_dead_letters``)."""
        rows = self._read("SELECT name, n FROM counters WHERE key_fp = ?", (self.key_fp,))
        return {str(name): int(n) for name, n in rows}

    def stats(self) -> OutboxStats:
        """This key's counts, at about the cost of a few index lookups on any backlog: one
        read, so one snapshot of the file."""
        ((gapped, first_after, last, identifies, oldest, dead),) = self._read(
            self._stats_sql, (self.key_fp, self.key_fp)
        )
        # Rows up to the gaps' end are counted one by one (a few, in practice: a leased
        # run); after it, ids run without a gap to the newest.
        pending = gapped + (last - first_after + 1 if first_after is not None else 0)
        counters = self.counters()
        return OutboxStats(
            pending_tracks=pending - identifies,
            pending_identifies=identifies,
            oldest_created_ms=oldest,
            dead_letters=int(dead),
            evicted=counters.get("evicted", 0),
            schema_version=self.schema_version(),
            refused=counters.get("refused", 0),
            dead_letters_pruned=counters.get("pruned", 0),
            lost=self.lost,
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
            for owner, until, count in self._read(
                f"SELECT owner, until_ms, (SELECT count(*) FROM {table} WHERE id BETWEEN "
                "first_id AND last_id) FROM leases WHERE key_fp = ? AND until_ms > ?",
                (fp, now_ms),
            ):
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
        senders = self._read(
            "SELECT key_fp, pid, last_attempt_ms, last_success_ms, last_error, "
            f"last_error_ms FROM sender_state {where}",
            params,
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
                keys = conn.execute(
                    f"SELECT DISTINCT key_fp FROM dead_letters {where}", params
                ).fetchall()
                for (fp,) in keys:
                    for statement in queue_schema(fp):
                        conn.execute(statement)
                    table = queue_table(fp)
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
