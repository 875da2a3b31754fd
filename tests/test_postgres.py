"""The client on a PostgreSQL outbox, against the devserver: delivery, restarts, several
processes as hosts of a fleet, and a database that goes away."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    API_KEY,
    child_env,
    fill_filesystem,
    numbers,
    postgres_server_url,
    tmpfs,
    wait_until,
)

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


# ---- in the caller's transaction ----


def test_an_event_tracked_in_a_rolled_back_transaction_is_never_sent(
    pg_url: str, server: DevServer
) -> None:
    import psycopg

    client = make(pg_url, server)
    try:
        with psycopg.connect(pg_url) as conn:
            conn.execute("CREATE TABLE invoices (id serial PRIMARY KEY, state text)")
            conn.commit()
            conn.execute("INSERT INTO invoices (state) VALUES ('failed')")
            client.track("user_1", "payment_failed", {"i": 0}, connection=conn)
            client.identify("user_1", traits={"i": 1}, connection=conn)
            conn.rollback()
        assert client.flush(timeout=5)
        assert client.stats().pending == 0
        assert server.requests == []
    finally:
        client.shutdown(timeout=1)


def test_an_event_tracked_in_a_transaction_is_sent_once_after_the_commit(
    pg_url: str, server: DevServer
) -> None:
    import psycopg

    client = make(pg_url, server)
    try:
        with psycopg.connect(pg_url) as conn:
            client.identify("user_1", traits={"i": 0}, connection=conn)
            client.track("user_1", "payment_failed", {"i": 1}, connection=conn)
            assert client.flush(timeout=5)  # not committed: nothing to send yet
            assert server.requests == [] and client.stats().pending == 0
            conn.commit()
        assert client.stats().pending == 2
        assert client.flush(timeout=5)
        assert [r.path.rsplit("/", 1)[1] for r in server.requests] == ["identify", "batch"]
        assert numbers(server.events) == [1] and server.duplicates == 0
    finally:
        client.shutdown(timeout=1)


def test_a_transactional_track_that_is_invalid_is_dropped_and_the_transaction_goes_on(
    pg_url: str, server: DevServer
) -> None:
    import psycopg

    errors: list[WhisperrError] = []
    client = make(pg_url, server, on_error=errors.append)
    try:
        with psycopg.connect(pg_url) as conn:
            client.track("user_1", "Not A Valid Type", connection=conn)
            client.track("user_1", "valid_type", {"i": 7}, connection=conn)
            conn.commit()
        assert [e.type for e in errors] == ["dropped"]
        assert client.flush(timeout=5)
        assert numbers(server.events) == [7]
    finally:
        client.shutdown(timeout=1)


def test_the_callers_transaction_errors_are_the_callers(pg_url: str, server: DevServer) -> None:
    import psycopg

    client = make(pg_url, server)
    try:
        with psycopg.connect(pg_url) as conn:
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1 / 0")
            # The transaction is aborted: the insert fails as any statement would.
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                client.track("user_1", "after_an_error", connection=conn)
            conn.rollback()
        with pytest.raises(TypeError, match="psycopg 3 connection"):
            client.track("user_1", "not_a_connection", connection=object())
    finally:
        client.shutdown(timeout=1)


def test_a_file_outbox_cannot_join_a_transaction(make_client: Any, pg_url: str) -> None:
    import psycopg

    client = make_client()  # a SQLite file
    with psycopg.connect(pg_url) as conn, pytest.raises(ValueError, match="PostgreSQL outbox"):
        client.track("user_1", "in_a_transaction", connection=conn)


# ---- Django: WHISPERR_DATABASE joins the project's transactions ----

DJANGO_PROJECT = """
import json
import sys
from urllib.parse import urlparse

import django
from django.conf import settings

url, base_url = urlparse(sys.argv[1]), sys.argv[2]
settings.configure(
    DATABASES={{
        "default": {{
            "ENGINE": "django.db.backends.postgresql",
            "NAME": url.path[1:],
            "USER": url.username,
            "HOST": url.hostname,
            "PORT": url.port,
        }}
    }},
    INSTALLED_APPS=[],
    ROOT_URLCONF=__name__,
    SECRET_KEY="not-a-secret",
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=["whisperr_durable.integrations.django.WhisperrMiddleware"],
    WHISPERR_API_KEY={api_key!r},
    WHISPERR_DATABASE="default",
    WHISPERR_BASE_URL=base_url,
    WHISPERR_FLUSH_AT=100_000,
    WHISPERR_FLUSH_INTERVAL=3600.0,
)
django.setup()

