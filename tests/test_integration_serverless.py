"""flush_before_return() for serverless handlers, and aflush(), with a real outbox and server.

A Lambda ``context`` is replaced by a small object with ``get_remaining_time_in_millis()``:
that is test data, the shape of what the Lambda runtime passes, not a stand-in for our code.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeClient

from whisperr_durable.devserver import DevServer
from whisperr_durable.integrations.serverless import flush_before_return

# What a returning handler may take beyond its flush budget (thread wake-ups, a slow CI box).
SLACK = 1.0


class LambdaContext:
    """What the Lambda runtime passes as ``context``, for what this SDK reads of it."""

    def __init__(self, remaining_ms: float) -> None:
        self.deadline = time.monotonic() + remaining_ms / 1000.0
        self.function_name = "whisperr-test"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) * 1000))


def unused_url() -> str:
    """A local URL on which nothing listens: every request is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def users(server: DevServer) -> list[str]:
    return sorted(e["external_user_id"] for e in server.events)


# ---- sync handlers ----


def test_the_events_are_at_the_server_when_the_handler_returns(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()

    @flush_before_return(client, timeout=5.0)
    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        for user in event["users"]:
            client.track(user, "report_exported", {"format": "csv"})
        return {"statusCode": 200}

    assert handler({"users": ["u1", "u2", "u3"]}, LambdaContext(30_000)) == {"statusCode": 200}
    # No waiting: the flush finished before the handler returned.
    assert users(server) == ["u1", "u2", "u3"]
    assert server.events[0]["properties"]["format"] == "csv"
    assert client.stats().pending == 0
    assert handler.__name__ == "handler"  # functools.wraps: the runtime finds it by name


def test_server_down_the_handler_returns_in_time_and_the_next_invocation_delivers(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()

    @flush_before_return(client, timeout=0.5)
    def handler(event: dict[str, Any], context: Any) -> str:
        client.track(event["user"], "invoked")
        return "ok"

    server.stop()
    started = time.monotonic()
    assert handler({"user": "cold"}, LambdaContext(30_000)) == "ok"
    assert time.monotonic() - started < 0.5 + SLACK
    assert client.stats().pending == 1  # on disk, in /tmp on Lambda

    # A warm invocation of the same environment: same process, same client.
    server.start()  # the same port
    assert handler({"user": "warm"}, LambdaContext(30_000)) == "ok"
    assert users(server) == ["cold", "warm"]
    assert server.duplicates == 0
    assert client.stats().pending == 0


def test_a_new_client_on_the_same_file_delivers_what_a_bounded_flush_left(
    server: DevServer, make_client: MakeClient
) -> None:
    down = make_client(base_url=unused_url())

    @flush_before_return(down, timeout=0.3)
    def first(event: dict[str, Any], context: Any) -> None:
        for i in range(5):
            down.track("u_left", "step", {"i": i})

    started = time.monotonic()
    first({}, LambdaContext(30_000))
    assert time.monotonic() - started < 0.3 + SLACK
    assert down.stats().pending == 5
    down.shutdown(timeout=0.2)  # the runtime process ends; the file stays

    # The runtime process restarted in the same environment: a new client, the same file.
    up = make_client()

    @flush_before_return(up, timeout=5.0)
    def second(event: dict[str, Any], context: Any) -> None:
        up.track("u_new", "step", {"i": 5})

    second({}, LambdaContext(30_000))
    assert sorted(e["properties"]["i"] for e in server.events) == [0, 1, 2, 3, 4, 5]
    assert server.duplicates == 0
    assert up.stats().pending == 0


def test_the_flush_ends_a_safety_margin_before_the_invocation_deadline(
    make_client: MakeClient,
) -> None:
    client = make_client(base_url=unused_url())

    @flush_before_return(client, timeout=30.0, safety_margin=0.5)
    def handler(event: dict[str, Any], context: Any) -> str:
        client.track("u1", "invoked")
        return "done"

    started = time.monotonic()
    context = LambdaContext(1_200)  # 1.2 s left: the flush gets about 0.7 s of it
    assert handler({}, context) == "done"
    elapsed = time.monotonic() - started
    # The flush ran (a server that cannot answer holds it to its budget), and was capped.
    assert 0.6 <= elapsed < 0.7 + SLACK, elapsed
    assert context.get_remaining_time_in_millis() >= 300
    assert client.stats().pending == 1


def test_a_method_handler_gets_the_deadline_cap_from_its_context(
    server: DevServer, make_client: MakeClient, tmp_path: Path
) -> None:
    down = make_client(path=str(tmp_path / "down.db"), base_url=unused_url())

    class Handler:
        def __init__(self, client: Any) -> None:
            self.client = client

        @flush_before_return(down, timeout=5.0, safety_margin=0.5)
        def handle(self, event: dict[str, Any], context: Any) -> str:
            self.client.track("u1", "invoked")
            return "done"

    started = time.monotonic()
    context = LambdaContext(1_200)  # (self, event, context): the context is the third
    assert Handler(down).handle({}, context) == "done"
    elapsed = time.monotonic() - started
    assert 0.6 <= elapsed < 0.7 + SLACK, elapsed  # not the 5 s timeout
    assert down.stats().pending == 1

    # And with a server that answers, the method's events are delivered before it returns.
    up = make_client()

    class Up:
        @flush_before_return(up, timeout=5.0)
        def handle(self, event: dict[str, Any], context: Any) -> None:
            up.track(event["user"], "invoked")

    Up().handle({"user": "m1"}, LambdaContext(30_000))
    assert users(server) == ["m1"]


def test_no_time_left_means_no_flush_and_an_immediate_return(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()

    @flush_before_return(client, timeout=5.0, safety_margin=1.0)
    def handler(event: dict[str, Any], context: Any) -> None:
        client.track("u1", "invoked")

    started = time.monotonic()
    handler({}, LambdaContext(400))  # less than the margin
    assert time.monotonic() - started < SLACK
    assert client.stats().pending == 1
    assert server.events == []  # not flushed (flush_at is huge in make_client)


def test_the_context_may_be_passed_by_keyword_or_be_absent(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()

    @flush_before_return(client, timeout=5.0)
    def handler(event: dict[str, Any], context: Any = None) -> None:
        client.track(event["user"], "invoked")

    handler({"user": "kw"}, context=LambdaContext(30_000))
    handler({"user": "none"})
    assert users(server) == ["kw", "none"]


def test_a_context_that_cannot_tell_its_remaining_time_falls_back_to_the_timeout(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()

    class Broken:
        def get_remaining_time_in_millis(self) -> Any:
            return None

    @flush_before_return(client, timeout=5.0)
    def handler(event: dict[str, Any], context: Any) -> str:
        client.track("u1", "invoked")
        return "ok"

    assert handler({}, Broken()) == "ok"
    assert users(server) == ["u1"]


def test_a_handler_that_raises_still_flushes_and_its_exception_is_unchanged(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()

    class Boom(Exception):
        pass

    @flush_before_return(client, timeout=5.0)
    def handler(event: dict[str, Any], context: Any) -> None:
        client.track("u1", "before_failure")
        raise Boom("handler failed")

    with pytest.raises(Boom, match="handler failed"):
        handler({}, LambdaContext(30_000))
    assert [e["event_type"] for e in server.events] == ["before_failure"]


def test_an_undelivered_flush_is_logged_not_raised(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(base_url=unused_url())

    @flush_before_return(client, timeout=0.2)
    def handler(event: dict[str, Any], context: Any) -> int:
        client.track("u1", "invoked")
        return 7

    with caplog.at_level(logging.INFO, logger="whisperr_durable"):
        assert handler({}, LambdaContext(30_000)) == 7
    assert any("not delivered before return" in r.getMessage() for r in caplog.records)


def test_a_disabled_client_is_a_no_op(server: DevServer) -> None:
    from whisperr_durable import DurableWhisperr

    client = DurableWhisperr(disabled=True)

    @flush_before_return(client)
    def handler(event: dict[str, Any], context: Any) -> str:
        client.track("u1", "invoked")
        return "ok"

    assert handler({}, LambdaContext(30_000)) == "ok"
    assert server.requests == []


def test_negative_budgets_are_refused(make_client: MakeClient) -> None:
    client = make_client()
    with pytest.raises(ValueError):
        flush_before_return(client, timeout=-1)
    with pytest.raises(ValueError):
        flush_before_return(client, safety_margin=-0.1)


# ---- async handlers ----


def test_an_async_handler_is_flushed_before_it_returns(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()

    @flush_before_return(client, timeout=5.0)
    async def handler(event: dict[str, Any], context: Any) -> str:
        await asyncio.sleep(0)
        client.track(event["user"], "async_invoked")
        return "async ok"

    assert inspect.iscoroutinefunction(handler)
    assert asyncio.run(handler({"user": "a1"}, LambdaContext(30_000))) == "async ok"
    assert users(server) == ["a1"]
    assert client.stats().pending == 0


def test_an_async_handler_against_a_down_server_returns_in_time(
    make_client: MakeClient,
) -> None:
    client = make_client(base_url=unused_url())

    @flush_before_return(client, timeout=0.5)
    async def handler(event: dict[str, Any], context: Any) -> str:
        client.track("u1", "async_invoked")
        return "ok"

    started = time.monotonic()
    assert asyncio.run(handler({}, LambdaContext(30_000))) == "ok"
    assert time.monotonic() - started < 0.5 + SLACK
    assert client.stats().pending == 1


def test_an_async_handler_that_raises_still_flushes(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()

    @flush_before_return(client, timeout=5.0)
    async def handler(event: dict[str, Any], context: Any) -> None:
        client.track("u1", "before_failure")
        raise KeyError("missing")

    with pytest.raises(KeyError):
        asyncio.run(handler({}, LambdaContext(30_000)))
    assert [e["event_type"] for e in server.events] == ["before_failure"]


# ---- aflush() ----


def test_aflush_delivers(server: DevServer, make_client: MakeClient) -> None:
    client = make_client()
    for i in range(10):
        client.track(f"u{i}", "signup")
    result = asyncio.run(client.aflush(10))
    assert result.ok and result.pending == 0
    assert len(server.events) == 10


def test_the_event_loop_keeps_running_while_aflush_waits(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()
    client.track("u1", "slow_server")
    server.latency = 0.5  # every request takes half a second to answer

    async def main() -> tuple[bool, int, float]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        result = await client.aflush(10)
        elapsed = time.monotonic() - started
        stop.set()
        await task
        return bool(result), ticks, elapsed

    ok, ticks, elapsed = asyncio.run(main())
    assert ok
    assert elapsed >= 0.5  # the flush really waited for the slow answer
    assert ticks >= 10  # and the loop ran another task all along (about 50 ticks)
    assert [e["external_user_id"] for e in server.events] == ["u1"]


def test_aflush_with_a_timeout_against_a_down_server_reports_what_is_pending(
    make_client: MakeClient,
) -> None:
    client = make_client(base_url=unused_url())
    for i in range(3):
        client.track("u1", "e", {"i": i})
    started = time.monotonic()
    result = asyncio.run(client.aflush(0.3))
    assert time.monotonic() - started < 0.3 + SLACK
    assert not result
    assert result.pending == 3 and result.reason == "timeout"
    assert client.stats().pending == 3
