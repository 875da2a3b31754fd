"""The outbox file in a hostile place: read-only flips, damaged rows, a file replaced or its
-shm deleted under a running client, files other users prepared, another program's
database. Every op is delivered, or counted, logged and reported; the host never stalls.

Permission tests run their client in a forked child as ``nobody`` when the suite runs as
root (root ignores permission bits).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path
from typing import Callable

import pytest
from conftest import (
    API_KEY,
    MakeClient,
    as_unprivileged,
    child_env,
    numbers,
    queue_table,
    raw,
    run_forked,
    wait_until,
)

from whisperr_durable import DurableWhisperr, OutboxFile, WhisperrError
from whisperr_durable.devserver import DevServer

ROOT = Path(__file__).resolve().parent.parent
CANNOT_SET_UP = 64


def nobody_ids() -> tuple[int, int]:
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid
    except KeyError:
        return 65534, 65534


@pytest.fixture
def own_dir(world_readable_dir: Path) -> Path:
    """A directory the unprivileged child owns (and so can make files in)."""
    if os.geteuid() == 0:
        os.chown(world_readable_dir, *nobody_ids())
    return world_readable_dir


def unprivileged(fn: Callable[[], int]) -> int:
    code = run_forked(as_unprivileged(fn), timeout=60)
    if code == CANNOT_SET_UP:
        pytest.skip("permission bits do not bind this process")
    return code


def client_in_child(path: str, url: str, errors: list[WhisperrError]) -> DurableWhisperr:
    return DurableWhisperr(
        API_KEY,
        path=path,
        base_url=url,
        flush_at=100_000,
        flush_interval=3600.0,
        store_timeout=0.2,
        on_error=errors.append,
    )


# ---- a read-only file that recovers ----


def test_a_file_read_only_when_the_client_opens_it_works_once_writable_again(
    own_dir: Path, server: DevServer
) -> None:
    path = str(own_dir / "outbox.db")

    def child() -> int:
        setup = client_in_child(path, server.url, [])
        setup.track("u1", "flip", {"i": 0})
        setup.shutdown(timeout=5)
        os.chmod(path, 0o400)
        if os.access(path, os.W_OK):
            return CANNOT_SET_UP
        errors: list[WhisperrError] = []
        client = client_in_child(path, server.url, errors)  # opens it read-only
        client.track("u1", "flip", {"i": 1})
        client.track("u1", "flip", {"i": 2})
        code = 0
        if [e.type for e in errors] != ["store_error"] or "readonly" not in errors[0].message:
            code |= 1
        os.chmod(path, 0o600)
        if not client.flush(timeout=10):  # delivered, from the file or from memory
            code |= 2
        # The sender's next try at the file, on a fresh connection, ends the episode.
        if not wait_until(lambda: client.stats().error is None):
            code |= 32
        before = client.stats().store_errors
        client.track("u1", "flip", {"i": 3})  # written to the file again
        stats = client.stats()
        if (stats.store_errors, stats.held, stats.pending) != (before, 0, 1):
            code |= 4
        if not client.flush(timeout=10):
            code |= 8
        if [e.type for e in errors] != ["store_error"]:
            code |= 16
        return code

    assert unprivileged(child) == 0
    assert numbers(server.events) == [0, 1, 2, 3]
    assert server.duplicates == 0


def test_a_file_the_sender_finds_read_only_is_reported_and_used_again_when_writable(
    own_dir: Path, server: DevServer
) -> None:
    path = str(own_dir / "outbox.db")

    def child() -> int:
        errors: list[WhisperrError] = []
        client = client_in_child(path, server.url, errors)
        client.track("u1", "flip", {"i": 0})  # the writer's connection opens read-write
        os.chmod(path, 0o400)
        if os.access(path, os.W_OK):
            return CANNOT_SET_UP
        code = 0
        first = client.flush(timeout=5)  # the sender's connection opens read-only
        if first.reason != "store" or first.pending != 1:
            code |= 1
        if [e.type for e in errors] != ["store_error"] or "sender" not in errors[0].message:
            code |= 2  # reported through on_error, not only logged
        os.chmod(path, 0o600)
        if not client.flush(timeout=10):  # a fresh connection after the error
            code |= 4
        if [e.type for e in errors] != ["store_error"]:
            code |= 8
        client.shutdown(timeout=1)
        return code

    assert unprivileged(child) == 0
    assert numbers(server.events) == [0]


# ---- an outbox this process cannot write at all ----


def test_an_outbox_of_another_user_is_refused_and_its_ops_delivered_from_memory(
    world_readable_dir: Path, server: DevServer
) -> None:
    # The cron job of another user (root here) made the file; the web workers run as nobody
    # with HOME inherited: ~/.whisperr.db is a file they cannot use.
    if os.geteuid() != 0:
        pytest.skip("needs root, to make a file that belongs to another user")
    home = world_readable_dir / "home"
    home.mkdir(mode=0o755)
    cron = DurableWhisperr(API_KEY, path=str(home / ".whisperr.db"), base_url=server.url)
    cron.track("u0", "from_cron", {"i": 0})
    cron.shutdown(timeout=5)

    def child() -> int:
        os.environ["HOME"] = str(home)
        errors: list[WhisperrError] = []
        client = DurableWhisperr(API_KEY, base_url=server.url, on_error=errors.append)
        for i in range(1, 4):
            client.track("u1", "worker", {"i": i})
        result = client.shutdown(timeout=10)
        code = 0
        if [e.type for e in errors] != ["store_error"]:
            code |= 1
        elif not all(
            word in errors[0].message for word in (".whisperr.db", "nobody", "root", "mode 0600")
        ):
            code |= 2  # the path, who we are, who owns it and how
        if (result.pending, result.lost) != (0, 0):
            code |= 4
        return code

    assert unprivileged(child) == 0
    assert numbers(server.events) == [0, 1, 2, 3]


# ---- damaged rows and damaged files ----


def test_damaged_rows_are_dead_lettered_and_the_rest_delivered(
    make_client: MakeClient, server: DevServer, db_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    for i in range(7):
        client.track("u1", "row", {"i": i})
    table = queue_table()
    damage = {
        1: ("body", "CAST(X'7B2262223A22FF227D' AS TEXT)"),  # not UTF-8
        2: ("body", "'{\"caf\u00e9\": 1}'"),  # not ASCII: we never write that
        3: ("body", "'not json'"),
        4: ("kind", "7"),
        5: ("created_ms", "'yesterday'"),
    }
    with closing(sqlite3.connect(db_path, isolation_level=None, timeout=5)) as conn:
        ids = [row[0] for row in conn.execute(f"SELECT id FROM {table} ORDER BY id")]
        for i, (column, value) in damage.items():
            conn.execute(f"UPDATE {table} SET {column} = {value} WHERE id = ?", (ids[i],))

    result = client.flush(timeout=10)

    assert (result.pending, result.reason, result.refused) == (0, None, 5)
    assert numbers(server.events) == [0, 6]
    dead = client.dead_letters()
    assert len(dead) == 5 and all(d.reason.startswith("damaged") for d in dead)
    assert [e.type for e in errors] == ["dropped"]
    assert "5 damaged" in errors[0].message
    assert any("damaged" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # The operator's views read them too.
    with OutboxFile(db_path) as outbox:
        assert len(outbox.dead_letters()) == 5
    assert client.stats().refused == 5


def test_a_damaged_row_is_shown_by_peek_never_sent(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    client = make_client()
    client.track("u1", "row", {"i": 0})
    client.track("u1", "row", {"i": 1})
    table = queue_table()
    with closing(sqlite3.connect(db_path, isolation_level=None, timeout=5)) as conn:
        conn.execute(f"UPDATE {table} SET body = CAST(X'FFFE' AS TEXT) WHERE id = 1")
    with OutboxFile(db_path) as outbox:
        bodies = [op.body for op in outbox.peek(10)]
    assert "damaged" in bodies[0] and bodies[1]["properties"] == {"i": 1}
    assert client.flush(timeout=5).refused == 1
    assert numbers(server.events) == [1]


def break_schema(path: str) -> None:
    """Make the schema unreadable: SQLite says "malformed database schema" on open."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute(
            "UPDATE sqlite_master SET sql = 'CREATE TABLE counters (' WHERE name = 'counters'"
        )


