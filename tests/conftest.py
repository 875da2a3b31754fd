from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from whisperr_durable.devserver import DevServer

API_KEY = "wrk_test_key"


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "outbox.db")


@pytest.fixture
def server() -> Iterator[DevServer]:
    """A real Whisperr-compatible server on 127.0.0.1, on a free port."""
    with DevServer(api_key=API_KEY) as srv:
        yield srv


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
