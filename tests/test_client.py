"""The public API end to end: a real outbox file, the real devserver, real processes."""

from __future__ import annotations

import inspect
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    API_KEY,
    MakeClient,
    closed_port_url,
    numbers,
    queue_table,
    run_forked,
)

import whisperr_durable
from whisperr_durable import (
    SDK_NAME,
    BulkResult,
    DurableWhisperr,
    Whisperr,
    WhisperrError,
    __version__,
    _retry,
)
from whisperr_durable._store import Outbox
from whisperr_durable._wire import utc_now_ms
from whisperr_durable.devserver import DevServer

OTHER_KEY = "wrk_other_key"
DAY_MS = 24 * 3600 * 1000
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_retry, "backoff", lambda n, rand=None: 0.001)


def wire_time(epoch_ms: int) -> str:
    moment = datetime.fromtimestamp(epoch_ms // 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{epoch_ms % 1000:03d}Z"


def message_ids(body: bytes) -> list[str]:
    return [e["context"]["$message_id"] for e in json.loads(body)["events"]]


# ---- the drop-in surface ----


def test_whisperr_is_an_alias_of_durable_whisperr() -> None:
    assert Whisperr is DurableWhisperr


def test_constructor_matches_the_official_sdk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    params = inspect.signature(DurableWhisperr).parameters
    official = {
        "base_url": "https://api.whisperr.net",
        "app_version": None,
        "flush_at": 20,
        "flush_interval": 10.0,
        "max_queue_size": 10000,
        "max_batch_size": 500,
        "max_retries": 6,
        "request_timeout": 10.0,
        "disabled": False,
        "debug": False,
        "on_error": None,
        "transport": None,
    }
    first = next(iter(params.values()))
    assert first.name == "api_key"
    assert first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    for name in official:
        assert name in params, name
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    # Everything beyond the key is keyword-only, and None when not passed: an environment
    # variable, else the default, decides.
    for name, param in list(params.items())[1:]:
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert param.default is None, name
    # With no WHISPERR_ settings, the official defaults.
    for name in [n for n in os.environ if n.startswith("WHISPERR_")]:
        monkeypatch.delenv(name)
    client = DurableWhisperr("wrk_test_key", path=str(tmp_path / "o.db"))
    try:
        options = client._options._asdict()
        for name, default in official.items():
            if name in options:
                assert options[name] == default, name
                assert type(options[name]) is type(default), name
    finally:
        client.shutdown(0)


def test_options_not_passed_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: DevServer
) -> None:
    path = str(tmp_path / "from-env.db")
    monkeypatch.setenv("WHISPERR_API_KEY", API_KEY)
    monkeypatch.setenv("WHISPERR_DB_PATH", path)
    monkeypatch.setenv("WHISPERR_BASE_URL", server.url)
    monkeypatch.setenv("WHISPERR_FLUSH_AT", "3")
    monkeypatch.setenv("WHISPERR_MAX_QUEUE_SIZE", "123")
    monkeypatch.setenv("WHISPERR_FSYNC", "yes")
    monkeypatch.setenv("WHISPERR_REQUEST_TIMEOUT", "2.5")
    client = DurableWhisperr()
    try:
        o = client._options
        assert (o.path, o.base_url, o.flush_at, o.max_queue_size, o.fsync) == (
            path,
            server.url,
            3,
            123,
            True,
        )
        assert o.request_timeout == 2.5
        client.track("u1", "from_env", {"i": 0})
        assert client.flush(timeout=10).ok
        assert numbers(server.events) == [0]
        assert os.path.exists(path)
    finally:
        client.shutdown(0)
    # An argument always wins over its variable.
    explicit = DurableWhisperr(path=str(tmp_path / "explicit.db"), flush_at=20, fsync=False)
    try:
        assert (explicit._options.flush_at, explicit._options.fsync) == (20, False)
        assert explicit._options.path == str(tmp_path / "explicit.db")
    finally:
        explicit.shutdown(0)
    # A variable that is no value of its option is refused, naming the variable.
    monkeypatch.setenv("WHISPERR_FLUSH_AT", "many")
    with pytest.raises(ValueError, match="WHISPERR_FLUSH_AT"):
        DurableWhisperr()


