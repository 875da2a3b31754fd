"""The chaos loop: processes SIGKILLed at random moments never lose an op whose track() returned.

Shared by ``tests/test_chaos.py`` (a short run in the default suite) and ``scripts/soak.py``
(the same loop for as long as you like). Not collected by pytest: its name does not start
with ``test_``.

One :class:`DevServer` runs in this (the parent) process, answering a share of requests with
503 and every request after a small latency, so that deliveries are in flight when kills
land. One outbox file lives in a temporary directory. Each round starts child processes
(``sys.executable -c``, running :func:`child_main` from this file) in two roles:

- producers: a ``DurableWhisperr`` on the file with a small ``flush_at``/``flush_interval``
  (so their own senders are busy too) that tracks events with the unique properties
  ``{"p": <producer name>, "i": i}`` and, after each ``track()`` returns, writes ``T i`` to
  its stdout pipe in one ``write()``. The parent counts an op as returned only once it has
  read that line. Every few ops a producer also calls ``flush()``; once it has tracked its
  quota it only flushes, like a sender;
- senders: a client that only calls ``flush()`` in a loop, announcing each call (``F+``)
  and its end (``F-``).

Once a round (``faults_per_round``), between its kills, the parent also injects a fault
from a shuffled deck of five (never killing meanwhile, so that no op is only in memory when
a kill lands; the round goes on once the children are through it):

- trickle: the server sends its answers one byte at a time, far slower than any request
  timeout allows; the children's watchdogs must end those requests (as retries);
- 404: the server answers 404 to everything, as a gateway in a deploy; the children must
  keep every op and pause (``config``);
- read-only: the outbox's WAL (and, without root, the file) cannot be written for a moment
  (``chattr +i`` as root, a mode of 0400 otherwise); the children hold their ops in memory,
  deliver them from there, and store the rest once the file takes writes again;
- damaged row: a row that is not an op's wire JSON (not UTF-8) is put in the queue; a sender
  must move it to the dead letters and deliver the rest;
- SIGSTOP: the process holding the sender lock is stopped in the middle of its work; the
  others must take over once its lease has run out, and its late acknowledgements must do
  no harm when it is continued.

The parent SIGKILLs children at moments chosen by waiting on conditions, never by sleeping:
a producer after it reported k more ops; the process that holds the sender lock (read from
``/proc/locks``, so it is mid-delivery) after the server stored m more events; a sender
while it is inside a ``flush()`` (an ``F+`` with no ``F-``, after the server got another
request); any child after the server got m more requests. Each killed child is replaced by
a new one of the same role, and at the end of a round every child left is killed too.

Between rounds the parent checks that every returned op is delivered or still in the file.
After the last round the server stops failing, a fresh client flushes the file until nothing
is pending, and the parent checks, from the server's records:

- loss: every returned ``(p, i)`` is among the accepted events;
- nothing invented: every accepted event's ``(p, i)`` belongs to a producer that got at
  least as far as ``i`` (``i`` may be one past its last record: killed between the commit
  and the record);
- ids never regenerated: every attempt to send one ``(p, i)``, accepted or not, carried the
  same body and ``$message_id``, no two accepted events share a ``(p, i)``, and the server's
  duplicate count equals the re-deliveries seen on the wire;
- nothing dead-lettered but the damaged rows, nothing evicted, and no report or warning a
  child gives that the faults of the run do not explain.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
API_KEY = "wrk_chaos_key"
EVENT_TYPE = "chaos_tick"
BATCH_PATH = "/v1/events/batch"

PRODUCER = "producer"
SENDER = "sender"

# The kinds of kill the parent chooses from (each round draws from a shuffled deck of them).
KILL_PRODUCER = "producer"  # a producer after it reported k more ops
KILL_LEADER = "leader"  # the sender-lock holder, mid-delivery, after m more stored events
KILL_IN_FLUSH = "in_flush"  # a pure sender inside flush()
KILL_ANY = "any"  # any child, after m more requests
KILL_KINDS = (KILL_PRODUCER, KILL_LEADER, KILL_IN_FLUSH, KILL_ANY)

# The faults the parent injects (each round draws from a shuffled deck of them).
FAULT_TRICKLE = "trickle"
FAULT_404 = "404"
FAULT_READ_ONLY = "read_only"
FAULT_DAMAGED_ROW = "damaged_row"
FAULT_SIGSTOP = "sigstop"
FAULT_KINDS = (FAULT_TRICKLE, FAULT_404, FAULT_READ_ONLY, FAULT_DAMAGED_ROW, FAULT_SIGSTOP)

# What a child may report to on_error, and log at WARNING, without breaking the contract:
# always (the server fails a share of requests), and for each fault of the run.
ALLOWED_REPORTS: dict[Optional[str], set[str]] = {
    None: {"retry_exhausted"},
    FAULT_404: {"config"},
    FAULT_READ_ONLY: {"store_error"},
}
ALLOWED_WARNINGS: dict[Optional[str], tuple[str, ...]] = {
    None: ("unreachable or failing", "delivery works again"),
    FAULT_404: ("base_url is probably wrong",),
    FAULT_READ_ONLY: (
        "cannot be written",
        "takes writes again",
        "still fails",
        "cannot use the outbox",
        "can use the outbox again",
    ),
    FAULT_DAMAGED_ROW: ("damaged",),
    FAULT_SIGSTOP: ("made no progress",),
}
# The body of the damaged row: a JSON object, but not UTF-8.
DAMAGED_BODY = bytes.fromhex("7b22ff227d")

# What a child runs: this file's directory on sys.path, then child_main(spec).
_CHILD_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); import chaos; chaos.child_main(sys.argv[2])"
)

Key = tuple[str, int]

# With ``ChaosConfig.sabotage`` (a check of the checker, never in a real run) producers
# record op i without tracking it when i % SABOTAGE_EVERY == SABOTAGE_SKIP (a loss the
# audit must find) and track it twice, with two message ids, when it is SABOTAGE_TWICE.
SABOTAGE_EVERY = 50
SABOTAGE_SKIP = 49
SABOTAGE_TWICE = 24


@dataclass
class ChaosConfig:
    """How long and how hard to shake: rounds run until either limit is reached (at least one)."""

    rounds: Optional[int] = 4  # stop after this many rounds (None: no limit)
    seconds: Optional[float] = None  # start no round after this many seconds (None: no limit)
    producers: int = 2
    senders: int = 1
    kills_per_round: int = 3
    faults: tuple[str, ...] = FAULT_KINDS
    faults_per_round: int = 1
    ops_per_producer: int = 2_000
    failure_rate: float = 0.2
    latency: float = 0.01
    request_timeout: float = 2.0
    wait_timeout: float = 5.0  # the longest wait for one kill condition
    drain_timeout: float = 30.0  # the final flush, with the server no longer failing
    child_life: float = 300.0  # a child exits by itself after this long (orphan guard)
    seed: Optional[int] = None
    sabotage: bool = False


# ---------------------------------------------------------------------------------------
# The child side
# ---------------------------------------------------------------------------------------


def _emit(line: str) -> None:
    # One write() per line: a pipe write under PIPE_BUF bytes is atomic, so the parent reads
    # every line written before the kill, whole, and nothing after it.
    os.write(1, (line.replace("\n", " | ")[:3000] + "\n").encode("utf-8", "replace"))


class _ForwardLogs(logging.Handler):
    """The SDK's WARNING and ERROR records, as ``W``/``E`` lines for the parent to judge."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += " " + "".join(traceback.format_exception(*record.exc_info))
        _emit(("E " if record.levelno >= logging.ERROR else "W ") + text)


