"""Callers that make a client's life hard, through the public API.

Signal handlers that call back into the client while their thread is inside it (run in a
child process, so that a deadlock costs a timeout, not the test run), a file another
connection keeps locked, infinite and NaN timeouts and options read from environment text,
objects and Mappings that raise from every method (with exceptions that cannot even be
printed), exception text that carries an email address, an API key argparse cannot place,
and a process that only constructs a client on a file an earlier one left ops in.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping
from contextlib import closing
from datetime import datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import (
    API_KEY,
    MakeClient,
    child_env,
    closed_port_url,
    delivery_order,
    numbers,
    queue_table,
    wait_until,
)

import whisperr_durable
from whisperr_durable import DurableWhisperr, WhisperrError
from whisperr_durable.devserver import DevServer

# The package under test, wherever it was imported from: child processes import the same.
PACKAGE_ROOT = Path(whisperr_durable.__file__).resolve().parent.parent
# A child that has not finished by then is taken to be deadlocked (it needs a second or two).
CHILD_TIMEOUT = 30.0


# ---- helpers ----


def run_child(script: str, *args: str, what: str, timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter; its last stdout line is a JSON report. A child
    still running after ``timeout`` is killed and the test fails: ``what`` hung."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, *args],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{what}: the child process did not finish in {timeout:.0f} s (killed): "
            f"deadlocked.\nstderr:\n{exc.stderr!r}"
        )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def seconds(call: Callable[[], object]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def queued(path: str) -> int:
    """How many of API_KEY's ops the file holds, read as another process would."""
    with closing(sqlite3.connect(path, isolation_level=None, timeout=5)) as conn:
        ((count,),) = conn.execute(f"SELECT count(*) FROM {queue_table()}").fetchall()
    return int(count)


# ---- signal handlers that re-enter the client ----

# A SIGALRM every 150 us calls the client from a handler while the main thread tracks in a
# loop: most land inside track(), with the thread holding the client's locks. A handler that
# is interrupted by the next signal returns at once (Python nests handlers: without this
# guard the nesting, not the client, would be tested). The report is one JSON line.
_REENTER = textwrap.dedent(
    """
    import json, logging, os, signal, sys, time
    from whisperr_durable import DurableWhisperr

    path, url, mode, main_calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    class Errors(logging.Handler):
        def __init__(self):
            super().__init__(logging.ERROR)
            self.messages = []
        def emit(self, record):
            self.messages.append(record.getMessage())

    errors = Errors()
    logging.getLogger("whisperr_durable").addHandler(errors)
    client = DurableWhisperr(
        "wrk_test_key", path=path, base_url=url, flush_at=1_000_000,
        flush_interval=3600.0, max_queue_size=1_000_000,
    )
    report = {"handler_calls": 0, "inside_track": 0, "flushes": [], "flush_seconds": []}
    busy = False

    def inside_track(frame):
        while frame is not None:
            code = frame.f_code
            if code.co_name == "track" and code.co_filename.endswith("_client.py"):
                return True
            frame = frame.f_back
        return False

    def on_alarm(signum, frame):
        global busy
        if busy:
            return
        busy = True
        try:
            inside = inside_track(frame)
            report["inside_track"] += inside
            if mode == "flush" and inside and len(report["flushes"]) < 10:
                started = time.monotonic()
                result = client.flush(timeout=0.5)
                client.stats()
                report["flush_seconds"].append(time.monotonic() - started)
                report["flushes"].append(result.reason)
            report["handler_calls"] += 1
            client.track("from_handler", "handler_event", {"n": report["handler_calls"]})
        finally:
            busy = False

    # One op first: the sender thread is running before the first signal.
    client.track("from_main", "main_event", {"i": -1})
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.00015, 0.00015)
    for i in range(main_calls):
        client.track("from_main", "main_event", {"i": i})
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    report["calls"] = 1 + main_calls + report["handler_calls"]
    if mode == "flush":
        report["final_flush"] = list(client.flush(timeout=30))
    else:
        # Ops a handler set aside are stored by the next write or by the sender: wait for
        # the count to settle rather than read it mid-move.
        deadline = time.monotonic() + 20
        while True:
            stats = client.stats()
            if stats.pending + stats.held == report["calls"] or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        report["pending"], report["held"] = stats.pending, stats.held
    report["errors"] = errors.messages
    print(json.dumps(report), flush=True)
    os._exit(0)
    """
)