def test_public_exports_are_pinned() -> None:
    assert set(whisperr_durable.__all__) == {
        "SDK_NAME",
        "BillingEvent",
        "BulkResult",
        "DeadLetter",
        "DurableWhisperr",
        "FlushResult",
        "KeyStatus",
        "OutboxFile",
        "OutboxStatus",
        "QueuedOp",
        "OutboxStats",
        "StoreError",
        "Whisperr",
        "WhisperrError",
        "__version__",
    }
    assert len(whisperr_durable.__all__) == len(set(whisperr_durable.__all__))
    for name in whisperr_durable.__all__:
        assert hasattr(whisperr_durable, name), name


def test_api_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, server: DevServer, db_path: str
) -> None:
    monkeypatch.setenv("WHISPERR_API_KEY", API_KEY)
    client = DurableWhisperr(path=db_path, base_url=server.url, flush_interval=3600.0)
    try:
        assert client.ready
        client.track("u1", "env_key_used")
        assert client.flush(timeout=5).ok
    finally:
        client.shutdown(timeout=0.5)
    assert [e["event_type"] for e in server.events] == ["env_key_used"]
    assert server.requests[0].headers["x-api-key"] == API_KEY


def test_a_missing_api_key_raises_unless_disabled(
    monkeypatch: pytest.MonkeyPatch, db_path: str
) -> None:
    monkeypatch.delenv("WHISPERR_API_KEY", raising=False)
    with pytest.raises(ValueError, match="api_key"):
        DurableWhisperr(path=db_path)
    with pytest.raises(ValueError, match="api_key"):
        DurableWhisperr("", path=db_path)
    client = DurableWhisperr(path=db_path, disabled=True)
    assert client.ready is False
    assert not os.path.exists(db_path)


# ---- ordering and batching ----


