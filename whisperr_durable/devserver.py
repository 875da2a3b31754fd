"""A local Whisperr-compatible ingestion server, for tests, demos and the command line.

It speaks the Whisperr ingestion contract (``POST /v1/events/batch``, ``/v1/identify`` and
``/v1/events/track``) as strictly as the real service, keeps what it accepted in memory for
assertions, and misbehaves on request: scripted statuses, dropped connections, latency,
random 503s, a ``Retry-After`` header, the legacy "one bad event fails the whole batch"
mode, and three faults of the network between an SDK and the service:

- ``trickle`` (seconds): every answer, status line and headers included, is written one byte
  at a time with this pause between bytes, so a client whose timeout applies per read never
  times out; ``stop()`` cuts a trickling answer short;
- ``pad_response`` (bytes): every answer's body is followed by that much whitespace, counted
  in its ``Content-Length`` (the JSON stays valid) and written in 64 KiB chunks, never built
  in memory; a client that hangs up ends it quietly;
- ``answer`` (a status): every ingestion request gets this status and an error body, and
  nothing is stored, like a gateway in front of the API answering 404 during a deploy.

Each recorded request says how many body bytes of its answer went out
(``RecordedRequest.bytes_sent``, set once the answer is written or abandoned: see
``wait_for_answers``), so a test can tell a client that read an answer from one that walked
away. Standard library only, so tests and ``python -m whisperr_durable.devserver`` need
nothing installed::

    with DevServer("wrk_dev", script=[503, "drop"]) as server:
        ...  # point the SDK at server.url, then
        assert server.wait_for_events(3)

Where the contract is silent, this server decides (and the real service may differ):

- an error body is ``{"error": "<reason>"}``; reasons never quote payload values;
- the body limit is checked against ``Content-Length`` (default 1 MiB); a chunked body is
  answered 411, since no SDK sends one;
- ``$message_id`` deduplication lasts for the server's lifetime (until ``reset()``), and a
  ``$message_id`` that is not a non-empty string rejects its event;
- ``event_type`` is matched as sent, not trimmed: trimming is the SDK's job;
- a script item decides its request; ``failure_rate`` applies only to unscripted requests;
  ``answer`` overrides both and the key check, without using up the script (``Retry-After``
  goes with an ``answer`` of 429 or 503, as with the others); none of them touches requests
  for unknown routes (404) or with other methods (405);
- ``trickle`` and ``pad_response`` shape every answer, errors and 404s included;
  ``bytes_sent`` counts what the server handed to the connection: the kernel's buffers hold
  some of it, so a client may have read less.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import random
import re
import signal
import socket
import socketserver
import sys
import threading
from collections import deque
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Union

__all__ = [
    "BATCH_PATH",
    "DEFAULT_MAX_BODY_BYTES",
    "IDENTIFY_PATH",
    "MAX_BATCH_EVENTS",
    "TRACK_PATH",
    "DevServer",
    "RecordedRequest",
    "ScriptItem",
    "batch_error",
    "main",
    "occurred_at_error",
    "parse_json_object",
    "parse_script",
    "validate_channel",
    "validate_event",
    "validate_identify",
]

BATCH_PATH = "/v1/events/batch"
IDENTIFY_PATH = "/v1/identify"
TRACK_PATH = "/v1/events/track"
ROUTES = frozenset({BATCH_PATH, IDENTIFY_PATH, TRACK_PATH})
# What the server received, for people and for other languages' tests: GET gives it as JSON
# (events, identifies and the count of duplicates, in arrival order), DELETE forgets it.
# Needs no key, and is not an ingestion request (``requests`` does not record it).
EVENTS_VIEW_PATH = "/_dev/events"

MAX_BATCH_EVENTS = 500
DEFAULT_MAX_BODY_BYTES = 1 << 20
PAST_WINDOW = timedelta(days=30)
FUTURE_WINDOW = timedelta(minutes=5)
CHANNEL_TYPES = frozenset({"email", "sms", "push"})

EVENT_TYPE_PATTERN = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")
OCCURRED_AT_PATTERN = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})\.([0-9]{3})Z"
)

_BATCH_FIELDS = frozenset({"events"})
_EVENT_FIELDS = frozenset(
    {"external_user_id", "event_type", "occurred_at", "properties", "context"}
)
_IDENTIFY_FIELDS = frozenset({"external_user_id", "traits", "preferred_channel", "channels"})
_CHANNEL_FIELDS = frozenset({"channel", "address", "opted_in", "verified"})
_PUSH_ONLY_FIELDS = ("kind", "platform", "push_env")
_PUSH_CHANNEL_FIELDS = _CHANNEL_FIELDS | frozenset(_PUSH_ONLY_FIELDS)

# A body over the limit is still read and discarded, so the client gets its 413 rather than
# a connection reset and a keep-alive connection stays usable. Past this size we answer and
# hang up instead of reading on.
_DRAIN_LIMIT = 64 << 20
_DRAIN_CHUNK = 64 << 10

# pad_response is written from this one chunk, so a padded answer of any size costs 64 KiB.
_PAD_CHUNK = b" " * (64 << 10)

ScriptItem = Union[int, Literal["drop"], None]
"""One scripted answer: an HTTP status, ``"drop"`` (close without answering), or ``None``
(process normally; so does ``202``)."""


# --- validation: pure functions returning a reason, or None when the input is acceptable ---


def unknown_field_error(
    obj: Mapping[str, object], allowed: frozenset[str], where: str
) -> str | None:
    """Names the first field of ``obj`` outside ``allowed``: the whole request fails on it."""
    unknown = sorted(set(obj) - allowed)
    return f"unknown field {unknown[0]!r} in {where}" if unknown else None


def occurred_at_error(value: object, now: datetime) -> str | None:
    """Why ``value`` is not a wire timestamp inside the server's window around ``now``."""
    if not isinstance(value, str):
        return "occurred_at must be a string"
    match = OCCURRED_AT_PATTERN.fullmatch(value)
    if match is None:
        return "occurred_at must be YYYY-MM-DDTHH:MM:SS.mmmZ (UTC, three fraction digits)"
    year, month, day, hour, minute, second, millis = (int(part) for part in match.groups())
    try:
        moment = datetime(
            year, month, day, hour, minute, second, millis * 1000, tzinfo=timezone.utc
        )
    except ValueError:
        return "occurred_at is not a valid date and time"
    if moment < now - PAST_WINDOW:
        return "occurred_at is more than 30 days before the server's clock"
    if moment > now + FUTURE_WINDOW:
        return "occurred_at is more than 5 minutes after the server's clock"
    return None


