"""Many processes, and forks, on one outbox file.

Every child is a real process: ``sys.executable tests/proc_helpers.py ROLE ARGS`` (see that
module), a real ``os.fork`` inside one, ``multiprocessing`` with the "fork" start method, or
gunicorn with ``--preload``. Children report on stdout, one JSON object a line; crashes are
SIGKILL. The server is the real devserver, instrumented to also record each request when it
starts (before its latency) and how many requests were in flight at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import httpx
import pytest
from conftest import (
    API_KEY,
    LineLog,
    MakeClient,
    child_env,
    closed_port_url,
    free_port,
    leased_ids,
    queue_table,
)

from whisperr_durable import DurableWhisperr, WhisperrError
from whisperr_durable._client import key_fingerprint
from whisperr_durable._lock import lock_path
from whisperr_durable._options import DEFAULT_REQUEST_TIMEOUT
from whisperr_durable._sender import _LEASE_SLACK
from whisperr_durable._store import Outbox
from whisperr_durable._wire import TRACK, utc_now_ms
from whisperr_durable.devserver import BATCH_PATH, DevServer

fcntl = pytest.importorskip("fcntl")  # POSIX only: flock, fork and SIGKILL

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    pytest.mark.slow,  # real processes: dev.py test --quick leaves them out
]

HELPERS = Path(__file__).resolve().with_name("proc_helpers.py")
ROOT = HELPERS.parent.parent

Key = tuple[str, int]


# ---- the instrumented server ----


class FlightServer(DevServer):
    """The devserver, also recording each request as it starts and the most in flight."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flight = threading.Condition()
        self._in_flight = 0
        self.max_in_flight = 0
        self._started: list[bytes] = []

    def _respond(self, *args: Any, **kwargs: Any) -> Any:
        method, path, _headers, body = args[:4]
        counted = method == "POST" and path == BATCH_PATH
        if counted:
            with self._flight:
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
                self._started.append(body)
                self._flight.notify_all()
        try:
            return super()._respond(*args, **kwargs)
        finally:
            if counted:
                with self._flight:
                    self._in_flight -= 1

    @property
    def started(self) -> list[bytes]:
        """Bodies of the batch requests received so far, in order, answered or not."""
        with self._flight:
            return list(self._started)

    def wait_for_started(self, n: int, timeout: float = 10.0) -> bool:
        """Block until ``n`` batch requests have arrived (the latency not yet served)."""
        with self._flight:
            return self._flight.wait_for(lambda: len(self._started) >= n, timeout)


@pytest.fixture
def fserver() -> Iterator[FlightServer]:
    srv = FlightServer(api_key=API_KEY)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# ---- children ----


