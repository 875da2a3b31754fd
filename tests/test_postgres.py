"""The client on a PostgreSQL outbox, against the devserver: delivery, restarts, several
processes as hosts of a fleet, and a database that goes away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from typing import Any

import pytest
from conftest import API_KEY, child_env, numbers, postgres_server_url, wait_until

from whisperr_durable import DurableWhisperr, WhisperrError
from whisperr_durable.devserver import DevServer


def make(pg_url: str, server: DevServer, **options: Any) -> DurableWhisperr:
    options.setdefault("flush_at", 100_000)
    options.setdefault("flush_interval", 3600.0)
    return DurableWhisperr(API_KEY, path=pg_url, base_url=server.url, **options)


def test_tracks_and_identifies_are_delivered_once_in_order(pg_url: str, server: DevServer) -> None:
    client = make(pg_url, server)
    try:
        client.identify("user_1", email="ann@example.com", traits={"i": -1})
        for i in range(1200):  # more than two batches
            client.track("user_1", "pg_event", {"i": i})
        assert client.stats().pending == 1201
        assert client.flush(timeout=20)
        assert server.requests[0].path.endswith("/identify")  # before the tracks
        assert numbers(server.events) == list(range(1200))
        assert server.duplicates == 0
        assert client.stats().pending == 0
    finally:
        client.shutdown(timeout=1)


def test_the_next_process_delivers_what_an_earlier_one_left(pg_url: str, server: DevServer) -> None:
    first = make(pg_url, server)
    for i in range(50):
        first.track("user_1", "left_behind", {"i": i})
    first.shutdown(timeout=0)  # no time to deliver: the ops stay in the database
    assert server.events == []
    second = make(pg_url, server)  # opens the same outbox, tracks nothing itself
    try:
        assert wait_until(lambda: len(server.events) == 50)
        assert numbers(server.events) == list(range(50))
    finally:
        second.shutdown(timeout=1)


def test_an_unreachable_database_never_raises_and_holds_the_ops(server: DevServer) -> None:
    postgres_server_url()  # the PostgreSQL tests' own preconditions
    errors: list[WhisperrError] = []
    url = "postgresql://postgres@127.0.0.1:1/nowhere"
    client = DurableWhisperr(
        API_KEY,
        path=url,
        base_url=server.url,
        flush_at=100_000,
        flush_interval=3600.0,
        store_timeout=0.5,
        on_error=errors.append,
    )
    try:
        for i in range(5):
            client.track("user_1", "held", {"i": i})
        stats = client.stats()
        assert stats.held == 5 and stats.error is not None
        assert "127.0.0.1" in stats.error
        assert [e.type for e in errors] == ["store_error"]
        # Delivered from memory, as the SQLite store does while its file fails.
        assert client.flush(timeout=10).pending == 0
        assert numbers(server.events) == list(range(5))
    finally:
        client.shutdown(timeout=1)


def test_a_password_never_shows_in_what_the_sdk_says(server: DevServer) -> None:
    postgres_server_url()
    errors: list[WhisperrError] = []
    client = DurableWhisperr(
        API_KEY,
        path="postgresql://app:s3cret@127.0.0.1:1/app",
        base_url=server.url,
        store_timeout=0.5,
        on_error=errors.append,
    )
    try:
        client.track("user_1", "held", {"i": 0})
        said = [e.message for e in errors] + [str(client.stats().error)]
        assert said and not any("s3cret" in text for text in said), said
    finally:
        client.shutdown(timeout=0)


# ---- a fleet: several processes share one database ----

HOST = """
import json, sys
from whisperr_durable import DurableWhisperr

url, base_url, host, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
errors = []
client = DurableWhisperr(
    {api_key!r}, path=url, base_url=base_url, flush_at=50, on_error=errors.append
)
for i in range(n):
    client.track("user_" + host, "fleet_event", {{"host": host, "i": i}})
result = client.flush(timeout=30)
print(json.dumps({{"ok": bool(result), "errors": [e.message for e in errors]}}))
"""


@pytest.mark.slow
def test_hosts_sharing_one_database_deliver_every_op_once_in_order_per_host(
    pg_url: str, server: DevServer
) -> None:
    hosts, n = 4, 300
    script = textwrap.dedent(HOST).format(api_key=API_KEY)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, pg_url, server.url, str(h), str(n)],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for h in range(hosts)
    ]
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert json.loads(out) == {"ok": True, "errors": []}, err
    events = server.events
    assert server.duplicates == 0
    assert Counter(e["properties"]["host"] for e in events) == {str(h): n for h in range(hosts)}
    for h in range(hosts):
        mine = [e["properties"]["i"] for e in events if e["properties"]["host"] == str(h)]
        assert mine == list(range(n))  # each host's ops in the order it tracked them


# ---- the database restarted mid-drain ----


@pytest.fixture
def pg_ctl() -> Any:
    """``restart()`` for the tests' PostgreSQL server, when the tests own it."""
    postgres_server_url()
    described = os.environ.get("WHISPERR_TEST_POSTGRES_CTL")
    if not described:
        pytest.skip("the tests' PostgreSQL server is not theirs to restart")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    from postgres import Server  # type: ignore[import-not-found]

    info = json.loads(described)
    from pathlib import Path

    return Server(Path(info["bin"]), Path(info["data"]), info["port"], info["user"])


@pytest.mark.slow
def test_a_database_restart_mid_drain_loses_nothing(
    pg_url: str, server: DevServer, pg_ctl: Any
) -> None:
    errors: list[WhisperrError] = []
    client = make(pg_url, server, on_error=errors.append, max_batch_size=50)
    try:
        for i in range(2000):
            client.track("user_1", "restart_event", {"i": i})
        client.flush(timeout=0.05)  # the drain begins
        pg_ctl.ctl("restart", "-m", "fast")  # every connection is cut
        for i in range(2000, 2100):  # tracked while it comes back
            client.track("user_1", "restart_event", {"i": i})
        assert wait_until(lambda: client.flush(timeout=5).pending == 0, timeout=60)
        delivered = sorted(set(numbers(server.events)))
        assert delivered == list(range(2100))  # every op; any duplicate has one message id
        stats = client.stats()
        assert (stats.pending, stats.held, stats.lost) == (0, 0, 0)
    finally:
        client.shutdown(timeout=1)