def _watchdog(life: float) -> None:
    """Exit when the parent goes away (stdin reaches EOF) or after ``life`` seconds."""

    def stdin_closed() -> None:
        with contextlib.suppress(OSError):
            sys.stdin.buffer.read()
        os._exit(3)

    threading.Thread(target=stdin_closed, daemon=True).start()
    timer = threading.Timer(life, lambda: os._exit(4))
    timer.daemon = True
    timer.start()


def child_main(spec_json: str) -> None:
    """Run one child: ``spec`` says its role, the file, the server and its pace."""
    spec: dict[str, Any] = json.loads(spec_json)
    _watchdog(float(spec["life"]))
    from whisperr_durable import DurableWhisperr, WhisperrError, _retry, _sender

    # Short retries, so that killed and live senders alike come back quickly.
    setattr(_retry, "backoff", lambda retry, rand=random.random: 0.01 + 0.04 * rand())  # noqa: B010
    setattr(_sender, "PAUSE_AFTER_FAILURE", 0.05)  # noqa: B010
    logger = logging.getLogger("whisperr_durable")
    logger.addHandler(_ForwardLogs())
    logger.setLevel(logging.WARNING)

    def on_error(error: WhisperrError) -> None:
        _emit(f"X {error.type} {error.message}")

    client = DurableWhisperr(
        API_KEY,
        path=spec["db"],
        base_url=spec["url"],
        flush_at=spec["flush_at"],
        flush_interval=spec["flush_interval"],
        max_batch_size=spec["max_batch_size"],
        request_timeout=spec["request_timeout"],
        max_queue_size=10_000_000,
        shutdown_timeout=0.2,
        on_error=on_error,
    )
    _emit("R")
    name: str = spec["name"]
    flush_every: int = spec["flush_every"]
    flush_timeout: float = spec["flush_timeout"]

    def flush() -> int:
        _emit("F+")
        result = client.flush(timeout=flush_timeout)
        _emit(f"F- {result.pending} {result.reason}")
        return result.pending

    sabotage: bool = spec.get("sabotage", False)
    if spec["role"] == PRODUCER:
        for i in range(spec["ops"]):
            if not (sabotage and i % SABOTAGE_EVERY == SABOTAGE_SKIP):
                client.track(f"user_{name}", EVENT_TYPE, {"p": name, "i": i})
            if sabotage and i % SABOTAGE_EVERY == SABOTAGE_TWICE:
                client.track(f"user_{name}", EVENT_TYPE, {"p": name, "i": i})
            _emit(f"T {i}")
            if flush_every and (i + 1) % flush_every == 0:
                flush()
        _emit("D")
    idle = threading.Event()
    while True:  # a sender; a producer that has tracked its quota too. Runs until killed.
        if flush() == 0:
            # Pacing an idle loop, not waiting for anything: with nothing pending, flush()
            # returns at once.
            idle.wait(0.02)


