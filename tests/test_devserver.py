"""The dev server, exercised over real HTTP on 127.0.0.1 (http.client and raw sockets, no
third-party client)."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from whisperr_durable.devserver import (
    BATCH_PATH,
    EVENTS_VIEW_PATH,
    IDENTIFY_PATH,
    TRACK_PATH,
    DevServer,
    occurred_at_error,
    parse_script,
    validate_event,
)

ROOT = Path(__file__).resolve().parents[1]
KEY = "wrk_test"
NOW = datetime(2026, 6, 14, 12, 0, 0, tzinfo=timezone.utc)


# --- helpers ---


def wire_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def make_event(
    event_type: str = "payment_failed",
    *,
    at: datetime = NOW,
    message_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "external_user_id": "user_1",
        "event_type": event_type,
        "occurred_at": wire_time(at),
        "properties": {"amount_cents": 4900},
        "context": {} if message_id is None else {"$message_id": message_id},
    }
    event.update(fields)
    return event


def batch(*events: Any) -> dict[str, Any]:
    return {"events": list(events)}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: Any


def connect(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=10)


def send(
    port: int,
    path: str,
    body: object = None,
    *,
    key: str | None = KEY,
    headers: Mapping[str, str] | None = None,
    method: str = "POST",
    connection: http.client.HTTPConnection | None = None,
) -> Answer:
    """One request; ``body`` is JSON-encoded unless it is bytes already."""
    conn = connection or connect(port)
    try:
        sent = {"Content-Type": "application/json"}
        if key is not None:
            sent["X-API-Key"] = key
        sent.update(headers or {})
        payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers=sent)
        response = conn.getresponse()
        data = response.read()
        received = {name.lower(): value for name, value in response.getheaders()}
        return Answer(response.status, received, json.loads(data) if data else None)
    finally:
        if connection is None:
            conn.close()


def raw_request(
    port: int, path: str, body: object, *, receive_buffer: int | None = None
) -> socket.socket:
    """Send one request on a raw socket and hand the socket back with the answer unread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        # Before connect, so the TCP window stays small and unread bytes wait at the server.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def read_head(sock: socket.socket) -> bytes:
    """Read until the blank line that ends the headers; returns the headers only."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before the headers ended: {data!r}"
        data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            data += chunk
    return data


@pytest.fixture
def server() -> Iterator[DevServer]:
    with DevServer(KEY, clock=lambda: NOW) as srv:
        yield srv


# --- auth ---


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"X-API-Key": "wrk_wrong"}, 401),
        ({"Authorization": "Bearer wrk_wrong"}, 401),
        ({"Authorization": f"Basic {KEY}"}, 401),
        ({"X-API-Key": KEY}, 202),
        ({"Authorization": f"Bearer {KEY}"}, 202),
    ],
)
def test_auth(server: DevServer, headers: dict[str, str], status: int) -> None:
    answer = send(server.port, BATCH_PATH, batch(make_event()), key=None, headers=headers)
    assert answer.status == status
    assert len(server.events) == (1 if status == 202 else 0)
    assert [r.status for r in server.requests] == [status]


def test_no_api_key_configured_accepts_any_request() -> None:
    with DevServer(None, clock=lambda: NOW) as srv:
        answer = send(srv.port, BATCH_PATH, batch(make_event()), key=None)
    assert answer.status == 202
    assert len(srv.events) == 1


# --- batches ---


def test_batch_is_accepted_with_counts_and_recorded(server: DevServer) -> None:
    events = [make_event(message_id=f"m{i}") for i in range(3)]
    answer = send(server.port, BATCH_PATH, batch(*events))
    assert answer.status == 202
    assert answer.body == {"accepted": 3, "rejected": 0}
    assert answer.headers["content-type"] == "application/json"
    assert server.events == events
    (recorded,) = server.requests
    assert (recorded.method, recorded.path, recorded.status) == ("POST", BATCH_PATH, 202)
    assert recorded.headers["x-api-key"] == KEY
    assert recorded.json() == batch(*events)


def test_bad_events_are_rejected_while_the_rest_are_accepted(server: DevServer) -> None:
    good = [
        make_event("payment_failed"),
        make_event("trial_started", at=NOW - timedelta(days=30)),  # oldest accepted
        make_event("x2", at=NOW + timedelta(minutes=5)),  # latest accepted
    ]
    bad = [
        make_event("Payment Failed"),
        make_event("payment__failed"),
        make_event("payment_failed_"),
        make_event(occurred_at="2026-06-14T12:00:00Z"),
        make_event(occurred_at="2026-06-14T12:00:00.000000Z"),
        make_event(occurred_at="2026-06-14T12:00:00.000+00:00"),
        make_event(occurred_at="2026-13-14T12:00:00.000Z"),
        make_event(at=NOW - timedelta(days=30, milliseconds=1)),  # too old
        make_event(at=NOW + timedelta(minutes=5, milliseconds=1)),  # too far ahead
        make_event(external_user_id=""),
        make_event(properties=[]),
        make_event(context=None),
        make_event(context={"$message_id": 7}),
    ]
    no_user = make_event()
    del no_user["external_user_id"]
    bad.append(no_user)
    events = [bad[0], good[0], *bad[1:7], good[1], *bad[7:], good[2]]

    answer = send(server.port, BATCH_PATH, batch(*events))

    assert answer.status == 202
    assert answer.body == {"accepted": len(good), "rejected": len(bad)}
    assert server.events == good


def test_legacy_mode_fails_the_whole_batch_for_one_bad_event() -> None:
    with DevServer(KEY, legacy=True, clock=lambda: NOW) as srv:
        refused = send(srv.port, BATCH_PATH, batch(make_event(), make_event("Bad Name")))
        assert refused.status == 400
        assert srv.events == []
        fine = send(srv.port, BATCH_PATH, batch(make_event(), make_event()))
        assert (fine.status, fine.body) == (202, {"accepted": 2, "rejected": 0})


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"events": []},
        {"events": [make_event() for _ in range(501)]},
        {"events": "nope"},
        {"events": [make_event(), 1]},
        {"events": [make_event()], "sent_at": "x"},  # unknown top-level field
        {"events": [make_event(userId="u")]},  # unknown field in an event
    ],
    ids=["no-events", "empty", "501", "not-a-list", "not-an-object", "top-level", "in-event"],
)
def test_bad_batch_fails_as_a_whole(server: DevServer, body: dict[str, Any]) -> None:
    answer = send(server.port, BATCH_PATH, body)
    assert answer.status == 400
    assert isinstance(answer.body["error"], str)
    assert server.events == []


def test_500_events_is_the_largest_batch(server: DevServer) -> None:
    answer = send(server.port, BATCH_PATH, batch(*[make_event() for _ in range(500)]))
    assert (answer.status, answer.body) == (202, {"accepted": 500, "rejected": 0})
    assert len(server.events) == 500


@pytest.mark.parametrize(
    "raw",
    [b"", b"{not json", b"[]", b'"events"', b"\xff\xfe", b'{"events": [NaN]}', b"[" * 100_000],
    ids=["empty", "broken", "array", "string", "not-utf8", "nan", "deep"],
)
def test_invalid_json_is_400(server: DevServer, raw: bytes) -> None:
    answer = send(server.port, BATCH_PATH, raw)
    assert answer.status == 400
    assert answer.body["error"].startswith("invalid JSON body")


def test_body_over_max_body_bytes_is_413_and_the_connection_stays_usable() -> None:
    with DevServer(KEY, max_body_bytes=300, clock=lambda: NOW) as srv:
        big = batch(*[make_event() for _ in range(5)])
        assert len(json.dumps(big)) > 300
        conn = connect(srv.port)
        try:
            too_big = send(srv.port, BATCH_PATH, big, connection=conn)
            small = send(srv.port, BATCH_PATH, batch(make_event()), connection=conn)
        finally:
            conn.close()
    assert too_big.status == 413
    assert small.status == 202
    assert len(srv.events) == 1


def test_keep_alive_serves_several_requests_on_one_connection(server: DevServer) -> None:
    conn = connect(server.port)
    try:
        answers = [
            send(server.port, BATCH_PATH, batch(make_event()), connection=conn) for _ in range(3)
        ]
    finally:
        conn.close()
    assert [a.status for a in answers] == [202, 202, 202]
    assert all(a.headers["content-length"] == str(len(json.dumps(a.body))) for a in answers)


def test_unknown_route_is_404_and_other_methods_405(server: DevServer) -> None:
    server.push_script(503)
    assert send(server.port, "/v1/events/unknown", batch(make_event())).status == 404
    get = send(server.port, BATCH_PATH, method="GET")
    assert get.status == 405
    assert get.headers["allow"] == "POST"
    assert send(server.port, IDENTIFY_PATH, method="PUT").status == 405
    assert server.script == [503]  # neither used the script


# --- track and identify ---


def test_track_endpoint_takes_one_event(server: DevServer) -> None:
    answer = send(server.port, TRACK_PATH, make_event(message_id="t1"))
    assert (answer.status, answer.body) == (202, {"accepted": 1, "rejected": 0})
    assert send(server.port, TRACK_PATH, make_event("Bad")).status == 400
    assert send(server.port, TRACK_PATH, make_event(extra=1)).status == 400
    assert server.events == [make_event(message_id="t1")]


def test_valid_identify_is_accepted() -> None:
    body = {
        "external_user_id": "user_8842",
        "traits": {"plan": "pro"},
        "preferred_channel": "email",
        "channels": [
            {"channel": "email", "address": "ada@example.com", "opted_in": True},
            {"channel": "sms", "address": "+15551234567", "opted_in": True, "verified": True},
            {
                "channel": "push",
                "address": "tok",
                "kind": "fcm",
                "platform": "android",
                "push_env": "production",
            },
        ],
    }
    with DevServer(KEY) as srv:
        answer = send(
            srv.port, IDENTIFY_PATH, body, key=None, headers={"Authorization": f"Bearer {KEY}"}
        )
        minimal = send(srv.port, IDENTIFY_PATH, {"external_user_id": "u2"})
    assert (answer.status, answer.body) == (202, {"accepted": 1, "rejected": 0})
    assert minimal.status == 202
    assert srv.identifies == [body, {"external_user_id": "u2"}]


@pytest.mark.parametrize(
    "body",
    [
        {"traits": {}},
        {"external_user_id": ""},
        {"external_user_id": 42},
        {"external_user_id": "u", "email": "ada@example.com"},
        {"external_user_id": "u", "traits": []},
        {"external_user_id": "u", "traits": None},
        {"external_user_id": "u", "preferred_channel": "fax"},
        {"external_user_id": "u", "preferred_channel": ["email"]},
        {"external_user_id": "u", "channels": {"channel": "email"}},
        {"external_user_id": "u", "channels": ["ada@example.com"]},
        {"external_user_id": "u", "channels": [{"type": "email", "address": "a@b.c"}]},
        {"external_user_id": "u", "channels": [{"channel": "fax", "address": "1"}]},
        {"external_user_id": "u", "channels": [{"channel": "email"}]},
        {"external_user_id": "u", "channels": [{"channel": "email", "address": ""}]},
        {
            "external_user_id": "u",
            "channels": [{"channel": "email", "address": "a@b.c", "opted_in": "yes"}],
        },
        {
            "external_user_id": "u",
            "channels": [{"channel": "email", "address": "a@b.c", "verified": 1}],
        },
        {
            "external_user_id": "u",
            "channels": [{"channel": "email", "address": "a@b.c", "kind": "fcm"}],
        },
        {
            "external_user_id": "u",
            "channels": [{"channel": "push", "address": "tok", "platform": 3}],
        },
        {
            "external_user_id": "u",
            "channels": [{"channel": "push", "address": "tok", "label": "x"}],
        },
    ],
)
def test_invalid_identify_is_400(server: DevServer, body: dict[str, Any]) -> None:
    answer = send(server.port, IDENTIFY_PATH, body)
    assert answer.status == 400
    assert server.identifies == []


# --- deduplication ---


def test_duplicate_message_ids_are_accepted_but_stored_once(server: DevServer) -> None:
    first = send(
        server.port, BATCH_PATH, batch(make_event(message_id="a"), make_event(message_id="b"))
    )
    again = send(
        server.port,
        BATCH_PATH,
        batch(make_event(message_id="a"), make_event(message_id="c"), make_event(message_id="c")),
    )
    assert first.body == {"accepted": 2, "rejected": 0}
    assert again.body == {"accepted": 3, "rejected": 0}
    assert [e["context"]["$message_id"] for e in server.events] == ["a", "b", "c"]
    assert server.duplicates == 2
    assert server.message_ids == {"a", "b", "c"}


def test_events_without_message_id_are_stored_every_time(server: DevServer) -> None:
    send(server.port, BATCH_PATH, batch(make_event()))
    send(server.port, BATCH_PATH, batch(make_event()))
    assert server.events == [make_event(), make_event()]
    assert server.duplicates == 0
    assert server.message_ids == set()


# --- fault injection ---


def test_scripted_statuses_come_in_order_then_normal_processing(server: DevServer) -> None:
    server.script = [503, 429, 401, 400, 413, 500, 202]
    event = batch(make_event(message_id="m1"))
    statuses = [send(server.port, BATCH_PATH, event).status for _ in range(8)]
    assert statuses == [503, 429, 401, 400, 413, 500, 202, 202]
    assert len(server.events) == 1  # the two 202s carried the same message id
    assert server.duplicates == 1

    server.push_script(503, None, 429)
    statuses = [send(server.port, BATCH_PATH, event).status for _ in range(4)]
    assert statuses == [503, 202, 429, 202]
    assert server.script == []


def test_script_status_is_answered_even_without_a_key(server: DevServer) -> None:
    server.push_script(500)
    assert send(server.port, BATCH_PATH, batch(make_event()), key=None).status == 500
    assert send(server.port, BATCH_PATH, batch(make_event()), key=None).status == 401


def test_drop_closes_the_connection_without_an_answer(server: DevServer) -> None:
    server.push_script("drop")
    with pytest.raises(http.client.RemoteDisconnected):
        send(server.port, BATCH_PATH, batch(make_event()))
    assert [r.status for r in server.requests] == [None]
    assert server.events == []
    assert send(server.port, BATCH_PATH, batch(make_event())).status == 202


def test_retry_after_is_sent_on_429_and_503_only() -> None:
    with DevServer(KEY, script=[503, 429, 401], retry_after="2", clock=lambda: NOW) as srv:
        answers = [send(srv.port, BATCH_PATH, batch(make_event())) for _ in range(4)]
    assert [a.status for a in answers] == [503, 429, 401, 202]
    assert [a.headers.get("retry-after") for a in answers] == ["2", "2", None, None]


def test_failure_rate_one_answers_503_every_time() -> None:
    date = "Wed, 21 Oct 2026 07:28:00 GMT"
    with DevServer(KEY, failure_rate=1.0, retry_after=date, clock=lambda: NOW) as srv:
        answers = [send(srv.port, BATCH_PATH, batch(make_event())) for _ in range(5)]
    assert {a.status for a in answers} == {503}
    assert {a.headers["retry-after"] for a in answers} == {date}
    assert srv.events == []


def test_failure_rate_is_reproducible_with_a_seed() -> None:
    def statuses() -> list[int]:
        with DevServer(KEY, failure_rate=0.5, seed=7, clock=lambda: NOW) as srv:
            return [send(srv.port, BATCH_PATH, batch(make_event())).status for _ in range(20)]

    first = statuses()
    assert first == statuses()
    assert set(first) == {202, 503}


def test_fault_settings_can_change_while_running(server: DevServer) -> None:
    server.failure_rate = 1.0
    assert send(server.port, BATCH_PATH, batch(make_event())).status == 503
    server.failure_rate = 0.0
    server.api_key = "wrk_other"
    assert send(server.port, BATCH_PATH, batch(make_event())).status == 401
    assert send(server.port, BATCH_PATH, batch(make_event()), key="wrk_other").status == 202


def test_latency_is_honoured() -> None:
    with DevServer(KEY, latency=0.05, clock=lambda: NOW) as srv:
        started = time.monotonic()
        answer = send(srv.port, BATCH_PATH, batch(make_event()))
        elapsed = time.monotonic() - started
    assert answer.status == 202
    assert elapsed >= 0.05


def test_bad_fault_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        DevServer(failure_rate=1.5)
    with pytest.raises(ValueError):
        DevServer(script=["nope"])  # type: ignore[list-item]
    for bad in ({"trickle": -0.1}, {"pad_response": -1}, {"answer": 99}, {"answer": True}):
        with pytest.raises(ValueError):
            DevServer(**bad)
    server = DevServer()
    with pytest.raises(ValueError):
        server.push_script(99)


# --- slow, padded and gateway answers ---


def test_trickle_writes_the_answer_byte_by_byte_and_stop_cuts_it_short() -> None:
    srv = DevServer(KEY, trickle=0.2, clock=lambda: NOW).start()
    try:
        started = time.monotonic()
        with raw_request(srv.port, BATCH_PATH, batch(make_event())) as sock:
            first = b"".join(sock.recv(1) for _ in range(5))
            took = time.monotonic() - started
            started = time.monotonic()
            srv.stop()
            stop_took = time.monotonic() - started
            rest = read_until_closed(sock)
            closed_after = time.monotonic() - started
    finally:
        srv.stop()
    assert first == b"HTTP/"
    assert took >= 0.8  # four pauses of 0.2 s between the five bytes
    assert stop_took < 1.0
    assert closed_after < 1.0
    assert len(rest) < 10  # what was in flight when stop() came; the head is ~150 bytes
    assert srv.wait_for_answers(1, timeout=1.0)
    (record,) = srv.requests
    assert (record.status, record.bytes_sent) == (202, 0)  # cut short within the head
    assert len(srv.events) == 1  # the request was processed; only its answer was slow


def test_a_trickled_answer_outlasts_a_per_read_timeout() -> None:
    with DevServer(KEY, trickle=0.005, clock=lambda: NOW) as srv:
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=0.25)
        answer = send(srv.port, BATCH_PATH, batch(make_event()), connection=conn)
        took = time.monotonic() - started
        conn.close()
        assert srv.wait_for_answers(1)
    assert (answer.status, answer.body) == (202, {"accepted": 1, "rejected": 0})
    assert took > 0.5  # twice the timeout, yet no read waited that long
    assert srv.requests[0].bytes_sent == int(answer.headers["content-length"])


def test_an_abandoned_padded_answer_is_cut_short_and_the_server_carries_on() -> None:
    padding = 50 << 20
    with DevServer(KEY, pad_response=padding, clock=lambda: NOW) as srv:
        with raw_request(
            srv.port, BATCH_PATH, batch(make_event()), receive_buffer=16 << 10
        ) as sock:
            head = read_head(sock)
        # The client hung up with 50 MB unread: the server notices and gives up.
        assert srv.wait_for_answers(1, timeout=10)
        srv.pad_response = 100
        after = send(srv.port, BATCH_PATH, batch(make_event()))
        assert srv.wait_for_answers(2, timeout=10)
    body = json.dumps({"accepted": 1, "rejected": 0})
    assert head.startswith(b"HTTP/1.1 202 ")
    assert f"\r\nContent-Length: {len(body) + padding}".encode() in head
    abandoned, answered = srv.requests
    assert abandoned.bytes_sent is not None
    assert abandoned.bytes_sent < padding // 10
    assert (after.status, after.body) == (202, {"accepted": 1, "rejected": 0})
    assert int(after.headers["content-length"]) == answered.bytes_sent == len(body) + 100
    assert len(srv.events) == 2


@pytest.mark.parametrize("status", [404, 400])
def test_answer_overrides_every_ingestion_request_and_stores_nothing(status: int) -> None:
    with DevServer(KEY, answer=status, failure_rate=1.0, clock=lambda: NOW) as srv:
        srv.push_script(503)
        answers = [
            send(srv.port, BATCH_PATH, batch(make_event())),
            send(srv.port, TRACK_PATH, make_event()),
            send(srv.port, IDENTIFY_PATH, {"external_user_id": "u"}),
            send(srv.port, BATCH_PATH, batch(make_event()), key=None),  # before the key check
        ]
        assert srv.script == [503]  # the script was not used up
        assert send(srv.port, BATCH_PATH, method="GET").status == 405
        srv.answer = None
        srv.failure_rate = 0.0
        later = [send(srv.port, BATCH_PATH, batch(make_event())).status for _ in range(2)]
    assert [a.status for a in answers] == [status] * 4
    assert all(a.body == {"error": f"answer set to {status}"} for a in answers)
    assert [r.status for r in srv.requests[:4]] == [status] * 4
    assert later == [503, 202]
    assert (len(srv.events), srv.identifies) == (1, [])


# --- waiting, state and lifecycle ---


def test_wait_for_events_and_requests(server: DevServer) -> None:
    sender = threading.Thread(
        target=send, args=(server.port, BATCH_PATH, batch(make_event(), make_event()))
    )
    sender.start()
    try:
        assert server.wait_for_events(2, timeout=10)
        assert server.wait_for_requests(1, timeout=10)
    finally:
        sender.join()
    assert not server.wait_for_events(3, timeout=0.05)
    assert len(server.events) == 2


def test_wait_for_identifies(server: DevServer) -> None:
    sender = threading.Thread(
        target=send, args=(server.port, IDENTIFY_PATH, {"external_user_id": "u"})
    )
    sender.start()
    try:
        assert server.wait_for_identifies(1, timeout=10)
    finally:
        sender.join()


def test_snapshots_are_copies(server: DevServer) -> None:
    send(server.port, BATCH_PATH, batch(make_event()))
    server.events[0]["event_type"] = "changed"
    server.events.clear()
    assert server.events == [make_event()]


def test_reset_forgets_everything(server: DevServer) -> None:
    send(server.port, BATCH_PATH, batch(make_event(message_id="a"), make_event(message_id="a")))
    send(server.port, IDENTIFY_PATH, {"external_user_id": "u"})
    server.push_script(503)
    server.reset()
    assert (server.events, server.identifies, server.requests) == ([], [], [])
    assert (server.duplicates, server.message_ids, server.script) == (0, set(), [])
    again = send(server.port, BATCH_PATH, batch(make_event(message_id="a")))
    assert again.status == 202
    assert len(server.events) == 1


def test_stop_is_idempotent_and_closes_the_port_and_connections() -> None:
    srv = DevServer(KEY, clock=lambda: NOW).start()
    port = srv.port
    conn = connect(port)
    try:
        assert send(port, BATCH_PATH, batch(make_event()), connection=conn).status == 202
        srv.stop()
        srv.stop()
        assert not srv.running
        with pytest.raises((http.client.HTTPException, OSError)):
            send(port, BATCH_PATH, batch(make_event()), connection=conn)
    finally:
        conn.close()
    with pytest.raises(ConnectionRefusedError):
        send(port, BATCH_PATH, batch(make_event()))
    assert len(srv.requests) == 1


def test_restart_reuses_the_port_and_keeps_what_was_received() -> None:
    srv = DevServer(KEY, clock=lambda: NOW).start()
    url = srv.url
    try:
        send(srv.port, BATCH_PATH, batch(make_event()))
        srv.stop()
        srv.start()
        assert srv.url == url
        assert send(srv.port, BATCH_PATH, batch(make_event())).status == 202
    finally:
        srv.stop()
    assert len(srv.events) == 2


def test_url_needs_a_start() -> None:
    srv = DevServer()
    with pytest.raises(RuntimeError):
        _ = srv.url
    with srv:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", srv.url)
        assert srv.url.endswith(f":{srv.port}")


def test_verbose_prints_one_line_per_request_without_bodies_or_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with DevServer(KEY, verbose=True, clock=lambda: NOW) as srv:
        send(srv.port, BATCH_PATH, batch(make_event(), make_event("Bad")))
        send(srv.port, BATCH_PATH, batch(make_event()), key="wrk_wrong")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(f"POST {BATCH_PATH} 202 accepted=1 rejected=1")
    assert f"POST {BATCH_PATH} 401" in lines[1]
    assert not any(secret in "\n".join(lines) for secret in (KEY, "wrk_wrong", "user_1"))


def test_quiet_by_default(server: DevServer, capsys: pytest.CaptureFixture[str]) -> None:
    send(server.port, BATCH_PATH, batch(make_event()))
    send(server.port, "/nowhere")
    assert capsys.readouterr() == ("", "")


# --- pure functions ---


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("2026-06-14T12:00:00.000Z", True),
        ("2026-06-14T12:00:00.123Z", True),
        ("2026-06-14T12:00:00Z", False),
        ("2026-06-14T12:00:00.1Z", False),
        ("2026-06-14T12:00:00.123z", False),
        ("2026-06-14 12:00:00.123Z", False),
        ("2026-06-14T12:00:00.123Z\n", False),
        ("2026-02-30T12:00:00.000Z", False),
        (1781438400000, False),
    ],
)
def test_occurred_at_format(value: object, ok: bool) -> None:
    assert (occurred_at_error(value, NOW) is None) is ok


def test_validate_event_reasons() -> None:
    assert validate_event(make_event(), NOW) is None
    assert validate_event([], NOW) == "an event must be a JSON object"
    assert "unknown field 'extra'" in (validate_event(make_event(extra=1), NOW) or "")
    assert "event_type" in (validate_event(make_event("payment_failed\n"), NOW) or "")


def test_parse_script() -> None:
    assert parse_script("503, 429,drop,DROP,202,") == [503, 429, "drop", "drop", 202]
    assert parse_script("") == []
    with pytest.raises(ValueError):
        parse_script("503,slow")
    with pytest.raises(ValueError):
        parse_script("99")


# --- what arrived, for people and other languages' tests ---


def test_the_events_view_gives_what_arrived_and_delete_forgets_it() -> None:
    with DevServer(KEY, clock=lambda: NOW) as srv:
        first, second = make_event(message_id="m1"), make_event("trial_expired", message_id="m2")
        assert send(srv.port, BATCH_PATH, batch(first, second)).status == 202
        assert send(srv.port, BATCH_PATH, batch(first)).status == 202  # a duplicate
        traits = {"external_user_id": "user_1", "traits": {"plan": "pro"}}
        assert send(srv.port, IDENTIFY_PATH, traits).status == 202

        view = send(srv.port, EVENTS_VIEW_PATH, method="GET", key=None)
        assert view.status == 200
        assert view.body == {"events": [first, second], "identifies": [traits], "duplicates": 1}
        assert view.body["events"] == srv.events
        assert len(srv.requests) == 3  # the view is not an ingestion request

        cleared = send(srv.port, EVENTS_VIEW_PATH, method="DELETE", key=None)
        assert (cleared.status, cleared.body) == (200, {"cleared": 3})
        empty = send(srv.port, EVENTS_VIEW_PATH, method="GET", key=None).body
        assert empty == {"events": [], "identifies": [], "duplicates": 0}
        # The message ids are forgotten too: the same event is new again.
        assert send(srv.port, BATCH_PATH, batch(first)).status == 202
        assert srv.events == [first] and srv.duplicates == 0
        wrong = send(srv.port, EVENTS_VIEW_PATH, batch(first), key=None)
        assert (wrong.status, wrong.headers["allow"]) == (405, "GET, DELETE")


# --- command line ---


@contextlib.contextmanager
def cli_server(*flags: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The command-line server on a free port, and that port; it must exit 0 on SIGTERM."""
    command = [sys.executable, "-m", "whisperr_durable.devserver", "--port", "0", *flags]
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", url)
        assert match, f"first line is not the URL: {url!r}"
        yield proc, int(match.group(1))
    finally:
        proc.terminate()
        _, errors = proc.communicate(timeout=10)
    assert proc.returncode == 0, errors