class Child:
    """A subprocess running one role of proc_helpers.py, spoken to through its pipes."""

    def __init__(self, role: str, args: dict[str, Any], stderr_path: Path) -> None:
        self.role = role
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(HELPERS), role, json.dumps(args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                bufsize=1,
            )
        self._lines: queue.Queue[Optional[str]] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # every writer (forked children too) has closed stdout

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def read(self, timeout: float = 20.0) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"{self.role}: no line within {timeout} s; stderr:\n{self.stderr()}")
        if line is None:
            pytest.fail(f"{self.role}: stdout closed; stderr:\n{self.stderr()}")
        message: dict[str, Any] = json.loads(line)
        return message

    def expect(self, event: str, timeout: float = 20.0) -> dict[str, Any]:
        message = self.read(timeout)
        assert message["event"] == event, (message, self.stderr())
        return message

    def read_events(self, *events: str) -> dict[str, dict[str, Any]]:
        """The next len(events) lines, whatever their order, by event name."""
        got = {m["event"]: m for m in (self.read() for _ in events)}
        assert sorted(got) == sorted(events), got
        return got

    def stdout_closed(self, timeout: float = 20.0) -> bool:
        try:
            return self._lines.get(timeout=timeout) is None
        except queue.Empty:
            return False

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.role} did not exit; stderr:\n{self.stderr()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


Spawn = Callable[..., Child]


@pytest.fixture
def spawn(tmp_path: Path, db_path: str, fserver: FlightServer) -> Iterator[Spawn]:
    """Start a child role on the test's outbox and server; kills leftovers at the end."""
    children: list[Child] = []

    def start(role: str, **args: Any) -> Child:
        args.setdefault("db", db_path)
        args.setdefault("url", fserver.url)
        args.setdefault("api_key", API_KEY)
        child = Child(role, args, tmp_path / f"{role}-{len(children)}.stderr")
        children.append(child)
        return child

    yield start
    for child in children:
        if child.proc.stdin is not None and not child.proc.stdin.closed:
            child.proc.stdin.close()
        child.kill()


@pytest.fixture
def clients(db_path: str, fserver: FlightServer) -> Iterator[Callable[..., DurableWhisperr]]:
    """In-process clients on the test's outbox and server, shut down at the end."""
    made: list[DurableWhisperr] = []

    def make(**options: Any) -> DurableWhisperr:
        options.setdefault("path", db_path)
        options.setdefault("base_url", fserver.url)
        client = DurableWhisperr(API_KEY, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.shutdown(timeout=1.0)


# ---- helpers ----


def sender_lock_file(db_path: str) -> str:
    return lock_path(db_path, key_fingerprint(API_KEY))


def lock_is_free(path: str) -> bool:
    """Whether nobody holds the flock on ``path`` (taken and let go at once if free)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def keys(events: list[dict[str, Any]]) -> list[Key]:
    return [(e["properties"]["p"], e["properties"]["i"]) for e in events]


def expected(*runs: tuple[str, int]) -> Counter[Key]:
    """Each (producer, i) exactly once, for i in range(n) of every (producer, n)."""
    return Counter({(p, i): 1 for p, n in runs for i in range(n)})


def batch_message_ids(body: bytes) -> list[str]:
    return [e["context"]["$message_id"] for e in json.loads(body)["events"]]


def live_leases(db_path: str) -> int:
    return len(leased_ids(db_path, live_at=utc_now_ms()))


class CountingTransport(httpx.BaseTransport):
    """A real HTTP transport that counts the requests it sends."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self.requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


# ---- concurrency ----


def test_four_processes_track_into_one_file_at_once(
    spawn: Spawn, clients: Callable[..., DurableWhisperr], fserver: FlightServer
) -> None:
    n = 500
    producers = [spawn("producer", proc=f"p{k}", n=n, barrier=True) for k in range(4)]
    for child in producers:
        child.expect("ready")
    for child in producers:  # all four start writing together
        child.send("go")
    for child in producers:
        tracked = child.expect("tracked")
        assert tracked["n"] == n
        assert tracked["problems"] == [], tracked  # no "database is locked", no store_error
        done = child.expect("done")
        assert done["flush"] == [0, None], done
        assert done["problems"] == [], done
        assert child.wait() == 0, child.stderr()

    fresh = clients()
    assert fresh.flush(timeout=10).ok
    assert fresh.stats().pending == 0
    events = fserver.events
    assert Counter(keys(events)) == expected(*((f"p{k}", n) for k in range(4)))
    assert len({e["context"]["$message_id"] for e in events}) == 4 * n
    assert fserver.duplicates == 0


def test_one_sender_at_a_time_and_fifo_order_across_processes(
    spawn: Spawn, fserver: FlightServer
) -> None:
    fserver.latency = 0.02
    n = 100
    producers = [
        spawn("producer", proc=f"p{k}", n=n, barrier=True, flush_at=5, max_batch_size=10)
        for k in range(3)
    ]
    for child in producers:
        child.expect("ready")
    for child in producers:
        child.send("go")
    for child in producers:
        assert child.expect("tracked")["problems"] == []
        done = child.expect("done")
        assert done["flush"] == [0, None] and done["problems"] == [], done
        assert child.wait() == 0, child.stderr()

    events = fserver.events
    assert Counter(keys(events)) == expected(*((f"p{k}", n) for k in range(3)))
    assert fserver.duplicates == 0
    # Each producer's events arrive in the order it tracked them: one FIFO, one sender.
    for k in range(3):
        arrived = [i for p, i in keys(events) if p == f"p{k}"]
        assert arrived == sorted(arrived), f"p{k} out of order"
    # Small batches from three processes with active senders: many requests, never two at once.
    assert len(fserver.started) >= 3 * n // 10
    assert fserver.max_in_flight == 1


def test_flush_in_a_process_that_does_not_lead_is_a_barrier_for_its_own_ops(
    spawn: Spawn, clients: Callable[..., DurableWhisperr], fserver: FlightServer, db_path: str
) -> None:
    fserver.latency = 0.25
    leader = spawn(
        "producer",
        proc="A",
        n=40,
        max_batch_size=10,
        flush_at=100_000,
        flush_interval=3600.0,
        finish="flush",
        hold=True,  # alive until the end: its sender delivers what B queues meanwhile
    )
    leader.expect("ready")
    leader.expect("tracked")
    assert fserver.wait_for_started(1)
    # A is in its delivery cycle (4 requests of 0.25 s) and holds the sender lock.
    assert not lock_is_free(sender_lock_file(db_path))

    transport = CountingTransport()
    errors: list[WhisperrError] = []
    b = clients(transport=transport, on_error=errors.append)
    for i in range(5):
        b.track("user_B", "proc_event", {"p": "B", "i": i})
    result = b.flush(timeout=10)

    assert result.ok, result
    assert [k for k in keys(fserver.events) if k[0] == "B"] == [("B", i) for i in range(5)]
    assert transport.requests == 0  # B never led: A's cycle delivered B's ops too
    assert errors == []
    done = leader.expect("done")
    assert done["flush"] == [0, None] and done["problems"] == [], done
    assert Counter(keys(fserver.events)) == expected(("A", 40), ("B", 5))


_COUNT_QUEUED = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=10)
try:
    print(conn.execute(sys.argv[2]).fetchone()[0])
finally:
    conn.close()  # the last connection of this process: SQLite may checkpoint here
"""


def queued_as_another_process_sees_it(db_path: str) -> str:
    """How many ops of API_KEY a separate process that opens, reads and closes the file
    finds (as ``whisperr-durable status`` does), or the error it met."""
    run = subprocess.run(
        [sys.executable, "-c", _COUNT_QUEUED, db_path, f"SELECT count(*) FROM {queue_table()}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return run.stdout.strip() or run.stderr.strip().splitlines()[-1]


def test_ops_tracked_after_another_process_looked_at_the_file_are_not_lost(
    clients: Callable[..., DurableWhisperr], fserver: FlightServer, db_path: str
) -> None:
    client = clients(flush_at=100_000, flush_interval=3600.0)
    client.track("u1", "delivered", {"p": "a", "i": 0})
    assert client.flush(timeout=10).ok  # the sender has opened its connection too
    # The sender may still be in its cycle and would deliver what comes next: with the
    # server gone, what is tracked from here stays queued.
    fserver.stop()
    for i in range(1, 6):
        client.track("u1", "queued", {"p": "a", "i": i})
    assert queued_as_another_process_sees_it(db_path) == "5"
    for i in range(6, 11):
        client.track("u1", "queued", {"p": "a", "i": i})
    assert client.stats().pending == 10
    assert queued_as_another_process_sees_it(db_path) == "10"


# ---- crashes and stale locks ----


def test_a_killed_lease_holder_is_replaced_long_before_its_lease_expires(
    spawn: Spawn, clients: Callable[..., DurableWhisperr], fserver: FlightServer, db_path: str
) -> None:
    fserver.latency = 3.0  # never served in full: the server drops it when it stops
    victim = spawn(
        "producer",
        proc="K",
        n=10,
        flush_at=100_000,
        flush_interval=3600.0,
        request_timeout=DEFAULT_REQUEST_TIMEOUT,
        finish="flush",
    )
    victim.expect("ready")
    victim.expect("tracked")
    assert fserver.wait_for_started(1)  # the batch is claimed and on the wire
    victim.kill()
    fserver.latency = 0.0
    lease = DEFAULT_REQUEST_TIMEOUT + _LEASE_SLACK
    assert live_leases(db_path) == 10  # still leased to the dead process for ~15 s

    fresh = clients()
    began = time.monotonic()
    result = fresh.flush(timeout=lease)
    took = time.monotonic() - began

    assert result.ok, result
    assert took < 5.0 < lease  # the free file lock said the owner was gone
    first, resent = fserver.started[:2]
    assert batch_message_ids(resent) == batch_message_ids(first)  # same $message_ids
    assert Counter(keys(fserver.events)) == expected(("K", 10))


@pytest.mark.parametrize("how", ["made_by_hand", "left_by_a_killed_holder"])
def test_a_stale_lock_file_does_not_stop_delivery(
    how: str,
    spawn: Spawn,
    clients: Callable[..., DurableWhisperr],
    fserver: FlightServer,
    db_path: str,
) -> None:
    path = sender_lock_file(db_path)
    client = clients()
    for i in range(3):
        client.track("user_S", "proc_event", {"p": "S", "i": i})
    if how == "made_by_hand":
        with open(path, "w") as f:
            f.write("4242\n")  # what a pid-file style lock would leave
    else:
        holder = spawn("hold_lock", lock_path=path)
        assert holder.expect("locked")["acquired"] is True
        # While the holder lives, the lock is honoured: nothing is sent.
        blocked = client.flush(timeout=0.5)
        assert (blocked.pending, blocked.reason) == (3, "timeout")
        assert fserver.started == []
        holder.kill()
    assert os.path.exists(path)

    began = time.monotonic()
    result = client.flush(timeout=5)
    assert result.ok, result
    assert time.monotonic() - began < 4.0  # under the 5 s asked for: not a timeout
    assert Counter(keys(fserver.events)) == expected(("S", 3))


def test_a_lease_given_just_after_our_clock_reading_keeps_us_off_its_rows(db_path: str) -> None:
    # Two connections, as two processes have. Y reads the clock, then waits for the write
    # lock while X (whose clock reading is 1 ms later) claims the head. (A guard against
    # leases "from the future" once took X's fresh lease for one and let Y claim the rows.)
    fp = key_fingerprint(API_KEY)
    x, y = Outbox(db_path, fp), Outbox(db_path, fp)
    now = utc_now_ms()
    for i in range(3):
        x.append(TRACK, json.dumps({"i": i}), now, 100)
    lease_ms = int((DEFAULT_REQUEST_TIMEOUT + _LEASE_SLACK) * 1000)
    limits: dict[str, Any] = {
        "max_rows": 10,
        "max_bytes": 1 << 20,
        "lease_ms": lease_ms,
        "max_age_ms": 24 * 3600 * 1000,
    }
    y_now = utc_now_ms()
    by_x = x.claim("X", now_ms=y_now + 1, **limits)
    by_y = y.claim("Y", now_ms=y_now, **limits)
    x.close()
    y.close()
    assert by_x.run is not None and by_x.run.ops == 3
    assert by_y.run is None


def test_leases_alone_keep_senders_of_several_processes_apart(
    spawn: Spawn, fserver: FlightServer, db_path: str
) -> None:
    # Where flock is unavailable (a directory stands where the lock file would go, as a
    # filesystem without flock would fail), the SDK says the row leases keep senders apart.
    os.mkdir(sender_lock_file(db_path))
    n = 500
    producers = [spawn("producer", proc=f"p{k}", n=n, barrier=True) for k in range(4)]
    for child in producers:
        child.expect("ready")
    for child in producers:
        child.send("go")
    for child in producers:
        child.expect("tracked")
        done = child.expect("done")
        assert done["flush"] == [0, None], done
        # Every child ran on leases alone, and had nothing else to report.
        assert done["problems"], done
        assert all("relying on the outbox's leases alone" in p for p in done["problems"]), done
        assert child.wait() == 0, child.stderr()
    events = fserver.events
    assert Counter(keys(events)) == expected(*((f"p{k}", n) for k in range(4)))
    assert fserver.duplicates == 0
    for k in range(4):
        arrived = [i for p, i in keys(events) if p == f"p{k}"]
        assert arrived == sorted(arrived), f"p{k} out of order"
    assert fserver.max_in_flight == 1


# ---- fork ----


def test_fork_after_use_child_and_parent_each_deliver_nothing_twice(
    spawn: Spawn, fserver: FlightServer
) -> None:
    n = 20
    proc = spawn("fork_basic", n=n, flush_at=100_000, flush_interval=3600.0)
    got = proc.read_events("child", "parent")
    child, parent = got["child"], got["parent"]
    assert parent["queued_at_fork"] == n  # the thread ran and rows were queued at the fork
    assert child["pid"] != parent["pid"]
    assert child["flush"] == [0, None] and child["problems"] == [], child
    assert parent["flush"] == [0, None] and parent["problems"] == [], parent
    assert parent["child_status"] == 0
    assert proc.wait() == 0, proc.stderr()

    assert Counter(keys(fserver.events)) == expected(
        ("parent_pre", n), ("child", n), ("parent_post", n)
    )
    assert fserver.duplicates == 0


def test_fork_mid_delivery_the_child_does_not_keep_the_parents_lock(
    spawn: Spawn, clients: Callable[..., DurableWhisperr], fserver: FlightServer, db_path: str
) -> None:
    path = sender_lock_file(db_path)
    fserver.latency = 3.0
    n = 10
    proc = spawn("fork_mid_cycle", n=n, flush_at=n, flush_interval=3600.0)
    proc.expect("queued")
    assert fserver.wait_for_started(1)
    assert not lock_is_free(path)  # the parent's sender is mid-request, holding the lock
    proc.send("fork")
    got = proc.read_events("forked", "child_alive")
    child_pid = got["forked"]["child"]
    assert got["child_alive"]["pid"] == child_pid
    try:
        proc.kill()  # the parent dies mid-request; its child lives on
        os.kill(child_pid, 0)
        assert live_leases(db_path) == n  # the batch is still leased to the dead parent
        assert lock_is_free(path)  # the child did not inherit the parent's flock
        fserver.latency = 0.0

        fresh = clients()
        began = time.monotonic()
        result = fresh.flush(timeout=DEFAULT_REQUEST_TIMEOUT + _LEASE_SLACK)
        assert result.ok, result
        assert time.monotonic() - began < 5.0  # not the ~15 s lease
        assert Counter(keys(fserver.events)) == expected(("parent", n))

        # The child is still alive and can lead in its turn.
        proc.send("ping")
        pong = proc.expect("pong")
        assert pong["pid"] == child_pid
        assert pong["flush"] == [0, None] and pong["problems"] == [], pong
        assert Counter(keys(fserver.events)) == expected(("parent", n), ("child", 1))
        proc.close_stdin()  # the child ends at EOF
        assert proc.stdout_closed()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)


def test_forks_while_other_threads_write_and_the_sender_delivers(
    spawn: Spawn, fserver: FlightServer, db_path: str
) -> None:
    forks = 15
    # Two writers track flat out: on a slow machine the backlog may pass the default bound,
    # and the evictions would make the children's flushes report lost ops.
    proc = spawn("fork_storm", forks=forks, flush_at=5, max_queue_size=10**7)
    done = proc.expect("done", timeout=60)
    assert done["statuses"] == [0] * forks  # every child delivered, none hung or failed
    assert done["flush"] == [0, None] and done["problems"] == [], done
    assert proc.wait() == 0, proc.stderr()
    counts = done["counts"]
    assert all(n > 0 for n in counts.values()), counts
    # A child exits (os._exit) right after its flush, perhaps mid-request for rows tracked
    # later: those are sent again by the parent, which the server deduplicates.
    assert Counter(keys(fserver.events)) == expected(("child", forks), *counts.items())
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def test_multiprocessing_fork_workers_share_a_client_made_before_the_fork(
    spawn: Spawn, fserver: FlightServer
) -> None:
    n = 30
    proc = spawn("mp_fork", n=n, processes=2)
    done = proc.expect("done", timeout=40)
    assert done["exitcodes"] == [0, 0], proc.stderr()
    assert done["flush"] == [0, None] and done["problems"] == [], done
    assert done["pid"] not in done["pool_pids"]
    assert proc.wait() == 0, proc.stderr()
    # Pool workers end with os._exit (no atexit flush): the parent's flush delivers the rest.
    assert Counter(keys(fserver.events)) == expected(
        ("boot", 1), ("pool", n), ("process_0", n), ("process_1", n)
    )


GUNICORN_APP = """
import logging
import os
import sys

from whisperr_durable import Whisperr

handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("WHISPERR-PROBLEM %(levelname)s %(message)s"))
handler.setLevel(logging.WARNING)
logging.getLogger("whisperr_durable").addHandler(handler)

