"""Delivery against a hostile or broken other end, through a real devserver on 127.0.0.1.

A misrouted ``base_url`` or a gateway answering 404/405, a server refusing every request, a
full dead-letter table, refusals and evictions during a flush, eviction racing a batch in
flight, a server that trickles its answer a byte a second, an answer of 50 MiB, a process
stopped (SIGSTOP) while it holds the sender lock, and what the logs say when delivery stops
and starts again. Every outbox is a real file; every child is a real process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Callable, Optional

import pytest
from chaos import lock_holder
from conftest import (
    API_KEY,
    MakeClient,
    closed_port_url,
    leased_ids,
    numbers,
    queue_table,
    raw,
    wait_until,
)
from test_cli import assert_one_line_error, cli, fill, key_status, status_json
from test_processes import Child, FlightServer, batch_message_ids

from whisperr_durable import DurableWhisperr, FlushResult, WhisperrError, _retry
from whisperr_durable._wire import utc_now_ms
from whisperr_durable.devserver import DevServer

ROOT = Path(__file__).resolve().parent.parent
# Refused requests in a row that go out at full speed (the halving search for a bad event).
FREE_REFUSALS = 16


# ---- helpers ----


def sdk_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("whisperr_durable") and r.levelno == logging.WARNING
    ]


def leased_rows(db_path: str) -> int:
    return len(leased_ids(db_path))


def reported_counts(errors: list[WhisperrError], pattern: str) -> list[int]:
    """The number in each ``dropped`` report whose message matches ``pattern``."""
    found = (re.search(pattern, e.message) for e in errors if e.type == "dropped")
    return [int(match[1]) for match in found if match]


def in_thread(fn: Callable[[], FlushResult]) -> tuple[threading.Thread, list[FlushResult]]:
    results: list[FlushResult] = []
    thread = threading.Thread(target=lambda: results.append(fn()), daemon=True)
    thread.start()
    return thread, results


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    def set_backoff(seconds: float) -> None:
        monkeypatch.setattr(_retry, "backoff", lambda n, rand=None: seconds)

    return set_backoff


# ---- a misrouted endpoint ----


@pytest.mark.parametrize("misroute", ["wrong_base_url", "answer_404", "answer_405"])
def test_a_misrouted_endpoint_keeps_the_backlog_and_pauses_until_the_route_works(
    server: DevServer, make_client: MakeClient, misroute: str
) -> None:
    n = 40
    status = 405 if misroute == "answer_405" else 404
    if misroute == "wrong_base_url":
        base_url = server.url + "/wrong"  # the devserver answers 404 to unknown routes
    else:
        base_url = server.url
        server.answer = status  # a gateway in front of the API
    errors: list[WhisperrError] = []
    # One op more than n makes flush_at: it wakes the sender, which must stay paused.
    client = make_client(base_url=base_url, on_error=errors.append, flush_at=n + 1)
    client.track_many(("u1", "misrouted_event", {"i": i}) for i in range(n))

    started = time.monotonic()
    result = client.flush(timeout=10)
    took = time.monotonic() - started

    assert (result.pending, result.reason) == (n, "config"), (
        f"a {status} must keep every op queued and stop the flush as 'config': {result}"
    )
    assert (result.refused, result.lost) == (0, 0) and not result
    assert took < 5, f"the flush took {took:.1f}s"
    stats = client.stats()
    assert (stats.pending, stats.dead_letters, stats.refused) == (n, 0, 0), stats
    assert [(e.type, e.status) for e in errors] == [("config", status)]
    assert "base_url" in errors[0].message
    (misrouted,) = server.requests
    assert misrouted.status == status

    client.track("u1", "misrouted_event", {"i": n})  # flush_at reached: the sender wakes
    assert not server.wait_for_requests(2, timeout=1.5), (
        "the sender sent again on its own right after a 404/405 instead of pausing"
    )
    assert len(errors) == 1

    if misroute == "wrong_base_url":
        client = make_client(on_error=errors.append)  # the right base_url, the same outbox
    else:
        server.answer = None
    assert client.flush(timeout=10).ok
    assert sorted(numbers(server.events)) == list(range(n + 1))
    assert server.duplicates == 0
    delivered_ids = [e["context"]["$message_id"] for e in server.events]
    assert batch_message_ids(misrouted.body) == delivered_ids[:n]  # the same ops, resent
    assert (client.stats().pending, client.dead_letters()) == (0, [])


# ---- a server that refuses everything ----


def test_a_server_refusing_every_request_gets_at_most_one_request_per_backoff_after_16(
    server: DevServer, make_client: MakeClient, fast_backoff: Callable[[float], None]
) -> None:
    backoff = 0.3
    fast_backoff(backoff)
    server.answer = 400
    client = make_client()
    n = 400
    client.track_many(("u1", "refused_event", {"i": i}) for i in range(n))

    started = time.monotonic()
    flusher, _ = in_thread(lambda: client.flush(timeout=3))
    try:
        assert server.wait_for_requests(FREE_REFUSALS + 1, timeout=10)
        counted_at, first = time.monotonic(), len(server.requests)
        time.sleep(1.2)  # the window in which requests are counted, not a wait for work
        ended_at, later = time.monotonic(), len(server.requests)
    finally:
        flusher.join(15)

    in_window, total = later - first, ended_at - started
    assert in_window <= (ended_at - counted_at) / backoff + 2, (
        f"{in_window} requests in {ended_at - counted_at:.1f}s after {first} refusals in a row"
    )
    assert later <= FREE_REFUSALS + total / backoff + 2, f"{later} requests in {total:.1f}s"
    assert all(r.status == 400 for r in server.requests)
    # Slowed down, not stopped.
    assert server.wait_for_requests(later + 1, timeout=10)
    # What was refused (400: the server will never take it) went to the dead letters.
    stats = client.stats()
    assert stats.refused > 0 and stats.dead_letters == stats.refused
    assert stats.pending + stats.refused == n
    assert {d.status for d in client.dead_letters()} == {400}


def test_refusals_past_the_first_16_still_move_ops_to_the_dead_letters(
    server: DevServer, make_client: MakeClient, fast_backoff: Callable[[float], None]
) -> None:
    fast_backoff(0.02)
    server.answer = 400
    client = make_client()
    n = 40  # 2n - 1 = 79 refused requests isolate and refuse every op
    client.track_many(("u1", "refused_event", {"i": i}) for i in range(n))

    result = client.flush(timeout=8)

    stats = client.stats()
    sizes = [len(batch_message_ids(r.body)) for r in server.requests]
    assert (result.pending, result.refused) == (0, n), (
        f"400 means drop: every op must reach the dead letters, slowly if need be; "
        f"{result}, {stats.refused} refused in all; after {FREE_REFUSALS} refusals the "
        f"requests held {sorted(set(sizes[FREE_REFUSALS:]))} events (the whole batch again "
        f"and again, the halving search given back each time): {len(sizes)} requests"
    )
    assert stats.dead_letters == n


# ---- what is refused or lost is never silent ----


def test_dead_letters_pruned_by_max_dead_letters_are_counted_logged_and_reported(
    server: DevServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="whisperr_durable")
    server.answer = 400
    errors: list[WhisperrError] = []
    # One op per request: each refusal costs one request, no halving search.
    client = make_client(max_dead_letters=3, max_batch_size=1, on_error=errors.append)
    for i in range(10):
        client.track("u1", "refused_event", {"i": i})

    result = client.flush(timeout=10)

    full = [m for m in sdk_warnings(caplog) if "dead letters are full" in m]
    assert full, f"no WARNING says the dead letters are full: {sdk_warnings(caplog)}"
    assert sum(reported_counts(errors, r"dead letters full: removed the (\d+) oldest")) == 7, [
        e.message for e in errors
    ]
    assert sum(reported_counts(errors, r"the server refused (\d+) op")) == 10
    stats = client.stats()
    assert (stats.refused, stats.dead_letters, stats.dead_letters_pruned) == (10, 3, 7), stats
    assert [json.loads(d.body)["properties"]["i"] for d in client.dead_letters()] == [7, 8, 9]
    assert (result.pending, result.reason, result.refused) == (0, None, 10)


def test_flush_is_not_a_success_when_the_server_refused_ops(
    server: DevServer, make_client: MakeClient
) -> None:
    server.answer = 400
    client = make_client()
    client.track("u1", "refused_event", {"i": 0})
    client.track("u1", "refused_event", {"i": 1})

    result = client.flush(timeout=10)

    assert not result, f"flush() reported success though the server refused both ops: {result}"
    assert (result.pending, result.reason, result.refused, result.lost) == (0, None, 2, 0)
    assert client.stats().dead_letters == 2


def test_flush_counts_ops_evicted_while_it_ran_as_lost(
    server: DevServer, make_client: MakeClient, db_path: str
) -> None:
    server.latency = 1.5  # each batch is in flight for a while
    client = make_client(max_queue_size=5, max_batch_size=2)
    client.track_many(("u1", "early_event", {"i": i}) for i in range(5))

    flusher, results = in_thread(lambda: client.flush(timeout=20))
    try:
        # The flush took its barrier before its first batch was leased.
        assert wait_until(lambda: leased_rows(db_path) > 0, timeout=10)
        # Past max_queue_size: what is not in flight is evicted, while the flush waits.
        for i in range(5, 15):  # track(): a bulk load would wait for room instead
            client.track("u1", "late_event", {"i": i})
        assert flusher.is_alive(), "the flush ended before the evictions: nothing proven"
    finally:
        flusher.join(30)

    (result,) = results
    evicted = client.stats().evicted
    assert evicted > 0
    assert not result, f"flush() reported success though {evicted} ops were evicted: {result}"
    assert (result.pending, result.reason, result.refused, result.lost) == (0, None, 0, evicted)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """As tests/test_cli.py's ``env``: no WHISPERR_* of the caller, a base URL nothing
    answers, this checkout on PYTHONPATH."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WHISPERR_")}
    clean["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    clean["HOME"] = str(tmp_path / "home")
    clean["WHISPERR_BASE_URL"] = closed_port_url()
    return clean


def test_cli_flush_against_a_wrong_base_url_exits_9_and_keeps_the_ops(
    cli_env: dict[str, str], db_path: str, server: DevServer
) -> None:
    fill(cli_env, db_path, bulk=5)
    wrong = server.url + "/wrong"

    run = cli(cli_env, "flush", "--path", db_path, "--base-url", wrong, WHISPERR_API_KEY=API_KEY)

    assert_one_line_error(run, 9, "answered 404/405", "--base-url", "5 ops still queued")
    mine = key_status(status_json(cli_env, db_path), API_KEY)
    assert (mine["pending"], mine["dead_letters"]) == (5, 0), mine
    # (The client the CLI makes may also try once on its own before the flush: 404 too.)
    assert {r.status for r in server.requests} == {404}
    assert server.events == []
    good = cli(
        cli_env, "flush", "--path", db_path, "--base-url", server.url, WHISPERR_API_KEY=API_KEY
    )
    assert good.code == 0, good
    assert sorted(numbers(server.events)) == list(range(5))


# ---- eviction and batches in flight ----


def test_eviction_counts_only_ops_that_never_reached_the_server(
    server: DevServer, make_client: MakeClient
) -> None:
    server.latency = 0.1  # every batch is leased, in flight, for a while
    errors: list[WhisperrError] = []
    client = make_client(max_queue_size=100, max_batch_size=50, flush_at=20, on_error=errors.append)
    # Far faster than 50 ops per 0.1 s go out, until several batches were delivered.
    tracked = 0
    deadline = time.monotonic() + 20
    while len(server.requests) < 5 and time.monotonic() < deadline:
        client.track("u1", "bounded_event", {"i": tracked})
        tracked += 1
    sent_meanwhile = len(server.requests)
    server.latency = 0.0

    assert client.flush(timeout=30).ok
    stats = client.stats()
    delivered = set(numbers(server.events))
    never_delivered = tracked - len(delivered)
    assert sent_meanwhile >= 5, "too few batches were delivered while the producer tracked"
    assert stats.evicted > 0, "the producer never outran the bound: nothing proven"
    assert stats.evicted + len(delivered) + stats.pending == tracked, (
        f"evicted {stats.evicted} + delivered {len(delivered)} + pending {stats.pending} "
        f"!= tracked {tracked}: ops delivered from under a lease were also counted evicted"
    )
    assert stats.evicted == never_delivered
    assert sum(reported_counts(errors, r"evicted (\d+)")) == never_delivered


# ---- a server that never finishes its answer, or one that never ends it ----


def test_request_timeout_bounds_a_whole_request_however_the_server_trickles(
    server: DevServer, make_client: MakeClient
) -> None:
    server.trickle = 1.0  # one byte of the answer a second: no single read ever times out
    errors: list[WhisperrError] = []
    client = make_client(request_timeout=2, max_retries=0, on_error=errors.append)
    client.track("u1", "slow_answer", {"i": 0})

    started = time.monotonic()
    result = client.flush(timeout=8)
    took = time.monotonic() - started

    assert (result.pending, result.reason) == (1, "retry_exhausted"), (
        f"a request must end within request_timeout + 0.5 s: {result} after {took:.1f}s"
    )
    assert took < 5, f"the flush took {took:.1f}s"
    assert [e.type for e in errors] == ["retry_exhausted"]
    assert "no complete answer within 2s" in errors[0].message, errors[0].message
    # Nothing is lost: the server stored it before trickling its answer; sent again, it is
    # a duplicate of the same $message_id.
    server.trickle = 0.0
    assert client.flush(timeout=10).ok
    assert (numbers(server.events), server.duplicates) == ([0], 1)


def test_a_huge_answer_is_not_read(server: DevServer, make_client: MakeClient) -> None:
    padding = 50 * 1024 * 1024
    server.pad_response = padding
    client = make_client()
    client.track("u1", "huge_answer", {"i": 0})

    assert client.flush(timeout=30).ok

    assert server.wait_for_answers(1, timeout=30)
    (request,) = server.requests
    assert request.status == 202
    # 64 KiB read, then the connection closed; the kernel's buffers take a few MiB more.
    assert request.bytes_sent is not None and request.bytes_sent < padding // 3, (
        f"the client read {request.bytes_sent} bytes of a {padding}-byte answer"
    )