from django.db import transaction
from django.http import HttpResponse
from django.test import Client
from django.urls import path

from whisperr_durable.integrations.django import get_client


class RolledBack(Exception):
    pass


def view(request, i):
    try:
        with transaction.atomic():
            request.whisperr.user_id = "user_d"
            request.whisperr.track("django_event", {{"i": i}})
            if i % 2:
                raise RolledBack()
    except RolledBack:
        pass
    return HttpResponse("ok")


urlpatterns = [path("v/<int:i>", view)]

for i in range(6):
    assert Client().get(f"/v/{{i}}").status_code == 200
client = get_client()
with transaction.atomic():
    client.track("user_d", "django_event", {{"i": 100}})  # get_client()'s calls join too
try:
    with transaction.atomic():
        client.identify("user_d", traits={{"i": 101}})
        raise RolledBack()
except RolledBack:
    pass
client.track("user_d", "django_event", {{"i": 200}})  # outside atomic(): stored at once
result = client.flush(timeout=10)
print(json.dumps({{"ok": bool(result), "pending": client.stats().pending, "path": client.path}}))
"""


@pytest.mark.slow
def test_django_atomic_blocks_decide_whether_the_events_exist(
    pg_url: str, server: DevServer
) -> None:
    script = textwrap.dedent(DJANGO_PROJECT).format(api_key=API_KEY)
    done = subprocess.run(
        [sys.executable, "-c", script, pg_url, server.url],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] and result["pending"] == 0, result
    assert result["path"].startswith("postgresql://postgres@127.0.0.1:")
    # The rolled back requests' events and the rolled back identify never went.
    assert numbers(server.events) == [0, 2, 4, 100, 200]
    assert not any(r.path.endswith("/identify") for r in server.requests)
    assert server.duplicates == 0


# ---- the operators' command line, on a database ----


def run_cli(pg_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "whisperr_durable", *args],
        capture_output=True,
        text=True,
        env=pg_env,
        timeout=60,
    )


@pytest.mark.slow
def test_the_command_line_works_on_a_database_url(pg_url: str, server: DevServer) -> None:
    env = child_env(WHISPERR_API_KEY=API_KEY, WHISPERR_BASE_URL=server.url)
    client = make(pg_url, server)
    try:
        for i in range(3):
            client.track("user_1", "cli_event", {"i": i})
    finally:
        client.shutdown(timeout=0)  # left queued
    status = run_cli(env, "status", "--path", pg_url, "--json")
    assert status.returncode == 0, status.stderr
    (key,) = json.loads(status.stdout)["keys"]
    assert (key["pending_tracks"], key["pending_identifies"]) == (3, 0)
    peek = run_cli(env, "peek", "--path", pg_url, "--json")
    assert peek.returncode == 0, peek.stderr
    ops = [json.loads(line) for line in peek.stdout.splitlines()]  # one op a line
    assert [op["body"]["properties"]["i"] for op in ops] == [0, 1, 2]
    tracked = run_cli(env, "track", "--path", pg_url, "user_1", "cli_track")
    assert tracked.returncode == 0, tracked.stderr
    flushed = run_cli(env, "flush", "--path", pg_url)
    assert flushed.returncode == 0, flushed.stderr
    assert numbers(server.events[:3]) == [0, 1, 2]
    assert server.events[3]["event_type"] == "cli_track"
    compacted = run_cli(env, "compact", "--path", pg_url)
    assert compacted.returncode == 0, compacted.stderr
    letters = run_cli(env, "dead-letters", "list", "--path", pg_url)
    assert letters.returncode == 0, letters.stderr


def test_the_command_line_never_shows_a_password(pg_url: str) -> None:
    url = "postgresql://app:s3cret@127.0.0.1:1/app"
    status = run_cli(child_env(), "status", "--path", url)
    assert status.returncode != 0
    assert "s3cret" not in status.stdout + status.stderr
    assert "app:***@127.0.0.1:1/app" in status.stderr


# ---- chaos: hosts of a fleet killed at random ----

CHAOS_CHILD = """
import sys
from whisperr_durable import DurableWhisperr

