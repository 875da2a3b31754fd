"""The sender's decisions, one request at a time, through ``httpx.MockTransport``.

Each test gives the client a handler function that decides every response; the outbox is a
real SQLite file under tmp_path. What the handler saw is the wire truth.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any, Callable, Optional

import httpx
import pytest

from whisperr_durable import DurableWhisperr, WhisperrError, _retry, _sender

API_KEY = "wrk_sender_key"
BASE_URL = "http://whisperr.test"

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """Wraps a handler and records every request it was asked about, in order."""

    def __init__(self, decide: Handler) -> None:
        self.decide = decide
        self.lock = threading.Lock()
        self.requests: list[tuple[str, Any]] = []  # (path, parsed body)
        self.statuses: list[int] = []  # one per request; 0 where the handler raised

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        with self.lock:
            self.requests.append((request.url.path, body))
        try:
            response = self.decide(request)
        except Exception:
            with self.lock:
                self.statuses.append(0)
            raise
        with self.lock:
            self.statuses.append(response.status_code)
        return response

    @property
    def paths(self) -> list[str]:
        with self.lock:
            return [path for path, _ in self.requests]

    def delivered(self) -> list[int]:
        """The ``i`` property of every event in a batch the handler answered with 2xx."""
        with self.lock:
            assert len(self.statuses) == len(self.requests)
            return [
                i
                for (path, body), status in zip(self.requests, self.statuses)
                if path == "/v1/events/batch" and 200 <= status < 300
                for i in ids(body["events"])
            ]

    def batches(self) -> list[list[dict[str, Any]]]:
        with self.lock:
            return [body["events"] for path, body in self.requests if path == "/v1/events/batch"]


def accepted(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/events/batch":
        n = len(json.loads(request.content)["events"])
        return httpx.Response(202, json={"accepted": n, "rejected": 0})
    return httpx.Response(202, json={"accepted": True})


def ids(events: list[dict[str, Any]]) -> list[int]:
    return [e["properties"]["i"] for e in events]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_retry, "backoff", lambda n, rand=None: 0.001)


@pytest.fixture
def make_client(db_path: str) -> Iterator[Callable[..., DurableWhisperr]]:
    clients: list[DurableWhisperr] = []

    def make(handler: Handler, **options: Any) -> DurableWhisperr:
        options.setdefault("flush_at", 10_000)
        options.setdefault("flush_interval", 3600.0)
        client = DurableWhisperr(
            API_KEY,
            path=db_path,
            base_url=BASE_URL,
            transport=httpx.MockTransport(handler),
            **options,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.shutdown(timeout=0.5)


def test_identify_alone_is_a_barrier(make_client: Callable[..., DurableWhisperr]) -> None:
    rec = Recorder(accepted)
    client = make_client(rec)
    client.track("u1", "a_event", {"i": 0})
    client.track("u1", "a_event", {"i": 1})
    client.identify("u1", traits={"plan": "pro"}, email="ada@example.com")
    client.identify("u2", traits={"plan": "free"})
    client.track("u1", "a_event", {"i": 2})
    client.track("u1", "a_event", {"i": 3})

    assert client.flush(timeout=5).ok

    assert rec.paths == [
        "/v1/events/batch",
        "/v1/identify",
        "/v1/identify",
        "/v1/events/batch",
    ]
    assert [ids(b) for b in rec.batches()] == [[0, 1], [2, 3]]
    identifies = [body for path, body in rec.requests if path == "/v1/identify"]
    assert identifies[0] == {
        "external_user_id": "u1",
        "traits": {"plan": "pro"},
        "channels": [{"channel": "email", "address": "ada@example.com", "opted_in": True}],
    }
    assert identifies[1] == {"external_user_id": "u2", "traits": {"plan": "free"}}
    assert client.stats().pending == 0


def test_413_splits_in_halves_until_the_bad_events_are_alone(
    make_client: Callable[..., DurableWhisperr],
) -> None:
    bad = {1, 2}

    def decide(request: httpx.Request) -> httpx.Response:
        events = json.loads(request.content)["events"]
        if any(e["properties"]["i"] in bad for e in events):
            return httpx.Response(413, json={"error": "payload too large"})
        return accepted(request)

    rec = Recorder(decide)
    errors: list[WhisperrError] = []
    client = make_client(rec, on_error=errors.append)
    for i in range(4):
        client.track("u1", "big_event", {"i": i})

    result = client.flush(timeout=5)
    assert (result.pending, result.reason, result.refused) == (0, None, 2)
    assert not result  # refused ops are not a success

    # [0,1,2,3] -> [0,1] -> [0] ok, [1] bad; [2,3] -> [2] bad, [3] ok: in id order.
    assert [ids(b) for b in rec.batches()] == [[0, 1, 2, 3], [0, 1], [0], [1], [2, 3], [2], [3]]
    assert rec.delivered() == [0, 3]  # every good event exactly once
    dead = client.dead_letters()
    assert [json.loads(d.body)["properties"]["i"] for d in dead] == [1, 2]
    assert all(d.status == 413 and d.kind == "track" for d in dead)
    assert [(e.type, e.status) for e in errors] == [("dropped", 413), ("dropped", 413)]
    stats = client.stats()
    assert stats.pending == 0 and stats.dead_letters == 2


def test_a_single_bad_event_in_a_large_batch_costs_only_itself(
    make_client: Callable[..., DurableWhisperr],
) -> None:
    def decide(request: httpx.Request) -> httpx.Response:
        events = json.loads(request.content)["events"]
        if any(e["properties"]["i"] == 37 for e in events):
            return httpx.Response(400, json={"error": "bad event"})
        return accepted(request)

    rec = Recorder(decide)
    client = make_client(rec)
    for i in range(100):
        client.track("u1", "an_event", {"i": i})

    result = client.flush(timeout=5)
    assert (result.pending, result.reason, result.refused) == (0, None, 1)

    # Every good event delivered exactly once, in order.
    assert rec.delivered() == [i for i in range(100) if i != 37]
    # Binary search: about log2(100) levels of two requests each, not 100 requests.
    assert len(rec.requests) <= 2 * 7 + 1
    assert [json.loads(d.body)["properties"]["i"] for d in client.dead_letters()] == [37]


@pytest.mark.parametrize(
    "exc_type", [httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError]
)
def test_network_errors_are_retried(
    make_client: Callable[..., DurableWhisperr], exc_type: type[httpx.TransportError]
) -> None:
    calls = {"n": 0}

    def decide(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise exc_type("simulated network failure", request=request)
        return accepted(request)

    rec = Recorder(decide)
    errors: list[WhisperrError] = []
    client = make_client(rec, max_retries=3, on_error=errors.append)
    for i in range(3):
        client.track("u1", "an_event", {"i": i})

    assert client.flush(timeout=5).ok

    batches = [ids(b) for b in rec.batches()]
    assert batches == [[0, 1, 2]] * 3
    # The idempotency keys are the same on every attempt.
    message_ids = {tuple(e["context"]["$message_id"] for e in b) for b in rec.batches()}
    assert len(message_ids) == 1
    assert errors == []
    assert client.stats().pending == 0


def test_network_errors_exhaust_retries_and_keep_the_ops(
    make_client: Callable[..., DurableWhisperr],
) -> None:
    failing = threading.Event()
    failing.set()

    def decide(request: httpx.Request) -> httpx.Response:
        if failing.is_set():
            raise httpx.ConnectError("connection refused", request=request)
        return accepted(request)

    rec = Recorder(decide)
    errors: list[WhisperrError] = []
    client = make_client(rec, max_retries=1, on_error=errors.append)
    client.track("u1", "an_event", {"i": 0})

    result = client.flush(timeout=5)
    assert (result.pending, result.reason) == (1, "retry_exhausted")
    assert len(rec.requests) == 2  # the first try and one retry
    assert [(e.type, e.status) for e in errors] == [("retry_exhausted", None)]
    assert client.stats().pending == 1
    assert client.dead_letters() == []

    failing.clear()
    assert client.flush(timeout=5).ok
    assert len(rec.requests) == 3
    first, last = rec.requests[0][1], rec.requests[-1][1]
    assert first == last  # byte-for-byte the same op, same $message_id


@pytest.mark.parametrize("status", [404, 405])
def test_404_or_405_for_a_batch_keeps_every_op_and_pauses_as_a_wrong_url(
    make_client: Callable[..., DurableWhisperr], status: int
) -> None:
    # A wrong base_url, or a gateway answering 404 during a deploy: not the events' fault.
    answers = [status]
    rec = Recorder(lambda request: httpx.Response(answers[-1], json={"error": "no route"}))
    errors: list[WhisperrError] = []
    client = make_client(rec, on_error=errors.append)
    for i in range(4):
        client.track("u1", "an_event", {"i": i})

    result = client.flush(timeout=5)

    assert (result.pending, result.reason, result.refused) == (4, "config", 0)
    assert [ids(b) for b in rec.batches()] == [[0, 1, 2, 3]]  # one request, then a pause
    assert client.dead_letters() == []
    assert [(e.type, e.status) for e in errors] == [("config", status)]
    assert "base_url" in errors[0].message
    # Once the route answers again, the same ops go, with the same ids.
    answers.append(202)
    assert client.flush(timeout=5).ok
    assert rec.delivered() == [0, 1, 2, 3]
    assert rec.requests[0][1] == rec.requests[-1][1]


def test_on_error_carries_the_status_of_auth_and_exhausted_retries(
    make_client: Callable[..., DurableWhisperr],
) -> None:
    statuses = iter([401, 503, 202])

    def decide(request: httpx.Request) -> httpx.Response:
        status = next(statuses)
        if status == 202:
            return accepted(request)
        return httpx.Response(status, json={"error": "nope"})

    rec = Recorder(decide)
    errors: list[WhisperrError] = []
    client = make_client(rec, max_retries=0, on_error=errors.append)
    client.track("u1", "an_event", {"i": 0})

    first = client.flush(timeout=5)
    assert (first.pending, first.reason) == (1, "auth")
    second = client.flush(timeout=5)
    assert (second.pending, second.reason) == (1, "retry_exhausted")
    assert client.flush(timeout=5).ok

    assert [(e.type, e.status) for e in errors] == [("auth", 401), ("retry_exhausted", 503)]
    assert all(isinstance(e, WhisperrError) and e.message for e in errors)
    assert len(rec.requests) == 3
    assert len({json.dumps(body) for _, body in rec.requests}) == 1


def test_a_transport_that_raises_a_foreign_exception_loses_nothing(
    make_client: Callable[..., DurableWhisperr],
) -> None:
    broken = threading.Event()
    broken.set()

    def decide(request: httpx.Request) -> httpx.Response:
        if broken.is_set():
            raise RuntimeError("a bug in a custom transport")
        return accepted(request)

    rec = Recorder(decide)
    errors: list[WhisperrError] = []
    client = make_client(rec, max_retries=1, on_error=errors.append)
    client.identify("u1", traits={"plan": "pro"})
    client.track("u1", "an_event", {"i": 0})

    result = client.flush(timeout=5)
    assert (result.pending, result.reason) == (2, "retry_exhausted")
    assert [e.type for e in errors] == ["retry_exhausted"]
    assert client.dead_letters() == []

    broken.clear()
    assert client.flush(timeout=5).ok
    assert rec.paths[-2:] == ["/v1/identify", "/v1/events/batch"]
    assert ids(rec.batches()[-1]) == [0]


class _Lingering(threading.Event):
    """The sender's hurry event, which also tells when the sender starts to linger on it."""

    def __init__(self) -> None:
        super().__init__()
        self.lingering = threading.Event()

    def wait(self, timeout: Optional[float] = None) -> bool:
        self.lingering.set()
        return super().wait(timeout)


