"""The store contract, run against both stores: a SQLite file and a PostgreSQL database.

The writer, the sender and the operators' views use a store only through its interface
(``_store.Store``). Each test here drives that interface and checks what it promises,
reading the rows back through a connection of its own where it needs to; what only one
store does (a row whose transaction commits after later ids were claimed, in PostgreSQL)
has its own test at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import raw

from whisperr_durable._store import Store, open_store, queue_table
from whisperr_durable._wire import IDENTIFY, TRACK, utc_now_ms

KEY = "fp-contract-a"
OTHER_KEY = "fp-contract-b"
NOW = utc_now_ms()
LEASE_MS = 30_000
MAX_AGE_MS = 30 * 86_400_000


class Backend:
    """One store under test, and a way to look at its rows from outside."""

    def __init__(self, path: str, kind: str) -> None:
        self.path, self.kind = path, kind
        self.stores: list[Store] = []

    def store(self, key_fp: str = KEY, **options: Any) -> Store:
        store = open_store(self.path, key_fp, **options)
        store.open()
        self.stores.append(store)
        return store

    def sql(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        if self.kind == "sqlite":
            return raw(self.path, sql.replace("%s", "?"), params)
        import psycopg

        with psycopg.connect(self.path, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def ids(self, key_fp: str = KEY) -> list[int]:
        """The ids queued for ``key_fp``, in order."""
        if self.kind == "sqlite":
            return [r[0] for r in self.sql(f"SELECT id FROM {queue_table(key_fp)} ORDER BY id")]
        return [
            r[0]
            for r in self.sql(
                "SELECT id FROM whisperr_durable.ops WHERE key_fp = %s ORDER BY id", (key_fp,)
            )
        ]

    def put_raw(self, body: str, key_fp: str = KEY, kind: int = TRACK) -> None:
        """A row written behind the store's back (damaged, say)."""
        if self.kind == "sqlite":
            self.sql(
                f"INSERT INTO {queue_table(key_fp)} (kind, body, created_ms) VALUES (?, ?, ?)",
                (kind, body, NOW),
            )
        else:
            self.sql(
                "INSERT INTO whisperr_durable.ops (key_fp, kind, body, created_ms) "
                "VALUES (%s, %s, %s, %s)",
                (key_fp, kind, body, NOW),
            )

    def close(self) -> None:
        for store in self.stores:
            store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = str(tmp_path / "outbox.db")
    else:
        path = request.getfixturevalue("pg_url")
    b = Backend(path, request.param)
    yield b
    b.close()


def body(n: int, pad: int = 0) -> str:
    return f'{{"n": {n}, "pad": "{"x" * pad}"}}'


def put(store: Store, n: int, kind: int = TRACK, created_ms: int = NOW, bound: int = 10**6) -> int:
    op_id, evicted = store.append(kind, body(n), created_ms, bound)
    assert evicted == 0
    return op_id


def claim(store: Store, owner: str = "owner-a", **kwargs: Any) -> list[int]:
    """The ids of the run ``owner`` claims (checked against its rows and body)."""
    options: dict[str, Any] = {
        "max_rows": 500,
        "max_bytes": 512 * 1024,
        "lease_ms": LEASE_MS,
        "max_age_ms": MAX_AGE_MS,
        "now_ms": utc_now_ms(),
    }
    options.update(kwargs)
    run = store.claim(owner, **options).run
    if run is None:
        return []
    rows = store.rows(run.first, run.last)
    assert run.body == b", ".join(r.body for r in rows)
    assert (run.first, run.last, run.ops) == (rows[0].id, rows[-1].id, len(rows))
    return [r.id for r in rows]


def bodies_n(store: Store, ids: list[int]) -> list[int]:
    return [int(r.body.split(b",")[0].split(b":")[1]) for r in store.rows(ids[0], ids[-1])]


# ---- appending, claiming, acknowledging ----


def test_a_run_is_claimed_from_the_head_in_order_and_acked(backend: Backend) -> None:
    store = backend.store()
    ids = [put(store, n) for n in range(5)]
    assert ids == sorted(ids) and backend.ids() == ids
    run = claim(store, max_rows=3)
    assert run == ids[:3] and bodies_n(store, run) == [0, 1, 2]
    assert claim(store, "owner-b") == []  # the head is leased
    assert store.ack(run[0], run[-1], "owner-a") == 3
    assert backend.ids() == ids[3:]
    assert claim(store) == ids[3:]
    assert store.ack(ids[3], ids[4], "owner-a") == 2
    assert store.stats().pending == 0 and not store.has_pending()


