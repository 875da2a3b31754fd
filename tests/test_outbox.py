"""Direct tests of the SQLite outbox (``whisperr_durable._store.Outbox``) on real files."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, NamedTuple, Optional

import pytest
from conftest import (
    raw,
    run_forked,
)

from whisperr_durable._store import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    Outbox,
    Row,
    Run,
    StoreError,
    queue_table,
    run_of,
)
from whisperr_durable._wire import IDENTIFY, TRACK, utc_now_ms

KEY = "fp-aaaa"
OTHER_KEY = "fp-bbbb"
NOW = 1_700_000_000_000
DAY_MS = 86_400_000
MAX_AGE_MS = 30 * DAY_MS
LEASE_MS = 30_000
BIG_QUEUE = 1_000_000
REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- helpers ----


def body(n: int, pad: int = 0) -> str:
    return json.dumps({"n": n, "pad": "x" * pad})


def put(
    ob: Outbox,
    n: int,
    *,
    kind: int = TRACK,
    created_ms: int = NOW,
    max_queue_size: int = BIG_QUEUE,
) -> int:
    op_id, evicted = ob.append(kind, body(n), created_ms, max_queue_size)
    assert evicted == 0
    return op_id


def claim(
    ob: Outbox,
    owner: str = "owner-a",
    *,
    now_ms: int = NOW,
    max_rows: int = 500,
    max_bytes: int = 512 * 1024,
    lease_ms: int = LEASE_MS,
    max_age_ms: int = MAX_AGE_MS,
) -> Claimed:
    c = ob.claim(
        owner,
        max_rows=max_rows,
        max_bytes=max_bytes,
        lease_ms=lease_ms,
        max_age_ms=max_age_ms,
        now_ms=now_ms,
    )
    rows = ob.rows(c.run.first, c.run.last) if c.run else []
    if c.run:
        # The run the sender sends is exactly its rows, in id order, joined for the wire.
        assert c.run == run_of(rows)
    return Claimed(rows, c.run, c.expired, c.damaged, c.pruned)


class Claimed(NamedTuple):
    """A claim, with the rows of its run."""

    rows: list[Row]
    run: Optional[Run]
    expired: int
    damaged: int
    pruned: int


def ids(c: Claimed) -> list[int]:
    return [row.id for row in c.rows]


def raw_ops(path: str, key_fp: str = KEY) -> dict[int, tuple[int, Optional[str], int]]:
    """id -> (attempts, lease owner, lease expiry) for every row queued for ``key_fp``
    (``None, 0``: under no lease)."""
    rows = raw(
        path,
        f"SELECT q.id, q.attempts, l.owner, coalesce(l.until_ms, 0) FROM {queue_table(key_fp)} "
        "AS q LEFT JOIN leases AS l ON l.key_fp = ? AND q.id BETWEEN l.first_id AND l.last_id",
        (key_fp,),
    )
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def lease_rows(path: str, key_fp: str, owner: str, until_ms: int, first: int, last: int) -> None:
    """Write another sender's lease on rows ``first``..``last``, as its claim does."""
    raw(
        path,
        "INSERT OR REPLACE INTO leases (key_fp, owner, first_id, last_id, until_ms) "
        "VALUES (?, ?, ?, ?, ?)",
        (key_fp, owner, first, last, until_ms),
    )


def raw_bodies(path: str, key_fp: str = KEY) -> list[tuple[int, str]]:
    """(id, body) of every row queued for ``key_fp``, in id order."""
    return raw(path, f"SELECT id, body FROM {queue_table(key_fp)} ORDER BY id")


def tables(path: str) -> set[str]:
    return {name for (name,) in raw(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}


def held(ob: Outbox, owner: str = "owner-a", **kwargs: Any) -> list[int]:
    """Claim the head batch for ``owner`` (as a sender does before ack or dead_letter)."""
    return ids(claim(ob, owner, **kwargs))


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def outbox(db_path: str) -> Iterator[Outbox]:
    ob = Outbox(db_path, KEY)
    try:
        yield ob
    finally:
        ob.close()


# ---- creation ----


def test_creates_missing_parent_0700_and_private_files_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.db"
    with umask(0o022):
        ob = Outbox(str(path), KEY)
        try:
            ob.open()
            put(ob, 1)  # makes SQLite create the -wal and -shm files
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            # SQLite gives the WAL and shared-memory files the database file's mode.
            for suffix in ("-wal", "-shm"):
                side = Path(str(path) + suffix)
                assert side.exists(), suffix
                assert stat.S_IMODE(os.stat(side).st_mode) == 0o600, suffix
        finally:
            ob.close()


def test_nested_missing_directories_leaf_is_0700(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "outbox.db"
    with umask(0o022):
        ob = Outbox(str(path), KEY)
        try:
            ob.open()
        finally:
            ob.close()
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o666, 0o604])
def test_an_existing_file_of_ours_that_is_too_open_is_made_private(db_path: str, mode: int) -> None:
    # Another local user could read the queued emails, or add rows we would deliver.
    Path(db_path).touch()
    os.chmod(db_path, mode)
    ob = Outbox(db_path, KEY)
    try:
        ob.open()
        ob.append(TRACK, body(0), NOW, BIG_QUEUE)
    finally:
        ob.close()
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600