@pytest.mark.parametrize("end", ["flush", "shutdown"])
def test_a_flush_or_a_shutdown_ends_the_senders_lingering_at_once(
    make_client: Callable[..., DurableWhisperr], monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    # After a batch that did not fill max_batch_size, the sender lets ops gather before it
    # claims again; here for longer than any test could wait.
    monkeypatch.setattr(_sender, "_LINGER", 3600.0)
    recorder = Recorder(accepted)
    client = make_client(recorder, flush_at=1)
    hurry = client._sender._hurry = _Lingering()
    client.track("u1", "lingering", {"i": 0})
    assert hurry.lingering.wait(10)  # the one-op batch went; the sender lingers
    assert recorder.delivered() == [0]
    client.track("u1", "lingering", {"i": 1})
    if end == "flush":
        assert client.flush(timeout=10).ok
    else:
        client.shutdown(timeout=10)  # its final flush
        thread = client._sender._thread
        assert thread is not None and not thread.is_alive()
    assert recorder.delivered() == [0, 1]


@pytest.mark.parametrize(
    ("status", "retry_after"),
    [
        (500, "30"),  # Retry-After counts on 429 and 503 only
        (502, "30"),
        (504, "Sun, 06 Dec 2099 00:00:00 GMT"),
        (503, "30.5"),  # whole seconds only: an unreadable value
        (429, "+30"),
    ],
)
def test_a_retry_after_outside_the_contracts_rules_leaves_the_normal_backoff(
    make_client: Callable[..., DurableWhisperr], status: int, retry_after: str
) -> None:
    answers = iter([httpx.Response(status, headers={"Retry-After": retry_after})])

    def decide(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or accepted(request)

    rec = Recorder(decide)
    errors: list[WhisperrError] = []
    client = make_client(rec, on_error=errors.append)
    client.track("u1", "an_event", {"i": 0})
    # The backoff here is a millisecond: a Retry-After honoured would outlast the flush.
    assert client.flush(timeout=5).ok
    assert rec.statuses == [status, 202]
    assert errors == []


@pytest.mark.parametrize("status", [429, 503])
def test_a_retry_after_on_429_or_503_is_waited_out_and_keeps_counting_retries(
    make_client: Callable[..., DurableWhisperr], status: int
) -> None:
    rec = Recorder(lambda request: httpx.Response(status, headers={"Retry-After": "0"}))
    errors: list[WhisperrError] = []
    client = make_client(rec, max_retries=2, on_error=errors.append)
    client.track("u1", "an_event", {"i": 0})
    result = client.flush(timeout=10)
    # Retry-After: 0 asked for no wait, and did not reset the count: the first attempt and
    # two retries, then the ops stay queued.
    assert (result.pending, result.reason) == (1, "retry_exhausted")
    assert rec.statuses == [status] * 3
    assert [e.type for e in errors] == ["retry_exhausted"]
