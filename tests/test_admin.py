"""OutboxFile: looking into an outbox file from outside a client."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from conftest import API_KEY, MakeClient, closed_port_url, queue_table, raw, set_lease, wait_until

from whisperr_durable import DurableWhisperr, OutboxFile, StoreError
from whisperr_durable._client import key_fingerprint
from whisperr_durable._store import SCHEMA_VERSION
from whisperr_durable._wire import utc_now_ms
from whisperr_durable.devserver import DevServer


def test_status_counts_what_each_key_holds(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    client = make_client()
    client.track("u1", "gets_refused")
    server.push_script(400)
    assert client.flush(timeout=5).refused == 1  # dead-lettered
    client.shutdown(timeout=5)  # its sender's cycle, and its record of it, are over
    client = make_client()  # sends nothing before a flush
    client.track("u1", "payment_failed", {"i": 1})
    client.identify("u1", traits={"plan": "pro"})
    make_client("wrk_other_key").track("u2", "trial_started")

    with OutboxFile(db_path) as outbox:
        status = outbox.status()
    assert status.schema_version == SCHEMA_VERSION
    assert status.file_bytes >= os.path.getsize(db_path) > 0
    by_key = {k.key_fingerprint: k for k in status.keys}
    mine = by_key[key_fingerprint(API_KEY)]
    assert (mine.pending_tracks, mine.pending_identifies, mine.dead_letters) == (1, 1, 1)
    assert mine.pending == 2
    assert mine.sender_pid == os.getpid()
    assert mine.last_error == "HTTP 400" and mine.last_error_ms is not None
    assert mine.leased == 0 and not mine.sender_active
    theirs = by_key[key_fingerprint("wrk_other_key")]
    assert (theirs.pending, theirs.dead_letters, theirs.sender_pid) == (1, 0, None)

    with OutboxFile(db_path, api_key=API_KEY) as outbox:
        assert [k.key_fingerprint for k in outbox.status().keys] == [key_fingerprint(API_KEY)]


def test_status_shows_a_batch_in_flight_and_the_process_holding_it(
    make_client: MakeClient, db_path: str
) -> None:
    client = make_client()
    client.track("u1", "in_flight")
    owner = "4242-abcdef"
    set_lease(db_path, owner, 2**62)
    with OutboxFile(db_path) as outbox:
        (key,) = outbox.status().keys
    assert (key.leased, key.lease_owner_pid, key.lease_until_ms) == (1, 4242, 2**62)


def test_peek_lists_the_next_ops_in_delivery_order(make_client: MakeClient, db_path: str) -> None:
    client = make_client()
    client.track("u1", "first", {"i": 1})
    client.identify("u1", email="ada@example.com")
    client.track("u1", "third", {"i": 3})
    make_client("wrk_other_key").track("u2", "someone_else")
    with OutboxFile(db_path, api_key=API_KEY) as outbox:
        ops = outbox.peek(10)
        assert [op.kind for op in ops] == ["track", "identify", "track"]
        assert [op.body.get("event_type") for op in ops] == ["first", None, "third"]
        assert ops[1].body["channels"][0]["address"] == "ada@example.com"
        assert [op.id for op in ops] == sorted(op.id for op in ops)
        assert len(outbox.peek(2)) == 2
    with OutboxFile(db_path) as outbox:
        assert len(outbox.peek(10)) == 4


def test_requeue_sends_a_dead_letter_again_with_its_message_id(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    client = make_client()
    client.track("u1", "refused_then_fixed", {"i": 1})
    server.push_script(422)
    assert client.flush(timeout=5).refused == 1
    with OutboxFile(db_path, api_key=API_KEY) as outbox:
        (dead,) = outbox.dead_letters()
        assert dead.status == 422 and dead.kind == "track"
        first_id = json.loads(dead.body)["context"]["$message_id"]
        assert outbox.requeue([dead.id]) == 1
        assert outbox.dead_letters() == []
        assert outbox.requeue() == 0
    assert client.flush(timeout=5).ok
    (event,) = server.events
    assert event["context"]["$message_id"] == first_id


def test_peek_shows_a_requeued_op_where_it_will_be_delivered(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    first = make_client()
    first.track("u1", "refused_then_fixed", {"i": 0})
    server.push_script(422)
    assert first.flush(timeout=5).refused == 1  # dead-lettered
    # Its sender may go on draining for a moment after flush() returned: the newer ops are
    # tracked by a client whose sender sends only when asked.
    first.shutdown(timeout=5)
    client = make_client()
    tick = utc_now_ms()
    while utc_now_ms() <= tick:  # the newer ops are created in a later millisecond
        pass
    client.track("u1", "newer", {"i": 1})
    client.track("u1", "newer", {"i": 2})
    with OutboxFile(db_path, api_key=API_KEY) as outbox:
        (dead,) = outbox.dead_letters()
        assert outbox.requeue([dead.id]) == 1  # back at the end of the queue
        peeked = [op.body["properties"]["i"] for op in outbox.peek(10)]
    assert client.flush(timeout=5).ok
    delivered = [event["properties"]["i"] for event in server.events]
    assert delivered == [1, 2, 0]
    assert peeked == delivered


def test_purge_deletes_dead_letters_by_id_or_all(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    client = make_client()
    for i in range(3):
        client.track("u1", "refused", {"i": i})
    server.push_script(400, 400, 400, 400, 400, 400)  # the batch, then each half, then each
    assert client.flush(timeout=5).refused == 3
    with OutboxFile(db_path) as outbox:
        dead = outbox.dead_letters()
        assert len(dead) == 3
        assert outbox.purge([dead[0].id]) == 1
        assert [d.id for d in outbox.dead_letters()] == [d.id for d in dead[1:]]
        assert outbox.purge() == 2
        assert outbox.dead_letters() == []


def test_a_missing_file_is_never_created(tmp_path: Path) -> None:
    path = tmp_path / "nothing-here.db"
    with pytest.raises(FileNotFoundError):
        OutboxFile(str(path))
    assert not path.exists()


def test_a_file_that_is_not_an_outbox_is_reported_and_left_alone(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all" * 100)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (text)")
    before = {p: p.read_bytes() for p in (garbage, foreign)}
    for path in (garbage, foreign):
        with pytest.raises(StoreError):
            OutboxFile(str(path))
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.db", "garbage.db"]


def test_a_later_schema_that_keeps_this_sdk_as_a_reader_is_used(
    db_path: str, server: DevServer
) -> None:
    # A later SDK added a table and kept min_reader_version: this one goes on using the
    # file, and leaves its version and its new table as they are.
    first = DurableWhisperr(API_KEY, path=db_path, base_url=closed_port_url())
    first.track("u1", "before", {"i": 0})
    first.shutdown(timeout=0)
    with sqlite3.connect(db_path, isolation_level=None) as conn:
        conn.execute("CREATE TABLE later_feature (x INTEGER)")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    client = DurableWhisperr(API_KEY, path=db_path, base_url=server.url)
    try:
        client.track("u1", "after", {"i": 1})
        assert client.flush(timeout=10).pending == 0
        assert client.stats().schema_version == SCHEMA_VERSION + 1
        assert client.stats().error is None
    finally:
        client.shutdown(timeout=1)
    assert [e["properties"]["i"] for e in server.events] == [0, 1]
    assert raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert raw(db_path, "SELECT count(*) FROM later_feature") == [(0,)]
    # Raised past this SDK's schema, the file is refused and left as it is.
    raw(db_path, "UPDATE meta SET value = ? WHERE name = 'min_reader_version'", (99,))
    with pytest.raises(StoreError, match="schema 99 or later"):
        OutboxFile(db_path).status()


# ---- space: what a drain frees ----


def file_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def test_a_drain_that_empties_the_queue_gives_the_space_back(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    client = make_client(max_queue_size=100_000)
    client.track_many(("u1", "bulk_event", {"i": i, "pad": "x" * 200}) for i in range(20_000))
    with OutboxFile(db_path) as outbox:
        full = outbox.status()
    assert full.file_bytes > 5_000_000
    assert client.flush(timeout=60).ok
    # The sender gives the freed pages back once its drain finds the queue empty.

    def reclaimed() -> bool:
        with OutboxFile(db_path) as outbox:
            return outbox.status().reclaimable_bytes == 0

    assert wait_until(reclaimed)
    assert wait_until(lambda: file_bytes(db_path) < full.file_bytes / 10)  # the WAL too
    assert len(server.events) == 20_000


def test_compact_gives_back_what_an_older_file_kept_and_keeps_every_queued_op(
    make_client: MakeClient, db_path: str
) -> None:
    client = make_client(max_queue_size=100_000)
    client.track_many(("u1", "bulk_event", {"i": i, "pad": "x" * 200}) for i in range(20_000))
    client.shutdown(timeout=0)
    # A file whose free pages stay in it (no incremental auto-vacuum), its queue mostly gone.
    with sqlite3.connect(db_path, isolation_level=None) as conn:
        conn.execute("PRAGMA auto_vacuum = NONE")
        conn.execute("VACUUM")
        conn.execute(
            f"DELETE FROM {queue_table()} WHERE json_extract(body, '$.properties.i') >= 10"
        )
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with OutboxFile(db_path) as outbox:
        before = outbox.status()
        assert before.reclaimable_bytes > 3_000_000
        sizes = outbox.compact()
        after = outbox.status()
    assert sizes[0] >= before.file_bytes - 4096 and sizes[1] < sizes[0] / 10
    assert after.reclaimable_bytes == 0 and after.file_bytes == sizes[1]
    assert [k.pending for k in after.keys] == [10]
    assert raw(db_path, "PRAGMA auto_vacuum") == [(2,)]  # later drains give pages back
    survivor = make_client()
    assert survivor.stats().pending == 10