def test_cli_prints_its_url_then_one_line_per_request() -> None:
    flags = ("--api-key", "wrk_cli", "--script", "503", "--retry-after", "1")
    with cli_server(*flags) as (proc, port):
        assert proc.stdout is not None
        event = batch(make_event(at=datetime.now(timezone.utc)))
        refused = send(port, BATCH_PATH, event, key="wrk_cli")
        accepted = send(port, BATCH_PATH, event, key="wrk_cli")
        log = [proc.stdout.readline(), proc.stdout.readline()]
    assert (refused.status, refused.headers["retry-after"]) == (503, "1")
    assert (accepted.status, accepted.body) == (202, {"accepted": 1, "rejected": 0})
    assert f"POST {BATCH_PATH} 503" in log[0]
    assert log[1].rstrip().endswith(f"POST {BATCH_PATH} 202 accepted=1 rejected=0")
    assert not any("wrk_cli" in line or "user_1" in line for line in log)


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_prints_a_line_per_op_received_unless_quiet(quiet: bool) -> None:
    flags = ["--port", "0", "--api-key", "wrk_cli", *(["--quiet"] if quiet else [])]
    proc = subprocess.Popen(
        [sys.executable, "-m", "whisperr_durable.devserver", *flags],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().strip().rsplit(":", 1)[1])
        now = datetime.now(timezone.utc)
        events = [make_event(at=now, message_id="m1"), make_event("trial_expired", at=now)]
        assert send(port, BATCH_PATH, batch(*events), key="wrk_cli").status == 202
        identify = {"external_user_id": "user_2", "traits": {"email": "ada@example.com"}}
        assert send(port, IDENTIFY_PATH, identify, key="wrk_cli").status == 202
        assert send(port, BATCH_PATH, batch(make_event(at=NOW)), key="nope").status == 401
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    received = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    if quiet:
        assert received == []
    else:
        assert received == [
            "event user_1 payment_failed m1",
            "event user_1 trial_expired -",
            "identify user_2",
        ]
    # Request lines either way; never a key, a property or a trait.
    assert sum(" POST " in line for line in out.splitlines()) == 3
    assert not any(word in out for word in ("wrk_cli", "4900", "ada@example.com"))


def test_cli_answer_pad_response_and_trickle() -> None:
    flags = ("--answer", "404", "--pad-response", "10", "--trickle", "0.002")
    with cli_server(*flags) as (_, port):
        started = time.monotonic()
        answer = send(port, BATCH_PATH, batch(make_event()), key=None)
        took = time.monotonic() - started
    assert (answer.status, answer.body) == (404, {"error": "answer set to 404"})
    assert int(answer.headers["content-length"]) == len(json.dumps(answer.body)) + 10
    assert took >= 0.3  # well over 150 bytes, 2 ms apart


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--failure-rate", "2"], "failure_rate"),
        (["--trickle", "-1"], "trickle"),
        (["--pad-response", "-1"], "pad_response"),
        (["--answer", "99"], "answer"),
    ],
)
def test_cli_refuses_bad_options(flags: list[str], named: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "whisperr_durable.devserver", "--port", "0", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert named in result.stderr