client = Whisperr(
    {api_key!r}, path={db!r}, base_url={url!r}, flush_at=5,
    on_error=lambda e: print("WHISPERR-PROBLEM on_error", e.type, e.message, file=sys.stderr),
)
# Before the fork: the master's sender thread is running when gunicorn forks the workers.
client.track("user_g", "proc_event", {{"p": "boot", "i": 0}})


def app(environ, start_response):
    i = int(environ["QUERY_STRING"].partition("=")[2])
    client.track("user_g", "proc_event", {{"p": "request", "i": i}})
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def test_gunicorn_preload_workers_deliver_every_event_once(
    tmp_path: Path, db_path: str, fserver: FlightServer, clients: Callable[..., DurableWhisperr]
) -> None:
    pytest.importorskip("gunicorn")
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "wsgi_app.py").write_text(
        textwrap.dedent(GUNICORN_APP).format(api_key=API_KEY, db=db_path, url=fserver.url)
    )
    port = free_port()
    gunicorn = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            "--workers=3",
            f"--bind=127.0.0.1:{port}",
            f"--chdir={app_dir}",
            "--graceful-timeout=10",
            "wsgi_app:app",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert gunicorn.stderr is not None
    log = LineLog(gunicorn.stderr)
    n = 30
    try:
        # Once the master listens, connections wait in the backlog for a worker.
        assert log.wait_for("Listening at:"), log.text(0)
        pids = []
        for i in range(n):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/?i={i}", timeout=10) as resp:
                pids.append(resp.read().decode())
        gunicorn.send_signal(signal.SIGTERM)  # graceful: the workers exit, running atexit
        assert gunicorn.wait(20) == 0
    finally:
        if gunicorn.poll() is None:
            gunicorn.kill()
            gunicorn.wait(10)
    text = log.text()
    assert "WHISPERR-PROBLEM" not in text and "Traceback" not in text, text
    assert text.count("Booting worker") == 3, text
    assert str(gunicorn.pid) not in pids  # the requests were served by forked workers

    # Delivered by the processes' exit flushes alone, each event once.
    assert Counter(keys(fserver.events)) == expected(("boot", 1), ("request", n))
    assert clients().stats().pending == 0