url, base_url, role, name, start = sys.argv[1:6]
client = DurableWhisperr(
    {api_key!r}, path=url, base_url=base_url, flush_at=20, flush_interval=0.2,
    request_timeout=2.0, shutdown_timeout=1.0,
)
if role == "producer":
    i = int(start)
    while True:
        client.track("user_" + name, "chaos_event", {{"p": name, "i": i}})
        print(i, flush=True)  # track() returned: the op must be delivered
        i += 1
else:
    while True:
        client.flush(timeout=1.0)
"""


@pytest.mark.slow
def test_hosts_killed_at_random_lose_no_returned_op_and_keep_each_ones_order(
    pg_url: str, server: DevServer
) -> None:
    import random
    import threading
    import time

    rng = random.Random()
    script = textwrap.dedent(CHAOS_CHILD).format(api_key=API_KEY)
    returned: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    guard = threading.Lock()

    def spawn(role: str, name: str) -> subprocess.Popen[str]:
        start = str(returned[name][-1] + 1 if returned.get(name) else 0)
        child = subprocess.Popen(
            [sys.executable, "-c", script, pg_url, server.url, role, name, start],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        if role == "producer":

            def read() -> None:
                assert child.stdout is not None
                for line in child.stdout:
                    with guard:
                        returned[name].append(int(line))

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            readers.append(reader)
        return child

    readers: list[threading.Thread] = []
    procs = {("producer", n): spawn("producer", n) for n in returned}
    procs.update({("sender", n): spawn("sender", n) for n in ("s1", "s2")})
    kills = 0
    deadline = time.monotonic() + 8
    try:
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.1, 0.6))  # a random moment in the processes' work
            (role, name), victim = rng.choice(list(procs.items()))
            victim.kill()
            victim.wait(10)
            kills += 1
            if role == "producer":
                for reader in readers:
                    reader.join(0.5)
            procs[(role, name)] = spawn(role, name)
    finally:
        for child in procs.values():
            child.kill()
            child.wait(10)
    for reader in readers:
        reader.join(5)
    assert kills >= 5 and all(len(r) > 20 for r in returned.values()), (kills, returned)

    # What is left is delivered by one more process; then the audit.
    final = make(pg_url, server)
    try:
        assert final.flush(timeout=30), final.stats()
    finally:
        final.shutdown(timeout=1)
    firsts: dict[str, list[int]] = {name: [] for name in returned}
    seen: set[tuple[str, int]] = set()
    for event in server.events:
        p, i = event["properties"]["p"], event["properties"]["i"]
        if (p, i) not in seen:
            seen.add((p, i))
            firsts[p].append(i)
    for name, indexes in returned.items():
        lost = sorted(set(indexes) - set(firsts[name]))
        assert not lost, f"{name}: {len(lost)} lost, from {lost[:10]}"
        assert firsts[name] == sorted(firsts[name]), f"{name} out of order"


def test_a_postgres_url_in_the_environment_is_the_outbox(
    pg_url: str, server: DevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = "postgres://" + pg_url.split("://", 1)[1]  # the other scheme libpq takes
    monkeypatch.setenv("WHISPERR_DB_PATH", short)
    client = DurableWhisperr(API_KEY, base_url=server.url, flush_at=100_000)
    try:
        assert client.path == short
        client.track("user_1", "from_the_environment", {"i": 0})
        assert client.flush(timeout=5)
        assert numbers(server.events) == [0]
    finally:
        client.shutdown(timeout=1)


# ---- a hostile database ----


def test_a_table_locked_past_store_timeout_holds_the_ops_and_loses_none(
    pg_url: str, server: DevServer
) -> None:
    import psycopg

    errors: list[WhisperrError] = []
    client = make(pg_url, server, store_timeout=0.3, on_error=errors.append)
    try:
        client.track("user_1", "before", {"i": 0})  # the tables, made
        with psycopg.connect(pg_url) as blocker:
            blocker.execute("LOCK TABLE whisperr_durable.ops IN ACCESS EXCLUSIVE MODE")
            for i in range(1, 4):
                client.track("user_1", "while_locked", {"i": i})  # returns, never raises
            stats = client.stats()  # cannot count the rows either: says so
            assert stats.held == 3 and stats.error is not None
            blocker.rollback()  # the lock goes
        assert [e.type for e in errors] == ["store_error"]
        assert "timeout" in errors[0].message
        assert client.flush(timeout=10)
        assert sorted(numbers(server.events)) == [0, 1, 2, 3]
        assert client.stats().held == 0
    finally:
        client.shutdown(timeout=1)


@pytest.mark.slow
def test_a_sender_whose_lock_connection_is_killed_mid_drain_loses_nothing(
    pg_url: str, server: DevServer
) -> None:
    # The advisory lock lives on a connection of its own: a database that ends it (an
    # administrator, a failover) frees the lock at once; the sender takes it again.
    import psycopg

    client = make(pg_url, server, max_batch_size=20)
    try:
        for i in range(400):
            client.track("user_1", "lock_lost", {"i": i})
        server.latency = 0.05  # 20 batches: a drain of a second, holding the lock
        client.flush(timeout=0.2)
        with psycopg.connect(pg_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks "
                "WHERE locktype = 'advisory' AND pid <> pg_backend_pid()"
            ).fetchall()
        assert killed == [(True,)]  # the sender's lock, held mid-drain
        server.latency = 0.0
        assert wait_until(lambda: client.flush(timeout=5).pending == 0, timeout=30)
        assert sorted(set(numbers(server.events))) == list(range(400))
    finally:
        client.shutdown(timeout=1)


def test_a_forked_child_makes_its_own_connections_and_the_parents_go_on(
    pg_url: str, server: DevServer
) -> None:
    # Both processes track at once: a connection shared across the fork would mix their
    # statements on one socket.
    client = make(pg_url, server)
    try:
        client.track("user_1", "parent_before", {"i": -1})
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 3
            try:
                for i in range(300):
                    client.track("user_1", "in_the_child", {"i": 1000 + i})
                code = 0 if client.flush(timeout=10) and client.stats().store_errors == 0 else 4
            finally:
                os._exit(code)
        for i in range(300):
            client.track("user_1", "in_the_parent", {"i": i})
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert client.flush(timeout=10)
        assert client.stats().store_errors == 0
        expected = [-1, *range(300), *range(1000, 1300)]
        assert sorted(numbers(server.events)) == expected
    finally:
        client.shutdown(timeout=1)


@pytest.fixture
def small_space(pg_ctl: Any) -> Iterator[Path]:
    """A 512 KiB tmpfs where the tests' PostgreSQL server can keep a tablespace."""
    with tmpfs(pg_ctl.data.parent / f"small-{os.getpid()}") as mount_point:
        if pg_ctl.user:
            shutil.chown(mount_point, pg_ctl.user)
        yield mount_point


