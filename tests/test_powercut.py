"""Power cuts: what survives is what was made durable, not what was written.

The first tests prove that the harness in ``powercut.py`` can fail: plain files and plain
``sqlite3`` in child processes lose exactly what they never synced. The last ones hold
``DurableWhisperr`` to its power-loss promise: with ``fsync=False``, an op is durable within
``sync_interval`` seconds of its ``track()`` returning, and a new outbox file's schema is
durable from the moment the file is created.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from powercut import Child, Line, PowerCut, build_shim, power_cut

from whisperr_durable import DurableWhisperr, OutboxFile, StoreError

pytestmark = pytest.mark.slow  # subprocesses: dev.py test --quick leaves them out

API_KEY = "wrk_powercut_key"
SYNC_INTERVAL = 1.0
# What the sync thread may take beyond sync_interval (its own fsync, scheduling, a loaded
# machine) before an op counts as lost.
SYNC_SLACK = 0.5


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("powercut-shim"))


@pytest.fixture
def machine(tmp_path: Path, shim: Path) -> Iterator[PowerCut]:
    with power_cut(tmp_path / "machine", shim) as m:
        yield m


# Every child starts with this: the disk, a way to report, and a way to wait for the cut.
_PRELUDE = """
import os, sys, threading, time
DISK = os.environ["POWERCUT_DIR"]
_say_lock = threading.Lock()
def say(*words):  # one write() a line, so that threads never interleave within a line
    with _say_lock:
        sys.stdout.write(" ".join(map(str, words)) + "\\n")
        sys.stdout.flush()
def wait_for_the_cut():
    time.sleep(60)
"""


def _sqlite_rows(path: Path) -> int:
    """Rows of table ``t`` in a database file, opened as SQLite would after the cut."""
    with sqlite3.connect(path) as conn:
        (n,) = conn.execute("SELECT count(*) FROM t").fetchone()
    conn.close()
    return int(n)


def _tables(path: Path) -> list[str]:
    """The tables in a database file, or raises ``sqlite3.Error`` (never creates a file)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [name for (name,) in conn.execute("SELECT name FROM sqlite_master")]
    finally:
        conn.close()


def _last_number(child: Child, prefix: str) -> int:
    """The number in the last line ``<prefix> <n>`` the child printed."""
    numbers = [int(line.text.split()[1]) for line in child.lines if line.text.startswith(prefix)]
    assert numbers, f"the child printed no {prefix!r} line"
    return numbers[-1]


# ---- the harness: files ----

_WRITE_THEN_MORE = (
    _PRELUDE
    + """
with open(os.path.join(DISK, "data"), "wb") as f:
    f.write(b"first part;")
    f.flush()
    os.fsync(f.fileno())
    dir_fd = os.open(DISK, os.O_RDONLY)
    os.fsync(dir_fd)  # the new name is durable too
    f.write(b"second part")
    f.flush()
    say("written")
    wait_for_the_cut()
"""
)


def test_writes_after_the_last_fsync_are_lost(machine: PowerCut) -> None:
    child = machine.spawn(_WRITE_THEN_MORE)
    child.wait_for("written")
    child.kill()

    assert (machine.disk / "data").read_bytes() == b"first part;second part"  # the page cache
    assert (machine.image() / "data").read_bytes() == b"first part;"


_NEW_FILES = (
    _PRELUDE
    + """
def create(name, data, sync):
    fd = os.open(os.path.join(DISK, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    if sync:
        os.fsync(fd)
    os.close(fd)

def sync_dir():
    fd = os.open(DISK, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)

create("named", b"synced before the directory", sync=True)
create("never_synced", b"written only", sync=False)
sync_dir()
create("unnamed", b"synced after the directory", sync=True)
say("done")
wait_for_the_cut()
"""
)


def test_a_new_file_survives_only_once_the_directory_was_fsynced_after_its_creation(
    machine: PowerCut,
) -> None:
    child = machine.spawn(_NEW_FILES)
    child.wait_for("done")
    child.kill()

    image = machine.image()
    assert sorted(p.name for p in machine.disk.iterdir()) == ["named", "never_synced", "unnamed"]
    # Synced, and named by a later directory fsync: there.
    assert (image / "named").read_bytes() == b"synced before the directory"
    # Synced, but created after the last directory fsync: gone, as POSIX allows.
    assert not (image / "unnamed").exists()
    # Named by the directory fsync, its data never synced: the name stays, the data is gone.
    assert (image / "never_synced").read_bytes() == b""