def event_shape_error(event: Mapping[str, Any], now: datetime) -> str | None:
    """Why this one event is rejected (a batch counts it in ``rejected``), or None."""
    user = event.get("external_user_id")
    if not isinstance(user, str) or not user:
        return "external_user_id must be a non-empty string"
    event_type = event.get("event_type")
    if not isinstance(event_type, str) or EVENT_TYPE_PATTERN.fullmatch(event_type) is None:
        return "event_type must match ^[a-z0-9]+(?:_[a-z0-9]+)*$"
    reason = occurred_at_error(event.get("occurred_at"), now)
    if reason is not None:
        return reason
    for name in ("properties", "context"):
        if name in event and not isinstance(event[name], dict):
            return f"{name} must be a JSON object"
    context = event.get("context", {})
    if "$message_id" in context and _message_id(event) is None:
        return "context.$message_id must be a non-empty string"
    return None


def validate_event(event: object, now: datetime) -> str | None:
    """Why ``event`` (one event body, as ``/v1/events/track`` takes it) is refused, or None."""
    if not isinstance(event, dict):
        return "an event must be a JSON object"
    return unknown_field_error(event, _EVENT_FIELDS, "the event") or event_shape_error(event, now)


def batch_error(body: Mapping[str, Any]) -> str | None:
    """Why a batch body fails as a whole (400), or None. Event shapes are judged apart."""
    reason = unknown_field_error(body, _BATCH_FIELDS, "the batch body")
    if reason is not None:
        return reason
    events = body.get("events")
    if not isinstance(events, list):
        return "events must be a list"
    if not 1 <= len(events) <= MAX_BATCH_EVENTS:
        return f"events must hold 1 to {MAX_BATCH_EVENTS} events, not {len(events)}"
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            return f"events[{index}] must be a JSON object"
        reason = unknown_field_error(event, _EVENT_FIELDS, f"events[{index}]")
        if reason is not None:
            return reason
    return None