def test_an_identify_goes_alone_between_tracks(backend: Backend) -> None:
    store = backend.store()
    t1, t2 = put(store, 1), put(store, 2)
    i = put(store, 3, kind=IDENTIFY)
    t4 = put(store, 4)
    for expected in ([t1, t2], [i], [t4]):
        run = claim(store)
        assert run == expected
        store.ack(run[0], run[-1], "owner-a")


def test_a_run_stops_at_max_bytes(backend: Backend) -> None:
    store = backend.store()
    ids = [store.append(TRACK, body(n, pad=100), NOW, 100)[0] for n in range(10)]
    one = len(body(0, pad=100)) + 2
    assert claim(store, max_bytes=3 * one + 2) == ids[:3]


def test_the_oldest_are_evicted_and_counted(backend: Backend) -> None:
    store = backend.store()
    evicted = [store.append(TRACK, body(n), NOW, 3)[1] for n in range(6)]
    assert sum(evicted) == 3
    assert bodies_n(store, claim(store)) == [3, 4, 5]
    assert store.stats().evicted == 3
    assert store.counters()["evicted"] == 3


def test_eviction_spares_the_batch_in_flight(backend: Backend) -> None:
    store = backend.store()
    for n in range(4):
        store.append(TRACK, body(n), NOW, 4)
    in_flight = claim(store, max_rows=2)  # a live lease on the two oldest
    for n in range(4, 8):
        store.append(TRACK, body(n), NOW, 4)
    left = backend.ids()
    assert left[:2] == in_flight  # still there, though the oldest
    assert store.ack(in_flight[0], in_flight[-1], "owner-a") == 2
    assert bodies_n(store, claim(store))[-1] == 7


def test_a_released_run_counts_an_attempt_and_goes_to_the_next_sender(backend: Backend) -> None:
    store = backend.store()
    ids = [put(store, n) for n in range(3)]
    run = claim(store)
    store.release(run[0], run[-1], "owner-a", failed=True)
    other = backend.store()
    assert claim(other, "owner-b") == ids
    assert [r.attempts for r in other.rows(ids[0], ids[-1])] == [1, 1, 1]


def test_another_senders_lease_blocks_until_it_expires_or_is_taken_over(backend: Backend) -> None:
    store = backend.store()
    ids = [put(store, n) for n in range(2)]
    now = utc_now_ms()
    assert claim(store, "owner-a", now_ms=now) == ids
    other = backend.store()
    assert claim(other, "owner-b", now_ms=now) == []
    assert claim(other, "owner-b", now_ms=now, take_over=True) == ids  # owner-a is gone
    assert store.ack(ids[0], ids[-1], "owner-a") == 0  # not owner-a's any more
    assert backend.ids() == ids
    assert other.ack(ids[0], ids[-1], "owner-b") == 2
    # A lease that ran out is free to take.
    later = [put(store, n) for n in range(2)]
    assert claim(store, "owner-a", now_ms=now, lease_ms=1) == later
    assert claim(other, "owner-b", now_ms=now + 10) == later


def test_head_shows_the_lease_on_the_oldest_op(backend: Backend) -> None:
    store = backend.store()
    assert store.head() is None
    first = put(store, 0)
    assert store.head() == (first, None, 0)
    now = utc_now_ms()
    claim(store, now_ms=now)
    assert store.head() == (first, "owner-a", now + LEASE_MS)


# ---- dead letters ----


def test_refused_ops_become_dead_letters_kept_within_their_bound(backend: Backend) -> None:
    store = backend.store(max_dead_letters=2)
    ids = [put(store, n) for n in range(3)]
    claim(store)
    assert store.dead_letter(ids[0], ids[1], "owner-a", 400, "bad", NOW) == (2, 0)
    assert store.dead_letter(ids[2], ids[2], "owner-a", 422, "worse", NOW) == (1, 1)
    letters = store.dead_letters()
    assert [(d.op_id, d.status, d.reason, d.attempts) for d in letters] == [
        (ids[1], 400, "bad", 1),
        (ids[2], 422, "worse", 1),
    ]
    stats = store.stats()
    assert (stats.pending, stats.dead_letters, stats.refused, stats.dead_letters_pruned) == (
        0,
        2,
        3,
        1,
    )
    assert store.requeue([letters[0].id], KEY) == 1
    assert bodies_n(store, claim(store)) == [1]
    assert store.purge(None, KEY) == 1
    assert store.dead_letters() == []