def test_a_malformed_schema_takes_the_quarantine_path(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    first = make_client()
    first.track("u1", "before", {"i": 0})
    first.shutdown(timeout=0)
    break_schema(db_path)
    with pytest.raises(sqlite3.DatabaseError, match="malformed database schema"):
        raw(db_path, "SELECT count(*) FROM counters")

    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    client.track("u1", "after", {"i": 1})

    asides = list(Path(db_path).parent.glob("outbox.db.corrupt-*"))
    assert [p.name for p in asides if not p.name.endswith("-wal")], asides
    assert errors and errors[0].type == "store_error" and "moved aside" in errors[0].message
    assert client.flush(timeout=5)
    assert numbers(server.events) == [1]


def test_stats_never_raise_on_a_file_that_cannot_be_read(
    make_client: MakeClient, db_path: str
) -> None:
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    client = make_client()
    stats = client.stats()
    assert stats.error is not None and "not a whisperr_durable outbox" in stats.error
    assert stats.pending == 0


# ---- a file replaced under a running client ----


def test_a_file_moved_away_under_a_running_client_counts_what_it_took(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    for i in range(5):
        client.track("u1", "moved", {"i": i})
    os.rename(db_path, db_path + ".old")  # as an operator moves a file aside
    os.rename(db_path + "-wal", db_path + ".old-wal")
    os.unlink(db_path + "-shm")

    result = client.flush(timeout=5)  # finds the file gone: those five are lost to it

    assert (result.pending, result.lost) == (0, 5)
    assert not result
    assert client.stats().lost == 5
    dropped = [e for e in errors if e.type == "dropped"]
    assert len(dropped) == 1 and "5 op(s)" in dropped[0].message
    # The client goes on with a new file at the path.
    client.track("u1", "moved", {"i": 5})
    assert client.flush(timeout=5).pending == 0
    assert numbers(server.events) == [5]
    assert raw(db_path + ".old", f"SELECT count(*) FROM {queue_table()}") == [(5,)]


WRITER = """
import sys
from whisperr_durable import DurableWhisperr
client = DurableWhisperr({key!r}, path={path!r}, base_url="http://127.0.0.1:9",
                         flush_at=10**6, flush_interval=3600.0)
for i in range({start}, {start} + {count}):
    client.track("u2", "other_process", {{"i": i}})
import os
os._exit(0)
"""


def test_a_deleted_shm_under_a_running_client_never_overwrites_another_process(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    for i in range(5):
        client.track("u1", "before", {"i": i})
    os.unlink(db_path + "-shm")
    # Another process opens the file now: it builds a new index of the WAL, and writes.
    script = WRITER.format(key=API_KEY, path=db_path, start=100, count=10)
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=child_env(), check=True)

    for i in range(5, 8):
        client.track("u1", "after", {"i": i})  # must not write with the stale index

    assert errors and errors[0].type == "store_error" and "-shm" in errors[0].message
    stats = client.stats()
    assert stats.held == 3 and stats.error is not None and "-shm" in stats.error
    result = client.flush(timeout=5)  # the three go from memory; the file is not used
    assert result.reason == "store"
    assert numbers(server.events) == [5, 6, 7]
    # Another process sees everything the file got: ours before, and the other's ten.
    check = textwrap.dedent(
        f"""
        import sqlite3
        conn = sqlite3.connect({db_path!r})
        print(conn.execute('SELECT count(*) FROM {queue_table()}').fetchone()[0])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", check], env=child_env(), check=True, capture_output=True, text=True
    )
    assert int(out.stdout) == 15


# ---- paths other users can prepare ----


@pytest.mark.parametrize("name", ["outbox.db", "outbox.db-wal", "outbox.db-shm"])
def test_a_symbolic_link_is_never_followed(
    tmp_path: Path, make_client: MakeClient, server: DevServer, name: str
) -> None:
    target = tmp_path / "attacker" / "planted"
    target.parent.mkdir()
    (tmp_path / "box").mkdir()
    path = tmp_path / "box" / "outbox.db"
    if name != "outbox.db":
        make_client(path=str(path)).shutdown(timeout=0)  # an outbox of ours, closed
    (path.parent / name).symlink_to(target)  # dangling: the attacker's file, if created

    errors: list[WhisperrError] = []
    client = make_client(path=str(path), on_error=errors.append)
    client.track("u1", "linked", {"i": 0})

    assert not target.exists()
    assert [e.type for e in errors] == ["store_error"]
    assert "symbolic link" in errors[0].message and name in errors[0].message
    assert client.flush(timeout=5).pending == 0  # delivered from memory
    assert numbers(server.events) == [0]


def test_a_file_another_user_made_is_refused(
    tmp_path: Path, make_client: MakeClient, server: DevServer
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to make a file that belongs to another user")
    path = tmp_path / "outbox.db"
    seeded = make_client(path=str(path))
    seeded.track("attacker", "injected", {"i": 99})  # a row the attacker wants delivered
    seeded.shutdown(timeout=0)
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if name.exists():
            os.chown(name, *nobody_ids())
            os.chmod(name, 0o666)
    before = path.read_bytes()

    errors: list[WhisperrError] = []
    client = make_client(path=str(path), on_error=errors.append)
    client.track("u1", "mine", {"i": 0})

    assert [e.type for e in errors] == ["store_error"]
    assert "belongs to nobody" in errors[0].message and str(path) in errors[0].message
    assert client.flush(timeout=5).pending == 0
    assert numbers(server.events) == [0]  # never the row the other user put there
    assert path.read_bytes() == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o666  # not ours to change


def test_a_new_outbox_and_its_companions_are_private(
    tmp_path: Path, make_client: MakeClient
) -> None:
    old = os.umask(0)
    try:
        client = make_client(path=str(tmp_path / "box" / "outbox.db"))
        client.track("u1", "private", {"i": 0})
    finally:
        os.umask(old)
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm"):
        assert stat.S_IMODE((tmp_path / "box" / name).stat().st_mode) == 0o600, name


# ---- another program's database ----


@pytest.mark.parametrize("user_version", [0, 2])
def test_another_programs_database_is_never_written(
    make_client: MakeClient, server: DevServer, db_path: str, user_version: int
) -> None:
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total INTEGER)")
        conn.execute("INSERT INTO invoices (total) VALUES (4900)")
        conn.execute(f"PRAGMA user_version = {user_version}")
    before = Path(db_path).read_bytes()

    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    client.track("u1", "not_here", {"i": 0})
    client.track("u1", "not_here", {"i": 1})

    assert [e.type for e in errors] == ["store_error"]
    assert "not a whisperr_durable outbox" in errors[0].message
    assert client.flush(timeout=5).pending == 0  # from memory
    assert numbers(server.events) == [0, 1]
    client.shutdown(timeout=1)
    assert Path(db_path).read_bytes() == before
    assert raw(db_path, "PRAGMA journal_mode") == [("delete",)]
    assert raw(db_path, "SELECT name FROM sqlite_master") == [("invoices",)]
    assert raw(db_path, "PRAGMA user_version") == [(user_version,)]


# ---- drops from memory ----


def test_drops_from_memory_are_logged_once_with_their_count(
    make_client: MakeClient, server: DevServer, db_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    from whisperr_durable._options import MAX_OVERFLOW

    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")  # never written
    server.answer = 503  # and the server down: nothing can leave memory
    client = make_client(max_retries=0)
    extra = 25
    for i in range(MAX_OVERFLOW + extra):
        client.track("u1", "held", {"i": i})

    assert client.stats().held == MAX_OVERFLOW
    drops = [r for r in caplog.records if "dropped the" in r.getMessage()]
    assert len(drops) == 1 and drops[0].levelno == logging.WARNING  # once, not 25 times
    result = client.shutdown(timeout=1)
    assert result.lost == MAX_OVERFLOW
    assert client.stats().lost == MAX_OVERFLOW + extra
    json.dumps(client.stats()._asdict())  # plain values, for a metrics exporter