def validate_channel(channel: object, where: str = "the channel") -> str | None:
    """Why one entry of an identify body's ``channels`` is refused, or None."""
    if not isinstance(channel, dict):
        return f"{where} must be a JSON object"
    kind = channel.get("channel")
    if not isinstance(kind, str) or kind not in CHANNEL_TYPES:
        return f"{where}: channel must be one of email, sms, push"
    allowed = _PUSH_CHANNEL_FIELDS if kind == "push" else _CHANNEL_FIELDS
    reason = unknown_field_error(channel, allowed, where)
    if reason is not None:
        return reason
    address = channel.get("address")
    if not isinstance(address, str) or not address:
        return f"{where}: address must be a non-empty string"
    for name in ("opted_in", "verified"):
        if name in channel and not isinstance(channel[name], bool):
            return f"{where}: {name} must be true or false"
    for name in _PUSH_ONLY_FIELDS:
        if name in channel and not isinstance(channel[name], str):
            return f"{where}: {name} must be a string"
    return None


def validate_identify(body: Mapping[str, Any]) -> str | None:
    """Why an identify body is refused (400), or None."""
    reason = unknown_field_error(body, _IDENTIFY_FIELDS, "the identify body")
    if reason is not None:
        return reason
    user = body.get("external_user_id")
    if not isinstance(user, str) or not user:
        return "external_user_id must be a non-empty string"
    if "traits" in body and not isinstance(body["traits"], dict):
        return "traits must be a JSON object"
    if "preferred_channel" in body:
        preferred = body["preferred_channel"]
        if not isinstance(preferred, str) or preferred not in CHANNEL_TYPES:
            return "preferred_channel must be one of email, sms, push"
    channels = body.get("channels", [])
    if not isinstance(channels, list):
        return "channels must be a list"
    for index, channel in enumerate(channels):
        reason = validate_channel(channel, f"channels[{index}]")
        if reason is not None:
            return reason
    return None


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode a request body that must be one UTF-8 JSON object; ValueError otherwise."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("body is nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError("body must be a JSON object")
    return value


def _reject_constant(name: str) -> object:
    # Python's json accepts NaN and Infinity; JSON (and the real service) does not.
    raise ValueError(f"{name} is not valid JSON")


def _message_id(event: Mapping[str, Any]) -> str | None:
    context = event.get("context")
    value = context.get("$message_id") if isinstance(context, dict) else None
    return value if isinstance(value, str) and value else None


def parse_script(text: str) -> list[ScriptItem]:
    """Parse the command line's ``--script``: ``"503,503,drop,202"``."""
    items: list[ScriptItem] = []
    for part in text.split(","):
        word = part.strip().lower()
        if not word:
            continue
        if word == "drop":
            items.append("drop")
        elif word.isdigit():
            items.append(int(word))
        else:
            raise ValueError(f"script items are HTTP statuses or 'drop', not {part.strip()!r}")
    return _checked_script(items)


def _is_status(item: object) -> bool:
    return isinstance(item, int) and not isinstance(item, bool) and 200 <= item <= 599


def _checked_script(items: Iterable[object]) -> list[ScriptItem]:
    checked: list[ScriptItem] = []
    for item in items:
        if item is None or item == "drop":
            checked.append(None if item is None else "drop")
        elif isinstance(item, int) and _is_status(item):
            checked.append(item)
        else:
            raise ValueError(f"a script item is a status 200-599, 'drop' or None, not {item!r}")
    return checked