def test_damaged_and_expired_rows_are_dead_lettered_at_claim(backend: Backend) -> None:
    store = backend.store()
    old = put(store, 0, created_ms=NOW - MAX_AGE_MS - 1000)
    backend.put_raw("not json")
    good = put(store, 2)
    claimed = store.claim(
        "owner-a",
        max_rows=500,
        max_bytes=512 * 1024,
        lease_ms=LEASE_MS,
        max_age_ms=MAX_AGE_MS,
        now_ms=utc_now_ms(),
    )
    assert (claimed.expired, claimed.damaged) == (1, 1)
    assert claimed.run is not None and (claimed.run.first, claimed.run.last) == (good, good)
    reasons = sorted((d.op_id == old, d.reason.split(":")[0]) for d in store.dead_letters())
    assert reasons == [(False, "damaged"), (True, "expired")]


# ---- reading ----


def test_stats_barriers_and_keys(backend: Backend) -> None:
    a, b = backend.store(KEY), backend.store(OTHER_KEY)
    assert (a.last_id(), a.span(), a.has_pending()) == (0, 0, False)
    first = put(a, 1, created_ms=NOW - 5)
    put(a, 2, kind=IDENTIFY)
    last = put(a, 3)
    put(b, 4)
    s = a.stats()
    assert (s.pending_tracks, s.pending_identifies, s.oldest_created_ms) == (2, 1, NOW - 5)
    assert b.stats().pending == 1 and backend.ids(OTHER_KEY) != []
    assert a.last_id() == last and a.span() >= 3
    assert a.pending_through(last) == 3 and a.pending_through(first) == 1
    assert a.pending_through(last, exact=False) == 1
    assert claim(b, "owner-b") == backend.ids(OTHER_KEY)  # b sees only its own
    reports = {r.key_fp: r for r in a.key_reports(None, utc_now_ms())}
    assert (reports[KEY].pending_tracks, reports[KEY].pending_identifies) == (2, 1)
    assert reports[OTHER_KEY].leased == 1


def test_the_sender_state_is_recorded_for_operators(backend: Backend) -> None:
    store = backend.store()
    store.record_sender(1234, NOW, NOW, None)
    store.record_sender(1234, NOW + 1, None, "HTTP 503")
    put(store, 0)
    (report,) = store.key_reports(KEY, utc_now_ms())
    assert (report.sender_pid, report.last_success_ms, report.last_error) == (
        1234,
        NOW,
        "HTTP 503",
    )


# ---- PostgreSQL only ----


@pytest.fixture
def pg(pg_url: str) -> Iterator[Backend]:
    b = Backend(pg_url, "postgres")
    yield b
    b.close()


def test_a_row_committed_after_later_ids_were_claimed_is_not_acked_unsent(pg: Backend) -> None:
    # Ids are given at insert, not at commit: a transaction that inserted first may commit
    # after a sender claimed the rows after it. The ack names the ids it sent, so the late
    # row stays, and is the next one sent.
    import psycopg

    store = pg.store()
    with psycopg.connect(pg.path) as late:  # a transaction left open
        late.execute(
            "INSERT INTO whisperr_durable.ops (key_fp, kind, body, created_ms) "
            "VALUES (%s, %s, %s, %s)",
            (KEY, TRACK, body(0), NOW),
        )
        after = put(store, 1)
        run = claim(store)
        assert run == [after]
        late.commit()
    late_id = pg.ids()[0]
    assert late_id < after
    assert store.ack(run[0], run[-1], "owner-a") == 1
    assert pg.ids() == [late_id]
    assert bodies_n(store, claim(store)) == [0]


def test_the_tables_of_a_newer_schema_are_refused(pg: Backend) -> None:
    store = pg.store()
    put(store, 0)
    pg.sql("UPDATE whisperr_durable.meta SET value = 99 WHERE name = 'min_reader_version'")
    from whisperr_durable._store import StoreError
    from whisperr_durable._store._postgres import _schema_ready

    _schema_ready.discard(pg.path)
    fresh = open_store(pg.path, KEY)
    with pytest.raises(StoreError, match="schema 99 or later"):
        fresh.open()
    assert pg.ids() != []  # left untouched