_CHANGE_OLD_FILES = (
    _PRELUDE
    + """
with open(os.path.join(DISK, "kept"), "r+b") as f:
    f.write(b"CHANGED")
with open(os.path.join(DISK, "synced"), "r+b") as f:
    f.write(b"CHANGED")
    f.flush()
    os.fsync(f.fileno())
    f.write(b" and more")
os.unlink(os.path.join(DISK, "deleted"))
say("done")
wait_for_the_cut()
"""
)


def test_files_that_existed_before_the_run_keep_their_initial_content(
    machine: PowerCut,
) -> None:
    for name in ("kept", "synced", "deleted"):
        (machine.disk / name).write_bytes(b"initial content")
    child = machine.spawn(_CHANGE_OLD_FILES)
    child.wait_for("done")
    child.kill()

    image = machine.image()
    assert (image / "kept").read_bytes() == b"initial content"
    assert (image / "synced").read_bytes() == b"CHANGED content"
    # Unlinked without a directory fsync: the name comes back.
    assert (image / "deleted").read_bytes() == b"initial content"


_SYNC_ALL = (
    _PRELUDE
    + """
with open(os.path.join(DISK, "data"), "wb") as f:
    f.write(b"before sync;")
    f.flush()
    os.sync()
    f.write(b"after sync")
    f.flush()
    say("done")
    wait_for_the_cut()
"""
)


def test_sync_makes_every_file_and_name_durable(machine: PowerCut) -> None:
    child = machine.spawn(_SYNC_ALL)
    child.wait_for("done")
    child.kill()

    assert (machine.image() / "data").read_bytes() == b"before sync;"


_THREADS = (
    _PRELUDE
    + """
N = int(sys.argv[1])

def content(v):
    return (b"%d;" % v) * (1000 + 37 * v)  # a torn copy would not have this shape

fds = [os.open(os.path.join(DISK, f"f{t}"), os.O_RDWR | os.O_CREAT, 0o600) for t in range(N)]
dir_fd = os.open(DISK, os.O_RDONLY)
os.fsync(dir_fd)

def rewrite(t):
    v = 0
    while True:
        data = content(v)
        os.pwrite(fds[t], data, 0)
        os.ftruncate(fds[t], len(data))
        os.fdatasync(fds[t])
        say(f"f{t} {v}")
        v += 1

for t in range(N):
    threading.Thread(target=rewrite, args=(t,), daemon=True).start()
wait_for_the_cut()
"""
)


def test_threads_syncing_at_once_leave_whole_snapshots_of_their_last_sync(
    machine: PowerCut,
) -> None:
    threads = 4
    child = machine.spawn(_THREADS, str(threads))
    seen: dict[str, int] = {}

    def enough(text: str) -> bool:
        name, v = text.split()
        seen[name] = int(v)
        return len(seen) == threads and min(seen.values()) >= 30

    child.wait_for(enough)
    child.kill()

    image = machine.image()
    for t in range(threads):
        last = _last_number(child, f"f{t} ")
        data = (image / f"f{t}").read_bytes()
        # The last sync that returned, or one more that returned as the cut came.
        assert data in [(b"%d;" % v) * (1000 + 37 * v) for v in (last, last + 1)], t


_PLAIN_CALLS = """
import errno, os, sys
path = sys.argv[1]
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)  # write-only: the shim reads it by name
os.write(fd, b"data")
os.fsync(fd)
os.fdatasync(fd)
os.close(fd)
os.sync()
try:
    os.fsync(fd)  # closed: libc's error, errno intact
except OSError as exc:
    assert exc.errno == errno.EBADF, exc
else:
    raise AssertionError("fsync of a closed descriptor succeeded")
print("ok")
"""