def test_a_signal_handler_that_tracks_inside_track_never_hangs_and_loses_nothing(
    db_path: str,
) -> None:
    report = run_child(
        _REENTER,
        db_path,
        closed_port_url(),
        "track",
        "3000",
        what="track() from a signal handler that interrupted track()",
    )
    assert report["inside_track"] > 0, "no signal landed inside track(): the test proves nothing"
    assert report["pending"] + report["held"] == report["calls"], report
    assert report["errors"] == []


def test_a_signal_handler_that_flushes_inside_track_never_hangs_and_all_is_delivered(
    db_path: str, server: DevServer
) -> None:
    report = run_child(
        _REENTER,
        db_path,
        server.url,
        "flush",
        "2000",
        what="flush() and stats() from a signal handler that interrupted track()",
    )
    assert report["flushes"], "no handler flushed inside track(): the test proves nothing"
    assert set(report["flushes"]) <= {None, "reentered", "timeout"}, report["flushes"]
    assert max(report["flush_seconds"]) < 10, report["flush_seconds"]
    assert report["final_flush"][:2] == [0, None], report["final_flush"]
    assert server.wait_for_events(report["calls"], timeout=20)
    assert len(server.events) == report["calls"]
    assert server.duplicates == 0
    assert report["errors"] == []


# The signal is aimed: a trace function raises it on the line of threading.Event.set that
# runs with the Event's own (non-reentrant) lock held, when track() wakes the sender
# (flush_at=1: every op wakes it). A real signal lands there too, only less often.
_AIMED = textwrap.dedent(
    """
    import json, linecache, os, signal, sys, threading
    from whisperr_durable import DurableWhisperr

    path, url, action = sys.argv[1], sys.argv[2], sys.argv[3]
    client = DurableWhisperr(
        "wrk_test_key", path=path, base_url=url, flush_at=1, flush_interval=3600.0
    )
    client.track("from_main", "main_event", {"i": 0})  # the sender thread is running
    report = {"aimed_at": None, "handler": None}

    def on_usr1(signum, frame):
        if action == "flush":
            report["handler"] = [client.flush(timeout=0.5).reason, client.stats().pending]
        else:
            client.track("from_handler", "handler_event", {"i": 2})
            report["handler"] = "tracked"

    signal.signal(signal.SIGUSR1, on_usr1)
    SET = threading.Event.set.__code__

    def tracer(frame, event, arg):
        caller = frame.f_back
        if (
            report["aimed_at"] is not None
            or frame.f_code is not SET
            or caller is None
            or not caller.f_code.co_filename.endswith("_sender.py")
        ):
            return None

        def local(frame, event, arg):
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            if event == "line" and line == "self._flag = True" and report["aimed_at"] is None:
                report["aimed_at"] = caller.f_code.co_name
                signal.raise_signal(signal.SIGUSR1)
            return local

        return local

    sys.settrace(tracer)
    client.track("from_main", "main_event", {"i": 1})
    sys.settrace(None)
    print(json.dumps(report), flush=True)
    os._exit(0)
    """
)


@pytest.mark.parametrize("action", ["track", "flush"])
def test_a_signal_handler_that_lands_while_track_wakes_the_sender_never_hangs(
    db_path: str, action: str
) -> None:
    report = run_child(
        _AIMED,
        db_path,
        closed_port_url(),
        action,
        timeout=10,  # two track()s and a flush(timeout=0.5)
        what=(
            f"{action}() from a signal handler that interrupted track() inside "
            "Sender.wake()/sync_soon() -> threading.Event.set(): the handler's own "
            "Event.set() waits for the Event's lock its thread already holds"
        ),
    )
    assert report["aimed_at"] is not None, "the signal was never raised: the test proves nothing"
    assert report["handler"] is not None