# ---- a stalled process holding the sender lock ----


def head_lease(db_path: str) -> Optional[tuple[str, int]]:
    rows = raw(
        db_path,
        f"SELECT l.owner, l.until_ms FROM leases AS l JOIN (SELECT id FROM {queue_table()} "
        "ORDER BY id LIMIT 1) AS h ON h.id BETWEEN l.first_id AND l.last_id",
    )
    return (rows[0][0], rows[0][1]) if rows else None


def write_lock_free(db_path: str) -> bool:
    """Whether a write transaction can begin (a process stopped inside one would hold it)."""
    with closing(sqlite3.connect(db_path, timeout=0.2)) as conn:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return False
        conn.execute("ROLLBACK")
        return True


def stop_mid_request(child: Child, server: FlightServer, db_path: str, timeout: float) -> None:
    """SIGSTOP ``child`` as it waits for the server's answer: holding the sender lock, its
    batch leased, no SQLite transaction open. Tried again at its next request if it was
    caught anywhere else (its request times out after a second)."""
    pid = child.proc.pid
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        if not server.wait_for_started(seen + 1, timeout=max(0.0, deadline - time.monotonic())):
            break
        seen = len(server.started)
        os.kill(pid, signal.SIGSTOP)
        lease = head_lease(db_path)
        if (
            lock_holder(db_path) == pid
            and lease is not None
            and lease[0].startswith(f"{pid}-")
            and lease[1] > utc_now_ms()
            and write_lock_free(db_path)
        ):
            return
        os.kill(pid, signal.SIGCONT)
    pytest.fail(f"could not stop the child mid-request; stderr:\n{child.stderr()}")


