from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from whisperr_durable import DurableWhisperr
from whisperr_durable._client import key_fingerprint
from whisperr_durable._outbox import _queue_table
from whisperr_durable.devserver import DevServer

API_KEY = "wrk_test_key"

MakeClient = Callable[..., DurableWhisperr]


def queue_table(api_key: str = API_KEY) -> str:
    """The quoted name of ``api_key``'s queue table in an outbox file, for raw SQL."""
    return _queue_table(key_fingerprint(api_key))


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