# ---------------------------------------------------------------------------------------
# The parent side
# ---------------------------------------------------------------------------------------


@dataclass
class Child:
    """One child process and what the parent has read from it."""

    name: str
    role: str
    proc: subprocess.Popen[bytes]
    stderr_path: str
    spec: dict[str, Any]
    ready: bool = False
    records: int = 0  # "T i" lines read: ops 0..records-1 returned from track()
    done: bool = False
    flushes_started: int = 0
    flushes_ended: int = 0
    eof: bool = False
    killed: bool = False
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reported: Counter[str] = field(default_factory=Counter)
    episodes: int = 0  # begun minus ended: ops held in memory (the file failing)
    reader: Optional[threading.Thread] = None

    @property
    def in_flush(self) -> bool:
        return self.flushes_started > self.flushes_ended

    @property
    def alive(self) -> bool:
        return not self.killed and self.proc.poll() is None


@dataclass
class RoundStats:
    round: int
    tracked: int
    delivered: int
    queued: int
    lost: int
    duplicates: int
    kills: Counter[str]
    elapsed: float

    def line(self) -> str:
        kills = " ".join(f"{k}={n}" for k, n in sorted(self.kills.items()))
        rate = self.duplicates / self.delivered if self.delivered else 0.0
        return (
            f"round {self.round}: tracked {self.tracked}, delivered unique {self.delivered}, "
            f"queued {self.queued}, lost {self.lost}, duplicates {self.duplicates} "
            f"({rate:.3%}), kills [{kills}] in {self.elapsed:.1f}s"
        )


@dataclass
class ChaosReport:
    rounds: int = 0
    children: int = 0
    tracked: int = 0  # ops whose record the parent read
    returned: set[Key] = field(default_factory=set)  # those ops
    delivered_unique: int = 0
    delivered_before_drain: int = 0
    duplicates: int = 0  # server.duplicates
    duplicates_on_wire: int = 0  # accepted occurrences in 2xx requests minus unique
    requests: int = 0
    failed_requests: int = 0  # answered 503 (injected)
    lost: list[Key] = field(default_factory=list)
    lost_between_rounds: list[Key] = field(default_factory=list)
    invented: list[str] = field(default_factory=list)
    regenerated: list[str] = field(default_factory=list)
    kills: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)  # faults injected
    fault_effects: Counter[str] = field(default_factory=Counter)  # faults seen to bite
    damaged_rows: int = 0
    enabled_faults: tuple[str, ...] = ()
    leader_kills: int = 0  # the killed process held the sender lock
    in_flush_kills: int = 0  # the killed process was inside flush()
    in_flush_by_kind: Counter[str] = field(default_factory=Counter)
    wait_timeouts: int = 0  # kills made after a wait for their condition timed out
    timeouts: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    child_errors: list[str] = field(default_factory=list)
    child_warnings: list[str] = field(default_factory=list)
    reported: Counter[str] = field(default_factory=Counter)
    final_pending: int = -1
    final_reason: Optional[str] = None
    dead_letters: int = 0
    evicted: int = 0
    elapsed: float = 0.0
    per_round: list[RoundStats] = field(default_factory=list)

    @property
    def duplicate_rate(self) -> float:
        return self.duplicates / self.delivered_unique if self.delivered_unique else 0.0

    def violations(self) -> list[str]:
        """Everything that breaks the contract or shows the run was not valid."""
        found: list[str] = []
        if self.lost:
            found.append(f"{len(self.lost)} returned op(s) lost, e.g. {self.lost[:5]}")
        if self.lost_between_rounds:
            found.append(
                f"{len(self.lost_between_rounds)} returned op(s) neither delivered nor queued "
                f"between rounds, e.g. {self.lost_between_rounds[:5]}"
            )
        if self.invented:
            found.append(f"{len(self.invented)} invented event(s): {self.invented[:5]}")
        if self.regenerated:
            found.append(f"{len(self.regenerated)} regenerated op(s): {self.regenerated[:5]}")
        if self.duplicates != self.duplicates_on_wire:
            found.append(
                f"server counted {self.duplicates} duplicates, the wire shows "
                f"{self.duplicates_on_wire}"
            )
        if self.crashes:
            found.append(f"children that died on their own: {self.crashes[:3]}")
        if self.child_errors:
            found.append(f"errors in children: {self.child_errors[:5]}")
        allowed = ALLOWED_WARNINGS[None] + tuple(
            w for f in self.enabled_faults for w in ALLOWED_WARNINGS.get(f, ())
        )
        warnings = [w for w in self.child_warnings if not any(a in w for a in allowed)]
        if warnings:
            found.append(f"warnings in children: {warnings[:5]}")
        kinds = set(ALLOWED_REPORTS[None]).union(
            *(ALLOWED_REPORTS.get(f, set()) for f in self.enabled_faults)
        )
        bad_reports = {k: n for k, n in self.reported.items() if k not in kinds and k != "dropped"}
        if bad_reports:
            found.append(f"on_error reports in children: {bad_reports}")
        if self.reported["dropped"] > self.damaged_rows:
            found.append(
                f"{self.reported['dropped']} dropped reports for {self.damaged_rows} damaged rows"
            )
        if self.final_pending != 0:
            found.append(f"{self.final_pending} op(s) still pending ({self.final_reason})")
        if self.dead_letters != self.damaged_rows or self.evicted:
            found.append(
                f"dead letters {self.dead_letters} (damaged rows put in: {self.damaged_rows}), "
                f"evicted {self.evicted}"
            )
        if self.tracked == 0:
            found.append("no op was tracked: the run proves nothing")
        return found

    def summary(self) -> str:
        kills = " ".join(f"{k}={n}" for k, n in sorted(self.kills.items()))
        return (
            f"chaos: {self.rounds} rounds, {self.children} children in {self.elapsed:.1f}s; "
            f"tracked {self.tracked}, delivered unique {self.delivered_unique} "
            f"({self.delivered_before_drain} before the final drain), lost {len(self.lost)}, "
            f"duplicates {self.duplicates} (rate {self.duplicate_rate:.3%}); "
            f"requests {self.requests} ({self.failed_requests} failed by the server); "
            f"kills [{kills}], of which holding the sender lock {self.leader_kills}, "
            f"faults {dict(self.faults)} (seen to bite: {dict(self.fault_effects)}), "
            f"inside flush() {self.in_flush_kills} ({self.in_flush_by_kind[KILL_IN_FLUSH]} aimed); "
            f"wait timeouts {self.wait_timeouts}; "
            f"on_error {dict(self.reported)}"
        )