@pytest.mark.parametrize("wakes", ["on_flush_only", "every_second"])
def test_a_stopped_lock_holder_does_not_block_other_processes(
    tmp_path: Path, db_path: str, caplog: pytest.LogCaptureFixture, wakes: str
) -> None:
    caplog.set_level(logging.WARNING, logger="whisperr_durable")
    n, later = 30, 5
    request_timeout = 1.0
    lease = request_timeout + 5.0
    flush_interval = 3600.0 if wakes == "on_flush_only" else 1.0
    server = FlightServer(api_key=API_KEY)
    server.start()
    try:
        server.latency = 3.0  # answered while the child is stopped: its ack comes late
        child = Child(
            "producer",
            {
                "db": db_path,
                "url": server.url,
                "api_key": API_KEY,
                "proc": "stalled",
                "n": n,
                "flush_at": 100_000,
                "flush_interval": 3600.0,
                "request_timeout": request_timeout,
                "finish": "flush",
                "flush_timeout": 60.0,
            },
            tmp_path / "child.stderr",
        )
        client: Optional[DurableWhisperr] = None
        try:
            child.expect("ready")
            child.expect("tracked")
            stop_mid_request(child, server, db_path, timeout=20)
            server.latency = 0.0
            client = DurableWhisperr(
                API_KEY,
                path=db_path,
                base_url=server.url,
                request_timeout=request_timeout,
                flush_at=100_000,
                flush_interval=flush_interval,
            )

            started = time.monotonic()
            result = client.flush(timeout=20)
            took = time.monotonic() - started

            assert result.ok, (
                f"a flush in another process waited on a stopped lock holder for {took:.1f}s "
                f"(lease {lease:g}s): {result}"
            )
            assert took < 20
            assert lock_holder(db_path) == child.proc.pid  # it never let go: it is stopped
            assert any("no progress" in m for m in sdk_warnings(caplog)), sdk_warnings(caplog)
            assert sorted(numbers(server.events)) == list(range(n))

            # Ops queued now reuse the ids of the rows the child's late ack names.
            client.track_many(("user_late", "proc_event", {"i": i}) for i in range(later))
            assert server.wait_for_answers(len(server.started), timeout=10)
            answered = len(server.requests)
            os.kill(child.proc.pid, signal.SIGCONT)
            done = child.expect("done", timeout=30)
            assert child.wait(30) == 0
            assert done["flush"] == [0, None], done

            assert client.flush(timeout=10).ok
            # Whatever went out after the child resumed carried only the ops queued later.
            resent = [
                e["properties"]
                for r in server.requests[answered:]
                for e in json.loads(r.body)["events"]
            ]
            assert all(p.get("p") is None for p in resent), resent
            assert client.stats().pending == 0
            stalled = [e for e in server.events if e["properties"].get("p") == "stalled"]
            assert sorted(numbers(stalled)) == list(range(n))
            assert sorted(e["properties"]["i"] for e in server.events if e not in stalled) == (
                list(range(later))
            )
            # Every event the server took was stored once; the rest, by $message_id,
            # are duplicates of it.
            accepted = sum(
                len(batch_message_ids(r.body)) for r in server.requests if r.status == 202
            )
            assert accepted == n + later + server.duplicates
            assert len(server.message_ids) == n + later
        finally:
            if child.proc.poll() is None:
                os.kill(child.proc.pid, signal.SIGCONT)
            child.kill()
            if client is not None:
                client.shutdown(timeout=1.0)
    finally:
        server.stop()