# ---- a locked file: the wait is paid once per episode ----


def lock_file(path: str) -> sqlite3.Connection:
    """Another connection holding the outbox's write lock, as a long writer would."""
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    return blocker


def release(blocker: sqlite3.Connection) -> None:
    blocker.execute("ROLLBACK")
    blocker.close()


def test_a_locked_file_costs_the_wait_once_per_episode(
    make_client: MakeClient, db_path: str, server: DevServer
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(store_timeout=0.3, on_error=errors.append)
    client.track("u1", "before_lock", {"i": 0})
    blocker = lock_file(db_path)
    try:
        first = seconds(lambda: client.track("u1", "while_locked", {"i": 1}))
        later = [
            seconds(lambda: client.identify("u1", traits={"i": 2})),
            seconds(lambda: client.track("u1", "while_locked", {"i": 3})),
            seconds(lambda: client.track("u1", "while_locked", {"i": 4})),
            seconds(lambda: client.identify("u1", traits={"i": 5})),
            seconds(lambda: client.track("u1", "while_locked", {"i": 6})),
            seconds(lambda: client.track("u1", "while_locked", {"i": 7})),
        ]
        stats = client.stats()
    finally:
        release(blocker)
    assert first >= 0.25, f"the first call did not wait for the lock ({first:.3f} s)"
    assert max(later) < 0.15, f"calls after the first waited again: {later}"
    assert (stats.held, stats.pending) == (7, 1), stats
    assert [e.type for e in errors] == ["store_error"]  # one report for the episode
    # The flush stores the held ops first, then delivers everything in call order.
    assert client.flush(timeout=10).ok
    assert delivery_order(server) == list(range(8))
    assert client.stats().held == 0
    assert server.duplicates == 0


def test_no_call_after_the_first_of_an_episode_waits_for_the_locked_file(
    make_client: MakeClient, db_path: str, server: DevServer
) -> None:
    # The episode lasts over two of the sender's tries to store the held ops (one a second).
    client = make_client(store_timeout=0.3)
    client.track("u1", "before_lock", {"i": 0})
    blocker = lock_file(db_path)
    waits: list[tuple[float, float]] = []  # (when, how long), from the episode's start
    try:
        started = time.monotonic()
        client.track("u1", "while_locked", {"i": 1})
        i = 2
        while time.monotonic() - started < 2.6:
            at = time.monotonic() - started
            took = seconds(partial(client.track, "u1", "while_locked", {"i": i}))
            waits.append((round(at, 2), round(took, 3)))
            i += 1
            time.sleep(0.02)  # a caller's pace, not a wait for the client
    finally:
        release(blocker)
    slow = [(at, took) for at, took in waits if took >= 0.15]
    assert slow == [], (
        "track() calls during the episode waited for the locked file again "
        f"((seconds since the lock, seconds waited): {slow}): Writer.store_held(), run by the "
        "sender every STORE_RETRY_INTERVAL, holds the writer's connection lock while it "
        "waits store_timeout for the file, and every track() needs that lock"
    )
    assert client.flush(timeout=10).ok
    assert delivery_order(server) == list(range(i))


def test_held_ops_do_not_wait_in_memory_for_a_flush_once_the_file_takes_writes(
    make_client: MakeClient, db_path: str, server: DevServer
) -> None:
    # A file with an op left in it: the new client's sender delivers it and goes to sleep
    # (flush_interval is an hour) before the episode begins.
    earlier = make_client(base_url=closed_port_url())
    earlier.track("u1", "left_behind", {"i": 0})
    earlier.shutdown(timeout=2)
    client = make_client(store_timeout=0.3)
    assert server.wait_for_events(1, timeout=10)
    assert wait_until(lambda: client.stats().pending == 0, timeout=10)  # acknowledged
    blocker = lock_file(db_path)
    try:
        client.track("u1", "while_locked", {"i": 1})
        assert client.stats().held == 1
    finally:
        release(blocker)
    # The sender is to try the file every STORE_RETRY_INTERVAL (1 s) while ops are held
    # (or deliver them from memory): either way none is left in memory.
    settled = wait_until(lambda: client.stats().held == 0, timeout=5)
    assert settled, (
        f"the held op is still only in memory ({client.stats()}) although the file takes "
        "writes again: nothing wakes the sender when an episode begins "
        "(DurableWhisperr._after_write wakes it only for flush_at or a checkpoint, and "
        "Sender._next_wait() was computed before the episode), so held ops wait for "
        "flush_interval, flush_at or a flush()"
    )
    assert client.flush(timeout=10).ok
    assert numbers(server.events) == [0, 1]


# ---- infinite, huge and NaN timeouts; options that cannot work ----


def test_infinite_and_huge_timeouts_mean_no_limit(
    make_client: MakeClient, server: DevServer
) -> None:
    client = make_client()
    client.track("u1", "e", {"i": 0})
    assert client.flush(float("inf")).ok
    client.track("u1", "e", {"i": 1})
    assert client.flush(1e300).ok
    client.track("u1", "e", {"i": 2})
    assert client.shutdown(float("inf")).ok
    assert numbers(server.events) == [0, 1, 2]


def test_a_nan_timeout_is_refused(make_client: MakeClient) -> None:
    client = make_client()
    client.track("u1", "e", {"i": 0})
    assert client.flush(timeout=10).ok
    with pytest.raises(ValueError, match="timeout"):
        client.flush(float("nan"))  # refused even with nothing left to wait for


def test_an_infinite_shutdown_timeout_is_accepted_as_no_limit(
    make_client: MakeClient, server: DevServer
) -> None:
    client = make_client(shutdown_timeout=float("inf"))
    client.track("u1", "e", {"i": 0})
    assert client.shutdown().ok
    assert numbers(server.events) == [0]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("flush_interval", math.inf),
        ("flush_interval", math.nan),
        ("request_timeout", math.inf),
        ("flush_at", 1.5),
        ("max_queue_size", True),
        ("store_timeout", -1),
        ("base_url", "not-a-url"),
        ("base_url", "api.whisperr.net"),
        ("base_url", "ftp://api.whisperr.net"),
        ("base_url", "https://"),
        ("base_url", "https://api.whisperr.net:99999"),
        ("base_url", "https://api.whisperr.net/?key=1"),
        ("base_url", "https://api.whisperr.net/#top"),
        ("base_url", "https://api whisperr.net"),
        ("base_url", 42),
    ],
    ids=repr,
)
def test_an_option_that_cannot_work_is_refused_at_construction(
    make_client: MakeClient, option: str, value: object
) -> None:
    with pytest.raises(ValueError, match=option):
        make_client(**{option: value})


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "https://api.whisperr.net/", "https://example.com/whisperr"]
)
def test_a_base_url_with_a_path_or_a_port_is_accepted(make_client: MakeClient, url: str) -> None:
    client = make_client(base_url=url)
    assert client.stats().pending == 0