class _Ledger:
    """What went over the wire, read incrementally from ``server.requests``."""

    def __init__(self) -> None:
        # The first body seen for each op: its $message_id and a digest of the whole event.
        self.bodies: dict[Key, tuple[Any, bytes]] = {}
        self.regenerated: list[str] = []
        self.accepted: set[Key] = set()
        self.accepted_occurrences = 0
        self.foreign: list[str] = []
        self.requests = 0
        self.failed = 0
        self._seen = 0

    def update(self, requests: list[Any]) -> None:
        for request in requests[self._seen :]:
            self.requests += 1
            if request.status == 503:
                self.failed += 1
            if request.path != BATCH_PATH:
                self.foreign.append(f"a request to {request.path}")
                continue
            try:
                events = json.loads(request.body)["events"]
            except (ValueError, KeyError, TypeError):
                self.foreign.append(f"an unreadable batch body ({request.status})")
                continue
            ok = request.status is not None and 200 <= request.status < 300
            for event in events:
                key = _key(event)
                if key is None:
                    self.foreign.append(f"an event that no producer made: {event!r:.200}")
                    continue
                body = (_message_id(event), _digest(event))
                first = self.bodies.setdefault(key, body)
                if first != body:
                    self.regenerated.append(
                        f"{key} sent with $message_id {first[0]}, later {body[0]}"
                        + (" and a different body" if first[0] == body[0] else "")
                    )
                if ok:
                    self.accepted.add(key)
                    self.accepted_occurrences += 1
        self._seen = len(requests)


def _key(event: Any) -> Optional[Key]:
    try:
        props = event["properties"]
        p, i = props["p"], props["i"]
    except (KeyError, TypeError):
        return None
    if not isinstance(p, str) or not isinstance(i, int) or event.get("event_type") != EVENT_TYPE:
        return None
    return p, i


def _message_id(event: dict[str, Any]) -> Any:
    return event.get("context", {}).get("$message_id")


def _digest(event: Any) -> bytes:
    return hashlib.blake2b(json.dumps(event, sort_keys=True).encode(), digest_size=16).digest()


def lock_holder(db: str) -> Optional[int]:
    """The pid holding a sender lock beside ``db``, from ``/proc/locks`` (None if none/unknown)."""
    inodes = set()
    for path in glob.glob(f"{db}.sender-*.lock"):
        with contextlib.suppress(OSError):
            inodes.add(os.stat(path).st_ino)
    try:
        with open("/proc/locks") as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        # "3: FLOCK  ADVISORY  WRITE 29011 fe:00:2146363 0 EOF"; waiters have "->" in 2nd place
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK":
            with contextlib.suppress(ValueError):
                if int(parts[5].rsplit(":", 1)[-1]) in inodes:
                    return int(parts[4])
    return None


