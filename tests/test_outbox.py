"""Direct tests of the SQLite outbox (``whisperr_durable._outbox.Outbox``) on real files."""

from __future__ import annotations

import json
import os
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
from typing import Any, Optional

import pytest
from conftest import run_forked

from whisperr_durable._outbox import SCHEMA_VERSION, Claim, Outbox, StoreError
from whisperr_durable._wire import IDENTIFY, TRACK

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
) -> Claim:
    return ob.claim(
        owner,
        max_rows=max_rows,
        max_bytes=max_bytes,
        lease_ms=lease_ms,
        max_age_ms=max_age_ms,
        now_ms=now_ms,
    )


def ids(c: Claim) -> list[int]:
    return [row.id for row in c.rows]


def raw(path: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Read the file through a separate connection, as another process would."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        return conn.execute(sql, params).fetchall()


def raw_ops(path: str) -> dict[int, tuple[str, int, Optional[str], int]]:
    """id -> (key_fp, attempts, lease_owner, lease_until_ms) for every queued row."""
    rows = raw(path, "SELECT id, key_fp, attempts, lease_owner, lease_until_ms FROM ops")
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


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


def test_existing_file_keeps_its_mode(db_path: str) -> None:
    Path(db_path).touch(mode=0o644)
    os.chmod(db_path, 0o640)
    ob = Outbox(db_path, KEY)
    try:
        ob.open()
    finally:
        ob.close()
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o640


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
    ob = Outbox(db_path, KEY, store_timeout=0.05, report=reports.append)
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
        handle.write(b"garbage!" * 4096)
    reports: list[str] = []
    ob = Outbox(db_path, KEY, store_timeout=0.05, report=reports.append)
    try:
        with pytest.raises(StoreError, match="malformed"):
            ob.stats()
        put(ob, 1)  # a fresh outbox
        assert ob.stats().pending == 1
    finally:
        ob.close()
    assert len(reports) == 1
    assert len(list(Path(db_path).parent.glob("outbox.db.corrupt-*"))) == 1


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
        assert [row.body for row in c.rows] == [body(n) for n in range(3)]
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


def test_ids_are_never_reused_even_after_the_table_empties(outbox: Outbox) -> None:
    first = [put(outbox, n) for n in range(3)]
    assert outbox.ack(first[0], first[-1]) == 3
    assert outbox.stats().pending == 0
    assert outbox.last_id() == 0
    nxt = put(outbox, 3)
    assert nxt > first[-1]
    outbox.dead_letter(nxt, nxt, 400, "bad", NOW)
    assert outbox.stats().pending == 0
    assert put(outbox, 4) > nxt
    outbox.close()
    # Also across a reopen of the file.
    again = Outbox(outbox.path, KEY)
    try:
        assert put(again, 5) > nxt + 1
    finally:
        again.close()


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
        ops = raw_ops(db_path)
        assert sorted(i for i, r in ops.items() if r[0] == KEY) == a_ids
        assert sorted(i for i, r in ops.items() if r[0] == OTHER_KEY) == [
            op_id for op_id, _ in b_results[-2:]
        ]
        assert a.stats().evicted == 0
        assert b.stats().evicted == 4
        # And A, bounded at its own size, evicts only its own oldest.
        _, evicted = a.append(TRACK, body(3), NOW, 3)
        assert evicted == 1
        assert ids(claim(a)) == [*a_ids[1:], a.last_id()]
        assert b.stats().pending == 2
    finally:
        a.close()
        b.close()


def test_queue_size_stays_exact_after_acks_dead_letters_and_expiry(outbox: Outbox) -> None:
    limit = 4
    got = [outbox.append(TRACK, body(n), NOW, limit) for n in range(limit)]
    assert all(e == 0 for _, e in got)
    first, second, third, fourth = (op_id for op_id, _ in got)
    assert outbox.ack(first, first) == 1
    assert outbox.dead_letter(second, second, 400, "bad", NOW) == 1
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


# ---- key partitioning ----


def test_two_keys_on_one_file_see_only_their_own_rows(db_path: str) -> None:
    a = Outbox(db_path, KEY)
    b = Outbox(db_path, OTHER_KEY)
    try:
        a1 = put(a, 1, created_ms=NOW - 5)
        b1 = put(b, 2, created_ms=NOW - 9, kind=IDENTIFY)
        a2 = put(a, 3)
        b2 = put(b, 4)
        b.dead_letter(b1, b1, 400, "bad", NOW)

        assert ids(claim(a, "owner-a")) == [a1, a2]
        assert ids(claim(b, "owner-b")) == [b2]
        sa, sb = a.stats(), b.stats()
        assert (sa.pending_tracks, sa.pending_identifies, sa.oldest_created_ms) == (2, 0, NOW - 5)
        assert (sb.pending_tracks, sb.pending_identifies, sb.oldest_created_ms) == (1, 0, NOW)
        assert (sa.dead_letters, sb.dead_letters) == (0, 1)
        assert a.dead_letters() == []
        assert [d.op_id for d in b.dead_letters()] == [b1]
        assert a.last_id() == a2
        assert b.last_id() == b2
        assert a.pending_through(b2) == 2
        assert b.pending_through(b2) == 1
        assert b.pending_through(a2) == 0

        # Writes by one key with the other key's ids change nothing of the other's.
        assert b.ack(a1, a2) == 0
        b.release(a1, a2, "owner-a", failed=True)
        assert b.dead_letter(a1, a2, 400, "bad", NOW) == 0
        ops = raw_ops(db_path)
        assert ops[a1] == (KEY, 0, "owner-a", NOW + LEASE_MS)
        assert ops[a2] == (KEY, 0, "owner-a", NOW + LEASE_MS)
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
    outbox.ack(t1, t2)
    assert ids(claim(outbox)) == [i]
    outbox.ack(i, i)
    assert ids(claim(outbox)) == [t3]


def test_max_rows_limits_the_batch(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(5)]
    c = claim(outbox, max_rows=2)
    assert ids(c) == all_ids[:2]
    # The rest is not leased: another owner takes the next run after the first is acked.
    outbox.ack(all_ids[0], all_ids[1])
    assert ids(claim(outbox, "owner-b", max_rows=2)) == all_ids[2:4]


def test_max_bytes_limits_the_batch(outbox: Outbox) -> None:
    bodies = [body(n, pad=90) for n in range(6)]
    assert {len(b) for b in bodies} == {len(bodies[0])}
    size = len(bodies[0])  # ~100 bytes: 3 fit in 350 with any sane separator accounting
    for b in bodies:
        outbox.append(TRACK, b, NOW, BIG_QUEUE)
    c = claim(outbox, max_bytes=350)
    assert len(c.rows) == 3
    assert len(",".join(row.body for row in c.rows)) <= 350
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
    assert [ops[i][2] for i in all_ids] == ["owner-a", "owner-a", None, None]


def test_an_expired_lease_is_taken_over(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(3)]
    assert ids(claim(outbox, "owner-a", lease_ms=1000)) == all_ids
    assert claim(outbox, "owner-b", now_ms=NOW + 999, lease_ms=1000).rows == []
    c = claim(outbox, "owner-b", now_ms=NOW + 1001, lease_ms=1000)
    assert ids(c) == all_ids
    ops = raw_ops(outbox.path)
    assert {ops[i][2:] for i in all_ids} == {("owner-b", NOW + 1001 + 1000)}


def test_a_lease_too_far_in_the_future_is_treated_as_expired(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(2)]
    # owner-a's clock was an hour ahead (or ours went back an hour).
    assert ids(claim(outbox, "owner-a", now_ms=NOW + 3_600_000, lease_ms=1000)) == all_ids
    c = claim(outbox, "owner-b", now_ms=NOW, lease_ms=1000)
    assert ids(c) == all_ids
    assert {raw_ops(outbox.path)[i][2] for i in all_ids} == {"owner-b"}


def test_the_same_owner_may_reclaim_its_own_leased_rows(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(2)]
    assert ids(claim(outbox, "owner-a")) == all_ids
    c = claim(outbox, "owner-a", now_ms=NOW + 10)
    assert ids(c) == all_ids
    # The lease was renewed from the new claim time.
    assert {raw_ops(outbox.path)[i][3] for i in all_ids} == {NOW + 10 + LEASE_MS}


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

    outbox.ack(t_edge, t_new)
    c = claim(outbox, now_ms=NOW)
    assert ids(c) == [i_old]  # identify has no age limit
    assert c.expired == 0
    outbox.ack(i_old, i_old)
    c = claim(outbox, now_ms=NOW)
    assert (c.rows, c.expired) == ([], 1)
    assert outbox.dead_letters()[-1].op_id == t_after
    assert outbox.stats().pending == 0


# ---- ack / release / dead_letter ----


def test_ack_deletes_exactly_the_run(db_path: str) -> None:
    a = Outbox(db_path, KEY)
    b = Outbox(db_path, OTHER_KEY)
    try:
        a1, a2 = put(a, 1), put(a, 2)
        b1 = put(b, 3)
        a3, a4 = put(a, 4), put(a, 5)
        assert a.ack(a2, a3) == 2
        assert sorted(raw_ops(db_path)) == [a1, b1, a4]
        assert a.ack(a2, a3) == 0  # already gone
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
    assert [ops[i][1:] for i in all_ids] == [(expected, None, 0)] * 2 + [(0, None, 0)]
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
    assert [ops[i][1] for i in all_ids] == [1, 1, 0, 0]


def test_dead_letter_moves_rows_with_status_reason_and_attempts(outbox: Outbox) -> None:
    t1 = put(outbox, 1, created_ms=NOW - 2)
    t2 = put(outbox, 2, created_ms=NOW - 1)
    i3 = put(outbox, 3, kind=IDENTIFY)
    keep = put(outbox, 4)
    claim(outbox, "owner-a")
    outbox.release(t1, t2, "owner-a", failed=True)  # one failed attempt already
    assert outbox.dead_letter(t1, i3, 422, "invalid event", NOW + 7) == 3
    assert sorted(raw_ops(outbox.path)) == [keep]
    dead = outbox.dead_letters()
    assert [(d.op_id, d.kind, d.body, d.created_ms) for d in dead] == [
        (t1, "track", body(1), NOW - 2),
        (t2, "track", body(2), NOW - 1),
        (i3, "identify", body(3), NOW),
    ]
    assert [d.attempts for d in dead] == [2, 2, 1]
    assert {(d.status, d.reason, d.failed_ms) for d in dead} == {(422, "invalid event", NOW + 7)}
    assert outbox.stats().dead_letters == 3
    assert outbox.stats().pending == 1


def test_dead_letters_are_bounded_oldest_removed(db_path: str) -> None:
    ob = Outbox(db_path, KEY, max_dead_letters=3)
    try:
        all_ids = [put(ob, n) for n in range(6)]
        assert ob.dead_letter(all_ids[0], all_ids[4], 500, "refused", NOW) == 5
        assert [d.op_id for d in ob.dead_letters()] == all_ids[2:5]
        assert ob.stats().dead_letters == 3
        ob.dead_letter(all_ids[5], all_ids[5], None, "refused", NOW)
        assert [d.op_id for d in ob.dead_letters()] == all_ids[3:6]
        assert raw(db_path, "SELECT count(*) FROM dead_letters") == [(3,)]
    finally:
        ob.close()


def test_dead_letter_bound_of_one_key_never_removes_another_keys(db_path: str) -> None:
    a = Outbox(db_path, KEY, max_dead_letters=3)
    b = Outbox(db_path, OTHER_KEY, max_dead_letters=3)
    try:
        a_ids = [put(a, n) for n in range(2)]
        a.dead_letter(a_ids[0], a_ids[-1], 400, "bad", NOW)
        b_ids = [put(b, n) for n in range(3)]
        b.dead_letter(b_ids[0], b_ids[-1], 400, "bad", NOW)
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
    outbox.ack(all_ids[0], all_ids[0])
    assert outbox.pending_through(barrier) == 1
    outbox.dead_letter(all_ids[1], all_ids[1], 400, "bad", NOW)
    assert outbox.pending_through(barrier) == 0
    outbox.ack(later, later)
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
    put(outbox, 1, created_ms=NOW)
    put(outbox, 2, created_ms=NOW - 50)  # created times need not follow ids
    i = put(outbox, 3, created_ms=NOW + 5, kind=IDENTIFY)
    put(outbox, 4, created_ms=NOW - 10, kind=IDENTIFY)
    s = outbox.stats()
    assert (s.pending_tracks, s.pending_identifies, s.pending) == (2, 2, 4)
    assert s.oldest_created_ms == NOW - 50
    outbox.dead_letter(i, i, 400, "bad", NOW)
    s = outbox.stats()
    assert (s.pending_tracks, s.pending_identifies, s.dead_letters) == (2, 1, 1)


def test_dead_letters_oldest_first_with_limit(outbox: Outbox) -> None:
    all_ids = [put(outbox, n) for n in range(5)]
    for op_id in reversed(all_ids):  # dead-lettered newest op first
        outbox.dead_letter(op_id, op_id, 400, f"bad {op_id}", NOW)
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
        assert raw(path, "SELECT count(*) FROM ops") == [(1,)]
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
    assert [row.body for row in c.rows] == [body(1), body(2), body(3)]
    assert ids(c)[0] == before
    assert ids(c)[-1] == after


def test_rows_survive_sigkill(db_path: str) -> None:
    n = 200
    script = textwrap.dedent(
        f"""
        import sys
        from whisperr_durable._outbox import Outbox
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
