from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Optional

import pytest

from whisperr_durable import DurableWhisperr
from whisperr_durable._client import key_fingerprint
from whisperr_durable._store import queue_table as table_of_key
from whisperr_durable.devserver import DevServer

API_KEY = "wrk_test_key"
ROOT = Path(__file__).resolve().parent.parent

MakeClient = Callable[..., DurableWhisperr]


def queue_table(api_key: str = API_KEY) -> str:
    """The quoted name of ``api_key``'s queue table in an outbox file, for raw SQL."""
    return table_of_key(key_fingerprint(api_key))


def numbers(events: Iterable[dict[str, Any]]) -> list[int]:
    """The ``i`` property of events, in their order."""
    return [e["properties"]["i"] for e in events]


def delivery_order(server: DevServer) -> list[int]:
    """The ``i`` of every accepted op (event property, identify trait) in request order."""
    order: list[int] = []
    for request in server.requests:
        if request.status is None or not 200 <= request.status < 300:
            continue
        body = request.json()
        if request.path.endswith("/identify"):
            order.append(body["traits"]["i"])
        else:
            order.extend(numbers(body["events"]))
    return order


def raw(path: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Read the file through a connection of our own, as another process would."""
    with closing(sqlite3.connect(path, isolation_level=None, timeout=10)) as conn:
        return conn.execute(sql, params).fetchall()


def set_lease(
    path: str,
    owner: str,
    until_ms: int,
    first: Optional[int] = None,
    last: Optional[int] = None,
    api_key: str = API_KEY,
) -> None:
    """Write a sender's lease on rows ``first``..``last`` of a key's queue (by default,
    every queued row), as a sender of another process does when it claims them."""
    with closing(sqlite3.connect(path, isolation_level=None, timeout=10)) as conn:
        lo, hi = conn.execute(f"SELECT min(id), max(id) FROM {queue_table(api_key)}").fetchone()
        conn.execute(
            "INSERT OR REPLACE INTO leases (key_fp, owner, first_id, last_id, until_ms) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                key_fingerprint(api_key),
                owner,
                lo if first is None else first,
                hi if last is None else last,
                until_ms,
            ),
        )


def leased_ids(path: str, api_key: str = API_KEY, *, live_at: int = 0) -> list[int]:
    """Ids of a key's queued rows under a sender's lease (one still running at ``live_at``)."""
    rows = raw(
        path,
        f"SELECT q.id FROM {queue_table(api_key)} AS q JOIN leases AS l ON l.key_fp = ? "
        "AND q.id BETWEEN l.first_id AND l.last_id WHERE l.until_ms > ? ORDER BY q.id",
        (key_fingerprint(api_key), live_at),
    )
    return [op_id for (op_id,) in rows]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll a condition the SDK's own threads bring about, where no event can be waited on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python: this checkout importable, no WHISPERR_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPERR_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def free_port() -> int:
    """A port nothing listens on at the moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class LineLog:
    """Collects a child's text stream line by line; lets a test wait for a given line."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 20.0) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: any(text in line for line in self._lines), timeout
            )

    def text(self, timeout: float = 10.0) -> str:
        """Everything, once the stream has ended (or ``timeout`` passed)."""
        self._thread.join(timeout)
        with self._changed:
            return "".join(self._lines)


def closed_port_url() -> str:
    """A URL nothing listens on: every request to it fails at once."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "outbox.db")


@pytest.fixture
def server() -> Iterator[DevServer]:
    """A real Whisperr-compatible server on 127.0.0.1, on a free port."""
    with DevServer(api_key=API_KEY) as srv:
        yield srv


@pytest.fixture
def make_client(server: DevServer, db_path: str) -> Iterator[MakeClient]:
    """Clients on the test's outbox and server; nothing is sent before a flush unless asked."""
    clients: list[DurableWhisperr] = []

    def make(api_key: str = API_KEY, **options: Any) -> DurableWhisperr:
        options.setdefault("path", db_path)
        options.setdefault("base_url", server.url)
        options.setdefault("flush_at", 100_000)
        options.setdefault("flush_interval", 3600.0)
        client = DurableWhisperr(api_key, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.shutdown(timeout=0.5)


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_internal_errors() -> Iterator[None]:
    """Fail any test in which the SDK logged an unexpected error of its own."""
    handler = _ErrorRecords()
    logger = logging.getLogger("whisperr_durable")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]


def run_forked(fn: Callable[[], int], timeout: float = 20.0) -> int:
    """Run ``fn`` in a forked child; its return value is the exit code (99 if it raised)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        code = 99
        try:
            code = fn()
        finally:
            os._exit(code)
    statuses: list[int] = []
    reaper = threading.Thread(target=lambda: statuses.append(os.waitpid(pid, 0)[1]))
    reaper.start()
    reaper.join(timeout)
    if reaper.is_alive():
        os.kill(pid, signal.SIGKILL)
        reaper.join(10)
        pytest.fail("the forked child did not finish")
    return os.waitstatus_to_exitcode(statuses[0])


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 512 KiB tmpfs, when this sandbox allows mounting one."""
    with tmpfs(tmp_path / "small") as mount_point:
        yield mount_point


@contextmanager
def tmpfs(mount_point: Path) -> Iterator[Path]:
    """A real 512 KiB tmpfs mounted at ``mount_point`` (made here), when this sandbox allows
    mounting one; unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run mount here: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"the sandbox does not allow mounting a tmpfs: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill_filesystem(directory: Path) -> Path:
    """Write a file until the filesystem has not one byte left."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (b"\0" * 65536, b"\0" * 4096, b"\0"):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == 28  # ENOSPC
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


def postgres_server_url() -> str:
    """The PostgreSQL server the tests may use (``WHISPERR_TEST_POSTGRES``, which
    ``scripts/dev.py test`` sets to a throwaway server of its own). Skips without one, and
    fails instead where CI requires the PostgreSQL tests to run
    (``WHISPERR_REQUIRE_POSTGRES``)."""
    url = os.environ.get("WHISPERR_TEST_POSTGRES")
    why = ""
    if not url:
        why = (
            "no PostgreSQL server for the tests: run them with scripts/dev.py test on a "
            "machine with PostgreSQL, or set WHISPERR_TEST_POSTGRES to a server's URL"
        )
    else:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            why = "psycopg is not installed (the postgres extra)"
    if why:
        if os.environ.get("WHISPERR_REQUIRE_POSTGRES"):
            pytest.fail(f"the PostgreSQL tests must run here: {why}")
        pytest.skip(why)
    assert url is not None
    return url


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database of its own for the test, on the tests' PostgreSQL server, dropped
    after it (with any connection a test left open)."""
    import psycopg

    server_url = postgres_server_url()
    name = f"whisperr_test_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield server_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_databases = itertools.count()


def load_spec(name: str) -> dict[str, Any]:
    """A conformance fixture file beside ``WHISPERR_SPEC_PATH``; skips where it is unset."""
    spec = os.environ.get("WHISPERR_SPEC_PATH")
    if not spec:
        pytest.skip("WHISPERR_SPEC_PATH is not set")
    path = Path(spec).parent / name
    if not path.is_file():
        pytest.skip(f"{path} does not exist")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def as_unprivileged(fn: Callable[[], int]) -> Callable[[], int]:
    """``fn`` run as ``nobody`` when we are root (root ignores permission bits)."""
    if os.geteuid() != 0:
        return fn
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    except KeyError:
        uid = gid = 65534

    def drop_and_run() -> int:
        # Imported while still root: the interpreter may live where nobody cannot read it
        # (under /root), and a client imports these on first use.
        import encodings.idna  # noqa: F401
        import secrets  # noqa: F401

        import filelock  # noqa: F401
        import httpx

        httpx.Client().close()
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        return fn()

    return drop_and_run


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A directory outside pytest's private tree (0700), which ``nobody`` can enter."""
    directory = Path(tempfile.mkdtemp(prefix="whisperr-faults-"))
    os.chmod(directory, 0o755)
    try:
        yield directory
    finally:
        os.chmod(directory, 0o755)
        shutil.rmtree(directory, ignore_errors=True)