# ---- exit while the sender is busy ----

_EXIT_AT_ONCE = """
import sys, time
from whisperr_durable import DurableWhisperr
client = DurableWhisperr({key!r}, path=sys.argv[1], base_url={url!r}, shutdown_timeout=0)
time.sleep(float(sys.argv[2]))  # each child exits at another moment of the sender's start
client.shutdown(0)
"""


def test_a_process_that_exits_while_its_sender_starts_exits_cleanly(
    tmp_path: Path, make_client: MakeClient
) -> None:
    # A client that opens a file with a backlog starts its sender at once, and the sender
    # sets up its HTTP client (OpenSSL loads the certificates, without the GIL). A daemon
    # thread left there at exit runs on while the C exit handlers free OpenSSL's state, and
    # the process crashes: exit must end the thread first.
    url = closed_port_url()
    template = str(tmp_path / "template.db")
    filler = make_client(path=template, base_url=url)
    filler.track_many(("u1", "left", {"i": i}) for i in range(200))
    filler.shutdown(0)
    code = _EXIT_AT_ONCE.format(key=API_KEY, url=url)
    codes = []
    for batch in range(6):
        procs = []
        for i in range(4):
            path = str(tmp_path / f"outbox-{batch}-{i}.db")
            source = sqlite3.connect(template)
            with contextlib.closing(sqlite3.connect(path)) as target:
                source.backup(target)
            source.close()
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code, path, str(0.02 + (batch * 4 + i) * 0.003)],
                    env=child_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            codes.append((proc.returncode, err.decode()[-300:]))
    assert [(n, c) for n, c in enumerate(codes) if c[0] != 0] == []