def test_an_infinite_flush_interval_from_the_environment_fails_at_setup(
    monkeypatch: pytest.MonkeyPatch, server: DevServer, db_path: str
) -> None:
    pytest.importorskip("starlette")
    from whisperr_durable.integrations import asgi

    asgi._reset_client()
    monkeypatch.setenv("WHISPERR_API_KEY", API_KEY)
    monkeypatch.setenv("WHISPERR_BASE_URL", server.url)
    monkeypatch.setenv("WHISPERR_DB_PATH", db_path)
    monkeypatch.setenv("WHISPERR_FLUSH_INTERVAL", "inf")
    try:
        with pytest.raises(ValueError, match="flush_interval"):
            asgi.get_client()
    finally:
        asgi._reset_client()


# ---- nothing a caller passes raises (outside strict mode) ----


class Unprintable(Exception):
    """An exception whose text cannot be had."""

    def __str__(self) -> str:
        raise RuntimeError("no text")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class UnprintableValue:
    """A value that cannot be turned into text in any way."""

    def __str__(self) -> str:
        raise Unprintable()

    def __repr__(self) -> str:
        raise Unprintable()

    def __format__(self, spec: str) -> str:
        raise Unprintable()


class UnprintableDecimal(Decimal):
    def __str__(self) -> str:
        raise Unprintable()

    def __repr__(self) -> str:
        raise Unprintable()

    def __format__(self, spec: str, *args: Any) -> str:
        raise Unprintable()