def queued_keys(db: str) -> set[Key]:
    """The ``(p, i)`` of every op still in the outbox (read with plain SQL, children dead)."""
    if not os.path.exists(db):
        return set()
    conn = sqlite3.connect(db, timeout=10)
    try:
        # Every key's queue table ("ops:<key fingerprint>"), whichever keys wrote to the file.
        tables = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'ops:%'"
        ).fetchall()
        rows = [
            row
            for (table,) in tables
            for row in conn.execute(
                'SELECT CAST(body AS BLOB) FROM "' + table.replace('"', '""') + '"'
            ).fetchall()
        ]
    finally:
        conn.close()
    keys = set()
    for (body,) in rows:
        try:
            key = _key(json.loads(body))
        except ValueError:  # a damaged row the parent put there
            continue
        if key is not None:
            keys.add(key)
    return keys


class _Chaos:
    def __init__(
        self, config: ChaosConfig, workdir: str, server: Any, log: Callable[[str], None]
    ) -> None:
        self.config = config
        self.workdir = workdir
        self.db = os.path.join(workdir, "outbox.db")
        self.server = server
        self.log = log
        self.rng = random.Random(config.seed)
        self.cond = threading.Condition()
        self.children: list[Child] = []
        self.ledger = _Ledger()
        self.report = ChaosReport()
        self.round = 0
        self.serial = 0
        self.deck: list[str] = []
        self.fault_deck: list[str] = []
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        self.env = env

    # -- children --

    def spawn(self, role: str) -> Child:
        self.serial += 1
        name = f"r{self.round}{role[0]}{self.serial}"
        rng = self.rng
        spec = {
            "role": role,
            "name": name,
            "db": self.db,
            "url": self.server.url,
            "life": self.config.child_life,
            "ops": self.config.ops_per_producer,
            "flush_at": rng.choice([1, 5, 20]),
            "flush_interval": rng.choice([0.02, 0.1, 0.5]),
            "max_batch_size": rng.choice([5, 25, 100]),
            "request_timeout": self.config.request_timeout,
            "flush_every": rng.choice([5, 20, 100]) if role == PRODUCER else 0,
            # A flush is a barrier for the whole file's backlog: producers wait less.
            "flush_timeout": rng.choice([0.05, 0.2, 0.5] if role == PRODUCER else [0.1, 0.5, 2.0]),
            "sabotage": self.config.sabotage,
        }
        stderr_path = os.path.join(self.workdir, f"{name}.stderr")
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_CODE, str(TESTS_DIR), json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=str(ROOT),
                env=self.env,
            )
        child = Child(name, role, proc, stderr_path, spec)
        child.reader = threading.Thread(
            target=self._read, args=(child,), name=f"chaos-read-{name}", daemon=True
        )
        with self.cond:
            self.children.append(child)
        child.reader.start()
        self.report.children += 1
        return child

    def _read(self, child: Child) -> None:
        stream = child.proc.stdout
        assert stream is not None
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            tag, _, rest = line.partition(" ")
            with self.cond:
                if tag == "T":
                    if rest != str(child.records):
                        child.errors.append(f"{child.name}: record {rest!r} out of order")
                    child.records += 1
                elif tag == "F+":
                    child.flushes_started += 1
                elif tag == "F-":
                    child.flushes_ended += 1
                elif tag == "R":
                    child.ready = True
                elif tag == "D":
                    child.done = True
                elif tag == "E":
                    child.errors.append(f"{child.name}: {rest}")
                elif tag == "W":
                    child.warnings.append(f"{child.name}: {rest}")
                    if "the outbox cannot be written" in rest:
                        child.episodes += 1
                    elif "the outbox takes writes again" in rest:
                        child.episodes -= 1
                elif tag == "X":
                    child.reported[rest.partition(" ")[0]] += 1
                else:
                    child.errors.append(f"{child.name}: unexpected line {line!r:.200}")
                self.cond.notify_all()
        with self.cond:
            child.eof = True
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def live(self, role: Optional[str] = None) -> list[Child]:
        return [c for c in self.children if c.alive and (role is None or c.role == role)]

    def kill(self, child: Child, kind: str) -> None:
        """SIGKILL one child (by its pid), then read its pipe to the end."""
        if child.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.proc.pid, signal.SIGKILL)
        child.killed = True
        child.proc.wait(timeout=10)
        self.wait(lambda: child.eof, 10)
        self.report.kills[kind] += 1
        if child.in_flush:
            self.report.in_flush_kills += 1
            self.report.in_flush_by_kind[kind] += 1

    def reap(self) -> None:
        """Kill every child still running and account for how each one ended."""
        for child in self.children:
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.proc.pid, signal.SIGKILL)
                child.killed = True
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=10)
            if child.reader is not None:
                child.reader.join(timeout=10)
            if child.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    child.proc.stdin.close()
            if child.proc.stdout is not None:
                with contextlib.suppress(OSError):
                    child.proc.stdout.close()

    # -- one kill of each kind; each returns once its child is dead --

    def _server_events(self) -> int:
        return len(self.server.message_ids)

    def kill_producer(self) -> None:
        producers = [c for c in self.live(PRODUCER) if not c.done] or self.live(PRODUCER)
        if not producers:
            return self.kill_any()
        child = self.rng.choice(producers)
        with self.cond:
            target = child.records + self.rng.randint(1, 2 * child.spec["flush_every"])
        if not self.wait(lambda: child.records >= target or child.done or child.eof, self._t()):
            self.timed_out(KILL_PRODUCER)
        self.kill(child, KILL_PRODUCER)
        self.replace(child)

    def kill_leader(self) -> None:
        target = self._server_events() + self.rng.randint(1, 60)
        if not self.server.wait_for_events(target, self._t()):
            self.timed_out(KILL_LEADER)
        for _ in range(20):
            pid = lock_holder(self.db)
            for child in self.live():
                if child.proc.pid == pid:
                    self.report.leader_kills += 1
                    self.kill(child, KILL_LEADER)
                    self.replace(child)
                    return
            # Between two delivery cycles: look again once the server gets another request.
            self.server.wait_for_requests(len(self.server.requests) + 1, 1.0)
        self.kill_any()

    def kill_in_flush(self) -> None:
        senders = self.live(SENDER)
        if not senders:
            return self.kill_any()
        child = self.rng.choice(senders)
        deadline = time.monotonic() + self._t()
        inside = False
        while not inside and not child.eof and time.monotonic() < deadline:
            if not self.wait(lambda: child.in_flush or child.eof, deadline - time.monotonic()):
                break
            with self.cond:
                started = child.flushes_started
            # Inside a flush: let it reach the server once more, then kill if still inside
            # that same flush (else wait for the next one).
            self.server.wait_for_requests(len(self.server.requests) + 1, 1.0)
            with self.cond:
                inside = child.in_flush and child.flushes_started == started
        if not inside:
            self.timed_out(KILL_IN_FLUSH)
        self.kill(child, KILL_IN_FLUSH)
        self.replace(child)

    def kill_any(self) -> None:
        target = len(self.server.requests) + self.rng.randint(1, 20)
        if not self.server.wait_for_requests(target, self._t()):
            self.timed_out(KILL_ANY)
        children = self.live()
        if children:
            child = self.rng.choice(children)
            self.kill(child, KILL_ANY)
            self.replace(child)

    def timed_out(self, kind: str) -> None:
        self.report.wait_timeouts += 1
        with self.cond:
            children = ", ".join(
                f"{c.name}(records={c.records} flushes={c.flushes_started}/{c.flushes_ended}"
                f"{' done' if c.done else ''})"
                for c in self.children
                if c.alive
            )
        note = (
            f"round {self.round}: waiting to kill ({kind}) timed out; server requests "
            f"{len(self.server.requests)}, events {self._server_events()}, lock holder "
            f"{lock_holder(self.db)}; live: {children}"
        )
        self.report.timeouts.append(note)
        self.log(note)

    def replace(self, child: Child) -> None:
        self.spawn(child.role)

    # -- one fault of each kind; no child is killed while it lasts --

    def fault_trickle(self) -> None:
        before = len(self.server.requests)
        self.server.trickle = 1.0  # one byte a second: no answer within request_timeout
        try:
            if self.server.wait_for_requests(before + 2, self._t()):
                self.report.fault_effects[FAULT_TRICKLE] += 1
            # The requests sent meanwhile must end: they hold the sender lock.
            self.wait_for_answers(self._t() + self.config.request_timeout)
        finally:
            self.server.trickle = 0.0

    def fault_404(self) -> None:
        before = len(self.server.requests)
        self.server.answer = 404
        try:
            if self.server.wait_for_requests(before + 2, self._t()):
                self.report.fault_effects[FAULT_404] += 1
        finally:
            self.server.answer = None

    def fault_read_only(self) -> None:
        with self.cond:
            begun = sum(c.episodes > 0 for c in self.children)
        if not read_only(self.db, True):
            return
        try:
            # Long enough for producers to try to write, and for senders to try to claim.
            for child in self.live(PRODUCER):
                target = child.records + 5

                def wrote(c: Child = child, t: int = target) -> bool:
                    return c.records >= t or c.done or c.eof

                self.wait(wrote, 2.0)
        finally:
            read_only(self.db, False)
        with self.cond:
            if sum(c.episodes > 0 for c in self.children) > begun:
                self.report.fault_effects[FAULT_READ_ONLY] += 1
        # A connection opened while the file was read-only fails on its next write, after
        # the flip: every producer writes again (its warnings come before its records)...
        with self.cond:
            targets = {c.name: c.records + 2 for c in self.live(PRODUCER)}

        def wrote_again() -> bool:
            return all(
                c.records >= targets.get(c.name, 0) or c.done or c.eof for c in self.live(PRODUCER)
            )

        self.wait(wrote_again, self._t())
        # ...and no kill until every child wrote what it held to the file (or delivered it).
        if not self.wait(lambda: all(c.episodes <= 0 for c in self.live()), 15.0):
            self.timed_out(FAULT_READ_ONLY)

    def fault_damaged_row(self) -> None:
        conn = sqlite3.connect(self.db, timeout=10, isolation_level=None)
        try:
            ((table,),) = conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'ops:%'"
            ).fetchall()
            conn.execute(
                'INSERT INTO "' + table.replace('"', '""') + '" (kind, body, created_ms) '
                "VALUES (0, CAST(? AS TEXT), ?)",
                (DAMAGED_BODY, int(time.time() * 1000)),
            )
        finally:
            conn.close()
        self.report.damaged_rows += 1
        # A sender takes it with the rows around it.
        target = self._server_events() + 1
        if self.server.wait_for_events(target, self._t()):
            self.report.fault_effects[FAULT_DAMAGED_ROW] += 1

    def fault_sigstop(self) -> None:
        child = None
        for _ in range(20):
            pid = lock_holder(self.db)
            child = next((c for c in self.live() if c.proc.pid == pid), None)
            if child is not None:
                break
            self.server.wait_for_requests(len(self.server.requests) + 1, 1.0)
        if child is None:
            self.timed_out(FAULT_SIGSTOP)
            return
        os.kill(child.proc.pid, signal.SIGSTOP)
        try:
            # The others deliver once its lease (request_timeout + 5 s) has run out.
            target = self._server_events() + 1
            lease = self.config.request_timeout + 5.0
            if self.server.wait_for_events(target, 2 * lease + self._t()):
                self.report.fault_effects[FAULT_SIGSTOP] += 1
        finally:
            os.kill(child.proc.pid, signal.SIGCONT)

    def wait_for_answers(self, timeout: float) -> None:
        """Until every request the server got has had its answer (or was cut)."""
        deadline = time.monotonic() + timeout
        while any(r.bytes_sent is None for r in self.server.requests):
            if time.monotonic() >= deadline:
                return
            self.server.wait_for_answers(len(self.server.requests), 0.1)

    def next_fault(self) -> Optional[str]:
        if not self.config.faults:
            return None
        if not self.fault_deck:
            self.fault_deck = list(self.config.faults)
            self.rng.shuffle(self.fault_deck)
        return self.fault_deck.pop()

    def _t(self) -> float:
        return self.config.wait_timeout

    def next_kind(self) -> str:
        if not self.deck:
            self.deck = list(KILL_KINDS)
            self.rng.shuffle(self.deck)
        return self.deck.pop()

    # -- rounds and the audit --

    def run_round(self) -> None:
        self.round += 1
        started = time.monotonic()
        kills_before = Counter(self.report.kills)
        for _ in range(self.config.producers):
            self.spawn(PRODUCER)
        for _ in range(self.config.senders):
            self.spawn(SENDER)
        actions = {
            KILL_PRODUCER: self.kill_producer,
            KILL_LEADER: self.kill_leader,
            KILL_IN_FLUSH: self.kill_in_flush,
            KILL_ANY: self.kill_any,
        }
        faults = {
            FAULT_TRICKLE: self.fault_trickle,
            FAULT_404: self.fault_404,
            FAULT_READ_ONLY: self.fault_read_only,
            FAULT_DAMAGED_ROW: self.fault_damaged_row,
            FAULT_SIGSTOP: self.fault_sigstop,
        }
        for k in range(self.config.kills_per_round):
            if k == self.config.kills_per_round // 2:
                for _ in range(self.config.faults_per_round):
                    fault = self.next_fault()
                    if fault is not None:
                        self.report.faults[fault] += 1
                        faults[fault]()
            actions[self.next_kind()]()
        # The end of the round: whatever runs now is killed where it stands.
        for child in self.live():
            self.kill(child, "end")
        self.reap()
        self.audit_round(started, kills_before)

    def recorded(self) -> dict[str, int]:
        with self.cond:
            return {c.name: c.records for c in self.children if c.role == PRODUCER}

    def returned_keys(self) -> set[Key]:
        return {(name, i) for name, n in self.recorded().items() for i in range(n)}

    def audit_round(self, started: float, kills_before: Counter[str]) -> None:
        self.ledger.update(self.server.requests)
        returned = self.returned_keys()
        queued = queued_keys(self.db)
        missing = sorted(returned - self.ledger.accepted - queued)
        known = set(self.report.lost_between_rounds)
        self.report.lost_between_rounds.extend(k for k in missing if k not in known)
        stats = RoundStats(
            round=self.round,
            tracked=len(returned),
            delivered=len(self.ledger.accepted),
            queued=len(queued),
            lost=len(missing),
            duplicates=self.server.duplicates,
            kills=self.report.kills - kills_before,
            elapsed=time.monotonic() - started,
        )
        self.report.per_round.append(stats)
        self.report.rounds = self.round
        self.log(stats.line())

    def drain(self) -> None:
        """With the server healthy again, a fresh client flushes the file until it is empty."""
        from whisperr_durable import DurableWhisperr

        self.report.delivered_before_drain = len(self.ledger.accepted)
        self.server.failure_rate = 0.0
        self.server.latency = 0.0
        client = DurableWhisperr(
            API_KEY,
            path=self.db,
            base_url=self.server.url,
            max_batch_size=500,
            request_timeout=5.0,
            flush_interval=60.0,
        )
        try:
            deadline = time.monotonic() + self.config.drain_timeout
            while True:
                result = client.flush(timeout=max(0.1, deadline - time.monotonic()))
                if result.pending == 0 or time.monotonic() >= deadline:
                    break
            stats = client.stats()
            self.report.final_pending = stats.pending
            self.report.final_reason = result.reason
            self.report.dead_letters = stats.dead_letters
            self.report.evicted = stats.evicted
        finally:
            client.shutdown(timeout=1.0)

    def final_audit(self) -> None:
        report, ledger = self.report, self.ledger
        ledger.update(self.server.requests)
        recorded = self.recorded()
        returned = self.returned_keys()
        events = self.server.events
        by_key: dict[Key, Any] = {}
        for event in events:
            key = _key(event)
            if key is None:
                report.invented.append(f"not a chaos event: {event!r:.200}")
                continue
            if key in by_key:
                report.regenerated.append(
                    f"{key} accepted twice, as {_message_id(by_key[key])} and {_message_id(event)}"
                )
            by_key[key] = event
            p, i = key
            # An op may be accepted without its record: killed between commit and record.
            if p not in recorded or not (
                0 <= i <= recorded[p] and i < self.config.ops_per_producer
            ):
                report.invented.append(f"{key} (that producer reported {recorded.get(p)} ops)")
            if ledger.bodies.get(key) != (_message_id(event), _digest(event)):
                report.regenerated.append(f"{key} accepted as a body never seen on the wire")
        report.invented.extend(ledger.foreign)
        report.regenerated.extend(ledger.regenerated)
        if set(by_key) != ledger.accepted:
            report.regenerated.append(
                f"{len(set(by_key) ^ ledger.accepted)} op(s) differ between the server's "
                "events and the 2xx requests"
            )
        report.returned = returned
        report.lost = sorted(returned - set(by_key))
        report.tracked = len(returned)
        report.delivered_unique = len(by_key)
        report.duplicates = self.server.duplicates
        report.duplicates_on_wire = ledger.accepted_occurrences - len(ledger.accepted)
        report.requests = ledger.requests
        report.failed_requests = ledger.failed
        for child in self.children:
            report.child_errors.extend(child.errors)
            report.child_warnings.extend(child.warnings)
            report.reported.update(child.reported)
            if child.proc.returncode != -signal.SIGKILL:
                report.crashes.append(
                    f"{child.name} exited with {child.proc.returncode}: {_tail(child.stderr_path)}"
                )