# ---- the logs ----


def test_a_rejected_key_is_logged_once_when_it_begins_and_once_when_it_ends(
    server: DevServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="whisperr_durable")
    server.answer = 401
    client = make_client()
    client.track("u1", "logged_event", {"i": 0})

    first, second = client.flush(timeout=10), client.flush(timeout=10)

    assert (first.reason, second.reason) == ("auth", "auth")
    assert len(server.requests) == 2  # each flush tried again
    logged = sdk_warnings(caplog)
    assert len(logged) == 1, f"one WARNING per episode, not {logged}"
    assert "rejected the API key" in logged[0]
    assert API_KEY not in logged[0]

    caplog.clear()
    server.answer = None
    assert client.flush(timeout=10).ok
    logged = sdk_warnings(caplog)
    assert len(logged) == 1 and "delivery works again" in logged[0], logged


def test_an_unreachable_api_is_logged_once_when_it_begins_and_once_when_it_ends(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="whisperr_durable")
    url = closed_port_url()
    client = make_client(base_url=url, max_retries=0)
    client.track("u1", "logged_event", {"i": 0})

    first, second = client.flush(timeout=10), client.flush(timeout=10)

    assert (first.reason, second.reason) == ("retry_exhausted", "retry_exhausted")
    logged = sdk_warnings(caplog)
    assert len(logged) == 1, f"one WARNING per episode, not {logged}"
    assert "unreachable or failing" in logged[0]

    caplog.clear()
    port = int(url.rsplit(":", 1)[1])
    with DevServer(api_key=API_KEY, port=port) as revived:
        assert client.flush(timeout=10).ok
        assert numbers(revived.events) == [0]
    logged = sdk_warnings(caplog)
    assert len(logged) == 1 and "delivery works again" in logged[0], logged