@pytest.mark.parametrize("watched", [False, True])
def test_the_shim_passes_calls_through_and_keeps_errno(
    tmp_path: Path, shim: Path, watched: bool
) -> None:
    disk, snap = tmp_path / "disk", tmp_path / "snap"
    disk.mkdir()
    snap.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POWERCUT_")}
    env["LD_PRELOAD"] = str(shim)
    if watched:
        env.update(POWERCUT_DIR=str(disk), POWERCUT_SNAP=str(snap))
    run = subprocess.run(
        [sys.executable, "-c", _PLAIN_CALLS, str(disk / "f")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (run.returncode, run.stdout, run.stderr) == (0, "ok\n", "")
    recorded = sorted(p.name for p in snap.iterdir())
    assert recorded == ([".dirlist", "f"] if watched else [])
    if watched:
        assert (snap / "f").read_bytes() == b"data"


# ---- the harness: SQLite ----

_SQLITE_WRITER = (
    _PRELUDE
    + """
import sqlite3
conn = sqlite3.connect(os.path.join(DISK, "test.db"), isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute(f"PRAGMA synchronous={sys.argv[1]}")
conn.execute("PRAGMA wal_autocheckpoint=100")  # checkpoints, and WAL restarts, during the run
conn.execute("CREATE TABLE IF NOT EXISTS t (i INTEGER PRIMARY KEY, pad TEXT)")
i = 0
while True:
    conn.execute("INSERT INTO t VALUES (?, ?)", (i, "x" * 200))
    say(f"C {i}")
    i += 1
"""
)


def test_sqlite_wal_full_keeps_every_commit_that_returned(machine: PowerCut) -> None:
    child = machine.spawn(_SQLITE_WRITER, "FULL")
    child.wait_for("C 300", timeout=30)
    child.kill()
    last = _last_number(child, "C ")

    rows = _sqlite_rows(machine.image() / "test.db")
    # Every commit that returned, and at most the one under way when the cut came.
    assert last + 1 <= rows <= last + 2, (last, rows)


_SQLITE_NORMAL = (
    _PRELUDE
    + """
import sqlite3
synced, more = int(sys.argv[1]), int(sys.argv[2])
conn = sqlite3.connect(os.path.join(DISK, "test.db"), isolation_level=None)
conn.execute("PRAGMA synchronous=NORMAL")
conn.execute("PRAGMA wal_autocheckpoint=0")  # no checkpoint but ours
for i in range(synced):
    conn.execute("INSERT INTO t VALUES (?)", (i,))
conn.execute("PRAGMA wal_checkpoint(PASSIVE)")  # syncs the WAL, then the database
say("synced", synced)
for i in range(synced, synced + more):
    conn.execute("INSERT INTO t VALUES (?)", (i,))
say("committed", synced + more)
wait_for_the_cut()
"""
)


def test_sqlite_wal_normal_loses_the_commits_after_the_last_sync(machine: PowerCut) -> None:
    db = machine.disk / "test.db"
    with sqlite3.connect(db) as conn:  # made before the run: durable
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY)")
    conn.close()
    child = machine.spawn(_SQLITE_NORMAL, "50", "100")
    child.wait_for("committed 150")
    child.kill()

    image = machine.image()
    assert _sqlite_rows(db) == 150  # committed: a process kill would have lost nothing
    assert _sqlite_rows(image / "test.db") == 50


_SQLITE_NEW_FILE = (
    _PRELUDE
    + """
import sqlite3
conn = sqlite3.connect(os.path.join(DISK, "test.db"), isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA synchronous=NORMAL")
conn.execute("PRAGMA wal_autocheckpoint=0")  # no checkpoint, so no sync but SQLite's own
conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY)")
for i in range(int(sys.argv[1])):
    conn.execute("INSERT INTO t VALUES (?)", (i,))
say("committed")
wait_for_the_cut()
"""
)


def test_sqlite_wal_normal_loses_the_schema_of_a_new_file(machine: PowerCut) -> None:
    child = machine.spawn(_SQLITE_NEW_FILE, "50")
    child.wait_for("committed")
    child.kill()

    assert _sqlite_rows(machine.disk / "test.db") == 50
    path = machine.image() / "test.db"
    try:
        tables = _tables(path)
    except sqlite3.Error:
        return  # does not even open: lost too
    assert tables == []


# ---- DurableWhisperr ----


def _unreachable_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (a port just bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# argv: the client's options (JSON), the seconds between two track() calls.
_TRACKER = (
    _PRELUDE
    + """
import json
from whisperr_durable import DurableWhisperr
options, period = json.loads(sys.argv[1]), float(sys.argv[2])
client = DurableWhisperr(path=os.path.join(DISK, "outbox.db"), **options)
i = 0
while True:
    client.track("user_1", "power_tick", {"i": i})
    say(f"T {i} {time.monotonic():.6f}")  # the same clock as the parent's on Linux
    i += 1
    time.sleep(period)
"""
)


def _tracker_options() -> dict[str, Any]:
    # The sender has no other reason to touch the file: no wake by count, none by timer
    # that would come before the cut, and every delivery attempt fails.
    return {
        "api_key": API_KEY,
        "base_url": _unreachable_url(),
        "flush_at": 100_000,
        "flush_interval": 3600.0,
        "sync_interval": SYNC_INTERVAL,
    }


def _returned(lines: list[Line]) -> dict[int, float]:
    """Op index -> the child's time.monotonic() once its track() had returned."""
    returned = {}
    for line in lines:
        if line.text.startswith("T "):
            _, i, at = line.text.split()
            # The child's clock is the parent's: a line is never stamped after it was read.
            assert float(at) <= line.at, line
            returned[int(i)] = float(at)
    return returned


def _track_until(child: Child, seconds: float) -> float:
    """Let the child track for ``seconds`` after its first op returned; the cut's time."""
    first = float(child.wait_for(lambda t: t.startswith("T "), timeout=20).text.split()[2])
    child.wait_for(lambda t: t.startswith("T ") and float(t.split()[2]) >= first + seconds)
    return child.kill()


def _survivors(path: Path, returned: dict[int, float]) -> list[int]:
    """The op indices queued in an outbox file; fails the test unless it is an outbox."""
    problem = None
    try:
        with OutboxFile(str(path), api_key=API_KEY) as outbox:
            version = outbox.status().schema_version
            survivors = [op.body["properties"]["i"] for op in outbox.peek(limit=100_000)]
    except (FileNotFoundError, StoreError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        pytest.fail(
            f"the outbox did not survive the power cut ({problem}): all {len(returned)} "
            "returned ops are gone",
            pytrace=False,
        )
    assert version >= 1
    # A prefix of what returned (WAL commits are durable in order), and nothing invented.
    assert survivors == list(range(len(survivors))), survivors
    assert len(survivors) <= len(returned) + 1
    # A fresh client on the image sees the same queue.
    client = DurableWhisperr(API_KEY, path=str(path), base_url=_unreachable_url(), flush_at=100_000)
    try:
        assert client.stats().pending == len(survivors)
    finally:
        client.shutdown(timeout=0.5)
    return survivors


def test_ops_are_durable_within_sync_interval_of_their_track(machine: PowerCut) -> None:
    child = machine.spawn(_TRACKER, json.dumps(_tracker_options()), "0.04")
    cut = _track_until(child, 2.5)
    returned = _returned(child.lines)
    must = sorted(i for i, at in returned.items() if at <= cut - SYNC_INTERVAL - SYNC_SLACK)
    assert len(must) >= 10, "the child tracked too slowly to test anything"

    survivors = _survivors(machine.image() / "outbox.db", returned)

    lost = sorted(set(must) - set(survivors))
    assert not lost, (
        f"{len(lost)} of the {len(must)} ops that returned more than "
        f"{SYNC_INTERVAL + SYNC_SLACK} s before the cut are gone ({len(survivors)} of "
        f"{len(returned)} returned ops survived; lost: {lost[:5]}...)"
    )


def test_a_new_outbox_keeps_its_schema_through_a_power_cut(machine: PowerCut) -> None:
    child = machine.spawn(_TRACKER, json.dumps(_tracker_options()), "0.02")
    _track_until(child, 0.3)
    returned = _returned(child.lines)
    assert returned, "nothing was tracked"

    # Its ops may be gone (not yet synced), but the file is an outbox a client can use.
    _survivors(machine.image() / "outbox.db", returned)