# --- the server ---


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it. ``status`` is None when no answer was sent.

    ``bytes_sent`` is how many bytes of the answer's body (padding included) the server
    handed to the connection: None while the answer is being written, 0 for a dropped
    request, fewer than its ``Content-Length`` when the client hung up first.
    """

    method: str
    path: str
    status: int | None
    headers: dict[str, str]
    body: bytes
    bytes_sent: int | None = None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class _Reply:
    status: int | None  # None: close the connection without answering
    body: dict[str, object]
    headers: tuple[tuple[str, str], ...] = ()
    trickle: float = 0.0  # seconds between the bytes of the answer; 0 writes it at once
    padding: int = 0  # whitespace bytes after the body


_DROP = _Reply(None, {})


def _error(status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
    return _Reply(status, {"error": reason}, headers)


def _accepted(accepted: int, rejected: int) -> _Reply:
    return _Reply(202, {"accepted": accepted, "rejected": rejected})


def _authorized(api_key: str | None, headers: Mapping[str, str]) -> bool:
    if api_key is None:
        return True
    if headers.get("x-api-key") == api_key:
        return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and token.strip() == api_key


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class DevServer:
    """An in-memory Whisperr ingestion server on a local port, run in a daemon thread.

    ``api_key``, ``retry_after``, ``latency``, ``failure_rate``, ``legacy``, ``trickle``,
    ``pad_response``, ``answer``, ``max_body_bytes``, ``clock``, ``verbose`` and
    ``print_events`` (with ``verbose``: a line per op received) may be reassigned while it
    runs: each is read once per request and replaced whole, which is atomic, so they need no
    lock.
    ``script`` is a property guarded by the lock, like everything the server records.
    """

    def __init__(
        self,
        api_key: str | None = "wrk_dev",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        script: Iterable[ScriptItem] | None = None,
        retry_after: str | None = None,
        latency: float = 0.0,
        failure_rate: float = 0.0,
        seed: int | None = None,
        legacy: bool = False,
        trickle: float = 0.0,
        pad_response: int = 0,
        answer: int | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        clock: Callable[[], datetime] | None = None,
        verbose: bool = False,
        print_events: bool = False,
    ) -> None:
        if api_key == "":
            raise ValueError("api_key must be a non-empty string, or None to accept any request")
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError("failure_rate must be within [0, 1]")
        if latency < 0:
            raise ValueError("latency must not be negative")
        if trickle < 0:
            raise ValueError("trickle must not be negative")
        if pad_response < 0:
            raise ValueError("pad_response must not be negative")
        if answer is not None and not _is_status(answer):
            raise ValueError(f"answer must be a status 200-599 or None, not {answer!r}")
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must not be negative")
        self.api_key = api_key
        self.host = host
        self.retry_after = retry_after
        self.latency = latency
        self.failure_rate = failure_rate
        self.legacy = legacy
        self.trickle = trickle
        self.pad_response = pad_response
        self.answer = answer
        self.max_body_bytes = max_body_bytes
        self.clock: Callable[[], datetime] = clock or _utc_now
        self.verbose = verbose
        self.print_events = print_events
        self._port = port
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._script: deque[ScriptItem] = deque(_checked_script(script or ()))
        self._events: list[dict[str, Any]] = []
        self._identifies: list[dict[str, Any]] = []
        self._requests: list[RecordedRequest] = []
        self._message_ids: set[str] = set()
        self._duplicates = 0
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> DevServer:
        """Bind (port 0 picks a free port; a restart reuses the port) and serve in a thread."""
        if self._httpd is not None:
            raise RuntimeError("DevServer is already running")
        self._stopping.clear()
        httpd = _HTTPServer((self.host, self._port), self)
        self._port = int(httpd.socket.getsockname()[1])
        thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"whisperr-devserver:{self._port}",
            daemon=True,
        )
        thread.start()
        self._httpd, self._thread = httpd, thread
        return self

    def stop(self) -> None:
        """Stop serving, close the port and every open connection. Safe to call twice."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._httpd = self._thread = None
        # Wakes requests sleeping out their latency (they get no answer) and cuts trickling
        # answers short.
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        # Without this, a keep-alive connection would go on being served after stop().
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join()

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port once started (the port asked for, until then)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port``; valid once the server has been started (and after stop)."""
        if self._port == 0:
            raise RuntimeError("DevServer has no port yet: call start() first")
        return f"http://{self.host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    # fault injection

    @property
    def script(self) -> list[ScriptItem]:
        """The scripted answers not yet used, in order."""
        with self._lock:
            return list(self._script)

    @script.setter
    def script(self, items: Iterable[ScriptItem]) -> None:
        checked = _checked_script(items)
        with self._lock:
            self._script = deque(checked)

    def push_script(self, *items: ScriptItem) -> None:
        """Append scripted answers, used after those already queued."""
        checked = _checked_script(items)
        with self._lock:
            self._script.extend(checked)

    # what was received

    @property
    def events(self) -> list[dict[str, Any]]:
        """Copies of the accepted events, duplicates left out, in arrival order."""
        with self._lock:
            return copy.deepcopy(self._events)

    @property
    def identifies(self) -> list[dict[str, Any]]:
        """Copies of the accepted identify bodies, in arrival order."""
        with self._lock:
            return copy.deepcopy(self._identifies)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request answered (or dropped), in order."""
        with self._lock:
            return list(self._requests)

    @property
    def duplicates(self) -> int:
        """Events accepted but not stored because their ``$message_id`` was already seen."""
        with self._lock:
            return self._duplicates

    @property
    def message_ids(self) -> set[str]:
        """The ``$message_id`` of every accepted event."""
        with self._lock:
            return set(self._message_ids)

    def wait_for_events(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` events are stored; False if ``timeout`` passes first."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._events) >= n, timeout)

    def wait_for_identifies(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` identify bodies are stored; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._identifies) >= n, timeout)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` requests are recorded; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._requests) >= n, timeout)

    def wait_for_answers(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` answers are written out, abandoned or dropped (their
        record's ``bytes_sent`` is set); False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: sum(r.bytes_sent is not None for r in self._requests) >= n, timeout
            )

    def reset(self) -> None:
        """Forget everything received (message ids included) and the remaining script."""
        with self._lock:
            self._events.clear()
            self._identifies.clear()
            self._requests.clear()
            self._message_ids.clear()
            self._duplicates = 0
            self._script.clear()

    # request handling, called from the handler threads

    def _track_connection(self, connection: socket.socket, is_open: bool) -> None:
        with self._lock:
            if is_open:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def _view(self, method: str) -> _Reply:
        """``GET`` or ``DELETE`` of EVENTS_VIEW_PATH."""
        if method == "GET":
            with self._lock:
                return _Reply(
                    200,
                    {
                        "events": list(self._events),
                        "identifies": list(self._identifies),
                        "duplicates": self._duplicates,
                    },
                )
        if method == "DELETE":
            with self._lock:
                cleared = len(self._events) + len(self._identifies)
                self._events.clear()
                self._identifies.clear()
                self._message_ids.clear()
                self._duplicates = 0
            return _Reply(200, {"cleared": cleared})
        return _error(405, "use GET or DELETE", (("Allow", "GET, DELETE"),))

    def _respond(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        body_problem: _Reply | None,
    ) -> tuple[_Reply, RecordedRequest | None]:
        if path == EVENTS_VIEW_PATH:
            return self._view(method), None
        if self.latency > 0:
            self._stopping.wait(self.latency)
        if self._stopping.is_set():
            reply = _DROP
        elif path not in ROUTES:
            reply = _error(404, "no such route")
        elif method != "POST":
            reply = _error(405, "use POST", (("Allow", "POST"),))
        else:
            reply = self._ingest(path, headers, body, body_problem)
        # Recorded before the answer goes out, so a client that has its answer finds its
        # request here; only bytes_sent waits for the writing (see _record_bytes_sent).
        record = RecordedRequest(
            method=method, path=path, status=reply.status, headers=headers, body=body
        )
        with self._changed:
            self._requests.append(record)
            self._changed.notify_all()
        if self.verbose:
            _print_request_line(method, path, reply)
            if self.print_events and reply.status is not None and 200 <= reply.status < 300:
                _print_received(path, body)
        return replace(reply, trickle=self.trickle, padding=self.pad_response), record

    def _record_bytes_sent(self, record: RecordedRequest, bytes_sent: int) -> None:
        with self._changed:
            # From the end: it is nearly always the latest. reset() may have dropped it.
            for index in range(len(self._requests) - 1, -1, -1):
                if self._requests[index] is record:
                    self._requests[index] = replace(record, bytes_sent=bytes_sent)
                    break
            self._changed.notify_all()

    def _ingest(
        self, path: str, headers: dict[str, str], body: bytes, body_problem: _Reply | None
    ) -> _Reply:
        answer = self.answer
        if answer is not None:
            # A gateway in front of the API answers before it: no script, no key check.
            return self._fault_reply(answer, f"answer set to {answer}")
        fault = self._next_fault()
        if fault is not None:
            return fault
        if not _authorized(self.api_key, headers):
            return _error(401, "missing or wrong API key")
        if body_problem is not None:
            return body_problem
        try:
            payload = parse_json_object(body)
        except ValueError as exc:
            return _error(400, f"invalid JSON body: {exc}")
        now = self.clock()
        if now.tzinfo is None:
            now = now.replace(tzinfo=timezone.utc)
        if path == BATCH_PATH:
            return self._ingest_batch(payload, now)
        if path == TRACK_PATH:
            return self._ingest_track(payload, now)
        return self._ingest_identify(payload)

    def _next_fault(self) -> _Reply | None:
        with self._lock:
            scripted = bool(self._script)
            item = self._script.popleft() if scripted else None
            fail = not scripted and self._random.random() < self.failure_rate
        if item == "drop":
            return _DROP
        if isinstance(item, int) and item != 202:
            return self._fault_reply(item, f"scripted {item}")
        if fail:
            return self._fault_reply(503, "injected failure")
        return None

    def _fault_reply(self, status: int, reason: str) -> _Reply:
        retry_after = self.retry_after
        if status in (429, 503) and retry_after is not None:
            return _error(status, reason, (("Retry-After", retry_after),))
        return _error(status, reason)

    def _ingest_batch(self, body: dict[str, Any], now: datetime) -> _Reply:
        reason = batch_error(body)
        if reason is not None:
            return _error(400, reason)
        events: list[dict[str, Any]] = body["events"]
        verdicts = [event_shape_error(event, now) for event in events]
        rejected = [verdict for verdict in verdicts if verdict is not None]
        if rejected and self.legacy:
            return _error(400, f"{len(rejected)} bad event(s), the first: {rejected[0]}")
        good = [event for event, verdict in zip(events, verdicts) if verdict is None]
        self._store_events(good)
        return _accepted(len(good), len(rejected))

    def _ingest_track(self, body: dict[str, Any], now: datetime) -> _Reply:
        reason = validate_event(body, now)
        if reason is not None:
            return _error(400, reason)
        self._store_events([body])
        return _accepted(1, 0)

    def _ingest_identify(self, body: dict[str, Any]) -> _Reply:
        reason = validate_identify(body)
        if reason is not None:
            return _error(400, reason)
        with self._changed:
            self._identifies.append(body)
            self._changed.notify_all()
        return _accepted(1, 0)

    def _store_events(self, events: list[dict[str, Any]]) -> None:
        with self._changed:
            for event in events:
                message_id = _message_id(event)
                if message_id is not None:
                    if message_id in self._message_ids:
                        self._duplicates += 1
                        continue
                    self._message_ids.add(message_id)
                self._events.append(event)
            self._changed.notify_all()