def test_wal_mode_and_schema_version_seen_by_another_connection(outbox: Outbox) -> None:
    outbox.open()
    assert raw(outbox.path, "PRAGMA journal_mode") == [("wal",)]
    assert raw(outbox.path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert outbox.stats().schema_version == SCHEMA_VERSION


@pytest.mark.parametrize(("fsync", "expected"), [(True, 2), (False, 1)])
def test_synchronous_full_with_fsync_normal_without(
    db_path: str, fsync: bool, expected: int
) -> None:
    ob = Outbox(db_path, KEY, fsync=fsync)
    try:
        # 2 is FULL, 1 is NORMAL (per connection, so read through the outbox's own).
        assert ob._connection().execute("PRAGMA synchronous").fetchone()[0] == expected
    finally:
        ob.close()


def test_newer_schema_version_raises_store_error(db_path: str) -> None:
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute("CREATE TABLE future (x)")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")  # an outbox, of a later SDK
    ob = Outbox(db_path, KEY, store_timeout=0.05)
    try:
        with pytest.raises(StoreError, match="schema version"):
            ob.open()
        with pytest.raises(StoreError):
            ob.append(TRACK, body(1), NOW, BIG_QUEUE)
    finally:
        ob.close()
    # The file was not migrated or damaged.
    assert raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert raw(db_path, "SELECT name FROM sqlite_master WHERE name = 'ops'") == []


def test_a_file_that_is_not_a_database_is_moved_aside(db_path: str) -> None:
    garbage = b"this is not a sqlite file at all, just some text" * 100
    Path(db_path).write_bytes(garbage)
    reports: list[str] = []
    ob = Outbox(db_path, KEY, store_timeout=0.05, report=lambda _, text: reports.append(text))
    try:
        ob.append(TRACK, body(1), NOW, BIG_QUEUE)
        assert ob.stats().pending == 1
    finally:
        ob.close()
    asides = sorted(p.name for p in Path(db_path).parent.glob("outbox.db.corrupt-*"))
    assert len(asides) == 1, asides
    assert (Path(db_path).parent / asides[0]).read_bytes() == garbage  # kept for inspection
    assert len(reports) == 1 and asides[0] in reports[0]


def test_corruption_found_in_use_moves_the_file_aside(db_path: str) -> None:
    first = Outbox(db_path, KEY)
    for n in range(200):
        put(first, n)
    first.checkpoint(truncate=True)
    first.close()
    # A valid header over broken table pages: the file opens, the first real read fails.
    with open(db_path, "r+b") as handle:
        handle.seek(4096)
        handle.write(b"garbage!" * (os.path.getsize(db_path) // 8))  # every page but the first
    reports: list[tuple[str, str]] = []
    ob = Outbox(
        db_path, KEY, store_timeout=0.05, report=lambda kind, text: reports.append((kind, text))
    )
    try:
        with pytest.raises(StoreError, match="malformed"):
            ob.stats()
        put(ob, 1)  # a fresh outbox
        assert ob.stats().pending == 1
    finally:
        ob.close()
    (aside,) = Path(db_path).parent.glob("outbox.db.corrupt-*")
    # What the file held is counted as lost (here: unreadable, so an unknown number), and
    # the move is reported.
    assert [kind for kind, _ in reports] == ["store_error", "dropped"]
    assert str(aside) in reports[0][1] and "unknown number" in reports[1][1]


def test_reopening_keeps_rows(db_path: str) -> None:
    ob = Outbox(db_path, KEY)
    first = [put(ob, n, created_ms=NOW + n) for n in range(3)]
    put(ob, 3, kind=IDENTIFY)
    ob.close()

    again = Outbox(db_path, KEY)
    try:
        stats = again.stats()
        assert (stats.pending_tracks, stats.pending_identifies) == (3, 1)
        c = claim(again)
        assert ids(c) == first
        assert [row.body for row in c.rows] == [body(n).encode() for n in range(3)]
        assert [row.created_ms for row in c.rows] == [NOW, NOW + 1, NOW + 2]
        assert again.last_id() == first[-1] + 1
    finally:
        again.close()


# ---- append ----


def test_append_returns_increasing_ids(outbox: Outbox) -> None:
    got = [put(outbox, n) for n in range(5)]
    assert got == sorted(got)
    assert len(set(got)) == 5
    assert outbox.last_id() == got[-1]


def test_ids_restart_only_in_an_empty_queue_and_new_ids_follow_every_queued_id(
    outbox: Outbox,
) -> None:
    first = [put(outbox, n) for n in range(3)]
    assert first == [1, 2, 3]
    assert held(outbox, max_rows=2) == first[:2]
    assert outbox.ack(first[0], first[1], "owner-a") == 2
    # One row still queued: the next id follows it, it never fills the freed ids.
    assert put(outbox, 3) == 4
    assert held(outbox) == [3, 4]
    assert outbox.ack(3, 4, "owner-a") == 2
    assert outbox.stats().pending == 0
    assert outbox.last_id() == 0
    # An empty queue starts again at 1, after an ack ...
    assert put(outbox, 4) == 1
    assert held(outbox) == [1]
    assert outbox.dead_letter(1, 1, "owner-a", 400, "bad", NOW) == (1, 0)
    # ... and after a dead letter.
    assert put(outbox, 5) == 1
    assert put(outbox, 6) == 2
    outbox.close()
    # Also across a reopen of the file: ids go on above the queued rows.
    again = Outbox(outbox.path, KEY)
    try:
        assert put(again, 7) == 3
        assert [r[0] for r in raw_bodies(again.path)] == [1, 2, 3]
        assert [r[1] for r in raw_bodies(again.path)] == [body(5), body(6), body(7)]
    finally:
        again.close()


def test_new_ids_are_above_every_queued_id_whatever_was_deleted(outbox: Outbox) -> None:
    for n in range(5):
        put(outbox, n)
    assert held(outbox) == [1, 2, 3, 4, 5]
    # A hole in the middle and the newest row gone: never reused below a queued row.
    assert outbox.ack(2, 3, "owner-a") == 2
    assert outbox.ack(5, 5, "owner-a") == 1
    assert sorted(raw_ops(outbox.path)) == [1, 4]
    assert put(outbox, 9) == 5  # max(id) + 1: above 4, the newest queued id
    assert [r[1] for r in raw_bodies(outbox.path)] == [body(0), body(3), body(9)]  # FIFO kept


@pytest.mark.parametrize("stale_call", ["ack", "dead_letter"])
def test_a_stale_ack_or_dead_letter_never_touches_new_rows_with_the_same_ids(
    outbox: Outbox, stale_call: str
) -> None:
    old = [put(outbox, n) for n in range(3)]
    assert held(outbox, "owner-a", lease_ms=1000) == old
    # owner-a stalls past its lease; owner-b takes the rows over and delivers them.
    assert held(outbox, "owner-b", now_ms=NOW + 1001) == old
    assert outbox.ack(old[0], old[-1], "owner-b") == 3
    # The queue emptied, so new rows get the very same ids; owner-b claims some of them.
    new = [put(outbox, 10 + n) for n in range(4)]
    assert new[:3] == old
    assert held(outbox, "owner-b", now_ms=NOW + 1002, max_rows=2) == new[:2]
    before = raw_ops(outbox.path)
    # owner-a wakes up and reports on its old batch: the ids now name other rows.
    if stale_call == "ack":
        assert outbox.ack(old[0], old[-1], "owner-a") == 0
    else:
        assert outbox.dead_letter(old[0], old[-1], "owner-a", 400, "bad", NOW) == (0, 0)
    assert raw_ops(outbox.path) == before
    assert [r[1] for r in raw_bodies(outbox.path)] == [body(10 + n) for n in range(4)]
    assert outbox.dead_letters() == []
    assert outbox.stats().pending == 4


@pytest.mark.parametrize("call", ["ack", "dead_letter"])
def test_ack_and_dead_letter_touch_only_rows_the_owner_holds(outbox: Outbox, call: str) -> None:
    all_ids = [put(outbox, n) for n in range(4)]
    assert held(outbox, "owner-a", max_rows=2) == all_ids[:2]
    before = raw_ops(outbox.path)

    def run(owner: str) -> int:
        if call == "ack":
            return outbox.ack(all_ids[0], all_ids[-1], owner)
        return outbox.dead_letter(all_ids[0], all_ids[-1], owner, 400, "bad", NOW)[0]

    # Another owner's call, over held and unclaimed rows alike, changes nothing.
    assert run("owner-b") == 0
    assert raw_ops(outbox.path) == before
    assert outbox.dead_letters() == []
    # The holder's call over the whole range takes its two rows, not the unclaimed two.
    assert run("owner-a") == 2
    assert sorted(raw_ops(outbox.path)) == all_ids[2:]
    assert raw_ops(outbox.path) == {i: before[i] for i in all_ids[2:]}
    expected_dead = all_ids[:2] if call == "dead_letter" else []
    assert [d.op_id for d in outbox.dead_letters()] == expected_dead
    # Unclaimed rows are not taken by any owner's call.
    assert run("owner-a") == 0
    assert sorted(raw_ops(outbox.path)) == all_ids[2:]


def test_dead_letter_by_an_empty_owner_moves_no_unclaimed_rows(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(3)]
    assert outbox.ack(all_ids[0], all_ids[-1], "") == 0  # ack already gets this right
    assert outbox.dead_letter(all_ids[0], all_ids[-1], "", 400, "bad", NOW) == (0, 0)
    assert sorted(raw_ops(outbox.path)) == all_ids


def test_a_released_row_is_no_longer_the_owners_to_ack(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(2)]
    assert held(outbox) == all_ids
    outbox.release(all_ids[0], all_ids[-1], "owner-a", failed=False)
    assert outbox.ack(all_ids[0], all_ids[-1], "owner-a") == 0
    assert outbox.dead_letter(all_ids[0], all_ids[-1], "owner-a", 400, "bad", NOW) == (0, 0)
    assert sorted(raw_ops(outbox.path)) == all_ids
    assert outbox.dead_letters() == []


def test_eviction_keeps_newest_rows_and_counts_them(outbox: Outbox) -> None:
    results = [outbox.append(TRACK, body(n), NOW + n, 3) for n in range(5)]
    assert [evicted for _, evicted in results] == [0, 0, 0, 1, 1]
    all_ids = [op_id for op_id, _ in results]
    assert ids(claim(outbox)) == all_ids[2:]
    assert outbox.stats().pending == 3
    assert outbox.stats().evicted == 2
    assert outbox.stats().oldest_created_ms == NOW + 2

    # A smaller bound evicts several at once, oldest first.
    op_id, evicted = outbox.append(TRACK, body(9), NOW + 9, 2)
    assert evicted == 2
    remaining = raw_ops(outbox.path)
    assert sorted(remaining) == [all_ids[4], op_id]
    assert outbox.stats().evicted == 4


def test_eviction_never_touches_another_keys_rows(db_path: str) -> None:
    a = Outbox(db_path, KEY)
    b = Outbox(db_path, OTHER_KEY)
    try:
        a_ids = [put(a, n) for n in range(3)]
        b_results = [b.append(TRACK, body(100 + n), NOW, 2) for n in range(6)]
        assert [e for _, e in b_results] == [0, 0, 1, 1, 1, 1]
        # Ids are per key: B's run starts at 1 beside A's.
        assert a_ids == [1, 2, 3]
        assert [op_id for op_id, _ in b_results] == [1, 2, 3, 4, 5, 6]
        assert sorted(raw_ops(db_path, KEY)) == a_ids
        assert sorted(raw_ops(db_path, OTHER_KEY)) == [5, 6]
        assert a.stats().evicted == 0
        assert b.stats().evicted == 4
        # And A, bounded at its own size, evicts only its own oldest.
        _, evicted = a.append(TRACK, body(3), NOW, 3)
        assert evicted == 1
        assert ids(claim(a)) == [*a_ids[1:], a.last_id()]
        assert b.stats().pending == 2
        assert sorted(raw_ops(db_path, OTHER_KEY)) == [5, 6]
    finally:
        a.close()
        b.close()


def test_appends_of_another_connection_never_let_the_queue_outgrow_its_bound(
    db_path: str,
) -> None:
    # An append that expects to fit (a fast, single statement) finds, by the id it got,
    # that another process filled the queue meanwhile: it evicts all the same.
    a = Outbox(db_path, KEY)
    b = Outbox(db_path, KEY)
    try:
        assert [a.append(TRACK, body(n), NOW, 10)[1] for n in range(3)] == [0, 0, 0]
        for n in range(3, 23):
            b.append(TRACK, body(n), NOW, 10**9)
        op_id, evicted = a.append(TRACK, body(23), NOW, 10)
        assert (op_id, evicted) == (24, 14)
        assert sorted(raw_ops(db_path)) == list(range(15, 25))
        assert a.stats().evicted == 14

        # At a full queue of a larger bound, one append in a hundred evicts 1% at once; the
        # others fit in the room it made, and another process's appends still count.
        c = Outbox(db_path, OTHER_KEY)
        results = [c.append(TRACK, body(n), NOW, 200)[1] for n in range(260)]
        assert sum(results) == 60 and results.count(0) > 230
        assert len(raw_ops(db_path, OTHER_KEY)) == 200
        d = Outbox(db_path, OTHER_KEY)
        for n in range(5):
            d.append(TRACK, body(n), NOW, 10**9)
        c.append(TRACK, body(0), NOW, 200)
        assert len(raw_ops(db_path, OTHER_KEY)) <= 200
        c.close()
        d.close()
    finally:
        a.close()
        b.close()


def test_a_queue_that_empties_and_fills_again_keeps_its_bound(outbox: Outbox) -> None:
    # An append skips the eviction check when its id is well above the oldest id it saw;
    # once the queue empties, ids start again at 1 and that memory is void.
    for n in range(201):
        outbox.append(TRACK, body(n), NOW, 200)
    assert len(raw_ops(outbox.path)) == 198  # 1% evicted at once
    while True:
        c = claim(outbox)
        if not c.rows:
            break
        outbox.ack(c.rows[0].id, c.rows[-1].id, "owner-a")
    assert raw_ops(outbox.path) == {}
    sizes = []
    for n in range(210):
        outbox.append(TRACK, body(n), NOW, 200)
        sizes.append(outbox.stats().pending)
    assert max(sizes) == 200
    assert sizes[-1] >= 198


@contextmanager
def between_read_and_lease(outbox: Outbox, change: Any) -> Iterator[None]:
    """Run ``change`` (another process's doing) right after the claim's head is read,
    before its lease: the claim must then lease only what the file holds by then."""
    read = outbox._read
    changes = [change]

    def read_then_change(sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        rows = read(sql, params)
        if "ORDER BY id LIMIT" in sql and changes:
            changes.pop()()
        return rows

    outbox._read = read_then_change  # type: ignore[method-assign]
    try:
        yield
    finally:
        del outbox._read


def test_a_claim_takes_nothing_another_sender_leased_after_it_read_the_head(
    outbox: Outbox,
) -> None:
    first, second, third = (put(outbox, n) for n in range(3))

    def other_sender_leases_the_first_two() -> None:
        lease_rows(outbox.path, KEY, "owner-b", NOW + LEASE_MS, first, second)

    with between_read_and_lease(outbox, other_sender_leases_the_first_two):
        c = claim(outbox)
    assert c.rows == []  # the head is under owner-b's lease: nothing after it either
    assert raw_ops(outbox.path)[third] == (0, None, 0)
    assert [owner for _, owner, _ in raw_ops(outbox.path).values()] == [
        "owner-b",
        "owner-b",
        None,
    ]
    assert first in raw_ops(outbox.path)


def test_a_claim_never_sends_rows_that_were_replaced_after_it_read_them(
    outbox: Outbox,
) -> None:
    # Another sender delivered the whole queue and new ops took the same ids: the claim
    # must send the new rows (read again), never the old bodies under the new rows' lease.
    for n in range(3):
        put(outbox, n)
    table = queue_table(KEY)

    def delivered_elsewhere_and_refilled() -> None:
        raw(outbox.path, f"DELETE FROM {table}")
        for n in range(100, 103):
            raw(
                outbox.path,
                f"INSERT INTO {table} (kind, body, created_ms) VALUES (?, ?, ?)",
                (TRACK, body(n), NOW),
            )

    with between_read_and_lease(outbox, delivered_elsewhere_and_refilled):
        c = claim(outbox)
    assert ids(c) == [1, 2, 3]
    assert [json.loads(row.body)["n"] for row in c.rows] == [100, 101, 102]
    assert outbox.ack(1, 3, "owner-a") == 3
    assert raw_ops(outbox.path) == {}


def test_a_claim_leaves_rows_evicted_after_it_read_them(outbox: Outbox) -> None:
    for n in range(4):
        put(outbox, n)
    table = queue_table(KEY)

    def evicted_by_another_process() -> None:
        raw(outbox.path, f"DELETE FROM {table} WHERE id <= 2")

    with between_read_and_lease(outbox, evicted_by_another_process):
        c = claim(outbox)
    assert ids(c) == [3, 4]


def test_queue_size_stays_exact_after_acks_dead_letters_and_expiry(outbox: Outbox) -> None:
    limit = 4
    got = [outbox.append(TRACK, body(n), NOW, limit) for n in range(limit)]
    assert all(e == 0 for _, e in got)
    first, second, third, fourth = (op_id for op_id, _ in got)
    assert held(outbox, max_rows=1) == [first]
    assert outbox.ack(first, first, "owner-a") == 1
    assert held(outbox, max_rows=1) == [second]
    assert outbox.dead_letter(second, second, "owner-a", 400, "bad", NOW) == (1, 0)
    c = claim(outbox, now_ms=NOW + MAX_AGE_MS + 1, max_rows=1)  # third is past the window
    assert c.expired == 1
    assert c.rows == []
    assert outbox.dead_letters()[-1].op_id == third
    c = claim(outbox, "owner-a", max_rows=1)
    assert ids(c) == [fourth]
    outbox.release(fourth, fourth, "owner-a", failed=True)  # a release deletes nothing
    # One row is left: three appends fit in the bound without evicting anything.
    for n in range(3):
        _, evicted = outbox.append(TRACK, body(10 + n), NOW, limit)
        assert evicted == 0
    assert outbox.stats().pending == limit
    _, evicted = outbox.append(TRACK, body(20), NOW, limit)
    assert evicted == 1
    assert fourth not in raw_ops(outbox.path)
    assert outbox.stats().pending == limit
    assert outbox.stats().evicted == 1


def test_eviction_is_by_id_window_so_a_hole_in_the_queue_leaves_it_short(
    outbox: Outbox,
) -> None:
    """The documented window: rows with id <= newest - max_queue_size go, present or not."""
    limit = 4
    for n in range(limit):
        put(outbox, n, max_queue_size=limit)
    assert held(outbox) == [1, 2, 3, 4]
    assert outbox.ack(2, 3, "owner-a") == 2  # out of order: a hole behind the head
    op_id, evicted = outbox.append(TRACK, body(4), NOW, limit)
    assert (op_id, evicted) == (5, 1)  # id 1 is at the cutoff: evicted though only 3 queued
    assert sorted(raw_ops(outbox.path)) == [4, 5]
    assert outbox.stats().pending == 2 < limit
    assert outbox.stats().evicted == 1
    # Appends fill the window back up; the bound then holds the newest `limit` again.
    results = [outbox.append(TRACK, body(5 + n), NOW, limit) for n in range(3)]
    assert results == [(6, 0), (7, 0), (8, 1)]
    assert sorted(raw_ops(outbox.path)) == [5, 6, 7, 8]


# ---- key partitioning ----


def test_two_keys_on_one_file_see_only_their_own_rows(db_path: str) -> None:
    a = Outbox(db_path, KEY)
    b = Outbox(db_path, OTHER_KEY)
    try:
        a1 = put(a, 1, created_ms=NOW - 5)
        b1 = put(b, 2, created_ms=NOW - 9, kind=IDENTIFY)
        a2 = put(a, 3)
        b2 = put(b, 4)
        # Each key numbers its own ops.
        assert (a1, a2) == (1, 2)
        assert (b1, b2) == (1, 2)
        assert held(b, "owner-b") == [b1]  # the identify, alone
        assert b.dead_letter(b1, b1, "owner-b", 400, "bad", NOW) == (1, 0)

        assert ids(claim(a, "owner-a")) == [a1, a2]
        assert ids(claim(b, "owner-b")) == [b2]
        assert [r[1] for r in raw_bodies(db_path, KEY)] == [body(1), body(3)]
        assert [r[1] for r in raw_bodies(db_path, OTHER_KEY)] == [body(4)]
        sa, sb = a.stats(), b.stats()
        assert (sa.pending_tracks, sa.pending_identifies, sa.oldest_created_ms) == (2, 0, NOW - 5)
        assert (sb.pending_tracks, sb.pending_identifies, sb.oldest_created_ms) == (1, 0, NOW)
        assert (sa.dead_letters, sb.dead_letters) == (0, 1)
        assert a.dead_letters() == []
        assert [d.op_id for d in b.dead_letters()] == [b1]
        assert [d.body for d in b.dead_letters()] == [body(2)]
        assert a.last_id() == a2
        assert b.last_id() == b2
        assert a.pending_through(a2) == 2
        assert b.pending_through(b2) == 1
        assert b.pending_through(b1) == 0

        # Writes by one key, with ids and owner of the other key's held rows, change
        # nothing of the other's (nor of its own rows, held by another owner).
        a_before, b_before = raw_ops(db_path, KEY), raw_ops(db_path, OTHER_KEY)
        assert b.ack(a1, a2, "owner-a") == 0
        b.release(a1, a2, "owner-a", failed=True)
        assert b.renew(a1, a2, "owner-a", NOW + 99_999) == 0
        assert b.dead_letter(a1, a2, "owner-a", 400, "bad", NOW) == (0, 0)
        assert raw_ops(db_path, KEY) == a_before
        assert a_before == {a1: (0, "owner-a", NOW + LEASE_MS), a2: (0, "owner-a", NOW + LEASE_MS)}
        assert raw_ops(db_path, OTHER_KEY) == b_before
        assert a.dead_letters() == []
        # And the same ids by their own key and owner do act.
        assert a.ack(a1, a2, "owner-a") == 2
        assert raw_ops(db_path, OTHER_KEY) == b_before
    finally:
        a.close()
        b.close()


def test_each_key_has_its_own_table_created_when_its_outbox_opens(db_path: str) -> None:
    a = Outbox(db_path, KEY)
    b = Outbox(db_path, OTHER_KEY)
    try:
        a.open()
        assert f"ops:{KEY}" in tables(db_path)
        assert f"ops:{OTHER_KEY}" not in tables(db_path)
        b.open()
        assert {f"ops:{KEY}", f"ops:{OTHER_KEY}"} <= tables(db_path)
        assert not {"ops", "queue_sizes"} & tables(db_path)
    finally:
        a.close()
        b.close()


# ---- claim ----


def test_identify_at_head_is_claimed_alone(outbox: Outbox) -> None:
    i = put(outbox, 1, kind=IDENTIFY)
    put(outbox, 2)
    put(outbox, 3)
    c = claim(outbox)
    assert ids(c) == [i]
    assert c.rows[0].kind == IDENTIFY
    assert c.expired == 0


def test_leading_tracks_stop_before_an_identify(outbox: Outbox) -> None:
    t1, t2 = put(outbox, 1), put(outbox, 2)
    i = put(outbox, 3, kind=IDENTIFY)
    t3 = put(outbox, 4)
    c = claim(outbox)
    assert ids(c) == [t1, t2]
    assert all(row.kind == TRACK for row in c.rows)
    assert outbox.ack(t1, t2, "owner-a") == 2
    assert ids(claim(outbox)) == [i]
    assert outbox.ack(i, i, "owner-a") == 1
    assert ids(claim(outbox)) == [t3]


def test_max_rows_limits_the_batch(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(5)]
    c = claim(outbox, max_rows=2)
    assert ids(c) == all_ids[:2]
    # The rest is not leased: another owner takes the next run after the first is acked.
    assert outbox.ack(all_ids[0], all_ids[1], "owner-a") == 2
    assert ids(claim(outbox, "owner-b", max_rows=2)) == all_ids[2:4]
    assert {i: r[1] for i, r in raw_ops(outbox.path).items()} == {
        all_ids[2]: "owner-b",
        all_ids[3]: "owner-b",
        all_ids[4]: None,
    }


def test_max_bytes_limits_the_batch(outbox: Outbox) -> None:
    bodies = [body(n, pad=90) for n in range(6)]
    assert {len(b) for b in bodies} == {len(bodies[0])}
    size = len(bodies[0])  # ~100 bytes: 3 fit in 350 with any sane separator accounting
    for b in bodies:
        outbox.append(TRACK, b, NOW, BIG_QUEUE)
    c = claim(outbox, max_bytes=350)
    assert len(c.rows) == 3
    assert len(b",".join(row.body for row in c.rows)) <= 350
    assert 4 * size > 350


def test_one_row_is_claimed_even_if_it_exceeds_max_bytes(outbox: Outbox) -> None:
    big = outbox.append(TRACK, body(1, pad=500), NOW, BIG_QUEUE)[0]
    put(outbox, 2)
    c = claim(outbox, max_bytes=10)
    assert ids(c) == [big]


def test_nothing_is_claimed_while_another_owner_holds_a_live_lease(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(4)]
    assert ids(claim(outbox, "owner-a", max_rows=2)) == all_ids[:2]
    # The head is leased: owner-b gets nothing, not even the unleased rows behind it.
    c = claim(outbox, "owner-b", now_ms=NOW + 10)
    assert c.rows == []
    assert c.expired == 0
    ops = raw_ops(outbox.path)
    assert [ops[i][1] for i in all_ids] == ["owner-a", "owner-a", None, None]


def test_an_expired_lease_is_taken_over(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(3)]
    assert ids(claim(outbox, "owner-a", lease_ms=1000)) == all_ids
    assert claim(outbox, "owner-b", now_ms=NOW + 999, lease_ms=1000).rows == []
    c = claim(outbox, "owner-b", now_ms=NOW + 1001, lease_ms=1000)
    assert ids(c) == all_ids
    ops = raw_ops(outbox.path)
    assert {ops[i][1:] for i in all_ids} == {("owner-b", NOW + 1001 + 1000)}


def test_a_lease_too_far_in_the_future_is_treated_as_expired(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(2)]
    # owner-a's clock was an hour ahead (or ours went back an hour).
    assert ids(claim(outbox, "owner-a", now_ms=NOW + 3_600_000, lease_ms=1000)) == all_ids
    c = claim(outbox, "owner-b", now_ms=NOW, lease_ms=1000)
    assert ids(c) == all_ids
    assert {raw_ops(outbox.path)[i][1] for i in all_ids} == {"owner-b"}


def test_the_same_owner_may_reclaim_its_own_leased_rows(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(2)]
    assert ids(claim(outbox, "owner-a")) == all_ids
    c = claim(outbox, "owner-a", now_ms=NOW + 10)
    assert ids(c) == all_ids
    # The lease was renewed from the new claim time.
    assert {raw_ops(outbox.path)[i][2] for i in all_ids} == {NOW + 10 + LEASE_MS}


def test_old_tracks_are_dead_lettered_as_expired_old_identify_is_not(outbox: Outbox) -> None:
    old = NOW - MAX_AGE_MS - 1
    t_old1 = put(outbox, 1, created_ms=old)
    t_old2 = put(outbox, 2, created_ms=old - 5)
    t_edge = put(outbox, 3, created_ms=NOW - MAX_AGE_MS)  # exactly at the window: kept
    t_new = put(outbox, 4)
    i_old = put(outbox, 5, kind=IDENTIFY, created_ms=old)
    t_after = put(outbox, 6, created_ms=old)

    c = claim(outbox, now_ms=NOW)
    assert c.expired == 2
    assert ids(c) == [t_edge, t_new]
    dead = outbox.dead_letters()
    assert [d.op_id for d in dead] == [t_old1, t_old2]
    assert all("expired" in d.reason for d in dead)
    assert all(d.kind == "track" and d.status is None and d.attempts == 1 for d in dead)
    assert all(d.failed_ms == NOW for d in dead)
    assert [d.body for d in dead] == [body(1), body(2)]
    assert [d.created_ms for d in dead] == [old, old - 5]
    assert outbox.stats().dead_letters == 2
    assert outbox.stats().pending == 4

    assert outbox.ack(t_edge, t_new, "owner-a") == 2
    c = claim(outbox, now_ms=NOW)
    assert ids(c) == [i_old]  # identify has no age limit
    assert c.expired == 0
    assert outbox.ack(i_old, i_old, "owner-a") == 1
    c = claim(outbox, now_ms=NOW)
    assert (c.rows, c.expired) == ([], 1)
    assert outbox.dead_letters()[-1].op_id == t_after
    assert outbox.stats().pending == 0


# ---- ack / release / dead_letter ----


def test_a_claim_writes_one_lease_row_which_ends_with_the_last_settled_op(
    outbox: Outbox,
) -> None:
    all_ids = [put(outbox, n) for n in range(6)]
    before = raw(outbox.path, f"SELECT * FROM {queue_table(KEY)} ORDER BY id")
    assert ids(claim(outbox, max_rows=4)) == all_ids[:4]
    # The rows themselves are not written: the lease is one row beside them.
    assert raw(outbox.path, f"SELECT * FROM {queue_table(KEY)} ORDER BY id") == before
    lease = (KEY, "owner-a", all_ids[0], all_ids[3], NOW + LEASE_MS)
    assert raw(outbox.path, "SELECT * FROM leases") == [lease]
    # Settled in parts (a split batch), the lease lasts until its last op is settled.
    assert outbox.ack(all_ids[2], all_ids[3], "owner-a") == 2
    assert outbox.dead_letter(all_ids[1], all_ids[1], "owner-a", 400, "bad", NOW) == (1, 0)
    assert raw(outbox.path, "SELECT * FROM leases") == [lease]
    assert outbox.ack(all_ids[0], all_ids[0], "owner-a") == 1
    assert raw(outbox.path, "SELECT * FROM leases") == []
    # The rest is unleased: anyone may claim it.
    assert ids(claim(outbox, "owner-b", now_ms=NOW + 1)) == all_ids[4:]


def test_a_claim_summed_up_by_sqlite_and_one_planned_row_by_row_take_the_same_run(
    outbox: Outbox,
) -> None:
    # Sound young tracks only: SQLite's summary of the head window is the run. Any other
    # row in the window (here a track too old to send, then an identify) makes the claim
    # read the rows and plan them one by one; both must come to the same runs.
    young = [put(outbox, n) for n in range(3)]
    assert ids(claim(outbox, max_rows=2)) == young[:2]
    outbox.ack(young[0], young[1], "owner-a")
    old = put(outbox, 3, created_ms=NOW - MAX_AGE_MS - 1)
    after = [put(outbox, n) for n in range(4, 6)]
    identify = put(outbox, 6, kind=IDENTIFY)
    c = claim(outbox)  # the old track goes to the dead letters on the way
    assert (ids(c), c.expired) == ([young[2], *after], 1)
    assert old not in raw_ops(outbox.path)
    outbox.ack(young[2], after[1], "owner-a")
    c = claim(outbox)
    assert ids(c) == [identify] and c.run is not None and c.run.kind == IDENTIFY


def test_ack_deletes_exactly_the_run(db_path: str) -> None:
    a = Outbox(db_path, KEY)
    b = Outbox(db_path, OTHER_KEY)
    try:
        a1, a2 = put(a, 1), put(a, 2)
        b1 = put(b, 3)
        a3, a4 = put(a, 4), put(a, 5)
        assert held(a) == [a1, a2, a3, a4]
        assert held(b) == [b1]  # the same owner name, on another key's queue
        assert a.ack(a2, a3, "owner-a") == 2
        assert sorted(raw_ops(db_path, KEY)) == [a1, a4]
        assert sorted(raw_ops(db_path, OTHER_KEY)) == [b1]
        assert a.ack(a2, a3, "owner-a") == 0  # already gone
        assert b.stats().pending == 1
        assert a.stats().pending == 2
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("failed", [True, False])
def test_release_clears_the_lease_and_counts_failures(outbox: Outbox, failed: bool) -> None:
    all_ids = [put(outbox, n) for n in range(3)]
    assert ids(claim(outbox, "owner-a", max_rows=2)) == all_ids[:2]
    outbox.release(all_ids[0], all_ids[1], "owner-a", failed=failed)
    ops = raw_ops(outbox.path)
    expected = 1 if failed else 0
    assert [ops[i] for i in all_ids] == [(expected, None, 0)] * 2 + [(0, None, 0)]
    # Another owner can claim them at once, and sees the attempts.
    c = claim(outbox, "owner-b", now_ms=NOW + 1)
    assert ids(c) == all_ids
    assert [row.attempts for row in c.rows] == [expected, expected, 0]


def test_release_by_another_owner_changes_nothing(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(2)]
    claim(outbox, "owner-a")
    before = raw_ops(outbox.path)
    outbox.release(all_ids[0], all_ids[-1], "owner-b", failed=True)
    assert raw_ops(outbox.path) == before
    assert claim(outbox, "owner-b", now_ms=NOW + 1).rows == []


def test_release_touches_only_the_owners_rows_in_the_range(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(4)]
    claim(outbox, "owner-a", max_rows=2)
    outbox.release(all_ids[0], all_ids[-1], "owner-a", failed=True)
    ops = raw_ops(outbox.path)
    assert [ops[i][0] for i in all_ids] == [1, 1, 0, 0]


def test_dead_letter_moves_rows_with_status_reason_and_attempts(outbox: Outbox) -> None:
    t1 = put(outbox, 1, created_ms=NOW - 2)
    t2 = put(outbox, 2, created_ms=NOW - 1)
    i3 = put(outbox, 3, kind=IDENTIFY)
    keep = put(outbox, 4)
    assert held(outbox, "owner-a") == [t1, t2]
    outbox.release(t1, t2, "owner-a", failed=True)  # one failed attempt already
    assert held(outbox, "owner-a") == [t1, t2]
    # The range reaches the identify, which owner-a does not hold: only the tracks go.
    assert outbox.dead_letter(t1, i3, "owner-a", 422, "invalid event", NOW + 7) == (2, 0)
    assert sorted(raw_ops(outbox.path)) == [i3, keep]
    assert held(outbox, "owner-a") == [i3]
    assert outbox.dead_letter(i3, i3, "owner-a", 422, "invalid event", NOW + 7) == (1, 0)
    assert sorted(raw_ops(outbox.path)) == [keep]
    dead = outbox.dead_letters()
    assert [(d.op_id, d.kind, d.body, d.created_ms) for d in dead] == [
        (t1, "track", body(1), NOW - 2),
        (t2, "track", body(2), NOW - 1),
        (i3, "identify", body(3), NOW),
    ]
    assert [d.attempts for d in dead] == [2, 2, 1]
    assert {(d.status, d.reason, d.failed_ms) for d in dead} == {(422, "invalid event", NOW + 7)}
    assert {d.key_fingerprint for d in dead} == {KEY}
    assert outbox.stats().dead_letters == 3
    assert outbox.stats().pending == 1


def test_dead_letters_are_bounded_oldest_removed(db_path: str) -> None:
    ob = Outbox(db_path, KEY, max_dead_letters=3)
    try:
        all_ids = [put(ob, n) for n in range(6)]
        assert held(ob) == all_ids
        assert ob.dead_letter(all_ids[0], all_ids[4], "owner-a", 500, "refused", NOW) == (5, 2)
        assert [d.op_id for d in ob.dead_letters()] == all_ids[2:5]
        assert ob.stats().dead_letters == 3
        assert ob.dead_letter(all_ids[5], all_ids[5], "owner-a", None, "refused", NOW) == (1, 1)
        assert [d.op_id for d in ob.dead_letters()] == all_ids[3:6]
        assert raw(db_path, "SELECT count(*) FROM dead_letters") == [(3,)]
        # Never silent: what the bound removed is counted, as is what was refused.
        stats = ob.stats()
        assert (stats.refused, stats.dead_letters_pruned) == (6, 3)
    finally:
        ob.close()


def test_dead_letter_bound_of_one_key_never_removes_another_keys(db_path: str) -> None:
    a = Outbox(db_path, KEY, max_dead_letters=3)
    b = Outbox(db_path, OTHER_KEY, max_dead_letters=3)
    try:
        a_ids = [put(a, n) for n in range(2)]
        assert held(a) == a_ids
        assert a.dead_letter(a_ids[0], a_ids[-1], "owner-a", 400, "bad", NOW) == (2, 0)
        b_ids = [put(b, n) for n in range(3)]
        assert held(b) == b_ids
        assert b.dead_letter(b_ids[0], b_ids[-1], "owner-a", 400, "bad", NOW) == (3, 0)
        assert [d.op_id for d in b.dead_letters()] == b_ids
        assert [d.op_id for d in a.dead_letters()] == a_ids
    finally:
        a.close()
        b.close()


# ---- reading ----


def test_last_id_and_pending_through(outbox: Outbox) -> None:
    assert outbox.last_id() == 0
    assert outbox.pending_through(0) == 0
    all_ids = [put(outbox, n) for n in range(4)]
    assert outbox.last_id() == all_ids[-1]
    barrier = all_ids[1]
    assert outbox.pending_through(barrier) == 2
    later = put(outbox, 9)
    assert outbox.pending_through(barrier) == 2  # rows after the barrier do not count
    assert outbox.pending_through(barrier, exact=False) == 1
    assert held(outbox) == [*all_ids, later]
    assert outbox.ack(all_ids[0], all_ids[0], "owner-a") == 1
    assert outbox.pending_through(barrier) == 1
    assert outbox.dead_letter(all_ids[1], all_ids[1], "owner-a", 400, "bad", NOW) == (1, 0)
    assert outbox.pending_through(barrier) == 0
    assert outbox.pending_through(barrier, exact=False) == 0
    assert outbox.ack(later, later, "owner-a") == 1
    assert outbox.last_id() == all_ids[-1]


def test_stats(outbox: Outbox) -> None:
    empty = outbox.stats()
    assert (
        empty.pending_tracks,
        empty.pending_identifies,
        empty.oldest_created_ms,
        empty.dead_letters,
        empty.evicted,
        empty.pending,
        empty.schema_version,
    ) == (0, 0, None, 0, 0, 0, SCHEMA_VERSION)
    i = put(outbox, 3, created_ms=NOW + 5, kind=IDENTIFY)
    put(outbox, 1, created_ms=NOW)
    put(outbox, 2, created_ms=NOW - 50)  # created times need not follow ids
    put(outbox, 4, created_ms=NOW - 10, kind=IDENTIFY)
    s = outbox.stats()
    assert (s.pending_tracks, s.pending_identifies, s.pending) == (2, 2, 4)
    assert s.oldest_created_ms == NOW + 5  # the head's: the next op to be sent
    assert held(outbox) == [i]
    assert outbox.dead_letter(i, i, "owner-a", 400, "bad", NOW) == (1, 0)
    s = outbox.stats()
    assert (s.pending_tracks, s.pending_identifies, s.dead_letters) == (2, 1, 1)
    assert s.oldest_created_ms == NOW


def queued_kinds(path: str) -> tuple[int, int]:
    """``(tracks, identifies)`` queued for KEY, counted row by row."""
    kinds = dict(raw(path, f"SELECT kind, count(*) FROM {queue_table(KEY)} GROUP BY kind"))
    return kinds.get(TRACK, 0), kinds.get(IDENTIFY, 0)


def gaps_through(path: str) -> Optional[int]:
    rows = raw(path, "SELECT through_id FROM gaps WHERE key_fp = ?", (KEY,))
    return rows[0][0] if rows else None


def assert_stats_exact(ob: Outbox) -> None:
    s = ob.stats()
    assert (s.pending_tracks, s.pending_identifies) == queued_kinds(ob.path)
    head = raw(ob.path, f"SELECT created_ms FROM {queue_table(KEY)} ORDER BY id LIMIT 1")
    assert s.oldest_created_ms == (head[0][0] if head else None)


def test_stats_count_exactly_across_the_gaps_a_queue_can_have(outbox: Outbox) -> None:
    # stats() counts the rows after the gaps' end from two ids: every way a row can leave
    # the middle of the queue must be recorded, and an empty queue forgets it.
    now = utc_now_ms()
    for n in range(6):
        outbox.append(TRACK, body(n), now + n, 6)
    assert ids(claim(outbox, now_ms=now, max_rows=2)) == [1, 2]  # in flight
    # A full queue evicts the oldest op not in flight, 3, leaving a gap behind 1 and 2.
    for n in range(6, 9):
        outbox.append(TRACK, body(n), now, 6)
    assert sorted(raw_ops(outbox.path)) == [1, 2, 4, 5, 6, 7, 8, 9]
    assert gaps_through(outbox.path) == 3
    assert_stats_exact(outbox)
    outbox.release(1, 2, "owner-a", failed=True)  # the gap outlives the lease
    assert (outbox.stats().pending, outbox.span()) == (8, 9)
    assert_stats_exact(outbox)

    # A row refused out of the middle of a run, the others given back.
    c = claim(outbox, now_ms=now, max_rows=4)
    assert ids(c) == [1, 2, 4, 5]
    assert outbox.dead_letter(4, 4, "owner-a", 400, "bad", now) == (1, 0)
    outbox.release(1, 5, "owner-a", failed=True)
    assert gaps_through(outbox.path) == 4
    assert_stats_exact(outbox)

    # Delivered from the head: no new gap; identifies counted by kind.
    outbox.append(IDENTIFY, body(9), now, 100)
    assert outbox.ack(1, 2, "owner-a") == 0  # not ours any more: nothing leaves
    c = claim(outbox, now_ms=now, max_rows=2)
    assert ids(c) == [1, 2] and outbox.ack(1, 2, "owner-a") == 2
    assert gaps_through(outbox.path) == 4
    assert_stats_exact(outbox)
    assert outbox.stats().pending_identifies == 1

    # Put back at the end, then everything delivered: the gaps go with the last row.
    assert outbox.requeue(None, KEY) == 1
    assert_stats_exact(outbox)
    while (c := claim(outbox, now_ms=now)).run:
        outbox.ack(c.run.first, c.run.last, "owner-a")
    assert outbox.stats().pending == 0
    assert gaps_through(outbox.path) is None
    # The ids start again at 1, below where the gaps ended, and are counted as such.
    for n in range(3):
        put(outbox, n, kind=IDENTIFY if n == 1 else TRACK)
    assert sorted(raw_ops(outbox.path)) == [1, 2, 3]
    assert_stats_exact(outbox)


@pytest.mark.parametrize("seed", range(8))
def test_stats_count_exactly_whatever_leaves_the_queue(outbox: Outbox, seed: int) -> None:
    rng = random.Random(seed)
    now = utc_now_ms()
    for _ in range(150):
        step = rng.random()
        if step < 0.45:
            kind = IDENTIFY if rng.random() < 0.2 else TRACK
            outbox.append(kind, body(0), now, rng.choice((5, 8, 40)))
        elif step < 0.55:
            outbox.requeue(None, KEY)
        else:
            run = ids(claim(outbox, now_ms=now, max_rows=rng.randint(1, 6)))
            for _ in range(rng.randint(0, 4)):  # appends beside a batch in flight
                outbox.append(TRACK, body(1), now, rng.choice((3, 5, 8)))
            assert_stats_exact(outbox)
            if run:
                # Any part of the run delivered, any one op of it refused, the rest back.
                a, b = sorted(rng.sample(run, 2)) if len(run) > 1 else (run[0], run[0])
                if rng.random() < 0.7:
                    outbox.ack(a, b, "owner-a")
                if rng.random() < 0.5:
                    bad = rng.choice(run)
                    outbox.dead_letter(bad, bad, "owner-a", 400, "bad", now)
                outbox.release(run[0], run[-1], "owner-a", failed=False)
        assert_stats_exact(outbox)


def test_dead_letters_oldest_first_with_limit(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(5)]
    assert held(outbox) == all_ids
    for op_id in reversed(all_ids):  # dead-lettered newest op first
        assert outbox.dead_letter(op_id, op_id, "owner-a", 400, f"bad {op_id}", NOW) == (1, 0)
    dead = outbox.dead_letters()
    assert [d.op_id for d in dead] == list(reversed(all_ids))
    assert [d.id for d in dead] == sorted(d.id for d in dead)
    limited = outbox.dead_letters(limit=2)
    assert limited == dead[:2]
    assert outbox.dead_letters(limit=0) == []


# ---- store errors ----


def test_parent_is_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    ob = Outbox(str(blocker / "outbox.db"), KEY, store_timeout=0.05)
    try:
        with pytest.raises(StoreError):
            ob.open()
        with pytest.raises(StoreError):
            ob.append(TRACK, body(1), NOW, BIG_QUEUE)
        with pytest.raises(StoreError):
            ob.stats()
        with pytest.raises(StoreError):
            claim(ob)
    finally:
        ob.close()


def _append_fails_with_store_error(path: str) -> int:
    """0: StoreError; 1: a raw sqlite3.Error leaked; 2: the append succeeded."""
    ob = Outbox(path, KEY, store_timeout=0.05)
    try:
        ob.append(TRACK, body(1), NOW, BIG_QUEUE)
    except StoreError:
        return 0
    except sqlite3.Error:
        return 1
    finally:
        ob.close()
    return 2


def test_read_only_file_raises_store_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        path = str(tmp_path / "outbox.db")
        ob = Outbox(path, KEY)
        put(ob, 1)
        ob.close()
        os.chmod(path, 0o400)
        try:
            assert _append_fails_with_store_error(path) == 0
        finally:
            os.chmod(path, 0o600)
        return

    # Root ignores file permissions: try as the unprivileged "nobody" in a forked child,
    # in a directory outside pytest's private (0700, root-owned) temporary tree.
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    except KeyError:
        uid = gid = 65534
    directory = tempfile.mkdtemp(prefix="whisperr-ro-")
    try:
        path = os.path.join(directory, "outbox.db")
        ob = Outbox(path, KEY)
        put(ob, 1)
        ob.close()
        os.chown(directory, uid, gid)
        os.chown(path, uid, gid)
        os.chmod(path, 0o400)

        def as_nobody() -> int:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            if not os.access(path, os.R_OK) or os.access(path, os.W_OK):
                return 10
            return _append_fails_with_store_error(path)

        code = run_forked(as_nobody)
        if code == 10:
            pytest.skip("could not make the file read-only for an unprivileged user")
        assert code == 0
        assert raw(path, f"SELECT count(*) FROM {queue_table(KEY)}") == [(1,)]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def writer_lock(db_path: str) -> Iterator[sqlite3.Connection]:
    """Another connection holding the write lock (``BEGIN IMMEDIATE``) on a ready outbox."""
    ob = Outbox(db_path, KEY)
    ob.open()
    ob.close()
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=0, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


def test_locked_database_raises_store_error_within_store_timeout(
    db_path: str, writer_lock: sqlite3.Connection
) -> None:
    ob = Outbox(db_path, KEY, store_timeout=0.05)
    try:
        assert ob.stats().pending == 0  # readers are not blocked by a writer in WAL mode
        started = time.monotonic()
        with pytest.raises(StoreError, match="locked"):
            op_id, _ = ob.append(TRACK, body(1), NOW, BIG_QUEUE)
        elapsed = time.monotonic() - started
        assert 0.045 <= elapsed < 2.0
        # The failed call left no transaction behind: once the lock goes, writes work.
        writer_lock.execute("ROLLBACK")
        op_id, _ = ob.append(TRACK, body(2), NOW, BIG_QUEUE)
        assert ob.last_id() == op_id
        assert ob.stats().pending == 1
    finally:
        ob.close()


def test_append_waits_for_a_lock_released_shortly(
    db_path: str, writer_lock: sqlite3.Connection
) -> None:
    ob = Outbox(db_path, KEY, store_timeout=5.0)
    appended = threading.Event()
    done_while_locked: list[bool] = []

    def release() -> None:
        done_while_locked.append(appended.is_set())
        writer_lock.execute("ROLLBACK")

    timer = threading.Timer(0.2, release)
    try:
        timer.start()
        started = time.monotonic()
        op_id, _ = ob.append(TRACK, body(1), NOW, BIG_QUEUE)
        appended.set()
        elapsed = time.monotonic() - started
        timer.join(5)
        assert done_while_locked == [False]
        assert 0.15 <= elapsed < 4.0
        assert ob.last_id() == op_id
    finally:
        timer.cancel()
        timer.join(5)
        ob.close()


# ---- fork and crash ----


def test_forked_child_opens_its_own_connection(outbox: Outbox) -> None:
    before = put(outbox, 1)
    parent_conn = outbox._connection()

    def child() -> int:
        code = 0
        op_id, _ = outbox.append(TRACK, body(2), NOW, BIG_QUEUE)
        if outbox._connection() is parent_conn:
            code |= 1
        if op_id <= before:
            code |= 2
        if outbox.stats().pending != 2:
            code |= 4
        outbox.close()  # closes only the child's own connection
        return code

    assert run_forked(child) == 0
    # No connection crosses a fork: the parent's was closed before it and reopens on use.
    assert outbox._connection() is not parent_conn
    after = put(outbox, 3)
    c = claim(outbox)
    assert [row.body for row in c.rows] == [body(n).encode() for n in (1, 2, 3)]
    assert ids(c)[0] == before
    assert ids(c)[-1] == after


def test_rows_survive_sigkill(db_path: str) -> None:
    n = 200
    script = textwrap.dedent(
        f"""
        import sys
        from whisperr_durable._store import Outbox
        ob = Outbox({db_path!r}, {KEY!r})
        for i in range({n}):
            ob.append({TRACK}, '{{"n": %d}}' % i, {NOW} + i, {BIG_QUEUE})
        print("done", flush=True)
        sys.stdin.read()
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "done"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()

    ob = Outbox(db_path, KEY)
    try:
        assert ob.stats().pending == n
        c = claim(ob, max_rows=n)
        assert [json.loads(row.body)["n"] for row in c.rows] == list(range(n))
        assert [row.created_ms for row in c.rows] == [NOW + i for i in range(n)]
    finally:
        ob.close()


def test_a_fork_while_another_thread_uses_the_outbox_never_hangs_the_child(
    outbox: Outbox,
) -> None:
    put(outbox, 1)
    holding = threading.Event()
    release = threading.Event()

    def busy() -> None:  # as a thread stuck retrying a locked file would
        with outbox._guard:
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        assert holding.wait(5)

        def child() -> int:
            signal.alarm(10)  # a hang here would be the bug
            put(outbox, 2)
            return 0 if outbox.stats().pending == 2 else 1

        started = time.monotonic()
        assert run_forked(child) == 0
        assert time.monotonic() - started < 5  # the parent waited a bounded time
    finally:
        release.set()
        thread.join(10)
    assert outbox.stats().pending == 2


def test_a_file_far_over_the_bound_shrinks_a_thousand_rows_a_call(db_path: str) -> None:
    big = Outbox(db_path, KEY)
    try:
        big.append_many([(TRACK, body(n), NOW) for n in range(2500)], BIG_QUEUE)
    finally:
        big.close()
    small = Outbox(db_path, KEY)
    try:
        _, evicted = small.append(TRACK, body(2500), NOW, 10)
        assert evicted == 1000  # not all 2,491 at once, in the caller's transaction
        assert small.stats().pending == 1501
        evictions = [small.append(TRACK, body(n), NOW, 10)[1] for n in range(2501, 2504)]
        assert evictions == [1000, 493, 1]
        assert small.stats().pending == 10
        # A bulk append never grows the queue past the bound, however large.
        assert small.append_many([(TRACK, body(n), NOW) for n in range(3000)], 10) == 3000
        assert small.stats().pending == 10
    finally:
        small.close()


def test_a_full_queue_makes_room_for_the_next_percent_at_once(outbox: Outbox) -> None:
    limit = 200  # 1% of it: 2 more rows go with each eviction
    results = [outbox.append(TRACK, body(n), NOW, limit) for n in range(limit + 6)]
    evictions = [(n, evicted) for n, (_, evicted) in enumerate(results) if evicted]
    # The 201st op evicts the oldest 3 (1 over the bound + 2); the next 2 fit; and so on.
    assert evictions == [(200, 3), (203, 3)]
    assert outbox.stats().evicted == 6
    assert outbox.stats().pending == limit
    first_id = results[0][0]
    assert sorted(raw_ops(outbox.path)) == [first_id + n for n in range(6, limit + 6)]


def test_eviction_leaves_a_batch_in_flight_alone_in_every_life_of_the_queue(
    outbox: Outbox,
) -> None:
    # A queue that empties starts its ids again at 1, and the same sender may lease the new
    # head: what eviction remembers of the first lease must not spare the second queue.
    now = utc_now_ms()
    for life in range(2):
        appended = [outbox.append(TRACK, body(n), now, 4) for n in range(4)]
        assert [op_id for op_id, _ in appended] == [1, 2, 3, 4]
        assert ids(claim(outbox, now_ms=now + life, max_rows=1)) == [1]  # in flight
        assert outbox.append(TRACK, body(4), now, 4)[1] == 0  # only the leased op is older
        assert outbox.append(TRACK, body(5), now, 4)[1] == 1  # the oldest one not leased
        assert sorted(raw_ops(outbox.path)) == [1, 3, 4, 5, 6]
        c = claim(outbox, now_ms=now + life)  # the rest, with the one in flight
        assert outbox.ack(c.rows[0].id, c.rows[-1].id, "owner-a") == 5  # delivered
        assert outbox.stats().pending == 0
    assert outbox.stats().evicted == 2