def test_identify_splits_the_tracks_around_it_in_acceptance_order(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()
    client.track("u1", "before_identify", {"i": 0})
    client.track("u1", "before_identify", {"i": 1})
    client.identify("u1", traits={"plan": "pro"}, email="ada@example.com")
    client.track("u1", "after_identify", {"i": 2})
    client.track("u1", "after_identify", {"i": 3})

    assert client.flush(timeout=5).ok

    requests = server.requests
    assert [(r.path, r.status) for r in requests] == [
        ("/v1/events/batch", 202),
        ("/v1/identify", 202),
        ("/v1/events/batch", 202),
    ]
    assert numbers(requests[0].json()["events"]) == [0, 1]
    assert requests[1].json() == {
        "external_user_id": "u1",
        "traits": {"plan": "pro"},
        "channels": [{"channel": "email", "address": "ada@example.com", "opted_in": True}],
    }
    assert numbers(requests[2].json()["events"]) == [2, 3]
    assert numbers(server.events) == [0, 1, 2, 3]


def test_max_batch_size_bounds_each_request(server: DevServer, make_client: MakeClient) -> None:
    client = make_client(max_batch_size=3)
    for i in range(7):
        client.track("u1", "small_batches", {"i": i})

    assert client.flush(timeout=5).ok

    assert [len(r.json()["events"]) for r in server.requests] == [3, 3, 1]
    assert numbers(server.events) == list(range(7))


def test_max_batch_size_above_500_is_clamped(server: DevServer, make_client: MakeClient) -> None:
    client = make_client(max_batch_size=1000)
    for i in range(501):
        client.track("u1", "clamped", {"i": i})

    assert client.flush(timeout=10).ok

    # The server would refuse a 501-event batch with 400.
    assert [(len(r.json()["events"]), r.status) for r in server.requests] == [(500, 202), (1, 202)]
    assert numbers(server.events) == list(range(501))
    assert client.dead_letters() == []


def test_flush_at_triggers_delivery_without_a_flush(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client(flush_at=5, flush_interval=3600.0)
    for i in range(4):
        client.track("u1", "counted", {"i": i})
    assert server.requests == []
    client.track("u1", "counted", {"i": 4})

    assert server.wait_for_events(5, timeout=5)
    assert numbers(server.events) == [0, 1, 2, 3, 4]


def test_flush_interval_triggers_delivery_without_a_flush(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client(flush_at=100_000, flush_interval=0.05)
    for i in range(3):
        client.track("u1", "timed", {"i": i})

    assert server.wait_for_events(3, timeout=5)
    assert numbers(server.events) == [0, 1, 2]


def test_flush_sends_at_once_not_at_the_next_poll(
    server: DevServer, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the sender's poll stretched far beyond the flush's timeout, only the flush's own
    # wake-up can deliver in time.
    monkeypatch.setattr(whisperr_durable._sender, "_POLL_WHILE_WAITING", 60.0)
    client = make_client(flush_interval=3600.0)
    client.track("u1", "first")
    client._sender.start()
    for i in range(3):
        client.track("u1", "flushed", {"i": i})
        assert client.flush(timeout=10).pending == 0
    assert [e["event_type"] for e in server.events] == ["first", "flushed", "flushed", "flushed"]


# ---- the request ----


def test_request_headers_and_body_bytes(server: DevServer, make_client: MakeClient) -> None:
    client = make_client(app_version="2.3.4")
    client.track("u1", "checked_request", {"amount_cents": 4900, "note": "caf\u00e9"})
    client.identify("u1", traits={"plan": "pro"})

    assert client.flush(timeout=5).ok

    assert len(server.requests) == 2
    for request in server.requests:
        assert request.headers["content-type"] == "application/json"
        assert request.headers["x-api-key"] == API_KEY
        assert request.headers["user-agent"].startswith("whisperr-durable-python/")
        assert "content-encoding" not in request.headers
        # Byte for byte what json.dumps (default separators, ASCII) writes.
        assert request.body == json.dumps(request.json()).encode()
    (event,) = server.requests[0].json()["events"]
    context = event["context"]
    assert context["sdk_name"] == SDK_NAME == "whisperr-durable-python"
    assert context["sdk_version"] == __version__
    assert context["app_version"] == "2.3.4"
    assert isinstance(context["$message_id"], str) and len(context["$message_id"]) >= 16
    assert event["properties"] == {"amount_cents": 4900, "note": "caf\u00e9"}


def test_app_version_is_absent_when_not_configured(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()
    client.track("u1", "no_app_version", context={"$mode": "test", "sdk_name": "mine"})
    assert client.flush(timeout=5).ok
    (event,) = server.events
    assert "app_version" not in event["context"]
    assert event["context"]["$mode"] == "test"
    assert event["context"]["sdk_name"] == "mine"  # the caller's key wins over the SDK's


def test_occurred_at_is_captured_at_track_time(server: DevServer, make_client: MakeClient) -> None:
    client = make_client()
    captured = utc_now_ms() - 2 * 60 * 1000 - 345  # two minutes ago, odd milliseconds
    client._clock_ms = lambda: captured
    client.track("u1", "timed_event")
    client._clock_ms = utc_now_ms

    assert client.flush(timeout=5).ok

    (event,) = server.events
    assert event["occurred_at"] == wire_time(captured)


# ---- eviction ----


def test_a_full_queue_evicts_the_oldest_and_reports_it(
    server: DevServer, make_client: MakeClient
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(max_queue_size=5, on_error=errors.append)
    for i in range(8):
        client.track("u1", "churn_signal", {"i": i})

    assert [e.type for e in errors] == ["dropped"] * 3
    assert all("evict" in e.message for e in errors)
    stats = client.stats()
    assert (stats.evicted, stats.pending) == (3, 5)
    assert server.requests == []

    assert client.flush(timeout=5).ok
    assert numbers(server.events) == [3, 4, 5, 6, 7]
    assert client.stats().evicted == 3


# ---- auth ----


def test_auth_failure_pauses_and_the_next_flush_resends_the_same_ids(
    server: DevServer, make_client: MakeClient
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    client.track("u1", "kept_on_401", {"i": 0})
    client.track("u1", "kept_on_401", {"i": 1})
    server.push_script(401)

    first = client.flush(timeout=5)
    assert (first.pending, first.reason) == (2, "auth")
    assert client.stats().pending == 2
    assert [(e.type, e.status) for e in errors] == [("auth", 401)]
    assert [r.status for r in server.requests] == [401]

    second = client.flush(timeout=5)
    assert second.ok
    rejected, delivered = server.requests
    assert delivered.status == 202
    assert message_ids(rejected.body) == message_ids(delivered.body)
    assert rejected.body == delivered.body
    assert numbers(server.events) == [0, 1]
    assert client.stats().pending == 0


def test_a_wrong_api_key_never_deletes_queued_ops(
    server: DevServer, make_client: MakeClient
) -> None:
    server.api_key = "wrk_the_server_wants_another"
    client = make_client()
    client.identify("u1", traits={"plan": "pro"})
    for i in range(3):
        client.track("u1", "wrong_key", {"i": i})

    for _ in range(3):
        result = client.flush(timeout=5)
        assert (result.pending, result.reason) == (4, "auth")
    stats = client.stats()
    assert (stats.pending_identifies, stats.pending_tracks, stats.dead_letters) == (1, 3, 0)
    assert {r.status for r in server.requests} == {401}

    server.api_key = API_KEY
    assert client.flush(timeout=5).ok
    assert len(server.identifies) == 1
    assert numbers(server.events) == [0, 1, 2]


# ---- retries ----


@pytest.mark.usefixtures("fast_backoff")
def test_retry_exhaustion_keeps_the_ops_and_counts_attempts(
    server: DevServer, make_client: MakeClient, db_path: str
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(max_retries=2, on_error=errors.append)
    client.track("u1", "flaky_server", {"i": 0})
    server.push_script(503, 503, 503)

    result = client.flush(timeout=5)
    assert (result.pending, result.reason) == (1, "retry_exhausted")
    assert [r.status for r in server.requests] == [503, 503, 503]
    assert len({r.body for r in server.requests}) == 1
    assert [(e.type, e.status) for e in errors] == [("retry_exhausted", 503)]
    with sqlite3.connect(db_path) as conn:
        assert conn.execute(f"SELECT attempts FROM {queue_table()}").fetchall() == [(3,)]

    assert client.flush(timeout=5).ok
    assert [r.status for r in server.requests] == [503, 503, 503, 202]
    assert numbers(server.events) == [0]
    assert server.requests[-1].body == server.requests[0].body


@pytest.mark.usefixtures("fast_backoff")
def test_retry_after_is_waited_out(server: DevServer, make_client: MakeClient) -> None:
    wait_s = 1  # whole seconds (the contract's rule); the patched backoff alone: about 1 ms
    server.retry_after = str(wait_s)
    server.push_script(503)
    seen: list[float] = []

    def watch() -> None:
        for n in (1, 2):
            if server.wait_for_requests(n, timeout=10):
                seen.append(time.monotonic())

    watcher = threading.Thread(target=watch)
    watcher.start()
    client = make_client()
    client.track("u1", "told_to_wait")
    try:
        assert client.flush(timeout=10).ok
    finally:
        watcher.join(10)

    assert [r.status for r in server.requests] == [503, 202]
    assert len(seen) == 2
    # The retry came at least Retry-After later (a little slack for the watcher's wake-up).
    assert seen[1] - seen[0] >= wait_s - 0.05
    assert seen[1] - seen[0] < wait_s + 5


# ---- refused and expired events ----


def test_one_bad_event_in_a_legacy_400_batch_costs_only_itself(
    server: DevServer, make_client: MakeClient
) -> None:
    server.legacy = True
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    for i in range(10):
        if i == 6:
            # Ten minutes ahead: our client takes it, the server's window does not.
            client._clock_ms = lambda: utc_now_ms() + 10 * 60 * 1000
        client.track("u1", "mixed_batch", {"i": i})
        client._clock_ms = utc_now_ms

    result = client.flush(timeout=10)
    assert (result.pending, result.reason, result.refused) == (0, None, 1)

    assert numbers(server.events) == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert server.duplicates == 0
    (dead,) = client.dead_letters()
    assert (dead.status, dead.kind) == (400, "track")
    assert json.loads(dead.body)["properties"] == {"i": 6}
    assert [(e.type, e.status) for e in errors] == [("dropped", 400)]
    assert client.stats().pending == 0


def test_expired_events_are_dead_lettered_and_never_sent(
    server: DevServer, make_client: MakeClient
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    client._clock_ms = lambda: utc_now_ms() - 31 * DAY_MS
    client.track("u1", "too_old", {"i": 0})
    client._clock_ms = utc_now_ms
    client.track("u1", "fresh", {"i": 1})

    result = client.flush(timeout=5)
    assert (result.pending, result.reason, result.refused) == (0, None, 1)

    assert numbers(server.events) == [1]
    assert all(b"too_old" not in r.body for r in server.requests)
    (dead,) = client.dead_letters()
    assert "expired" in dead.reason
    assert json.loads(dead.body)["event_type"] == "too_old"
    assert [e.type for e in errors] == ["dropped"]
    assert client.stats().dead_letters == 1


# ---- invalid calls and callbacks ----


def test_strict_mode_raises_on_a_bad_event_type(make_client: MakeClient) -> None:
    client = make_client(strict=True)
    with pytest.raises(ValueError):
        client.track("u1", "Not Snake Case")
    with pytest.raises(ValueError):
        client.identify("", traits={"plan": "pro"})
    assert client.stats().pending == 0


def test_non_strict_mode_reports_dropped_and_queues_nothing(
    server: DevServer, make_client: MakeClient
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    client.track("u1", "Not Snake Case")
    client.track("u1", "also-bad")
    assert [e.type for e in errors] == ["dropped", "dropped"]
    assert client.stats().pending == 0
    assert client.flush(timeout=5).ok
    assert server.requests == []


def test_a_callback_that_raises_is_ignored(server: DevServer, make_client: MakeClient) -> None:
    calls: list[str] = []

    def on_error(error: WhisperrError) -> None:
        calls.append(error.type)
        raise RuntimeError("the host's callback is broken")

    client = make_client(on_error=on_error)
    client.track("u1", "Bad Name")  # must not raise
    client.track("u1", "good_name")
    server.push_script(401)
    result = client.flush(timeout=5)
    assert result.reason == "auth"
    assert client.flush(timeout=5).ok
    assert calls == ["dropped", "auth"]
    assert [e["event_type"] for e in server.events] == ["good_name"]


# ---- disabled ----


def test_disabled_client_records_and_sends_nothing(server: DevServer, tmp_path: Path) -> None:
    path = tmp_path / "never" / "outbox.db"
    client = DurableWhisperr(API_KEY, path=str(path), base_url=server.url, disabled=True)
    assert client.ready is False
    client.track("u1", "ignored_event")
    client.identify("u1", traits={"plan": "pro"})
    result = client.flush(timeout=1)
    assert result.ok and result.pending == 0
    assert client.shutdown(timeout=1).ok
    assert not path.exists()
    assert not path.parent.exists()
    assert server.requests == []


# ---- shutdown, partitioning, crashes ----


def test_shutdown_is_bounded_when_the_server_is_down(make_client: MakeClient, db_path: str) -> None:
    url = closed_port_url()
    client = make_client(base_url=url)
    for i in range(3):
        client.track("u1", "server_down", {"i": i})

    started = time.monotonic()
    result = client.shutdown(timeout=1)
    elapsed = time.monotonic() - started

    assert elapsed < 3.0
    assert result.pending == 3 and not result.ok
    # The old sender thread may still be closing its connection; a new connection opened at
    # that moment hits the SQLITE_BUSY bug that test_track_waits_out_a_briefly_locked_outbox
    # shows. Let it finish first so that this test checks only what it is about.
    thread = client._sender._thread
    if thread is not None:
        thread.join(5)
    later = make_client(base_url=url)
    assert later.stats().pending == 3


def test_each_key_only_sends_its_own_rows(server: DevServer, make_client: MakeClient) -> None:
    server.api_key = None  # accept any key; the headers tell them apart
    first = make_client(API_KEY)
    first.track("u1", "first_key", {"i": 0})
    first.track("u1", "first_key", {"i": 1})
    second = make_client(OTHER_KEY)
    second.track("u2", "second_key", {"i": 2})

    assert second.flush(timeout=5).ok
    assert [e["event_type"] for e in server.events] == ["second_key"]
    assert {r.headers["x-api-key"] for r in server.requests} == {OTHER_KEY}
    assert second.stats().pending == 0
    assert first.stats().pending == 2

    assert first.flush(timeout=5).ok
    assert numbers(server.events) == [2, 0, 1]
    assert [r.headers["x-api-key"] for r in server.requests] == [OTHER_KEY, API_KEY]


SIGTERM_CHILD = """
import signal, sys, time
from whisperr_durable import DurableWhisperr
if {previous!r} == "handler":
    def previous(signum, frame):
        print("previous handler ran", flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, previous)
elif {previous!r} == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
client = DurableWhisperr(
    {key!r}, path={path!r}, base_url={url!r}, flush_at=1_000_000, flush_interval=3600.0,
    flush_on_sigterm={opt_in!r},
)
for i in range({count}):
    client.track("user_1", "sigterm_test", {{"i": i}})
print("tracked", flush=True)
while True:
    time.sleep(0.05)
    if {previous!r} == "ignore" and client.stats().pending == 0:
        print("still running, all delivered", flush=True)
        break
"""


@pytest.mark.parametrize(
    ("opt_in", "previous", "code", "said"),
    [
        (True, "default", -signal.SIGTERM, ""),  # ends as SIGTERM ends it, after the flush
        (True, "handler", 3, "previous handler ran"),  # the app's own handler still runs
        (True, "ignore", 0, "still running, all delivered"),  # ignored: it goes on
        (False, "default", -signal.SIGTERM, ""),  # no exit handler: nothing delivered
    ],
)
def test_flush_on_sigterm_delivers_before_the_process_ends(
    server: DevServer,
    make_client: MakeClient,
    db_path: str,
    opt_in: bool,
    previous: str,
    code: int,
    said: str,
) -> None:
    count = 50
    script = SIGTERM_CHILD.format(
        key=API_KEY, path=db_path, url=server.url, opt_in=opt_in, previous=previous, count=count
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=str(ROOT), text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "tracked"
        assert server.requests == []  # flush_at and flush_interval never came
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert child.returncode == code
    assert out.strip() == said
    if opt_in:
        assert numbers(server.events) == list(range(count))
    else:
        assert server.events == []
        assert make_client().stats().pending == count  # on disk, for the next process


def test_a_sigkilled_process_loses_nothing(
    server: DevServer, make_client: MakeClient, db_path: str
) -> None:
    count = 200
    script = textwrap.dedent(
        f"""
        import sys
        from whisperr_durable import DurableWhisperr
        client = DurableWhisperr(
            {API_KEY!r}, path={db_path!r}, base_url={server.url!r},
            flush_at=1_000_000, flush_interval=3600.0,
        )
        for i in range({count}):
            client.track("user_" + str(i % 7), "crash_test", {{"i": i}})
        print("done", flush=True)
        sys.stdin.read()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=str(ROOT),
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "done"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        if child.stdin is not None:
            child.stdin.close()
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert server.requests == []  # nothing was sent before the kill

    survivor = make_client()
    assert survivor.stats().pending == count
    assert survivor.flush(timeout=10).ok

    events = server.events
    assert sorted(numbers(events)) == list(range(count))
    assert numbers(events) == list(range(count))  # in acceptance order
    assert len({e["context"]["$message_id"] for e in events}) == count
    assert server.duplicates == 0
    assert survivor.stats().pending == 0


def test_a_fresh_outbox_is_private(
    server: DevServer, make_client: MakeClient, tmp_path: Path
) -> None:
    path = tmp_path / "private" / "nested" / "outbox.db"
    client = make_client(path=str(path))
    client.track("u1", "private_file")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Every directory the client created, not only the last one.
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    # SQLite gives the WAL the database file's mode; the WAL holds the queued events too.
    wal = Path(str(path) + "-wal")
    if wal.exists():
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    assert client.flush(timeout=5).ok


def test_track_waits_out_a_briefly_locked_outbox(
    server: DevServer, make_client: MakeClient, db_path: str
) -> None:
    first = make_client()
    first.track("u1", "before_lock", {"i": 0})
    assert first.flush(timeout=5).ok
    first.shutdown(timeout=0.5)
    # Another connection holds the file's exclusive lock for a moment, as the last
    # connection to close does while it checkpoints and removes the WAL.
    locker = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    locker.execute("PRAGMA locking_mode=EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    locker.execute("COMMIT")  # the exclusive lock is kept until close
    unlock = threading.Timer(0.2, locker.close)
    unlock.start()
    errors: list[WhisperrError] = []
    try:
        second = make_client(on_error=errors.append, store_timeout=5.0)
        second.track("u1", "while_locked", {"i": 1})  # waits (up to store_timeout)
    finally:
        unlock.join(5)
    assert errors == []
    assert second.flush(timeout=5).ok
    assert numbers(server.events) == [0, 1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_delivers_and_the_parent_keeps_working(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()
    client.track("u1", "before_fork", {"i": 0})
    client.track("u1", "before_fork", {"i": 1})
    assert client.stats().pending == 2  # the sender thread is running now

    def child() -> bool:
        client.track("u2", "in_child", {"i": 2})
        return client.flush(timeout=5).ok

    assert run_forked(lambda: 0 if child() else 2) == 0

    # The child's flush covered every queued op of this key, the parent's included.
    assert sorted(numbers(server.events)) == [0, 1, 2]
    client.track("u1", "after_fork", {"i": 3})
    assert client.flush(timeout=5).ok
    assert client.stats().pending == 0
    events = server.events
    assert sorted(numbers(events)) == [0, 1, 2, 3]
    assert len({e["context"]["$message_id"] for e in events}) == 4
    assert server.duplicates == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_while_another_thread_is_inside_the_client(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()
    client.track("u1", "before_fork", {"i": 0})
    # Another thread of the parent is inside the client (holding its lock) at fork time;
    # in the child that thread does not exist and would never let go.
    inside, release = threading.Event(), threading.Event()

    def busy() -> None:
        with client._writer._lock:
            inside.set()
            release.wait(30)

    holder = threading.Thread(target=busy)
    holder.start()
    assert inside.wait(5)
    try:

        def child() -> bool:
            client.track("u2", "in_child", {"i": 1})
            return client.flush(timeout=5).ok

        assert run_forked(lambda: 0 if child() else 2, timeout=10) == 0
    finally:
        release.set()
        holder.join(5)

    assert sorted(numbers(server.events)) == [0, 1]
    client.track("u1", "after_fork", {"i": 2})
    assert client.flush(timeout=5).ok
    assert numbers(server.events)[-1] == 2
    assert server.duplicates == 0


def test_an_op_that_cannot_be_stored_is_held_and_stored_first_when_the_file_recovers(
    make_client: MakeClient, db_path: str, server: DevServer
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(store_timeout=0.05, on_error=errors.append)
    client.track("u1", "before_lock", {"i": 0})
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        client.track("u1", "while_locked", {"i": 1})  # must not raise
        client.track("u1", "while_locked", {"i": 2})
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert [e.type for e in errors] == ["store_error"]  # once per episode
    stats = client.stats()
    assert (stats.store_errors, stats.held) == (2, 2)
    assert stats.pending == 1  # what was stored before is untouched
    # Still in the episode: held at once, behind the others, without trying the file.
    client.track("u1", "after_lock", {"i": 3})
    assert client.stats().held == 3
    # The sender stores the held ops first, oldest first, then delivers them in order.
    assert client.flush(timeout=5).ok
    assert [e["properties"]["i"] for e in server.events] == [0, 1, 2, 3]
    assert client.stats().held == 0


def test_track_many_stores_everything_in_order_and_skips_invalid_items(
    make_client: MakeClient, server: DevServer
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(on_error=errors.append)
    items: list[Any] = [("u1", "bulk_event", {"i": i}) for i in range(2500)]
    items[10] = ("u1", "Not Valid", {"i": 10})
    items[20] = ("", "bulk_event", {"i": 20})
    items[30] = ("u1",)
    items.append({"external_user_id": "u2", "event_type": "from_a_dict", "properties": {"i": -1}})
    items.append(("u3", "with_context", {"i": -2}, {"$mode": "test"}))
    assert client.track_many(iter(items)).stored == 2500 - 3 + 2
    assert [e.type for e in errors] == ["dropped"] * 3
    assert client.stats().pending == 2499
    assert client.flush(timeout=10).ok
    got = [e["properties"]["i"] for e in server.events]
    expected = [i for i in range(2500) if i not in (10, 20, 30)] + [-1, -2]
    assert got == expected
    assert len({e["context"]["$message_id"] for e in server.events}) == len(expected)
    last = server.events[-1]
    assert last["context"]["$mode"] == "test" and last["context"]["sdk_name"]
    assert last["occurred_at"].endswith("Z")


def test_track_many_in_strict_mode_raises_for_an_invalid_item(make_client: MakeClient) -> None:
    client = make_client(strict=True)
    with pytest.raises(ValueError):
        client.track_many([("u1", "fine"), ("u1", "Not Fine"), ("u1", "after")])
    assert client.stats().pending == 1  # the valid item before it is stored, none after


def test_a_bulk_load_larger_than_the_queue_waits_for_delivery_instead_of_evicting_itself(
    make_client: MakeClient, server: DevServer
) -> None:
    errors: list[WhisperrError] = []
    client = make_client(max_queue_size=300, on_error=errors.append)
    result = client.track_many(("u1", "bulk_event", {"i": i}) for i in range(3000))
    assert result == BulkResult(stored=3000, held=0, evicted=0)
    assert client.stats().evicted == 0 and client.stats().pending <= 300
    assert client.flush(timeout=30).ok
    assert numbers(server.events) == list(range(3000))
    assert errors == []


@pytest.mark.parametrize("answer", [0, 401, 404])  # 0: nothing listens
def test_a_bulk_load_evicts_as_the_contract_says_when_delivery_cannot_proceed(
    make_client: MakeClient, server: DevServer, answer: int
) -> None:
    errors: list[WhisperrError] = []
    if not answer:
        client = make_client(base_url=closed_port_url(), max_queue_size=300)
    else:
        server.answer = answer
        client = make_client(max_queue_size=300, on_error=errors.append)
    started = time.monotonic()
    result = client.track_many(("u1", "bulk_event", {"i": i}) for i in range(1000))
    # No waiting out a failure (a retry's backoff, a pause): the first failed request ends it.
    assert time.monotonic() - started < 5
    # The newest stay (a full queue makes room for 1% more at once); the call says what it
    # evicted, and so does the counter.
    kept = client.stats().pending
    assert 297 <= kept <= 300
    assert result == BulkResult(stored=1000, held=0, evicted=1000 - kept)
    assert client.stats().evicted == 1000 - kept
    if answer:
        assert "dropped" in [e.type for e in errors]
        server.answer = None
        assert client.flush(timeout=10).ok
        assert numbers(server.events) == list(range(1000 - kept, 1000))


def test_shutdown_stops_at_the_first_failure_and_keeps_the_rest(
    make_client: MakeClient, server: DevServer
) -> None:
    client = make_client(shutdown_timeout=30)
    for i in range(3):
        client.track("u1", "at_exit", {"i": i})
    server.push_script(503)  # a retry would succeed, but shutdown makes one attempt
    started = time.monotonic()
    result = client.shutdown()
    assert time.monotonic() - started < 5  # no waiting out backoff with a 30 s budget
    assert (result.pending, result.reason) == (3, "retry_exhausted")
    assert len(server.requests) == 1
    survivor = make_client()
    assert survivor.flush(timeout=5).ok
    assert sorted(e["properties"]["i"] for e in server.events) == [0, 1, 2]


# ---- group commit ----


def test_calls_from_several_threads_share_one_transaction(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client(fsync=True)
    client.track("u0", "warm_up")
    statements: list[str] = []
    writer = client._writer
    outbox = writer._outbox
    assert isinstance(outbox, Outbox)
    outbox._connection().set_trace_callback(statements.append)
    threads = [
        threading.Thread(target=client.track, args=(f"u{n}", "grouped", {"n": n}))
        for n in range(1, 6)
    ]
    # While one commit is in progress (the client's lock held), the calls pile up...
    with writer._lock:
        before = writer._group_added  # a call that finds the lock free writes at once
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while writer._group_added < before + 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert writer._group_added == before + 5
    # ...and the first to get the lock commits them all: one transaction, one fsync.
    for thread in threads:
        thread.join(10)
    assert statements.count("COMMIT") == 1
    assert client.flush(timeout=10).pending == 0
    grouped = [e for e in server.events if e["event_type"] == "grouped"]
    assert sorted(e["properties"]["n"] for e in grouped) == [1, 2, 3, 4, 5]


def test_many_threads_lose_nothing_and_keep_each_threads_order(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client(fsync=True)

    def work(n: int) -> None:
        for i in range(100):
            client.track(f"u{n}", "threaded", {"i": i})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert client.flush(timeout=30).pending == 0
    assert len(server.events) == 800
    assert len(server.message_ids) == 800
    for n in range(8):
        mine = [e["properties"]["i"] for e in server.events if e["external_user_id"] == f"u{n}"]
        assert mine == list(range(100))


def test_aflush_does_not_need_the_loops_default_executor(
    server: DevServer, make_client: MakeClient
) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    client = make_client()
    client.track("u1", "awaited")
    release = threading.Event()

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1)
        loop.set_default_executor(executor)
        busy = loop.run_in_executor(None, release.wait, 30)  # the only worker, taken
        try:
            return await asyncio.wait_for(client.aflush(timeout=10), timeout=20)
        finally:
            release.set()
            await busy
            executor.shutdown()

    assert asyncio.run(main()).pending == 0
    assert [e["event_type"] for e in server.events] == ["awaited"]


def test_the_readme_quickstart_runs_as_written(server: DevServer, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Quickstart") :]
    section = section[: section.index("\n## ", 1)]
    snippet = section[section.index("```python\n") + len("```python\n") :]
    snippet = snippet[: snippet.index("```")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPERR_")}
    # As the README says to try it: the local server, its key, a home of its own.
    env.update(
        WHISPERR_API_KEY=server.api_key or "",
        WHISPERR_BASE_URL=server.url,
        HOME=str(tmp_path),
        PYTHONPATH=str(ROOT),
    )
    run = subprocess.run(
        [sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert [(e["external_user_id"], e["event_type"]) for e in server.events] == [
        ("user_8842", "payment_failed")
    ]
    assert [i["external_user_id"] for i in server.identifies] == ["user_8842"]
    assert (tmp_path / ".whisperr.db").exists()