def read_only(db: str, on: bool) -> bool:
    """Make the outbox unwritable (``on``) or writable again; ``False`` if this cannot be done
    here. Root ignores modes: as root the WAL, which every commit writes, is made immutable
    (never the -shm, which SQLite maps: writing it then would be a SIGBUS)."""
    if os.geteuid() != 0:
        for name in (db, db + "-wal"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(name, 0o400 if on else 0o600)
        return True
    if not os.path.exists(db + "-wal"):
        return False
    try:
        done = subprocess.run(
            ["chattr", "+i" if on else "-i", db + "-wal"], capture_output=True, check=False
        )
    except OSError:  # no chattr here
        return False
    return done.returncode == 0


def _tail(path: str, size: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_chaos(
    config: ChaosConfig,
    workdir: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> ChaosReport:
    """Run the chaos loop and return what it found (``report.violations()`` empty: all good)."""
    from whisperr_durable.devserver import DevServer

    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="whisperr-chaos-"))
        server = stack.enter_context(
            DevServer(
                api_key=API_KEY,
                failure_rate=config.failure_rate,
                latency=config.latency,
                seed=config.seed,
            )
        )
        chaos = _Chaos(config, workdir, server, log)
        chaos.report.enabled_faults = tuple(config.faults)
        try:
            while True:
                chaos.run_round()
                if config.rounds is not None and chaos.round >= config.rounds:
                    break
                if config.seconds is not None and time.monotonic() - started >= config.seconds:
                    break
        finally:
            chaos.reap()
        chaos.drain()
        chaos.final_audit()
        chaos.report.elapsed = time.monotonic() - started
        return chaos.report


__all__ = [
    "API_KEY",
    "ChaosConfig",
    "ChaosReport",
    "RoundStats",
    "child_main",
    "lock_holder",
    "queued_keys",
    "run_chaos",
]