def test_a_full_disk_on_the_database_server_holds_the_ops_and_loses_none(
    pg_url: str, server: DevServer, small_space: Path
) -> None:
    # The queue table moves to a tablespace on a 512 KiB tmpfs, which then fills up: the
    # server can no longer extend the table ("could not extend file").
    import psycopg

    space = f"whisperr_small_{os.getpid()}"
    errors: list[WhisperrError] = []
    client = make(pg_url, server, on_error=errors.append)
    admin = psycopg.connect(pg_url, autocommit=True)
    try:
        client.track("user_1", "before", {"i": 0})  # the tables, made
        admin.execute(f"CREATE TABLESPACE {space} LOCATION '{small_space}'")
        admin.execute(f"ALTER TABLE whisperr_durable.ops SET TABLESPACE {space}")
        filler = fill_filesystem(small_space)
        i = 1
        while not errors and i < 5000:  # until the table's last page is full
            client.track("user_1", "disk_full", {"i": i})
            i += 1
        assert [e.type for e in errors] == ["store_error"], errors
        assert "space" in errors[0].message.lower()
        for _ in range(5):  # held while the disk stays full
            client.track("user_1", "disk_full", {"i": i})
            i += 1
        assert client.stats().held >= 5
        filler.unlink()  # space comes back
        assert client.flush(timeout=20)
        assert sorted(numbers(server.events)) == list(range(i))
        assert client.stats().held == 0
    finally:
        client.shutdown(timeout=1)
        admin.execute("ALTER TABLE whisperr_durable.ops SET TABLESPACE pg_default")
        admin.execute(f"DROP TABLESPACE IF EXISTS {space}")
        admin.close()