class BadIsoformat(datetime):
    def isoformat(self, *args: Any, **kwargs: Any) -> str:
        raise Unprintable()


class KeysRaise(Mapping[str, Any]):
    def keys(self) -> Any:
        raise Unprintable()

    def __getitem__(self, key: str) -> Any:
        raise Unprintable()

    def __iter__(self) -> Iterator[str]:
        raise Unprintable()

    def __len__(self) -> int:
        return 1


class GetitemRaises(Mapping[str, Any]):
    def __getitem__(self, key: str) -> Any:
        raise Unprintable()

    def __iter__(self) -> Iterator[str]:
        return iter(["plan", "type", "address"])

    def __len__(self) -> int:
        return 3


HOSTILE_CALLS: dict[str, Callable[[DurableWhisperr], object]] = {
    "an unprintable object in properties": lambda c: c.track("u1", "e", {"x": UnprintableValue()}),
    "an unprintable Decimal NaN in properties": lambda c: c.track(
        "u1", "e", {"amount": UnprintableDecimal("NaN")}
    ),
    "a datetime whose isoformat raises": lambda c: c.track(
        "u1", "e", {"at": BadIsoformat(2024, 1, 1)}
    ),
    "properties whose keys() raises": lambda c: c.track("u1", "e", KeysRaise()),
    "context whose __getitem__ raises": lambda c: c.track("u1", "e", None, GetitemRaises()),
    "a nested Mapping that raises": lambda c: c.track("u1", "e", {"x": GetitemRaises()}),
    "traits whose keys() raises": lambda c: c.identify("u1", traits=KeysRaise()),
    "a channel whose __getitem__ raises": lambda c: c.identify("u1", channels=[GetitemRaises()]),
}


