"""The outbox under broken disks and files, through the public client where possible.

Real conditions only: a writer connection that SQLite cannot grow (``max_page_count``) and a
real 512 KiB tmpfs filled to the last byte, files an unprivileged process cannot write,
garbage and truncated files, WAL files left by SIGKILLed processes and then removed or cut,
six processes creating one file at once, leases and backoff across wall-clock jumps, and
what ``on_error`` and the logs may say.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from conftest import (
    API_KEY,
    MakeClient,
    as_unprivileged,
    child_env,
    closed_port_url,
    delivery_order,
    fill_filesystem,
    leased_ids,
    numbers,
    queue_table,
    raw,
    run_forked,
    set_lease,
    wait_until,
)

from whisperr_durable import DurableWhisperr, WhisperrError, _options, _retry, _writer
from whisperr_durable._client import key_fingerprint
from whisperr_durable._lock import lock_path
from whisperr_durable._store import APPLICATION_ID, SCHEMA_VERSION, Outbox
from whisperr_durable._wire import TRACK, encode_track, message_id, utc_now_ms
from whisperr_durable.devserver import DevServer

ROOT = Path(__file__).resolve().parent.parent
DAY_MS = 24 * 3600 * 1000
# SQLite's default max_page_count here; anything this large means "no limit" for our files.
NO_PAGE_LIMIT = 1_073_741_823


@pytest.fixture
def restore_logger() -> Iterator[None]:
    """``debug=True`` sets the package logger's level and adds a stderr handler: undo both."""
    logger = logging.getLogger("whisperr_durable")
    level, handlers = logger.level, list(logger.handlers)
    yield
    for handler in list(logger.handlers):
        if handler not in handlers:
            logger.removeHandler(handler)
    logger.setLevel(level)


# ---- helpers ----


def rows_in_main_file_only(path: str, scratch: Path) -> int:
    """How many ops the main database file holds by itself, without its -wal."""
    scratch.mkdir(exist_ok=True)
    copy = scratch / "main-only.db"
    shutil.copyfile(path, copy)
    try:
        ((count,),) = raw(str(copy), f"SELECT count(*) FROM {queue_table()}")
    except sqlite3.OperationalError as exc:  # the schema itself is still in the WAL
        assert "no such table" in str(exc)
        return 0
    return int(count)


def seed_outbox(path: str, count: int, *, pad: int = 0) -> None:
    """Store ``count`` real events for API_KEY and leave them checkpointed in the main file."""
    now = utc_now_ms()
    outbox = Outbox(path, key_fingerprint(API_KEY))
    try:
        for i in range(count):
            body = encode_track(
                {}, "seed_user", "seeded", {"i": i, "pad": "s" * pad}, None, message_id(), now
            )
            outbox.append(TRACK, body, now, 100_000)
        outbox.checkpoint(truncate=True)
    finally:
        outbox.close()  # the only connection: SQLite checkpoints and removes the WAL


def moved_aside(db_path: str) -> list[Path]:
    """Outbox files moved aside (not their -wal companions)."""
    found = Path(db_path).parent.glob(Path(db_path).name + ".corrupt-*")
    return sorted(p for p in found if not p.name.endswith("-wal"))


def cap_writer_pages(client: DurableWhisperr) -> sqlite3.Connection:
    """Make the client's own writer connection unable to grow the file (SQLITE_FULL)."""
    outbox = client._writer._outbox
    assert isinstance(outbox, Outbox)
    conn = outbox._connection()
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    (limit,) = conn.execute(f"PRAGMA max_page_count={int(pages)}").fetchone()
    assert limit == pages
    return conn


def pad_for(i: int) -> str:
    return "x" * ((i * 397) % 1500)  # varied sizes: 0 to ~1.5 KiB


def track_until_store_error(
    client: DurableWhisperr, errors: list[WhisperrError], start: int, limit: int = 5000
) -> int:
    """Track ``{"i": start}``, ``start + 1``... until ``on_error`` hears of a refusal; the
    next ``i``. The op of the last call is the first one refused."""
    seen = len(errors)
    i = start
    while len(errors) == seen:
        assert i - start < limit, "the outbox never reported being full"
        client.track("u1", "disk_full", {"i": i, "pad": pad_for(i)})  # never raises
        i += 1
    return i


def held(client: DurableWhisperr) -> int:
    """Ops the client holds in memory because the outbox refused them."""
    return client.stats().held


def wait_ok(result: Any) -> None:
    assert result.ok, result


# ---- 1. disk full ----