def _print_request_line(method: str, path: str, reply: _Reply) -> None:
    # The reason and counts only: never a body, a header or the key.
    if reply.status is None:
        outcome = "dropped, no answer"
    elif "accepted" in reply.body:
        counts = f"accepted={reply.body['accepted']} rejected={reply.body['rejected']}"
        outcome = f"{reply.status} {counts}"
    else:
        outcome = f"{reply.status} {reply.body.get('error', '')}".rstrip()
    stamp = datetime.now().strftime("%H:%M:%S")
    sys.stdout.write(f"{stamp} {method} {path} {outcome}\n")
    sys.stdout.flush()


def _print_received(path: str, body: bytes) -> None:
    """One line per op an accepted request carried: who, what, and its ``$message_id``
    (never properties or traits: they may be personal)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return
    if path == IDENTIFY_PATH:
        lines = [f"  identify {payload.get('external_user_id')}"]
    else:
        events = payload.get("events", []) if path == BATCH_PATH else [payload]
        lines = [
            f"  event {e.get('external_user_id')} {e.get('event_type')} {_message_id(e) or '-'}"
            for e in events
            if isinstance(e, dict)
        ]
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()


def _padded(payload: bytes, padding: int) -> Iterator[bytes]:
    yield payload
    while padding > 0:
        chunk = _PAD_CHUNK[:padding]
        yield chunk
        padding -= len(chunk)


def _bytewise(chunks: Iterable[bytes]) -> Iterator[bytes]:
    for chunk in chunks:
        for index in range(len(chunk)):
            yield chunk[index : index + 1]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: DevServer) -> None:
        self.app = app
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on a machine
        # without DNS; we need no server name.
        socketserver.TCPServer.server_bind(self)
        self.server_name = self.app.host
        self.server_port = int(self.socket.getsockname()[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up (or stop() closing its connection) is routine here.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries a Content-Length
    server_version = "whisperr-devserver"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body go out in two writes
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.app._track_connection(self.connection, True)

    def finish(self) -> None:
        self.server.app._track_connection(self.connection, False)
        super().finish()

    def do_POST(self) -> None:
        try:
            body, body_problem = self._read_body(self.server.app.max_body_bytes)
        except ConnectionError:
            self.close_connection = True
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        path = self.path.split("?", 1)[0]
        app = self.server.app
        reply, record = app._respond(self.command, path, headers, body, body_problem)
        bytes_sent = 0
        if reply.status is None:
            self.close_connection = True
        else:
            bytes_sent = self._send(reply.status, reply)
        if record is not None:
            app._record_bytes_sent(record, bytes_sent)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_POST

    def _read_body(self, limit: int) -> tuple[bytes, _Reply | None]:
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True  # the body is not read, so the stream is lost
            return b"", _error(411, "send the body with a Content-Length")
        declared = self.headers.get("Content-Length", "0").strip()
        if not declared.isdigit():
            self.close_connection = True
            return b"", _error(400, "invalid Content-Length")
        length = int(declared)
        if length > limit:
            if length <= _DRAIN_LIMIT:
                self._discard(length)
            else:
                self.close_connection = True
            return b"", _error(413, f"body over {limit} bytes")
        body = self.rfile.read(length)
        if len(body) < length:
            raise ConnectionError("client closed the connection mid-body")
        return body, None

    def _discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, _DRAIN_CHUNK))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            length -= len(chunk)

    def _send(self, status: int, reply: _Reply) -> int:
        """Write the answer; returns how many of its body bytes went out.

        A client hanging up, or stop() during a trickle, ends the answer early and closes
        the connection: routine here, not an error.
        """
        payload = json.dumps(reply.body).encode()
        head = self._head(status, reply.headers, len(payload) + reply.padding)
        body: Iterable[bytes] = () if self.command == "HEAD" else _padded(payload, reply.padding)
        pieces: Iterator[bytes] = itertools.chain((head,), body)
        pause = reply.trickle
        if pause > 0:
            pieces = _bytewise(pieces)
        written = 0
        try:
            for index, piece in enumerate(pieces):
                # stop() sets _stopping, which ends the pause and the answer at once.
                if index and pause > 0 and self.server.app._stopping.wait(pause):
                    raise ConnectionAbortedError("the server is stopping")
                self.wfile.write(piece)
                written += len(piece)  # a piece cut off mid-write is not counted
        except OSError:
            self.close_connection = True
        return max(written - len(head), 0)

    def _head(self, status: int, extra: Iterable[tuple[str, str]], length: int) -> bytes:
        # Built whole rather than through send_response(), which writes the headers out in
        # one go: a trickle must pace the status line and headers like the body.
        phrase = self.responses.get(status, ("",))[0]
        lines = [
            f"{self.protocol_version} {status} {phrase}",
            f"Server: {self.version_string()}",
            f"Date: {self.date_time_string()}",
            "Content-Type: application/json",
            f"Content-Length: {length}",
            *(f"{name}: {value}" for name, value in extra),
        ]
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: DevServer prints its own line per request when verbose."""


