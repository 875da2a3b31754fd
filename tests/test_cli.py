"""The command line, driven as an operator drives it: ``python -m whisperr_durable ...``.

Every command runs as a real subprocess against a real outbox file under ``tmp_path`` and,
where it delivers, the real devserver on 127.0.0.1. Ops are put in the file by the CLI
itself, or in bulk by a child process that tracks and then leaves with ``os._exit`` (so
that it never delivers anything: they stay queued, untouched, for the test).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY

from whisperr_durable._client import key_fingerprint
from whisperr_durable._store import SCHEMA_VERSION, Outbox, queue_table
from whisperr_durable._wire import utc_now_ms
from whisperr_durable.devserver import DevServer

pytestmark = pytest.mark.slow  # subprocesses: dev.py test --quick leaves them out

ROOT = Path(__file__).resolve().parent.parent
OTHER_KEY = "wrk_other_key"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


@pytest.fixture
def closed_url() -> str:
    """A URL on which nothing listens: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def env(tmp_path: Path, closed_url: str) -> dict[str, str]:
    """No WHISPERR_* from the caller's shell; HOME in tmp_path; a base URL nothing answers,
    so that no test can reach the real service."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WHISPERR_")}
    clean["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    clean["HOME"] = str(tmp_path / "home")
    clean["WHISPERR_BASE_URL"] = closed_url
    return clean


def cli(env: dict[str, str], *args: str, timeout: float = 60, **extra_env: str) -> Run:
    proc = subprocess.run(
        [sys.executable, "-m", "whisperr_durable", *args],
        capture_output=True,
        text=True,
        env={**env, **extra_env},
        timeout=timeout,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_error(run: Run, code: int, *fragments: str) -> None:
    """The failure contract: the exit code, one line on stderr, no traceback."""
    assert run.code == code, run
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("whisperr-durable: "), run.err
    assert "Traceback" not in run.err
    for fragment in fragments:
        assert fragment in lines[0], run.err


_FILL = textwrap.dedent(
    """
    import json, os, sys
    from whisperr_durable import DurableWhisperr
    from whisperr_durable._wire import utc_now_ms
    spec = json.loads(sys.argv[1])
    clients = {}
    def client(key):
        if key not in clients:
            # Never woken: the ops stay queued, untouched, when this process leaves.
            clients[key] = DurableWhisperr(
                key, path=spec["path"], base_url=spec["url"], flush_at=10**9,
                flush_interval=3600,
            )
        return clients[key]
    for key, kind, user, name in spec["ops"]:
        if spec["spaced"]:  # each op in a millisecond of its own: created_ms orders them
            tick = utc_now_ms()
            while utc_now_ms() <= tick:
                pass
        if kind == "track":
            client(key).track(user, name, {"note": "x"})
        else:
            client(key).identify(user, traits={"name": name})
    for i in range(spec.get("bulk", 0)):
        client(spec["bulk_key"]).track(f"user_{i % 10}", "bulk_event", {"i": i})
    sys.stdout.flush()
    os._exit(0)  # no exit handler: nothing is delivered
    """
)


def fill(
    env: dict[str, str],
    path: str,
    ops: Sequence[tuple[str, str, str, str]] = (),
    *,
    bulk: int = 0,
    bulk_key: str = API_KEY,
    spaced: bool = False,
) -> None:
    """Queue ``(key, "track"|"identify", user, event_or_name)`` ops, and ``bulk`` tracks.

    ``spaced``: no two of ``ops`` are created in the same millisecond.
    """
    spec = {
        "spaced": spaced,
        "path": path,
        "url": env["WHISPERR_BASE_URL"],
        "ops": [list(op) for op in ops],
        "bulk": bulk,
        "bulk_key": bulk_key,
    }
    subprocess.run([sys.executable, "-c", _FILL, json.dumps(spec)], env=env, check=True, timeout=60)


def status_json(env: dict[str, str], path: str, *args: str) -> dict[str, Any]:
    run = cli(env, "status", "--path", path, "--json", *args)
    assert run.code == 0, run
    data: dict[str, Any] = json.loads(run.out)
    return data


def key_status(data: dict[str, Any], api_key: str) -> dict[str, Any]:
    fp = key_fingerprint(api_key)
    found: list[dict[str, Any]] = [k for k in data["keys"] if k["key_fingerprint"] == fp]
    assert len(found) == 1, data
    return found[0]


# ---- help ----


def test_help_documents_commands_and_exit_codes(env: dict[str, str]) -> None:
    run = cli(env, "--help")
    assert run.code == 0
    for command in ("status", "flush", "track", "identify", "peek", "dead-letters", "demo"):
        assert command in run.out
    assert "dev-server" in run.out
    codes = run.out[run.out.index("exit codes:") :]
    for code in range(8):
        assert re.search(rf"^\s+{code}\s+\S", codes, re.MULTILINE), code
    assert "WHISPERR_API_KEY" in run.out and "WHISPERR_DB_PATH" in run.out

    peek = cli(env, "peek", "--help")
    assert peek.code == 0
    assert "user data" in peek.out
    assert "exit codes:" in peek.out


def listed_exit_codes(help_text: str) -> list[int]:
    codes = help_text[help_text.index("exit codes:") :]
    return [int(code) for code in re.findall(r"^  (\d)  ", codes, re.MULTILINE)]


@pytest.mark.parametrize(
    ("command", "codes"),
    [
        (["status"], [0, 1, 2, 3, 4]),
        (["flush"], list(range(10))),
        (["track"], [0, 1, 2, 4]),  # creates the file: never "no outbox"
        (["identify"], [0, 1, 2, 4]),
        (["peek"], [0, 1, 2, 3, 4]),
        (["dead-letters", "requeue"], [0, 1, 2, 3, 4]),
    ],
)
def test_each_command_lists_only_the_exit_codes_it_can_return(
    env: dict[str, str], command: list[str], codes: list[int]
) -> None:
    run = cli(env, *command, "--help")
    assert run.code == 0
    assert listed_exit_codes(run.out) == codes


def test_every_option_says_what_it_does_and_its_default() -> None:
    from whisperr_durable import cli as cli_module
    from whisperr_durable import devserver

    def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from options(sub)
            elif action.option_strings and action.dest not in ("help", "version"):
                yield action

    parsers = [cli_module.build_parser(), devserver.build_parser()]
    for action in (a for p in parsers for a in options(p)):
        assert action.help, action.option_strings
        flag = action.nargs == 0  # --json, --quiet...: on or off
        assert flag or "default" in action.help, (action.option_strings, action.help)


def test_help_texts_fit_a_terminal_and_name_the_command_as_called(env: dict[str, str]) -> None:
    for command in (["--help"], ["dev-server", "--help"], ["demo", "--help"], ["flush", "--help"]):
        run = cli(env, *command)
        assert run.code == 0, run
        assert "``" not in run.out  # no reStructuredText markup
        assert max(len(line) for line in run.out.splitlines()) <= 100
    dev = cli(env, "dev-server", "--help")
    assert dev.out.startswith("usage: whisperr-durable dev-server ")


@pytest.mark.parametrize("width", [200, 100, 80, 60, 40, 24, 10])
def test_the_progress_bar_fits_the_terminal(width: int) -> None:
    from whisperr_durable.cli import Progress

    bar = Progress(1_234_567, io.StringIO())
    for remaining, elapsed in ((1_234_567, 0.0), (600_000, 10.0), (0, 20.0)):
        line = bar.line(remaining, elapsed, width)
        assert len(line) < width, line  # a line that wraps stacks up one per redraw
        if width >= 40:  # the count first; a bar where it fits beside it
            assert f"{1_234_567 - remaining:,}/1,234,567 delivered" in line
        if width >= 60:
            assert line.startswith("[")


# ---- track and identify ----


def test_track_and_identify_need_no_server(env: dict[str, str], db_path: str) -> None:
    env = {**env, "WHISPERR_API_KEY": API_KEY}
    track = cli(
        env,
        "--path",
        db_path,
        "track",
        "user_1",
        "payment_failed",
        "--props-json",
        '{"amount_cents": 4900, "vip": true, "plan": "free"}',
        "--prop",
        "plan=pro",
        "--prop",
        "count=3",
        "--prop",
        "eq=a=b",
    )
    assert (track.code, track.out, track.err) == (0, "", "")
    identify = cli(
        env,
        "identify",
        "user_1",
        "--path",
        db_path,
        "--email",
        "ada@example.com",
        "--phone",
        "+15550100",
        "--trait",
        "first_name=Ada",
        "--traits-json",
        '{"seats": 3}',
        "--preferred-channel",
        "email",
    )
    assert (identify.code, identify.out, identify.err) == (0, "", "")
    assert os.stat(db_path).st_mode & 0o777 == 0o600

    ops = cli(env, "peek", "--path", db_path, "--json").json_lines()
    assert [op["kind"] for op in ops] == ["track", "identify"]
    assert ops[0]["id"] < ops[1]["id"]
    event = ops[0]["body"]
    assert event["external_user_id"] == "user_1"
    assert event["event_type"] == "payment_failed"
    # --props-json keeps its JSON types; --prop values are strings, applied on top.
    assert event["properties"] == {
        "amount_cents": 4900,
        "vip": True,
        "plan": "pro",
        "count": "3",
        "eq": "a=b",
    }
    assert re.fullmatch(r"[0-9a-f]{32}", event["context"]["$message_id"])
    assert ops[1]["body"] == {
        "external_user_id": "user_1",
        "traits": {"seats": 3, "first_name": "Ada"},
        "preferred_channel": "email",
        "channels": [
            {"channel": "email", "address": "ada@example.com", "opted_in": True},
            {"channel": "sms", "address": "+15550100", "opted_in": True},
        ],
    }
    status = status_json(env, db_path)
    mine = key_status(status, API_KEY)
    assert (mine["pending_tracks"], mine["pending_identifies"], mine["pending"]) == (1, 1, 2)
    human = cli(env, "status", "--path", db_path)
    for run in (track, identify, human):
        assert API_KEY not in run.out + run.err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["track", "user_1", "Payment Failed"], "invalid event_type"),
        (["track", "user_1", "ok_event", "--prop", "novalue"], "--prop expects KEY=VALUE"),
        (["track", "user_1", "ok_event", "--props-json", "[1, 2]"], "must be a JSON object"),
        (["track", "user_1", "ok_event", "--props-json", "{oops"], "not valid JSON"),
        (["identify", "user_1", "--trait", "=x"], "--trait expects KEY=VALUE"),
        (["track", " ", "ok_event"], "external_user_id"),
    ],
)
def test_enqueue_rejects_invalid_input(
    env: dict[str, str], db_path: str, args: list[str], fragment: str
) -> None:
    run = cli(env, *args, "--path", db_path, WHISPERR_API_KEY=API_KEY)
    assert_one_line_error(run, 2, fragment)
    if os.path.exists(db_path):  # the client's shutdown may have made an empty outbox
        assert cli(env, "peek", "--path", db_path, "--json").out == ""  # nothing queued


def test_enqueue_needs_a_key(env: dict[str, str], db_path: str) -> None:
    run = cli(env, "track", "user_1", "ok_event", "--path", db_path)
    assert_one_line_error(run, 2, "WHISPERR_API_KEY", "--api-key")
    assert not os.path.exists(db_path)


def test_default_path_comes_from_the_environment(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "from-env.db"
    run = cli(env, "track", "u", "e", WHISPERR_DB_PATH=str(path), WHISPERR_API_KEY=API_KEY)
    assert run.code == 0, run
    assert path.exists()
    # Without either, ~/.whisperr.db (HOME is under tmp_path here).
    run = cli(env, "track", "u", "e", WHISPERR_API_KEY=API_KEY)
    assert run.code == 0, run
    assert (tmp_path / "home" / ".whisperr.db").exists()


# ---- status ----


def test_status_shows_pending_dead_letters_and_a_leased_batch(
    env: dict[str, str], db_path: str, server: DevServer
) -> None:
    # OTHER_KEY: one op refused by the server (a dead letter, and a recorded sender).
    fill(env, db_path, [(OTHER_KEY, "track", "user_9", "refused_event")])
    server.api_key = None  # accept any key
    server.push_script(400)
    flushed = cli(
        env, "flush", "--path", db_path, "--base-url", server.url, WHISPERR_API_KEY=OTHER_KEY
    )
    assert flushed.code == 8, flushed  # delivered what it could; the server refused one
    assert "refused 1 op" in flushed.out
    # API_KEY: three pending tracks and an identify; the first two leased by this process.
    fill(
        env,
        db_path,
        [(API_KEY, "track", f"user_{i}", "signup") for i in range(3)]
        + [(API_KEY, "identify", "user_1", "Ada")],
    )
    outbox = Outbox(db_path, key_fingerprint(API_KEY))
    try:
        now = utc_now_ms()
        claim = outbox.claim(
            f"{os.getpid()}-cli-test",
            max_rows=2,
            max_bytes=1 << 20,
            lease_ms=120_000,
            max_age_ms=10**12,
            now_ms=now,
        )
    finally:
        outbox.close()
    assert claim.run is not None and claim.run.ops == 2

    data = status_json(env, db_path)
    assert data["path"] == db_path
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["file_bytes"] >= os.path.getsize(db_path) > 0
    mine = key_status(data, API_KEY)
    assert (mine["pending_tracks"], mine["pending_identifies"], mine["pending"]) == (3, 1, 4)
    assert mine["leased"] == 2
    assert mine["lease_owner_pid"] == os.getpid()
    assert now < mine["lease_until_ms"] <= now + 120_000
    assert mine["dead_letters"] == 0
    assert mine["oldest_created_ms"] <= now
    other = key_status(data, OTHER_KEY)
    assert (other["pending"], other["dead_letters"], other["leased"]) == (0, 1, 0)
    assert other["last_error"] == "HTTP 400"
    assert other["sender_pid"] is not None and other["sender_active"] is False

    run = cli(env, "status", "--path", db_path)
    assert run.code == 0, run
    text = run.out
    assert f"key {key_fingerprint(API_KEY)}" in text
    assert "4 (3 tracks, 1 identify), oldest " in text
    assert f"2 leased by pid {os.getpid()}, lease ends in " in text
    assert re.search(r"dead letters\s+1$", text, re.MULTILINE)
    assert re.search(r"last error\s+HTTP 400 \(\d+s ago\)$", text, re.MULTILINE)
    # Aligned: within a key's block, every value starts in the same column.
    block = text.split(f"key {key_fingerprint(API_KEY)}\n")[1].split("\n\n")[0]
    starts = {len(m.group(1)) for m in re.finditer(r"^(  \S+(?: \S+)*\s+)", block, re.M)}
    assert len(starts) == 1, block
    # OTHER_KEY's sender was the flush above, which has exited.
    assert re.search(r"sender\s+idle; last cycle by pid \d+ \(not running\)$", text, re.M)
    assert API_KEY not in text and OTHER_KEY not in text

    only = status_json(env, db_path, "--api-key", OTHER_KEY)
    assert [k["key_fingerprint"] for k in only["keys"]] == [key_fingerprint(OTHER_KEY)]


def test_status_and_peek_while_another_process_writes(env: dict[str, str], db_path: str) -> None:
    writer_code = textwrap.dedent(
        """
        import os, sys, threading
        from whisperr_durable import DurableWhisperr
        # A bound it never reaches: every op it tracks stays queued.
        client = DurableWhisperr(sys.argv[2], path=sys.argv[1], base_url=sys.argv[3],
                                 flush_at=10**9, flush_interval=3600, max_queue_size=10**9)
        stop = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        n = 0
        while not stop.is_set():
            client.track(f"user_{n % 7}", "busy_event", {"n": n})
            n += 1
            if n == 200:
                print("ready", flush=True)
        print(n, flush=True)
        os._exit(0)
        """
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", writer_code, db_path, API_KEY, env["WHISPERR_BASE_URL"]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert writer.stdin is not None and writer.stdout is not None
    try:
        assert writer.stdout.readline().strip() == "ready"
        first = key_status(status_json(env, db_path), API_KEY)["pending"]
        peek = cli(env, "peek", "--path", db_path, "--json", "-n", "3")
        assert peek.code == 0, peek
        assert [op["body"]["properties"]["n"] for op in peek.json_lines()] == [0, 1, 2]
        human = cli(env, "status", "--path", db_path)
        assert human.code == 0, human
        second = key_status(status_json(env, db_path), API_KEY)["pending"]
        assert 200 <= first <= second
    finally:
        writer.stdin.close()
        tracked = int(writer.stdout.readline())
        assert writer.wait(timeout=30) == 0
    # Every op the writer tracked, and no more, is on disk.
    final = key_status(status_json(env, db_path), API_KEY)
    assert final["pending"] == tracked >= second, final
    assert final["evicted"] == 0


# ---- peek ----


def test_peek_shows_delivery_order(env: dict[str, str], db_path: str) -> None:
    fill(
        env,
        db_path,
        [
            (API_KEY, "track", "user_a", "first_event"),
            (OTHER_KEY, "track", "user_b", "second_event"),
            (API_KEY, "identify", "user_a", "Ada"),
            (OTHER_KEY, "track", "user_b", "fourth_event"),
            (API_KEY, "track", "user_a", "fifth_event"),
        ],
        spaced=True,
    )
    ops = cli(env, "peek", "--path", db_path, "--json").json_lines()
    # Each key's ops in its own delivery (id) order; ids are per key, so across keys the
    # oldest comes first.
    for fp in (key_fingerprint(API_KEY), key_fingerprint(OTHER_KEY)):
        ids = [op["id"] for op in ops if op["key_fingerprint"] == fp]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [op["created_ms"] for op in ops] == sorted(op["created_ms"] for op in ops)
    names = [op["body"].get("event_type", "identify") for op in ops]
    assert names == ["first_event", "second_event", "identify", "fourth_event", "fifth_event"]
    assert {op["key_fingerprint"] for op in ops} == {
        key_fingerprint(API_KEY),
        key_fingerprint(OTHER_KEY),
    }
    assert set(ops[0]) == {"id", "key_fingerprint", "kind", "created_ms", "attempts", "body"}

    two = cli(env, "peek", "--path", db_path, "--json", "-n", "2").json_lines()
    assert two == ops[:2]
    mine = cli(env, "peek", "--path", db_path, "--json", "--api-key", API_KEY).json_lines()
    assert [op["body"].get("event_type", "identify") for op in mine] == [
        "first_event",
        "identify",
        "fifth_event",
    ]

    human = cli(env, "peek", "--path", db_path, "-n", "3")
    assert human.code == 0, human
    lines = human.out.splitlines()
    assert lines[0].split() == ["ID", "KEY", "KIND", "CREATED", "ATTEMPTS", "BODY"]
    assert len(lines) == 4
    assert '"event_type":"first_event"' in lines[1]
    assert lines[1].index("track") == lines[0].index("KIND")  # aligned columns
    assert API_KEY not in human.out + human.err


# ---- flush ----


def test_flush_drains_and_leaves_other_keys_alone(
    env: dict[str, str], db_path: str, server: DevServer
) -> None:
    fill(env, db_path, [(OTHER_KEY, "track", "user_x", "not_mine")], bulk=120)
    run = cli(env, "flush", "--path", db_path, "--base-url", server.url, WHISPERR_API_KEY=API_KEY)
    assert run.code == 0, run
    assert run.out.startswith("delivered 120 ops in ")
    assert run.err == ""
    assert sorted(e["properties"]["i"] for e in server.events) == list(range(120))
    left = cli(env, "peek", "--path", db_path, "--json").json_lines()
    assert [op["body"]["event_type"] for op in left] == ["not_mine"]

    again = cli(env, "flush", "--path", db_path, "--base-url", server.url, WHISPERR_API_KEY=API_KEY)
    assert again.code == 0, again
    assert "nothing to deliver for this key (1 op of other keys left alone)" in again.out


def test_flush_with_a_rejected_key_exits_5(
    env: dict[str, str], db_path: str, server: DevServer
) -> None:
    fill(env, db_path, [(OTHER_KEY, "track", "u", "e"), (OTHER_KEY, "track", "u", "f")])
    run = cli(env, "flush", "--path", db_path, "--base-url", server.url, "--api-key", OTHER_KEY)
    assert_one_line_error(run, 5, "rejected the API key", "HTTP 401", "2 ops still queued")
    assert OTHER_KEY not in run.out + run.err
    assert key_status(status_json(env, db_path), OTHER_KEY)["pending"] == 2
    assert server.events == []


def test_flush_against_a_closed_port(env: dict[str, str], db_path: str, closed_url: str) -> None:
    fill(env, db_path, [(API_KEY, "track", "u", "e")])
    unreachable = cli(
        env,
        "flush",
        "--path",
        db_path,
        "--base-url",
        closed_url,
        "--max-retries",
        "0",
        "--timeout",
        "20",
        WHISPERR_API_KEY=API_KEY,
    )
    assert_one_line_error(unreachable, 6, "unreachable", closed_url, "1 op still queued")
    # Retries (2 s away) outlast a short timeout: the reason is the timeout, with the error.
    timed_out = cli(
        env,
        "flush",
        "--path",
        db_path,
        "--base-url",
        closed_url,
        "--timeout",
        "0.5",
        WHISPERR_API_KEY=API_KEY,
    )
    assert_one_line_error(timed_out, 7, "timed out after 0.5s", "1 op still queued")
    assert "last error: ConnectError" in timed_out.err
    assert key_status(status_json(env, db_path), API_KEY)["pending"] == 1


def test_flush_shows_progress_on_a_terminal(
    env: dict[str, str], db_path: str, server: DevServer
) -> None:
    pty = pytest.importorskip("pty")
    fill(env, db_path, bulk=2000)
    server.latency = 0.3  # four batches of 500: a flush of over a second
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "whisperr_durable", "flush", "--path", db_path],
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
            env={**env, "WHISPERR_API_KEY": API_KEY, "WHISPERR_BASE_URL": server.url},
        )
        os.close(slave)
        slave = -1
        out, _ = proc.communicate(timeout=60)
        terminal = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, (out, terminal)
    assert out.startswith("delivered 2,000 ops in ")
    drawn = terminal.decode()
    assert re.search(
        r"\[[#-]{8,24}\] [\d,]+/2,000 delivered, [\d,]+ events/s, [\d,]+ remaining", drawn
    )
    assert drawn.endswith("\r\x1b[K")  # the bar is cleared before the result is printed
    assert len(server.events) == 2000


# ---- dead letters ----


def test_dead_letters_list_requeue_and_purge(
    env: dict[str, str], db_path: str, server: DevServer
) -> None:
    env = {**env, "WHISPERR_BASE_URL": server.url}
    fill(env, db_path, [(API_KEY, "track", "user_1", "alpha"), (API_KEY, "track", "u2", "beta")])
    server.push_script(400, 400, 400)  # the batch, then each half alone
    run = cli(env, "flush", "--path", db_path, WHISPERR_API_KEY=API_KEY)
    assert run.code == 8, run
    assert "refused 2 ops" in run.out and "dead-letters list" in run.out

    letters = cli(env, "dead-letters", "list", "--path", db_path, "--json").json_lines()
    assert [d["body"]["event_type"] for d in letters] == ["alpha", "beta"]
    assert {d["status"] for d in letters} == {400}
    assert {d["key_fingerprint"] for d in letters} == {key_fingerprint(API_KEY)}
    human = cli(env, "dead-letters", "--path", db_path, "list")
    lines = human.out.splitlines()
    assert lines[0].split() == ["ID", "KIND", "FAILED", "STATUS", "ATTEMPTS", "WHAT", "REASON"]
    assert "alpha user_1" in lines[1] and "400" in lines[1] and "HTTP 400" in lines[1]

    no_key = cli(env, "dead-letters", "requeue", "--all", "--path", db_path)
    assert_one_line_error(no_key, 2, "needs the API key")
    neither = cli(env, "dead-letters", "purge", "--path", db_path)
    assert_one_line_error(neither, 2, "--all")

    alpha = letters[0]
    requeue = cli(
        env,
        "dead-letters",
        "requeue",
        str(alpha["id"]),
        "--path",
        db_path,
        WHISPERR_API_KEY=API_KEY,
    )
    assert requeue.code == 0, requeue
    assert requeue.out.startswith("requeued 1 dead letter;")
    flushed = cli(env, "flush", "--path", db_path, WHISPERR_API_KEY=API_KEY)
    assert flushed.code == 0, flushed
    assert flushed.out.startswith("delivered 1 op in ")
    (delivered,) = server.events
    assert delivered["context"]["$message_id"] == alpha["body"]["context"]["$message_id"]
    assert delivered["occurred_at"] == alpha["body"]["occurred_at"]

    missing = cli(env, "dead-letters", "purge", "999999", "--path", db_path)
    assert missing.code == 1
    assert "purged 0 dead letters" in missing.out
    assert_one_line_error(missing, 1, "1 id of 1 not found")
    purge = cli(env, "dead-letters", "purge", "--all", "--api-key", API_KEY, "--path", db_path)
    assert purge.code == 0, purge
    assert purge.out.strip() == "purged 1 dead letter"
    assert cli(env, "dead-letters", "list", "--path", db_path, "--json").out == ""
    assert cli(env, "dead-letters", "list", "--path", db_path).out.strip() == "no dead letters"


# ---- dev-server and demo ----


def test_dev_server_prints_its_url_and_what_it_receives(env: dict[str, str], db_path: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "whisperr_durable", "dev-server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    try:
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url
        enqueue = cli(env, "track", "u", "cli_event", "--path", db_path, "--api-key", "wrk_dev")
        assert enqueue.code == 0, enqueue
        run = cli(env, "flush", "--path", db_path, "--base-url", url, WHISPERR_API_KEY="wrk_dev")
        assert run.code == 0, run
        assert "POST /v1/events/batch 202 accepted=1 rejected=0" in proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0


def test_demo_runs_the_operator_commands(env: dict[str, str]) -> None:
    run = cli(env, "demo", "--events", "400", "--failure-rate", "0", timeout=120)
    assert run.code == 0, run
    assert "$ whisperr-durable status --path " in run.out
    assert re.search(r"^   \| outbox\s+\S+outbox\.db$", run.out, re.MULTILINE)
    assert "$ WHISPERR_API_KEY=wrk_demo whisperr-durable flush --path " in run.out
    assert re.search(r"^   \| (delivered|nothing to deliver)", run.out, re.MULTILINE)
    assert re.search(r"^   lost\s+0$", run.out, re.MULTILINE)
    assert re.search(r"^   delivered \(unique\)\s+400$", run.out, re.MULTILINE)


# ---- failure modes ----


@pytest.fixture
def garbage(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database\n" * 200)
    yield path
    # Never moved aside, never repaired, never touched.
    assert path.read_bytes() == b"this is not a database\n" * 200
    assert [p.name for p in tmp_path.iterdir() if "corrupt" in p.name] == []


def test_missing_file(env: dict[str, str], tmp_path: Path) -> None:
    path = str(tmp_path / "nothing.db")
    for args in (["status"], ["peek"], ["dead-letters", "list"]):
        assert_one_line_error(cli(env, *args, "--path", path), 3, f"no outbox at {path}")
    flush = cli(env, "flush", "--path", path, WHISPERR_API_KEY=API_KEY)
    assert_one_line_error(flush, 3, "no outbox")
    assert not os.path.exists(path)  # flush does not make one


def test_bad_paths(env: dict[str, str], tmp_path: Path) -> None:
    assert_one_line_error(cli(env, "status", "--path", str(tmp_path)), 4, "is a directory")
    track = cli(env, "track", "u", "e", "--path", str(tmp_path), WHISPERR_API_KEY=API_KEY)
    assert_one_line_error(track, 4, "is a directory")
    regular = tmp_path / "regular"
    regular.write_text("x")
    under = str(regular / "outbox.db")
    assert_one_line_error(cli(env, "status", "--path", under), 3, "not a directory")
    track = cli(env, "track", "u", "e", "--path", under, WHISPERR_API_KEY=API_KEY)
    assert_one_line_error(track, 4, "not stored")


def test_garbage_file(env: dict[str, str], garbage: Path) -> None:
    for args in (
        ["status"],
        ["peek", "--json"],
        ["dead-letters", "purge", "--all", "--api-key", API_KEY],
    ):
        run = cli(env, *args, "--path", str(garbage))
        assert_one_line_error(run, 4, "not a usable outbox")
    # A client would move a corrupt file aside and start afresh; the CLI never does.
    for args in (["flush"], ["track", "u", "e"]):
        run = cli(env, *args, "--path", str(garbage), WHISPERR_API_KEY=API_KEY)
        assert_one_line_error(run, 4, "not a usable outbox")


def test_debug_shows_the_traceback(env: dict[str, str], garbage: Path) -> None:
    run = cli(env, "--debug", "status", "--path", str(garbage))
    assert run.code == 4
    assert "Traceback (most recent call last)" in run.err
    assert run.err.rstrip().splitlines()[-1].startswith("whisperr-durable: ")


def test_a_database_that_is_not_an_outbox_is_left_alone(
    env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    conn.close()
    before = path.read_bytes()
    assert_one_line_error(cli(env, "status", "--path", str(path)), 4, "not a whisperr_durable")
    track = cli(env, "track", "u", "e", "--path", str(path), WHISPERR_API_KEY=API_KEY)
    assert_one_line_error(track, 4)
    assert path.read_bytes() == before


def test_a_newer_schema_is_refused(env: dict[str, str], db_path: str) -> None:
    fill(env, db_path, [(API_KEY, "track", "u", "e")])
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        conn.execute(
            "UPDATE meta SET value = ? WHERE name = 'min_reader_version'", (SCHEMA_VERSION + 1,)
        )
    conn.close()
    run = cli(env, "status", "--path", db_path)
    assert_one_line_error(run, 4, f"schema version {SCHEMA_VERSION + 1}")


def test_an_outbox_of_an_older_schema_is_refused_and_left_untouched(
    env: dict[str, str], db_path: str
) -> None:
    # Schemas 1 and 2 were never released; a file that claims one is not ours to read.
    fill(env, db_path, [(API_KEY, "track", "u", "e")])
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA user_version=1")
    conn.close()
    before = Path(db_path).read_bytes()
    run = cli(env, "status", "--path", db_path, "--json")
    assert_one_line_error(run, 4, "schema version 1, never released")
    assert Path(db_path).read_bytes() == before


def test_a_locked_file(env: dict[str, str], db_path: str) -> None:
    fill(env, db_path, [(API_KEY, "track", "u", "e")])
    locker_code = textwrap.dedent(
        """
        import sqlite3, sys
        conn = sqlite3.connect(sys.argv[1], isolation_level=None)
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        sys.stdin.read()
        """
    )
    locker = subprocess.Popen(
        [sys.executable, "-c", locker_code, db_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert locker.stdin is not None and locker.stdout is not None
    try:
        assert locker.stdout.readline().strip() == "locked"
        run = cli(env, "status", "--path", db_path)  # waits out the store timeout (5 s)
    finally:
        locker.stdin.close()
        locker.wait(timeout=10)
    assert_one_line_error(run, 4, "locked by another process")
    assert key_status(status_json(env, db_path), API_KEY)["pending"] == 1


def test_usage_errors_exit_2(env: dict[str, str], db_path: str) -> None:
    for args in (["status", "--bogus"], ["no-such-command"], ["peek", "-n", "zero"]):
        run = cli(env, *args, "--path", db_path)
        assert run.code == 2, run
        assert "usage:" in run.err and "Traceback" not in run.err


def test_bad_values_that_argparse_takes_still_exit_2(env: dict[str, str], db_path: str) -> None:
    fill(env, db_path, bulk=1)
    for args in (
        ["flush", "--timeout", "inf", "--api-key", API_KEY],
        ["flush", "--timeout", "nan", "--api-key", API_KEY],
        ["dead-letters", "purge", "--all"],  # never every key's by accident
    ):
        run = cli(env, *args, "--path", db_path)
        assert run.code == 2, run
        assert "Traceback" not in run.err and len(run.err.strip().splitlines()) == 1, run


def test_broken_pipe_is_not_an_error(env: dict[str, str], db_path: str) -> None:
    fill(env, db_path, bulk=3000)
    reader = subprocess.Popen(
        ["head", "-n", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert reader.stdin is not None
    proc = subprocess.run(
        [sys.executable, "-m", "whisperr_durable", "peek", "--json", "-n", "3000"],
        stdout=reader.stdin,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "WHISPERR_DB_PATH": db_path},
        timeout=60,
    )
    reader.stdin.close()
    assert reader.stdout is not None
    first = reader.stdout.read()
    assert reader.wait(timeout=10) == 0
    assert json.loads(first)["body"]["properties"]["i"] == 0
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_a_base_url_that_is_no_url_is_a_usage_error_at_once(
    env: dict[str, str], db_path: str
) -> None:
    fill(env, db_path, [(API_KEY, "track", "user_1", "signup")])
    started = time.monotonic()
    run = cli(env, "flush", "--path", db_path, "--base-url", "not-a-url", WHISPERR_API_KEY=API_KEY)
    assert_one_line_error(run, 2, "base_url 'not-a-url'", "http or https")
    assert time.monotonic() - started < 10  # not a retry loop against a URL that cannot work
    assert key_status(status_json(env, db_path), API_KEY)["pending"] == 1  # still queued


def test_compact_gives_the_space_back_and_status_shows_what_is_reclaimable(
    env: dict[str, str], db_path: str
) -> None:
    fill(env, db_path, bulk=5000)
    with sqlite3.connect(db_path, isolation_level=None) as conn:  # delivered, elsewhere
        conn.execute(f"DELETE FROM {queue_table(key_fingerprint(API_KEY))}")
    status = cli(env, "status", "--path", db_path)
    assert status.code == 0 and "reclaimable" in status.out
    assert status_json(env, db_path)["reclaimable_bytes"] > 500_000
    run = cli(env, "compact", "--path", db_path)
    assert run.code == 0, run
    assert run.out.startswith(f"compacted {db_path}: ")
    assert status_json(env, db_path)["reclaimable_bytes"] == 0
    missing = cli(env, "compact", "--path", db_path + ".nope")
    assert_one_line_error(missing, 3, "no outbox")