@pytest.mark.parametrize("recovery", ["next_track", "flush", "sender_wake"])
def test_disk_full_holds_ops_and_writes_them_first_when_space_returns(
    make_client: MakeClient,
    server: DevServer,
    caplog: pytest.LogCaptureFixture,
    recovery: str,
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    for i in range(5):
        client.track("u1", "disk_full", {"i": i})
    conn = cap_writer_pages(client)

    i = track_until_store_error(client, errors, 5)
    first_refused = i - 1
    stored = first_refused
    # A few more while full, an identify among them: all held, nothing raised.
    client.track("u1", "disk_full", {"i": i, "pad": pad_for(i)})
    client.identify("u1", traits={"i": i + 1}, email="held@example.com")
    client.track("u1", "disk_full", {"i": i + 2, "pad": "y" * 3000})
    i += 3

    assert [e.type for e in errors] == ["store_error"]  # once for the whole episode
    assert "full" in errors[0].message
    stats = client.stats()
    assert stats.pending == stored  # nothing already stored was touched
    assert stats.store_errors == i - first_refused
    assert held(client) == i - first_refused
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert server.requests == []

    conn.execute(f"PRAGMA max_page_count={NO_PAGE_LIMIT}")  # space returns
    if recovery == "next_track":
        # Still the episode: held at once, without trying the file. The sender retries the
        # file within a second and stores them all, oldest first; nothing is sent yet.
        client.track("u1", "disk_full", {"i": i})
        i += 1
        assert wait_until(lambda: held(client) == 0)
        assert client.stats().pending == i
        assert server.requests == []
        wait_ok(client.flush(timeout=10))
    elif recovery == "flush":
        wait_ok(client.flush(timeout=10))
    else:
        # No new call at all: the sender delivers when it wakes (as the flush_interval timer
        # wakes it), whether the file took the held ops by then or they go from memory.
        client._sender.wake()
        assert server.wait_for_events(i - 1, timeout=10)
        assert server.wait_for_identifies(1, timeout=10)
        wait_ok(client.flush(timeout=10))

    assert delivery_order(server) == list(range(i))  # held ops oldest first, before newer
    assert server.identifies[0]["channels"][0]["address"] == "held@example.com"
    assert server.duplicates == 0
    assert client.stats().pending == 0
    assert [e.type for e in errors] == ["store_error"]  # no drop, no second report


def test_each_disk_full_episode_is_reported_once(
    make_client: MakeClient, server: DevServer
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    client.track("u1", "disk_full", {"i": 0})
    conn = cap_writer_pages(client)
    i = track_until_store_error(client, errors, 1)
    for _ in range(3):
        client.track("u1", "disk_full", {"i": i, "pad": pad_for(i)})
        i += 1
    assert [e.type for e in errors] == ["store_error"]

    conn.execute(f"PRAGMA max_page_count={NO_PAGE_LIMIT}")
    client.track("u1", "disk_full", {"i": i})
    i += 1
    assert wait_until(lambda: held(client) == 0)  # the sender stored them: the episode ends
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count={int(pages)}")
    i = track_until_store_error(client, errors, i)
    assert [e.type for e in errors] == ["store_error", "store_error"]

    conn.execute(f"PRAGMA max_page_count={NO_PAGE_LIMIT}")
    wait_ok(client.flush(timeout=10))
    assert delivery_order(server) == list(range(i))


def test_beyond_max_overflow_the_oldest_held_ops_are_dropped_and_reported(
    make_client: MakeClient, server: DevServer
) -> None:
    # The client binds the name at import: this is the bound it really uses.
    limit = _writer.__dict__["MAX_OVERFLOW"]
    assert limit == _options.MAX_OVERFLOW
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    for i in range(3):
        client.track("u1", "overflow", {"i": i})
    conn = cap_writer_pages(client)
    i = track_until_store_error(client, errors, 3)
    first_refused = i - 1
    extra = 7
    while i - first_refused < limit + extra:
        client.track("u1", "overflow", {"i": i, "pad": pad_for(i)})
        i += 1

    types = [e.type for e in errors]
    assert types == ["store_error"] + ["dropped"] * extra
    assert held(client) == limit
    assert client.stats().pending == first_refused

    conn.execute(f"PRAGMA max_page_count={NO_PAGE_LIMIT}")
    wait_ok(client.flush(timeout=20))
    dropped = list(range(first_refused, first_refused + extra))  # the oldest held ones
    expected = [n for n in range(i) if n not in dropped]
    assert numbers(server.events) == expected
    assert server.duplicates == 0


def test_shutdown_with_the_disk_still_full_delivers_the_held_ops_from_memory(
    make_client: MakeClient, server: DevServer
) -> None:
    # Never worse than the in-memory SDK: what the file cannot take goes from memory.
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    for i in range(4):
        client.track("u1", "still_full", {"i": i})
    cap_writer_pages(client)
    i = track_until_store_error(client, errors, 4)
    client.track("u1", "still_full", {"i": i})
    assert held(client) == 2

    result = client.shutdown(timeout=5)

    assert (result.pending, result.lost) == (0, 0)
    assert numbers(server.events) == list(range(i + 1))  # in order: file first, then memory
    assert server.duplicates == 0
    assert [e.type for e in errors] == ["store_error"]


def test_shutdown_with_the_disk_full_and_the_server_down_reports_the_held_ops_as_dropped(
    make_client: MakeClient, server: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    for i in range(4):
        client.track("u1", "still_full", {"i": i})
    cap_writer_pages(client)
    i = track_until_store_error(client, errors, 4)
    stored = i - 1
    client.track("u1", "still_full", {"i": i})
    lost = held(client)
    assert lost == 2
    server.answer = 503

    started = time.monotonic()
    result = client.shutdown(timeout=2)
    assert time.monotonic() - started < 2.5
    assert not result.ok
    assert result.lost == lost
    # The single pass of shutdown stopped at the first failed request, as the official SDK's.
    assert [e.type for e in errors] == ["store_error", "dropped"]
    assert str(lost) in errors[-1].message
    logged = [r for r in caplog.records if "could not be stored or delivered" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING
    # Tracked after shutdown: still stored for the next client (the limit died with the
    # connection), never raised.
    client.track("u1", "after_shutdown", {"i": 100})

    # What was stored before the disk filled waits in the file, with the op tracked after
    # shutdown, for the next process.
    server.answer = None
    survivor = make_client()
    assert survivor.stats().pending == stored + 1
    wait_ok(survivor.flush(timeout=10))
    assert numbers(server.events) == [*range(stored), 100]


def test_flush_while_the_disk_is_full_and_the_server_down_counts_every_undelivered_op(
    make_client: MakeClient, server: DevServer
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append, max_retries=0)
    for i in range(5):
        client.track("u1", "full_flush", {"i": i})
    cap_writer_pages(client)
    track_until_store_error(client, errors, 5)
    server.answer = 503
    result = client.flush(timeout=2)
    assert result.reason == "retry_exhausted"
    # Every op enqueued before the flush and not delivered: held in memory or in the file.
    stats = client.stats()
    assert result.pending == stats.held + stats.pending > 5


def test_a_real_full_filesystem(small_fs: Path, server: DevServer) -> None:
    errors: list[WhisperrError] = []
    path = str(small_fs / "outbox.db")
    client = DurableWhisperr(
        API_KEY,
        path=path,
        base_url=server.url,
        flush_at=100_000,
        flush_interval=3600.0,
        on_error=errors.append,
    )
    try:
        for i in range(5):
            client.track("u1", "tmpfs_full", {"i": i})
        filler = fill_filesystem(small_fs)

        i = track_until_store_error(client, errors, 5)
        stored = i - 1
        for _ in range(10):
            client.track("u1", "tmpfs_full", {"i": i, "pad": pad_for(i)})
            i += 1
        assert [e.type for e in errors] == ["store_error"]
        assert "full" in errors[0].message
        assert client.stats().pending == stored
        assert held(client) == i - stored

        filler.unlink()  # space returns
        client.track("u1", "tmpfs_full", {"i": i})
        i += 1
        assert wait_until(lambda: held(client) == 0)  # the sender's retry stored them
        assert client.stats().pending == i
        wait_ok(client.flush(timeout=10))
        assert numbers(server.events) == list(range(i))
        assert [e.type for e in errors] == ["store_error"]
    finally:
        client.shutdown(timeout=1)


def test_a_real_full_filesystem_at_shutdown(small_fs: Path, server: DevServer) -> None:
    errors: list[WhisperrError] = []
    path = str(small_fs / "outbox.db")
    options: dict[str, Any] = {
        "base_url": server.url,
        "flush_at": 100_000,
        "flush_interval": 3600.0,
    }
    client = DurableWhisperr(API_KEY, path=path, on_error=errors.append, **options)
    try:
        for i in range(3):
            client.track("u1", "tmpfs_shutdown", {"i": i})
        filler = fill_filesystem(small_fs)
        i = track_until_store_error(client, errors, 3)
        stored = i - 1
        client.track("u1", "tmpfs_shutdown", {"i": i})
        result = client.shutdown(timeout=2)
        # The held ones go from memory. The stored ones wait in the file if the full
        # filesystem takes not even the sender's lease on them, or if it takes the lease but
        # not the delete after their delivery (they go again, with the same $message_id);
        # or they go for good if the WAL's existing pages take both. Either way none is
        # lost, and the result says which.
        assert result.lost == 0
        assert [e.type for e in errors] == ["store_error"]
        sent_early = sorted(numbers(server.events))
        if result.pending:
            assert (result.pending, result.reason) == (stored, "store")
            assert sent_early in ([stored, stored + 1], list(range(stored + 2)))
        else:
            assert sent_early == list(range(stored + 2))
    finally:
        client.shutdown(timeout=0)
    filler.unlink()
    survivor = DurableWhisperr(API_KEY, path=path, **options)
    try:
        assert survivor.stats().pending == result.pending
        wait_ok(survivor.flush(timeout=10))
    finally:
        survivor.shutdown(timeout=1)
    assert sorted(numbers(server.events)) == list(range(i + 1))
    assert server.duplicates == (stored if len(sent_early) > 2 and result.pending else 0)


# ---- 2. read-only files and directories ----


CANNOT_SET_UP = 64


def track_into_unwritable(path: str, url: str) -> int:
    """In the unprivileged child: bit flags of what went wrong (0: as documented)."""
    errors: list[WhisperrError] = []
    code = 0
    try:
        client = DurableWhisperr(
            API_KEY,
            path=path,
            base_url=url,
            flush_at=100_000,
            flush_interval=3600.0,
            store_timeout=0.2,
            on_error=errors.append,
        )
        client.track("u1", "read_only", {"i": 1})
        client.track("u1", "read_only", {"i": 2})
        client.identify("u1", traits={"i": 3})
    except BaseException:
        return 1
    if [e.type for e in errors] != ["store_error"]:  # once for the episode
        code |= 2
    elif not all(word in errors[0].message for word in (path, "nobody", "root", "mode")):
        code |= 4  # the path, who we are, who owns what we cannot write, and its mode
    result = client.shutdown(timeout=5)
    # Delivered from memory: the file is unusable, the network is fine.
    if (result.pending, result.lost, result.reason) != (0, 0, "store"):
        code |= 8
    if [e.type for e in errors] != ["store_error"]:
        code |= 16
    return code


def test_a_read_only_outbox_file(
    world_readable_dir: Path, server: DevServer, make_client: MakeClient
) -> None:
    path = str(world_readable_dir / "outbox.db")
    owner = make_client(path=path)
    owner.track("u0", "before", {"i": 0})
    wait_ok(owner.flush(timeout=5))
    owner.shutdown()
    assert not os.path.exists(path + "-wal")  # closed cleanly: everything in the main file
    os.chmod(path, 0o644 if os.geteuid() == 0 else 0o444)
    if os.geteuid() != 0:
        os.chmod(world_readable_dir, 0o555)
    before = Path(path).read_bytes()

    def child() -> int:
        if not os.access(path, os.R_OK) or os.access(path, os.W_OK):
            return CANNOT_SET_UP
        return track_into_unwritable(path, server.url)

    code = run_forked(as_unprivileged(child))
    if code == CANNOT_SET_UP:
        pytest.skip("could not make the outbox read-only for this process")
    assert code == 0, f"failure flags {code:#b}"
    os.chmod(world_readable_dir, 0o755)
    assert Path(path).read_bytes() == before
    # The owner's op, then the child's three, which the child delivered from memory.
    assert numbers(server.events) == [0, 1, 2]
    assert [i["traits"] for i in server.identifies] == [{"i": 3}]


def test_a_read_only_directory_for_a_new_outbox(
    world_readable_dir: Path, server: DevServer
) -> None:
    path = str(world_readable_dir / "outbox.db")
    if os.geteuid() != 0:
        os.chmod(world_readable_dir, 0o555)

    def child() -> int:
        if os.access(str(world_readable_dir), os.W_OK):
            return CANNOT_SET_UP
        return track_into_unwritable(path, server.url)

    code = run_forked(as_unprivileged(child))
    if code == CANNOT_SET_UP:
        pytest.skip("could not make the directory read-only for this process")
    assert code == 0, f"failure flags {code:#b}"
    assert sorted(os.listdir(world_readable_dir)) == []
    assert numbers(server.events) == [1, 2]  # delivered from memory
    assert [i["traits"] for i in server.identifies] == [{"i": 3}]


# ---- 3. corrupt files ----


def test_a_garbage_file_is_moved_aside_and_a_fresh_outbox_used(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    garbage = os.urandom(3000) + b"definitely not SQLite" * 500
    Path(db_path).write_bytes(garbage)
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    client.track("u1", "after_garbage", {"i": 0})  # never raises
    client.track("u1", "after_garbage", {"i": 1})

    asides = moved_aside(db_path)
    assert len(asides) == 1, asides
    aside = asides[0]
    assert re.fullmatch(rf"outbox\.db\.corrupt-\d{{8}}T\d{{6}}-{os.getpid()}", aside.name)
    assert aside.read_bytes() == garbage  # kept byte for byte, for inspection
    assert [e.type for e in errors] == ["store_error"]
    assert str(aside) in errors[0].message
    stats = client.stats()
    assert (stats.pending, stats.store_errors, stats.schema_version) == (2, 0, SCHEMA_VERSION)
    wait_ok(client.flush(timeout=5))
    assert numbers(server.events) == [0, 1]


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_a_truncated_outbox_is_read_or_moved_aside_never_raised(
    make_client: MakeClient, server: DevServer, db_path: str, keep: float
) -> None:
    seed_outbox(db_path, 300, pad=200)
    assert not os.path.exists(db_path + "-wal")
    size = os.path.getsize(db_path)
    with open(db_path, "r+b") as handle:
        handle.truncate(int(size * keep))
    truncated = Path(db_path).read_bytes()

    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    for i in range(1000, 1003):
        client.track("u1", "after_truncation", {"i": i})  # never raises
    result = client.flush(timeout=10)

    asides = moved_aside(db_path)
    if asides:
        assert len(asides) == 1
        assert asides[0].read_bytes() == truncated
        assert any(e.type == "store_error" and str(asides[0]) in e.message for e in errors)
    else:
        assert errors == []
    wait_ok(result)
    delivered = numbers(server.events)
    assert delivered[-3:] == [1000, 1001, 1002]
    assert set(delivered[:-3]) <= set(range(300))  # whatever was readable, nothing invented
    assert server.duplicates == 0


def force_checkpoint(path: str) -> None:
    """Copy the WAL into the main file and empty it.

    The sender may be running its own checkpoint right after a cycle, and SQLite answers a
    second checkpointer "busy" at once instead of calling the busy handler: ask again,
    within a deadline, as a busy handler would.
    """
    deadline = time.monotonic() + 5
    while True:
        ((busy, log, done),) = raw(path, "PRAGMA wal_checkpoint(TRUNCATE)")
        if busy == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert busy == 0 and log == done, (busy, log, done)


def test_ops_stored_after_a_move_aside_are_delivered_by_the_running_sender(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append, max_queue_size=5)
    client.track("u1", "in_use", {"i": 0})
    wait_ok(client.flush(timeout=5))  # the sender's own connection is open from here on
    # The drain that served the flush may go on with ops tracked right after it (and hold
    # them under its lease, which eviction leaves alone): what it takes stays queued.
    server.answer = 503
    for i in range(1, 6):
        client.track("u1", "in_use", {"i": i})
    force_checkpoint(db_path)
    # Break the page of the table only the writer uses (the eviction counter).
    ((root,),) = raw(db_path, "SELECT rootpage FROM sqlite_master WHERE name = 'counters'")
    ((page_size,),) = raw(db_path, "PRAGMA page_size")
    with open(db_path, "r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(b"\xee" * page_size)
    # The first track() that evicts finds the file corrupt. (The sender may say first that
    # the file it used was replaced under it, with the ops it held: a race of two threads.)
    i = 6
    while "store_error" not in [e.type for e in errors]:
        assert i < 100, "no append evicted"
        client.track("u1", "in_use", {"i": i})
        i += 1
    assert {e.type for e in errors} <= {"store_error", "dropped"}
    assert len(moved_aside(db_path)) == 1
    client.track("u1", "in_use", {"i": i})  # stored in a fresh file

    server.answer = None
    wait_ok(client.flush(timeout=3))
    assert {i - 1, i} <= set(numbers(server.events))


# ---- 4. WAL files ----


TRACKER = """
import json, sqlite3, sys
from whisperr_durable import DurableWhisperr
path = {path!r}
client = DurableWhisperr(
    {key!r}, path=path, base_url={url!r}, flush_at=1_000_000, flush_interval=3600.0,
)
for i in range({count}):
    client.track("user_" + str(i % 3), "wal_test", {{"i": i}})
{extra}
print("done", flush=True)
sys.stdin.read()
"""

CHECKPOINT_FROM_ANOTHER_CONNECTION = """
conn = sqlite3.connect(path, timeout=5, isolation_level=None)
print(json.dumps(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()), flush=True)
conn.close()
"""


def track_then_sigkill(path: str, url: str, count: int, extra: str = "") -> list[str]:
    """A child tracks ``count`` events, runs ``extra``, and is SIGKILLed; its printed lines."""
    script = TRACKER.format(path=path, key=API_KEY, url=url, count=count, extra=extra)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=str(ROOT),
        env=child_env(),
        text=True,
    )
    lines: list[str] = []
    try:
        assert child.stdout is not None
        while True:
            line = child.stdout.readline()
            assert line, "the child died before it was done"
            if line.strip() == "done":
                break
            lines.append(line.strip())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()
    assert child.returncode == -signal.SIGKILL
    return lines


def test_ops_only_in_the_wal_survive_a_sigkill(
    make_client: MakeClient, server: DevServer, db_path: str, tmp_path: Path
) -> None:
    count = 50
    track_then_sigkill(db_path, server.url, count)
    assert server.requests == []
    assert os.path.getsize(db_path + "-wal") > 0
    assert rows_in_main_file_only(db_path, tmp_path / "scratch") == 0  # never checkpointed

    survivor = make_client()
    assert survivor.stats().pending == count
    wait_ok(survivor.flush(timeout=10))
    assert numbers(server.events) == list(range(count))
    assert server.duplicates == 0


def test_a_removed_shm_file_is_rebuilt(
    make_client: MakeClient, server: DevServer, db_path: str, tmp_path: Path
) -> None:
    count = 40
    track_then_sigkill(db_path, server.url, count)
    os.unlink(db_path + "-shm")
    assert rows_in_main_file_only(db_path, tmp_path / "scratch") == 0  # rows only in the WAL

    errors: list[WhisperrError] = []
    survivor = make_client(on_error=errors.append)
    assert survivor.stats().pending == count
    assert os.path.exists(db_path + "-shm")
    wait_ok(survivor.flush(timeout=10))
    assert numbers(server.events) == list(range(count))
    assert errors == []


def test_a_removed_wal_after_a_checkpoint_loses_nothing(
    make_client: MakeClient, server: DevServer, db_path: str, tmp_path: Path
) -> None:
    count = 40
    lines = track_then_sigkill(db_path, server.url, count, CHECKPOINT_FROM_ANOTHER_CONNECTION)
    busy, log, done = json.loads(lines[-1])
    assert busy == 0 and log > 0 and log == done  # every frame copied into the main file
    assert os.path.getsize(db_path + "-wal") > 0
    assert rows_in_main_file_only(db_path, tmp_path / "scratch") == count
    os.unlink(db_path + "-wal")

    errors: list[WhisperrError] = []
    survivor = make_client(on_error=errors.append)
    assert survivor.stats().pending == count
    wait_ok(survivor.flush(timeout=10))
    assert numbers(server.events) == list(range(count))
    assert errors == []


def wal_layout(wal: Path) -> tuple[int, list[bool]]:
    """The frame size of a WAL file and, per frame, whether it ends a commit."""
    data = wal.read_bytes()
    page_size = int.from_bytes(data[8:12], "big")
    frame = 24 + page_size
    assert (len(data) - 32) % frame == 0, "the WAL does not end on a frame boundary"
    commits = [
        int.from_bytes(data[32 + k * frame + 4 : 32 + k * frame + 8], "big") != 0
        for k in range((len(data) - 32) // frame)
    ]
    return frame, commits


def test_a_wal_cut_mid_frame_keeps_every_complete_commit(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    count = 30
    track_then_sigkill(db_path, server.url, count)
    wal = Path(db_path + "-wal")
    frame, commits = wal_layout(wal)
    # The schema was checkpointed into the main file when the file was created (a power cut
    # must not take it), so the WAL started again: one commit per track, the last frame
    # ending one.
    assert commits[-1] and sum(commits) == count
    with open(wal, "r+b") as handle:
        handle.truncate(wal.stat().st_size - frame // 2)  # cut inside the last frame

    errors: list[WhisperrError] = []
    survivor = make_client(on_error=errors.append)
    assert survivor.stats().pending == count - 1  # only the cut commit is gone
    wait_ok(survivor.flush(timeout=10))
    assert numbers(server.events) == list(range(count - 1))
    assert errors == []
    assert moved_aside(db_path) == []


# ---- 5. schema creation and versions ----


RACER = """
import json, os, sys
from whisperr_durable import DurableWhisperr
errors = []
client = DurableWhisperr(
    {key!r}, path={path!r}, base_url={url!r}, flush_at=1_000_000, flush_interval=3600.0,
    on_error=errors.append,
)
print("ready", flush=True)
sys.stdin.readline()
raised = ""
try:
    client.track("racer", "schema_race", {{"i": {n}}})
except BaseException as exc:
    raised = repr(exc)
print(json.dumps({{"errors": [e.message for e in errors], "raised": raised}}), flush=True)
os._exit(0)
"""


def test_six_processes_create_one_new_outbox_at_once(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    n = 6
    assert not os.path.exists(db_path)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", RACER.format(key=API_KEY, path=db_path, url=server.url, n=k)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=str(ROOT),
            env=child_env(),
            text=True,
        )
        for k in range(n)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        assert not os.path.exists(db_path)  # nobody has touched the file yet
        for child in children:  # go, all at once
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outcomes = []
        for child in children:
            assert child.stdout is not None
            outcomes.append(json.loads(child.stdout.readline()))
            assert child.wait(20) == 0
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(10)
            for pipe in (child.stdin, child.stdout):
                if pipe is not None:
                    pipe.close()
    assert outcomes == [{"errors": [], "raised": ""}] * n

    assert raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    names = raw(db_path, "SELECT type, name, count(*) FROM sqlite_master GROUP BY type, name")
    assert all(c == 1 for _, _, c in names), names
    tables = {name for kind, name, _ in names if kind == "table"}
    assert tables == {
        "ops:" + key_fingerprint(API_KEY),  # the one key's queue, created once
        "dead_letters",
        "counters",
        "sender_state",
        "leases",
        "gaps",
        "meta",
        "sqlite_sequence",
    }
    indexes = {name for kind, name, _ in names if kind == "index"}
    assert "identifies:" + key_fingerprint(API_KEY) in indexes  # the queue's, created once
    assert raw(db_path, f"SELECT count(*), min(id), max(id) FROM {queue_table()}") == [(n, 1, n)]

    collector = make_client()
    wait_ok(collector.flush(timeout=10))
    assert sorted(numbers(server.events)) == list(range(n))


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_a_newer_schema_version_is_reported_and_left_untouched(
    make_client: MakeClient, server: DevServer, db_path: str, journal_mode: str
) -> None:
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA journal_mode={journal_mode}")
        conn.execute("CREATE TABLE ops_v9 (id INTEGER PRIMARY KEY, payload BLOB)")
        conn.execute("INSERT INTO ops_v9 (payload) VALUES (randomblob(5000))")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")  # an outbox, of a later SDK
    assert not os.path.exists(db_path + "-wal")
    past = time.time() - 3600
    os.utime(db_path, (past, past))
    before = Path(db_path).read_bytes()
    mtime = os.stat(db_path).st_mtime_ns

    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append, store_timeout=0.2)
    client.track("u1", "from_an_older_sdk", {"i": 0})  # never raises
    client.track("u1", "from_an_older_sdk", {"i": 1})
    assert [e.type for e in errors] == ["store_error"]
    assert f"schema version {SCHEMA_VERSION + 1}" in errors[0].message
    # Delivered from memory, since the file cannot take them; the flush says the file was
    # not usable.
    result = client.flush(timeout=5)
    assert (result.pending, result.reason) == (0, "store")
    assert numbers(server.events) == [0, 1]
    client.shutdown(timeout=1)
    assert [e.type for e in errors] == ["store_error"]

    assert Path(db_path).read_bytes() == before
    assert os.stat(db_path).st_mtime_ns == mtime
    assert raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert moved_aside(db_path) == []


# ---- 6. wall-clock jumps ----


def break_sender_lock(path: str) -> None:
    """A directory where the sender lock file goes: the lock can never be taken."""
    os.mkdir(lock_path(path, key_fingerprint(API_KEY)))


@pytest.mark.parametrize("sender_lock", ["available", "unavailable"])
def test_a_lease_a_day_ahead_does_not_stall_delivery(
    make_client: MakeClient,
    server: DevServer,
    db_path: str,
    caplog: pytest.LogCaptureFixture,
    sender_lock: str,
) -> None:
    if sender_lock == "unavailable":
        break_sender_lock(db_path)  # leases alone decide: the upper bound must do it
    client = make_client()
    for i in range(3):
        client.track("u1", "clock_back", {"i": i})
    # As written by a sender whose clock was a day ahead (or ours went back a day).
    set_lease(db_path, "ghost", utc_now_ms() + DAY_MS)
    wait_ok(client.flush(timeout=5))
    assert numbers(server.events) == [0, 1, 2]
    cannot_lock = any("cannot lock" in r.getMessage() for r in caplog.records)
    assert cannot_lock == (sender_lock == "unavailable")


def test_a_live_looking_lease_is_taken_over_by_the_sender_lock_holder(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    client = make_client()
    for i in range(3):
        client.track("u1", "take_over", {"i": i})
    # Within any lease we give, but its owner does not hold the sender lock: it is gone.
    set_lease(db_path, "ghost", utc_now_ms() + 10_000)
    wait_ok(client.flush(timeout=5))  # long before the lease would run out
    assert numbers(server.events) == [0, 1, 2]


def test_without_the_sender_lock_a_live_lease_is_respected(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    break_sender_lock(db_path)
    client = make_client()
    for i in range(3):
        client.track("u1", "respect_lease", {"i": i})
    set_lease(db_path, "ghost", utc_now_ms() + 10_000)
    result = client.flush(timeout=0.5)
    assert (result.pending, result.reason) == (3, "timeout")
    assert server.requests == []


@pytest.mark.parametrize("jump_ms", [DAY_MS, -DAY_MS], ids=["forward", "back"])
def test_backoff_follows_the_monotonic_clock_through_wall_clock_jumps(
    make_client: MakeClient,
    server: DevServer,
    monkeypatch: pytest.MonkeyPatch,
    jump_ms: int,
) -> None:
    delay = 0.3
    jumped = threading.Event()

    def backoff(retry: int, rand: Optional[Callable[[], float]] = None) -> float:
        jumped.set()  # the wall clock jumps while the sender waits for this retry
        return delay

    real_time, real_time_ns = time.time, time.time_ns
    monkeypatch.setattr(_retry, "backoff", backoff)
    monkeypatch.setattr(
        time, "time", lambda: real_time() + (jump_ms / 1000 if jumped.is_set() else 0.0)
    )
    monkeypatch.setattr(
        time, "time_ns", lambda: real_time_ns() + (jump_ms * 10**6 if jumped.is_set() else 0)
    )
    client = make_client()
    client.track("u1", "clock_jump", {"i": 0})
    server.push_script(503)
    started = time.monotonic()
    result = client.flush(timeout=5)
    elapsed = time.monotonic() - started
    wait_ok(result)
    assert jumped.is_set()
    assert [r.status for r in server.requests] == [503, 202]
    assert delay * 0.9 <= elapsed < 4.0  # neither skipped nor stalled by the jump
    assert abs(utc_now_ms() - real_time_ns() // 10**6 - jump_ms) < 60_000  # it did jump


# ---- 7. what on_error and the logs may say ----


SECRET_PROP = "prop-value-7c1e9b"
SECRET_EMAIL = "ada.secret@example.com"
SECRET_PHONE = "+15550001234"


def leaked(texts: list[str], secrets: tuple[str, ...]) -> list[str]:
    return [t for t in texts if any(s in t for s in secrets)]


def record_texts(records: list[logging.LogRecord]) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(r) for r in records]


def test_no_secret_reaches_on_error_or_the_logs(
    make_client: MakeClient,
    server: DevServer,
    db_path: str,
    caplog: pytest.LogCaptureFixture,
    restore_logger: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_retry, "backoff", lambda n, rand=None: 0.001)
    caplog.set_level(logging.DEBUG)
    errors: list[WhisperrError] = []

    def on_error(error: WhisperrError) -> None:
        errors.append(error)
        if len(errors) == 1:
            raise RuntimeError("the host's callback failed")  # logged, then ignored

    client = make_client(
        on_error=on_error, debug=True, max_retries=0, store_timeout=0.05, max_queue_size=3
    )
    secret_props = {"card": SECRET_PROP, "nested": {"v": [SECRET_PROP]}}
    # Invalid calls that carry the secrets.
    client.track("u1", "Bad Name", secret_props)
    client.track("u1", "nan_value", {**secret_props, "x": float("nan")})
    client.track("u1", "too_big", {"card": SECRET_PROP * 3000})
    client.track("u1", "unknown_type", {**secret_props, "obj": object()})
    client.identify("u1", channels=[{"type": "fax", "address": SECRET_EMAIL}])
    client.identify("u1", channels=[{"type": "email", "address": SECRET_EMAIL, "opted_in": 1}])
    client.identify("u1", email=SECRET_EMAIL, preferred_channel="pigeon")
    # Valid ops, through 503, 401 and 400 answers.
    client.track("u1", "secret_test", {**secret_props, "i": 0})
    client.identify("u1", email=SECRET_EMAIL, phone=SECRET_PHONE, traits={"note": SECRET_PROP})
    server.push_script(503)
    assert client.flush(timeout=5).reason == "retry_exhausted"
    server.push_script(401)
    assert client.flush(timeout=5).reason == "auth"
    server.push_script(400)  # the track is dead-lettered, the identify delivered
    assert client.flush(timeout=5).refused == 1
    # A store error while another connection holds the write lock, then an eviction.
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        client.track("u1", "while_locked", {**secret_props, "i": 1})
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    for i in range(2, 6):
        client.track("u1", "evicting", {**secret_props, "i": i})
    assert client.flush(timeout=5).pending == 0
    assert client.stats().evicted == 2  # by max_queue_size=3

    types = {e.type for e in errors}
    assert {"dropped", "retry_exhausted", "auth", "store_error"} <= types
    # The secrets did travel where they belong, so their absence below means something.
    assert server.identifies[-1]["channels"][0]["address"] == SECRET_EMAIL
    assert server.events[-1]["properties"]["card"] == SECRET_PROP
    assert any(
        r.levelno == logging.DEBUG and r.name.startswith("whisperr_durable") for r in caplog.records
    )

    secrets = (API_KEY, SECRET_PROP, SECRET_EMAIL, SECRET_PHONE)
    assert leaked([e.message for e in errors], secrets) == []
    assert leaked(record_texts(caplog.records), secrets) == []


def test_a_key_read_with_its_newline_never_leaks(
    make_client: MakeClient,
    server: DevServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_retry, "backoff", lambda n, rand=None: 0.001)
    caplog.set_level(logging.DEBUG)
    errors: list[WhisperrError] = []
    try:
        client = make_client(API_KEY + "\n", on_error=errors.append, max_retries=1)
    except ValueError as exc:  # refusing such a key outright is fine, if it is not quoted
        assert API_KEY not in str(exc)
        return
    client.track("u1", "newline_key", {"i": 0})
    # The key is taken without its surrounding white space, as it was meant.
    assert client.flush(timeout=3).ok
    assert errors == []
    assert server.requests[-1].headers["x-api-key"] == API_KEY
    secrets = (API_KEY,)
    assert leaked([e.message for e in errors], secrets) == []
    assert leaked(record_texts(caplog.records), secrets) == []


# ---- crashes inside the making of a file and inside an eviction ----


def test_a_schema_killed_midway_is_made_by_the_next_process(
    db_path: str, server: DevServer
) -> None:
    from whisperr_durable._store._schema import SCHEMA

    script = textwrap.dedent(
        f"""
        import sqlite3, sys
        conn = sqlite3.connect({db_path!r}, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")
        for statement in {list(SCHEMA[:3])!r}:
            conn.execute(statement)
        print("mid-schema", flush=True)
        sys.stdin.read()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "mid-schema"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    client = DurableWhisperr(API_KEY, path=db_path, base_url=server.url, flush_at=10**6)
    try:
        client.track("u1", "after_crash", {"i": 1})
        wait_ok(client.flush(timeout=5))
        assert numbers(server.events) == [1]
        assert raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    finally:
        client.shutdown(timeout=1)


def test_kills_during_eviction_keep_the_queue_bounded_and_its_count_exact(
    db_path: str, server: DevServer
) -> None:
    script = textwrap.dedent(
        f"""
        from whisperr_durable import DurableWhisperr
        client = DurableWhisperr({API_KEY!r}, path={db_path!r}, base_url={closed_port_url()!r},
                                 flush_at=10**6, flush_interval=3600.0, max_queue_size=50)
        i = 0
        while True:
            client.track("u1", "evicting", {{"i": i}})
            if i == 200:
                print("evicting", flush=True)
            i += 1
        """
    )
    fp = key_fingerprint(API_KEY)
    appended = 0
    for _ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=child_env()
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "evicting"
        finally:
            child.send_signal(signal.SIGKILL)  # somewhere in a track(), mid-eviction or not
            child.wait()
        # Each child counts from 0: its newest stored op says how many of its appends
        # committed (a kill inside a track() undoes the whole append, eviction and all).
        ((newest,),) = raw(db_path, f"SELECT body FROM {queue_table()} ORDER BY id DESC LIMIT 1")
        appended += json.loads(newest)["properties"]["i"] + 1
        ((count,),) = raw(db_path, f"SELECT count(*) FROM {queue_table()}")
        held = leased_ids(db_path)
        leased = len(held)
        ((first, last),) = raw(
            db_path,
            f"SELECT min(id), max(id) FROM {queue_table()} WHERE id NOT BETWEEN ? AND ?",
            (held[0], held[-1]) if held else (1, 0),
        )
        ((evicted,),) = raw(
            db_path, "SELECT n FROM counters WHERE key_fp = ? AND name = 'evicted'", (fp,)
        )
        # Bounded: a child's sender (started for the ops the one before left) may hold a
        # batch under lease, which eviction leaves alone; beside it, the newest 50 at most.
        assert count - leased <= 50
        assert last - first + 1 == count - leased  # the newest ops, no holes
        assert evicted + count == appended  # every committed append is queued or counted
    queued = [
        json.loads(body)["properties"]["i"]
        for (body,) in raw(db_path, f"SELECT body FROM {queue_table()} ORDER BY id")
    ]
    client = DurableWhisperr(API_KEY, path=db_path, base_url=server.url, max_queue_size=50)
    try:
        wait_ok(client.flush(timeout=10))
        assert numbers(server.events) == queued  # all of them, in queue order
    finally:
        client.shutdown(timeout=1)


def test_an_on_error_callback_that_tracks_never_deadlocks(db_path: str, server: DevServer) -> None:
    Path(db_path).write_bytes(b"not an outbox" * 100)
    seen: list[str] = []
    client: Optional[DurableWhisperr] = None

    def on_error(error: WhisperrError) -> None:
        seen.append(error.type)
        assert client is not None
        client.track("u1", "sdk_problem", {"type": error.type})  # a common pattern

    client = DurableWhisperr(API_KEY, path=db_path, base_url=server.url, on_error=on_error)
    done = threading.Event()

    def first_call() -> None:
        assert client is not None
        client.track("u1", "first", {"i": 1})
        done.set()

    worker = threading.Thread(target=first_call, daemon=True)
    worker.start()
    try:
        assert done.wait(10), "track() deadlocked in the on_error callback"
        assert seen == ["store_error"]  # the corrupt file was moved aside and reported
        wait_ok(client.flush(timeout=5))
        assert sorted(e["event_type"] for e in server.events) == ["first", "sdk_problem"]
    finally:
        if done.is_set():  # a deadlocked client would hang its own shutdown too
            client.shutdown(timeout=1)