# --- command line ---


def build_parser(prog: str = "python -m whisperr_durable.devserver") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a local, in-memory Whisperr-compatible ingestion server. It prints "
        "the URL it listens on, then one line per request and one per op received, until "
        f"Ctrl-C. GET {EVENTS_VIEW_PATH} gives what it received as JSON; DELETE forgets it.",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="one line per request, none per op received"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8787, help="default: %(default)s; 0 picks a free port"
    )
    parser.add_argument(
        "--api-key", default="wrk_dev", help='key to require (default %(default)s; "" for none)'
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long before each answer (default %(default)g)",
    )
    parser.add_argument(
        "--failure-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="probability of answering 503 instead of processing (default %(default)g)",
    )
    parser.add_argument(
        "--seed", type=int, help="seed for --failure-rate (default: a different run each time)"
    )
    parser.add_argument(
        "--retry-after", metavar="VALUE", help="Retry-After on 429 and 503 (default: none)"
    )
    parser.add_argument(
        "--legacy", action="store_true", help="one bad event fails the whole batch with 400"
    )
    parser.add_argument(
        "--trickle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="write every answer one byte at a time, this long apart (default %(default)g: "
        "at once)",
    )
    parser.add_argument(
        "--pad-response",
        type=int,
        default=0,
        metavar="BYTES",
        help="follow every answer's body with this much whitespace (default %(default)s)",
    )
    parser.add_argument(
        "--answer",
        type=int,
        metavar="STATUS",
        help="answer every ingestion request with this status and store nothing "
        "(e.g. 404, a gateway during a deploy); overrides --script and --failure-rate "
        "(default: none)",
    )
    parser.add_argument(
        "--script",
        default="",
        metavar="ITEMS",
        help="answers for the first requests, e.g. 503,429,drop,202 (202: process normally; "
        "default: none)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="BYTES",
        help="answer 413 to a larger body (default %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog) if prog else build_parser()
    args = parser.parse_args(argv)
    try:
        server = DevServer(
            args.api_key or None,
            host=args.host,
            port=args.port,
            script=parse_script(args.script),
            retry_after=args.retry_after,
            latency=args.latency,
            failure_rate=args.failure_rate,
            seed=args.seed,
            legacy=args.legacy,
            trickle=args.trickle,
            pad_response=args.pad_response,
            answer=args.answer,
            max_body_bytes=args.max_body_bytes,
            verbose=True,
            print_events=not args.quiet,
        )
        server.start()
    except ValueError as exc:
        parser.error(str(exc))
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(server.url, flush=True)
    try:
        _wait_for_interrupt()
    finally:
        server.stop()
    return 0


def _wait_for_interrupt() -> None:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # SIGTERM (kill, docker stop, a test's terminate()) stops as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()


if __name__ == "__main__":
    raise SystemExit(main())
