"""The ingestion contract, end to end: a real client, a real outbox file, the real devserver.

Part 1 is ours: every row of the contract's response table and the queue semantics.
Parts 2 and 3 run the public conformance fixtures (``wire.json``, ``behavior.json``) found
beside ``$WHISPERR_SPEC_PATH``, and skip where it is unset, as the official SDKs' tests do.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from conftest import API_KEY, load_spec

import whisperr_durable._retry as retry_module
import whisperr_durable._sender as sender_module
from whisperr_durable import DurableWhisperr, WhisperrError
from whisperr_durable.devserver import BATCH_PATH, IDENTIFY_PATH, DevServer, RecordedRequest

WIRE_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
FLUSH = 10.0  # generous upper bound; a passing flush returns in milliseconds


class Errors:
    """What on_error received, with a wait (the sender reports from its own thread)."""

    def __init__(self) -> None:
        self.items: list[WhisperrError] = []
        self._cond = threading.Condition()

    def __call__(self, error: WhisperrError) -> None:
        with self._cond:
            self.items.append(error)
            self._cond.notify_all()

    def wait_for(self, kind: str, timeout: float = FLUSH) -> WhisperrError:
        with self._cond:
            found = self._cond.wait_for(lambda: any(e.type == kind for e in self.items), timeout)
        assert found, f"no {kind!r} error reported; got {self.items}"
        return next(e for e in self.items if e.type == kind)

    @property
    def types(self) -> list[str]:
        with self._cond:
            return [e.type for e in self.items]


MakeClient = Callable[..., DurableWhisperr]


@pytest.fixture
def errors() -> Errors:
    return Errors()


@pytest.fixture
def make_client(db_path: str, server: DevServer, errors: Errors) -> Iterator[MakeClient]:
    """Clients on the test's outbox file and server; the sender only sends on flush()."""
    clients: list[DurableWhisperr] = []

    def make(**options: Any) -> DurableWhisperr:
        options.setdefault("flush_interval", 60.0)
        options.setdefault("on_error", errors)
        client = DurableWhisperr(API_KEY, path=db_path, base_url=server.url, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.shutdown(timeout=1.0)


@pytest.fixture
def backoff_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Backoff of 10 ms, recording the retry numbers the sender asked for."""
    calls: list[int] = []

    def fast(retry: int, rand: Any = None) -> float:
        calls.append(retry)
        return 0.01

    monkeypatch.setattr(retry_module, "backoff", fast)
    return calls


def requests_to(server: DevServer, path: str) -> list[RecordedRequest]:
    return [r for r in server.requests if r.path == path]


def sent_message_ids(request: RecordedRequest) -> list[str]:
    return [e["context"]["$message_id"] for e in request.json()["events"]]


def delivered_ids(server: DevServer) -> list[str]:
    return [e["context"]["$message_id"] for e in server.events]


# ---- part 1: the response table ----


def test_202_removes_the_ops_for_good(
    make_client: MakeClient, server: DevServer, errors: Errors
) -> None:
    client = make_client()
    for i in range(3):
        client.track("user_1", "feature_used", {"i": i})
    assert client.stats().pending == 3
    result = client.flush(timeout=FLUSH)
    assert (result.pending, result.reason) == (0, None)
    assert client.stats().pending == 0
    assert [e["properties"]["i"] for e in server.events] == [0, 1, 2]
    [request] = server.requests
    assert (request.method, request.path, request.status) == ("POST", BATCH_PATH, 202)
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-api-key"] == API_KEY
    # Nothing is left to send: a second flush makes no request.
    assert client.flush(timeout=FLUSH).ok
    assert len(server.requests) == 1
    assert errors.types == []


@pytest.mark.parametrize("status", [200, 201, 204])
def test_any_2xx_counts_as_delivered(
    make_client: MakeClient, server: DevServer, errors: Errors, status: int
) -> None:
    client = make_client()
    server.push_script(status)
    client.track("user_1", "feature_used")
    assert client.flush(timeout=FLUSH).ok
    assert client.stats().pending == 0
    assert [r.status for r in server.requests] == [status]
    client.flush(timeout=FLUSH)
    assert len(server.requests) == 1
    assert errors.types == []


@pytest.mark.parametrize("rejection", [401, 403, "wrong_key"])
def test_auth_rejection_keeps_the_ops_and_delivers_them_later(
    make_client: MakeClient, server: DevServer, errors: Errors, rejection: int | str
) -> None:
    client = make_client(max_retries=6)
    if rejection == "wrong_key":
        server.api_key = "wrk_some_other_key"
        status = 401
    else:
        assert isinstance(rejection, int)
        server.push_script(rejection)
        status = rejection
    client.track("user_1", "feature_used", {"n": 1})
    client.track("user_2", "feature_used", {"n": 2})

    result = client.flush(timeout=FLUSH)
    assert (result.pending, result.reason) == (2, "auth")
    error = errors.wait_for("auth")
    assert error.status == status
    assert error.message
    assert client.stats().pending == 2
    assert client.dead_letters() == []
    # Auth is not retried with backoff: one request, then delivery pauses.
    [first] = server.requests
    assert first.status == status
    first_ids = sent_message_ids(first)

    server.api_key = API_KEY
    assert client.flush(timeout=FLUSH).ok
    assert client.stats().pending == 0
    assert delivered_ids(server) == first_ids
    assert errors.types == ["auth"]


@pytest.mark.parametrize("failure", [429, 500, 502, 503, "drop"])
def test_exhausted_retries_keep_the_ops_and_deliver_them_later(
    make_client: MakeClient, server: DevServer, errors: Errors, failure: int | str
) -> None:
    client = make_client(max_retries=0)
    server.push_script(failure)  # type: ignore[arg-type]
    client.track("user_1", "sync_failed")

    result = client.flush(timeout=FLUSH)
    assert (result.pending, result.reason) == (1, "retry_exhausted")
    error = errors.wait_for("retry_exhausted")
    assert error.status == (None if failure == "drop" else failure)
    assert client.stats().pending == 1
    assert client.dead_letters() == []
    [first] = server.requests
    assert first.status == (None if failure == "drop" else failure)
    assert server.events == []

    assert client.flush(timeout=FLUSH).ok
    assert client.stats().pending == 0
    assert delivered_ids(server) == sent_message_ids(first)
    assert len(server.requests) == 2
    assert errors.types == ["retry_exhausted"]


def test_retry_class_is_retried_with_backoff_within_one_flush(
    make_client: MakeClient, server: DevServer, errors: Errors, backoff_calls: list[int]
) -> None:
    client = make_client(max_retries=3)
    server.push_script(503, 429, "drop")
    client.track("user_1", "feature_used")
    assert client.flush(timeout=FLUSH).ok
    assert backoff_calls == [1, 2, 3]
    assert [r.status for r in server.requests] == [503, 429, None, 202]
    ids = {tuple(sent_message_ids(r)) for r in server.requests}
    assert len(ids) == 1, "every retry carries the same $message_id"
    assert delivered_ids(server) == list(ids.pop())
    assert errors.types == []


def test_retries_run_out_after_max_retries(
    make_client: MakeClient, server: DevServer, errors: Errors, backoff_calls: list[int]
) -> None:
    client = make_client(max_retries=2)
    server.push_script(500, 500, 500)
    client.track("user_1", "feature_used")
    result = client.flush(timeout=FLUSH)
    assert result.reason == "retry_exhausted"
    assert errors.wait_for("retry_exhausted").status == 500
    # One attempt and max_retries retries.
    assert [r.status for r in server.requests] == [500, 500, 500]
    assert backoff_calls == [1, 2]
    assert client.stats().pending == 1


@pytest.mark.parametrize("status", [400, 409, 410, 413, 422])
def test_other_4xx_drops_a_single_event_for_good(
    make_client: MakeClient, server: DevServer, errors: Errors, status: int
) -> None:
    client = make_client(max_retries=6)
    server.push_script(status)
    client.track("user_1", "malformed_event", {"k": "v"})

    result = client.flush(timeout=FLUSH)
    assert (result.pending, result.reason) == (0, None)
    error = errors.wait_for("dropped")
    assert error.status == status
    assert client.stats().pending == 0
    [first] = server.requests
    [letter] = client.dead_letters()
    assert letter.status == status
    assert letter.kind == "track"
    assert json.loads(letter.body)["context"]["$message_id"] == sent_message_ids(first)[0]
    assert client.stats().dead_letters == 1

    # Never sent again; the queue goes on with the next op.
    client.flush(timeout=FLUSH)
    assert len(server.requests) == 1
    client.track("user_2", "feature_used")
    assert client.flush(timeout=FLUSH).ok
    assert [e["external_user_id"] for e in server.events] == ["user_2"]
    assert len(server.requests) == 2
    assert errors.types == ["dropped"]


def test_identify_is_dropped_on_4xx_and_kept_on_auth(
    make_client: MakeClient, server: DevServer, errors: Errors
) -> None:
    client = make_client(max_retries=0)
    server.push_script(422, 401)
    client.identify("user_1", traits={"plan": "pro"})
    client.flush(timeout=FLUSH)
    errors.wait_for("dropped")
    assert [d.kind for d in client.dead_letters()] == ["identify"]
    client.identify("user_2", email="a@b.c")
    result = client.flush(timeout=FLUSH)
    assert errors.wait_for("auth").status == 401  # reported, and the identify kept
    # The 401 came to this flush, or to the cycle still running from the one before; a
    # flush heeds only what its own attempt met, so it may already have tried again.
    if result.reason == "auth":
        assert client.stats().pending_identifies == 1
        assert client.flush(timeout=FLUSH).ok
    else:
        assert result.ok
    assert [b["external_user_id"] for b in server.identifies] == ["user_2"]


# ---- part 1: queue semantics ----


def test_fifo_identify_alone_tracks_batched_in_order(
    make_client: MakeClient, server: DevServer
) -> None:
    client = make_client()
    client.track("u", "a_happened")
    client.track("u", "b_happened")
    client.identify("u", traits={"plan": "pro"})
    client.track("u", "c_happened")
    assert client.flush(timeout=FLUSH).ok
    shapes = [
        (r.path, [e["event_type"] for e in r.json()["events"]] if r.path == BATCH_PATH else None)
        for r in server.requests
    ]
    assert shapes == [
        (BATCH_PATH, ["a_happened", "b_happened"]),
        (IDENTIFY_PATH, None),
        (BATCH_PATH, ["c_happened"]),
    ]
    assert server.identifies == [{"external_user_id": "u", "traits": {"plan": "pro"}}]


def test_batches_hold_at_most_max_batch_size_events(
    make_client: MakeClient, server: DevServer
) -> None:
    client = make_client(max_batch_size=2)
    for i in range(5):
        client.track("u", "feature_used", {"i": i})
    assert client.flush(timeout=FLUSH).ok
    assert [[e["properties"]["i"] for e in r.json()["events"]] for r in server.requests] == [
        [0, 1],
        [2, 3],
        [4],
    ]


def test_a_blocked_batch_stays_at_the_head_and_the_next_flush_resumes_there(
    make_client: MakeClient, server: DevServer, errors: Errors
) -> None:
    client = make_client(max_retries=0, max_batch_size=2)
    for i in range(3):
        client.track("u", "feature_used", {"i": i})
    server.push_script(202, 503)  # the first batch goes through, the second fails
    assert client.flush(timeout=FLUSH).reason == "retry_exhausted"
    assert [e["properties"]["i"] for e in server.events] == [0, 1]
    failed_ids = sent_message_ids(server.requests[1])
    client.track("u", "feature_used", {"i": 3})
    assert client.flush(timeout=FLUSH).ok
    assert [e["properties"]["i"] for e in server.events] == [0, 1, 2, 3]
    assert delivered_ids(server)[2:3] == failed_ids


def test_overflow_drops_the_oldest_and_reports_dropped(
    make_client: MakeClient, server: DevServer, errors: Errors
) -> None:
    client = make_client(max_queue_size=3)
    for i in range(5):
        client.track("u", "feature_used", {"i": i})
    assert "dropped" in errors.types
    assert client.stats().pending == 3
    assert client.flush(timeout=FLUSH).ok
    assert [e["properties"]["i"] for e in server.events] == [2, 3, 4]


def test_invalid_event_type_is_never_queued_and_reported_dropped(
    make_client: MakeClient, server: DevServer, errors: Errors
) -> None:
    client = make_client()
    client.track("u", "Not Snake Case")
    assert errors.types == ["dropped"]
    assert client.stats().pending == 0
    assert client.flush(timeout=FLUSH).ok
    assert server.requests == []


def test_a_raising_on_error_callback_is_ignored(make_client: MakeClient, server: DevServer) -> None:
    calls: list[str] = []

    def explode(error: WhisperrError) -> None:
        calls.append(error.type)
        raise RuntimeError("host bug")

    client = make_client(on_error=explode, max_retries=0)
    server.push_script(400)
    client.track("u", "feature_used", {"i": 0})
    client.flush(timeout=FLUSH)
    client.track("u", "feature_used", {"i": 1})
    assert client.flush(timeout=FLUSH).ok
    assert calls == ["dropped"]
    assert [e["properties"]["i"] for e in server.events] == [1]


# ---- parts 2 and 3: the public conformance fixtures ----


def _case_names(name: str) -> list[str]:
    """Case names for test ids; the test itself loads the file through load_spec."""
    spec = os.environ.get("WHISPERR_SPEC_PATH")
    try:
        data = json.loads((Path(spec or "").parent / name).read_text())
        return [case["name"] for case in data["cases"]]
    except (OSError, ValueError, KeyError, TypeError):
        return ["fixtures_not_found"]


def _spec_case(file: str, name: str) -> dict[str, Any]:
    spec = load_spec(file)  # skips cleanly when WHISPERR_SPEC_PATH is unset
    cases = {case["name"]: case for case in spec["cases"]}
    assert name in cases, f"{name} not in {file}"
    case: dict[str, Any] = cases[name]
    return case


def _epoch_ms(instant: datetime) -> int:
    # Our clock counts whole milliseconds: truncate the sub-millisecond digits.
    whole = instant.replace(microsecond=0)
    return int(whole.timestamp()) * 1000 + instant.microsecond // 1000


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def _native_channel(channel: dict[str, Any]) -> dict[str, Any]:
    names = {"type": "type", "address": "address", "optedIn": "opted_in", "verified": "verified"}
    unknown = set(channel) - set(names)
    assert not unknown, f"fixture channel field(s) this test cannot map: {unknown}"
    return {names[key]: value for key, value in channel.items()}


def _run_scenario(client: DurableWhisperr, op: str, scenario: dict[str, Any]) -> None:
    user = scenario["externalUserId"]
    if op == "track":
        known = {"externalUserId", "eventType", "properties", "clockIso"}
        assert not set(scenario) - known, f"unmapped scenario field(s): {set(scenario) - known}"
        client.track(user, scenario["eventType"], scenario.get("properties"))
    elif op == "identify":
        known = {
            "externalUserId",
            "traits",
            "email",
            "phone",
            "pushToken",
            "preferredChannel",
            "channels",
        }
        assert not set(scenario) - known, f"unmapped scenario field(s): {set(scenario) - known}"
        channels = scenario.get("channels")
        client.identify(
            user,
            traits=scenario.get("traits"),
            email=scenario.get("email"),
            phone=scenario.get("phone"),
            push_token=scenario.get("pushToken"),
            preferred_channel=scenario.get("preferredChannel"),
            channels=None if channels is None else [_native_channel(c) for c in channels],
        )
    else:
        pytest.fail(f"unknown op {op!r}")


@pytest.mark.parametrize("name", _case_names("wire.json"))
def test_wire_fixture(
    name: str,
    make_client: MakeClient,
    server: DevServer,
    errors: Errors,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    case = _spec_case("wire.json", name)
    scenario = case["scenario"]
    client = make_client()
    clock_iso: Optional[str] = scenario.get("clockIso")
    if clock_iso is not None:
        instant = _parse_iso(clock_iso)
        epoch_ms = _epoch_ms(instant)
        client._clock_ms = lambda: epoch_ms
        # The fixture's instant may lie outside the 30-day window around today: move the
        # sender's clock (which dead-letters expired events) and the server's clock there too.
        monkeypatch.setattr(sender_module, "utc_now_ms", lambda: epoch_ms + 1000)
        server.clock = lambda: instant

    _run_scenario(client, case["op"], scenario)
    assert client.flush(timeout=FLUSH).ok
    assert errors.types == []

    [request] = server.requests
    assert request.path == case["endpoint"]
    assert request.status == 202, request.body
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-api-key"] == API_KEY
    body = request.json()

    if "expectedBody" in case:
        assert body == case["expectedBody"]
    if "expectedEvent" in case:
        assert set(body) == {"events"}
        [event] = body["events"]
        for key, value in case["expectedEvent"].items():
            assert event[key] == value, key
        for key in case.get("contextMustContain", []):
            assert key in event["context"], key
        assert isinstance(event["context"]["$message_id"], str)
        assert event["context"]["$message_id"]
        if case.get("occurredAtRfc3339Z"):
            assert WIRE_TIMESTAMP.match(event["occurred_at"]), event["occurred_at"]
        if "expectedOccurredAt" in case:
            assert event["occurred_at"] == case["expectedOccurredAt"]
        # The server accepted it (its own validation of the same contract).
        assert server.events == [event]
    else:
        assert server.identifies == [body]


@pytest.mark.parametrize("name", _case_names("behavior.json"))
def test_behavior_fixture(
    name: str,
    make_client: MakeClient,
    server: DevServer,
    errors: Errors,
    backoff_calls: list[int],
) -> None:
    case = _spec_case("behavior.json", name)
    expect = case["expect"]
    options = case.get("clientOptions", {})
    assert not set(options) - {"maxRetries"}, f"unmapped client option(s): {options}"
    max_retries = int(options.get("maxRetries", 6))
    client = make_client(max_retries=max_retries)

    first = case["firstResponse"]
    status = int(first["status"])
    assert retry_module.classify(status) == first["classification"]
    # A retryable answer is given to every attempt the client may make.
    attempts = max_retries + 1 if first["classification"] == "retry" else 1
    server.push_script(*([status] * attempts))

    _run_scenario(client, case["op"], case["scenario"])
    first_result = client.flush(timeout=FLUSH)
    assert errors.wait_for(expect["errorType"]).status == status
    requests_before_recovery = len(server.requests)
    assert requests_before_recovery == attempts
    first_ids = sent_message_ids(server.requests[0])

    retained = expect["retainedAfterFirstFlush"]
    assert client.stats().pending == (1 if retained else 0)
    assert first_result.pending == (1 if retained else 0)
    assert server.events == []
    if not retained:
        assert len(client.dead_letters()) == 1

    recovery = case["recoveryResponse"]
    assert retry_module.classify(int(recovery["status"])) == recovery["classification"]
    if int(recovery["status"]) != 202:
        server.push_script(int(recovery["status"]))
    second_result = client.flush(timeout=FLUSH)
    assert second_result.ok

    retried = len(server.requests) > requests_before_recovery
    assert retried == expect["retriesAfterRecovery"]
    delivered = [e for e in server.events if e["context"]["$message_id"] in first_ids]
    assert bool(delivered) == expect["deliveredAfterRecovery"]
    if expect.get("stableMessageIdOnRetry"):
        assert delivered_ids(server) == first_ids
        assert sent_message_ids(server.requests[-1]) == first_ids
    assert client.stats().pending == 0
    assert errors.types == [expect["errorType"]]