STALLED_LEADER = """
import sys
from whisperr_durable import DurableWhisperr

url, base_url = sys.argv[1:3]
client = DurableWhisperr(
    {api_key!r}, path=url, base_url=base_url, flush_at=100_000, flush_interval=3600.0,
    request_timeout=1.0, max_batch_size=10,
)
for i in range(200):
    client.track("user_1", "stalled", {{"i": i}})
print("tracked", flush=True)
client.flush(timeout=60)
"""


@pytest.mark.slow
def test_a_stopped_leader_does_not_stop_the_fleet(
    pg_url: str, server: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A host holding the sender lock is stopped (SIGSTOP, a frozen VM): its connection, and
    # so its advisory lock, stay. Another host finds the head of the queue unchanged for
    # longer than a lease, and delivers with the leases alone.
    import signal
    import time

    server.latency = 0.2  # the leader is mid-drain, holding the lock, when it stops
    leader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(STALLED_LEADER).format(api_key=API_KEY),
            pg_url,
            server.url,
        ],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert leader.stdout is not None and leader.stdout.readline().strip() == "tracked"
        assert wait_until(lambda: len(server.requests) >= 2)
        leader.send_signal(signal.SIGSTOP)
        server.latency = 0.0
        other = make(pg_url, server, request_timeout=1.0)
        try:
            started = time.monotonic()
            assert wait_until(lambda: other.flush(timeout=2).pending == 0, timeout=60)
            took = time.monotonic() - started
        finally:
            other.shutdown(timeout=1)
        assert sorted(set(numbers(server.events))) == list(range(200))
        assert took >= 1.0  # it waited for the stalled leader's lease, then went on
        assert "has made no progress" in caplog.text
    finally:
        leader.send_signal(signal.SIGCONT)
        leader.kill()
        leader.wait(10)


def test_a_database_url_without_psycopg_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"whisperr-durable\[postgres\]"):
        DurableWhisperr(API_KEY, path="postgresql://app@db/app")


STOPPED_IN_A_TRANSACTION = """
import os, signal, sys
from whisperr_durable._store._postgres import _KEY_LOCK, PgOutbox

store = PgOutbox(sys.argv[1], sys.argv[2], store_timeout=1.0)
with store._write() as conn:  # a claim's transaction, its key lock taken
    conn.execute(_KEY_LOCK, (sys.argv[2],))
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


@pytest.mark.slow
def test_a_host_stopped_inside_a_transaction_holds_its_locks_for_store_timeout_only(
    pg_url: str, server: DevServer
) -> None:
    # Its transaction stays open while it is stopped: the server ends its session once it
    # has been idle in a transaction for longer than that host's store_timeout.
    import signal

    from whisperr_durable._client import key_fingerprint

    stopped = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(STOPPED_IN_A_TRANSACTION),
            pg_url,
            key_fingerprint(API_KEY),
        ],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    client = make(pg_url, server)
    try:
        assert stopped.stdout is not None and stopped.stdout.readline().strip() == "locked"
        for i in range(10):
            client.track("user_1", "behind_a_stopped_host", {"i": i})
        assert client.flush(timeout=15)
        assert numbers(server.events) == list(range(10))
    finally:
        client.shutdown(timeout=1)
        stopped.send_signal(signal.SIGCONT)
        stopped.kill()
        stopped.wait(10)


def test_a_bulk_load_beyond_max_queue_size_evicts_none_of_its_own_while_delivery_keeps_up(
    pg_url: str, server: DevServer
) -> None:
    # Default max_queue_size (10,000) and a load three times that, the server up: the load
    # waits for the sender to make room instead of evicting what it just wrote.
    client = DurableWhisperr(API_KEY, path=pg_url, base_url=server.url)
    try:
        result = client.track_many(("user_1", "bulk_event", {"i": i}) for i in range(30_000))
        assert (result.stored, result.held, result.evicted) == (30_000, 0, 0)
        assert client.flush(timeout=30)
        assert sorted(numbers(server.events)) == list(range(30_000))
        assert client.stats().evicted == 0
    finally:
        client.shutdown(timeout=1)


def test_the_command_line_without_psycopg_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None\n"  # as if it were not installed
        "from whisperr_durable.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "status", "--path", "postgresql://app:s3cret@db/app"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 4, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "whisperr-durable[postgres]"' in lines[0], lines
    assert "s3cret" not in done.stderr