@pytest.mark.parametrize("call", list(HOSTILE_CALLS.values()), ids=list(HOSTILE_CALLS))
def test_a_hostile_argument_is_reported_never_raised(
    make_client: MakeClient, call: Callable[[DurableWhisperr], object]
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    call(client)  # must not raise
    assert [e.type for e in errors] == ["dropped"]
    assert client.stats().pending == 0


def good(i: int) -> tuple[str, str, dict[str, int]]:
    return ("u1", "bulk_event", {"i": i})


def test_track_many_keeps_the_valid_items_around_a_hostile_one(
    make_client: MakeClient, server: DevServer
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    assert client.track_many([good(0), ("u1", "bulk_event", GetitemRaises()), good(2)]).stored == 2
    assert [e.type for e in errors] == ["dropped"]
    assert client.flush(timeout=10).ok
    assert numbers(server.events) == [0, 2]


def failing_after_two() -> Iterator[tuple[str, str, dict[str, int]]]:
    yield good(0)
    yield good(1)
    raise Unprintable()


def test_track_many_stops_at_a_failing_iterable_and_keeps_what_came_before(
    make_client: MakeClient, server: DevServer
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    assert client.track_many(failing_after_two()).stored == 2
    assert [e.type for e in errors] == ["dropped"]
    assert client.flush(timeout=10).ok
    assert numbers(server.events) == [0, 1]


def test_strict_mode_raises_value_error_and_keeps_the_items_before(
    make_client: MakeClient, server: DevServer
) -> None:
    client = make_client(strict=True)
    with pytest.raises(ValueError):
        client.track("u1", "e", GetitemRaises())
    with pytest.raises(ValueError):
        client.identify("u1", traits=KeysRaise())
    with pytest.raises(ValueError):
        client.track_many([good(0), ("u1", "bulk_event", GetitemRaises()), good(99)])
    with pytest.raises(ValueError):
        client.track_many(failing_after_two())
    assert client.flush(timeout=10).ok
    assert numbers(server.events) == [0, 0, 1]


# ---- a caller's exception text never reaches the logs, on_error or the terminal ----


class EmailKeyed(Mapping[str, Any]):
    """A profile whose lookup fails with the user's email in the exception's text."""

    def __getitem__(self, key: str) -> Any:
        raise KeyError("ada@example.com")

    def __iter__(self) -> Iterator[str]:
        return iter(["plan"])

    def __len__(self) -> int:
        return 1


def test_a_callers_exception_text_never_reaches_the_logs_or_on_error(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    try:
        EmailKeyed()["plan"]
    except KeyError as exc:
        tb = exc.__traceback__
        assert tb is not None
        while tb.tb_next is not None:
            tb = tb.tb_next
        raised_at = f"{Path(__file__).name}:{tb.tb_lineno}"
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    with caplog.at_level(logging.WARNING, logger="whisperr_durable"):
        client.track("u1", "e", EmailKeyed())
        client.identify("u1", traits=EmailKeyed())
        client.track_many([("u1", "e", EmailKeyed())])
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("whisperr_durable")]
    messages = [e.message for e in errors]
    assert len(warnings) == len(messages) == 3, (warnings, messages)
    for text in [*warnings, *messages, caplog.text]:
        assert "ada@example.com" not in text
    for text in [*warnings, *messages]:
        assert re.search(rf"KeyError raised at {re.escape(raised_at)}\b", text), text


@pytest.mark.parametrize(
    "argv",
    [
        # argparse: "invalid choice: '<the key>'" (--api-key belongs to the command).
        pytest.param(["--path", "{path}", "--api-key", "{key}", "status"], id="key-before-command"),
        pytest.param(["status", "--api-key={key}", "--bogus"], id="key-with-unknown-option"),
        # argparse: "unrecognized arguments: --api-key=<the key>".
        pytest.param(["--path", "{path}", "--api-key={key}", "status"], id="key=-before-command"),
        # An abbreviation argparse accepts after the command ("status --api-k KEY" works):
        # before it, "invalid choice: '<the key>'" again.
        pytest.param(["--path", "{path}", "--api-k", "{key}", "status"], id="abbreviated-option"),
    ],
)
def test_the_cli_never_prints_a_key_it_cannot_place(tmp_path: Path, argv: list[str]) -> None:
    key = "wrk_" + os.urandom(12).hex()
    args = [a.format(path=tmp_path / "outbox.db", key=key) for a in argv]
    assert any(key in a for a in args)  # the key is on the command line, to be echoed
    proc = subprocess.run(
        [sys.executable, "-m", "whisperr_durable", *args],
        capture_output=True,
        text=True,
        env=child_env(HOME=str(tmp_path / "home")),
        timeout=60,
    )
    assert proc.returncode == 2, proc
    assert "error:" in proc.stderr
    last_line = proc.stderr.strip().splitlines()[-1]
    assert key not in proc.stdout + proc.stderr, f"the CLI printed the API key: {last_line!r}"


# ---- a restarted process delivers what the previous one left ----


def test_a_new_client_delivers_what_an_earlier_one_left_without_tracking(
    make_client: MakeClient, server: DevServer, db_path: str
) -> None:
    earlier = make_client(base_url=closed_port_url())  # nothing it sends arrives
    for i in range(15):
        earlier.track("u1", "left_behind", {"i": i})
    earlier.shutdown(timeout=2)
    assert queued(db_path) == 15  # on disk, for the next process
    make_client()  # constructed only: no track, no flush
    assert server.wait_for_events(15, timeout=10), (
        f"{len(server.events)} of the 15 ops left in the file were delivered"
    )
    assert sorted(numbers(server.events)) == list(range(15))
    assert server.duplicates == 0
