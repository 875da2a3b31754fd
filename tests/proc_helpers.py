"""Child processes for tests/test_processes.py: ``python proc_helpers.py ROLE JSON_ARGS``.

Each role talks to the test through its pipes, one JSON object a line on stdout
(``{"event": NAME, ...}``) and plain lines on stdin (a barrier, a command, or EOF to end).
Every role reports what reached ``on_error`` and every WARNING or worse that the SDK logged,
so that the test can assert a clean run. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any, Optional

from whisperr_durable import DurableWhisperr, WhisperrError


class _Problems(logging.Handler):
    """Every WARNING-or-worse record of the SDK's logger, and every on_error call."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.items: list[str] = []
        self.guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.guard:
            self.items.append(f"log {record.levelname}: {record.getMessage()}")

    def on_error(self, error: WhisperrError) -> None:
        with self.guard:
            self.items.append(f"on_error {error.type}: {error.message}")

    def snapshot(self) -> list[str]:
        with self.guard:
            return list(self.items)


PROBLEMS = _Problems()
logging.getLogger("whisperr_durable").addHandler(PROBLEMS)
_OUT_LOCK = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """One whole line on stdout (short enough to be written atomically into the pipe)."""
    line = json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n"
    with _OUT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def make_client(args: dict[str, Any]) -> DurableWhisperr:
    options: dict[str, Any] = {
        "path": args["db"],
        "base_url": args["url"],
        "on_error": PROBLEMS.on_error,
    }
    for name in (
        "flush_at",
        "flush_interval",
        "max_batch_size",
        "max_queue_size",
        "request_timeout",
        "shutdown_timeout",
    ):
        if name in args:
            options[name] = args[name]
    return DurableWhisperr(args["api_key"], **options)


def in_forked_child(lifetime: float) -> None:
    """A forked child that hangs (a lock inherited held, say) dies of SIGALRM, not never."""
    signal.alarm(int(lifetime))


def result(flushed: Any) -> list[Any]:
    return [flushed.pending, flushed.reason]


def track_range(client: DurableWhisperr, proc: str, start: int, n: int) -> float:
    """Track ``n`` events ``{"p": proc, "i": start..}``; returns the slowest call in seconds."""
    worst = 0.0
    for i in range(start, start + n):
        began = time.perf_counter()
        client.track(f"user_{proc}", "proc_event", {"p": proc, "i": i})
        worst = max(worst, time.perf_counter() - began)
    return worst


# ---- roles ----


def producer(args: dict[str, Any]) -> None:
    """Track ``n`` events as fast as possible, then flush, shut down, or just exit.

    With ``barrier``, waits for a line on stdin after announcing ``ready`` so that several
    producers start together. With ``hold``, stays alive after ``done`` (its sender going on
    with whatever other processes queue) until stdin ends.
    """
    client = make_client(args)
    emit("ready")
    if args.get("barrier"):
        sys.stdin.readline()
    worst = track_range(client, args["proc"], 0, args["n"])
    emit("tracked", n=args["n"], worst_ms=worst * 1000, problems=PROBLEMS.snapshot())
    finish = args.get("finish", "shutdown")
    if finish == "flush":
        flushed = client.flush(args.get("flush_timeout", 30.0))
    else:
        flushed = client.shutdown(args.get("flush_timeout", 30.0))
    emit("done", flush=result(flushed), problems=PROBLEMS.snapshot())
    if args.get("hold"):
        sys.stdin.read()


def hold_lock(args: dict[str, Any]) -> None:
    """Take the sender lock as the SDK does, report, and hold it until stdin ends."""
    from whisperr_durable._lock import SenderLock

    lock = SenderLock(args["lock_path"])
    emit("locked", acquired=lock.try_acquire())
    sys.stdin.read()


def fork_basic(args: dict[str, Any]) -> None:
    """A client used before fork (thread started, rows queued); then both sides go on."""
    client = make_client(args)
    track_range(client, "parent_pre", 0, args["n"])
    queued_at_fork = client.stats().pending
    pid = os.fork()
    if pid == 0:
        in_forked_child(30)
        code = 1
        try:
            track_range(client, "child", 0, args["n"])
            flushed = client.flush(15.0)
            emit("child", flush=result(flushed), problems=PROBLEMS.snapshot())
            code = 0
        finally:
            os._exit(code)
    track_range(client, "parent_post", 0, args["n"])
    flushed = client.flush(15.0)
    _, status = os.waitpid(pid, 0)
    emit(
        "parent",
        queued_at_fork=queued_at_fork,
        flush=result(flushed),
        child_status=status,
        problems=PROBLEMS.snapshot(),
    )


def fork_mid_cycle(args: dict[str, Any]) -> None:
    """Fork on command while the sender is (expected to be) in the middle of a request.

    The parent then waits to be killed. The child lives on: on each ``ping`` line it tracks
    one event and flushes; it ends at EOF on stdin.
    """
    client = make_client(args)
    track_range(client, "parent", 0, args["n"])  # n == flush_at: the sender wakes
    emit("queued")
    sys.stdin.readline()  # "fork"
    pid = os.fork()
    if pid == 0:
        in_forked_child(60)
        code = 1
        try:
            emit("child_alive")
            i = 0
            for line in sys.stdin:
                if line.strip() != "ping":
                    continue
                track_range(client, "child", i, 1)
                i += 1
                flushed = client.flush(10.0)
                emit("pong", flush=result(flushed), problems=PROBLEMS.snapshot())
            code = 0
        finally:
            os._exit(code)
    emit("forked", child=pid)
    threading.Event().wait()  # until SIGKILL


def fork_storm(args: dict[str, Any]) -> None:
    """Fork again and again while other threads write and the sender delivers.

    Each forked child tracks one event and flushes; its exit status says how that went
    (0 ok, 2 flush not ok, 3 problems reported). The parent then stops its writers and
    flushes everything.
    """
    client = make_client(args)
    stop = threading.Event()
    counts: dict[str, int] = {}

    def write(name: str) -> None:
        i = 0
        while not stop.is_set():
            track_range(client, name, i, 1)
            i += 1
        counts[name] = i

    writers = [threading.Thread(target=write, args=(f"writer_{k}",)) for k in range(2)]
    for writer in writers:
        writer.start()
    statuses = []
    for k in range(args["forks"]):
        pid = os.fork()
        if pid == 0:
            in_forked_child(10)
            code = 1
            try:
                track_range(client, "child", k, 1)
                flushed = client.flush(15.0)
                code = 0 if flushed.ok else 2
                if PROBLEMS.snapshot():
                    code = 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        statuses.append(os.waitstatus_to_exitcode(status))
        if statuses[-1] != 0:
            break  # -14: the child hung until its alarm
    stop.set()
    for writer in writers:
        writer.join()
    flushed = client.flush(15.0)
    emit(
        "done",
        statuses=statuses,
        counts=counts,
        flush=result(flushed),
        problems=PROBLEMS.snapshot(),
    )


_MP_CLIENT: Optional[DurableWhisperr] = None


def _pool_work(i: int) -> int:
    assert _MP_CLIENT is not None
    track_range(_MP_CLIENT, "pool", i, 1)
    return os.getpid()


def _process_work(k: int, n: int) -> None:
    assert _MP_CLIENT is not None
    track_range(_MP_CLIENT, f"process_{k}", 0, n)
    flushed = _MP_CLIENT.flush(15.0)
    os._exit(0 if flushed.ok and not PROBLEMS.snapshot() else 3)


def mp_fork(args: dict[str, Any]) -> None:
    """multiprocessing with the "fork" start method and a client made before it forks."""
    global _MP_CLIENT
    _MP_CLIENT = client = make_client(args)
    track_range(client, "boot", 0, 1)  # the sender thread runs before any fork
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(3)
    pids = pool.map(_pool_work, range(args["n"]), chunksize=1)
    pool.close()
    pool.join()
    processes = [
        ctx.Process(target=_process_work, args=(k, args["n"])) for k in range(args["processes"])
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(30)
    flushed = client.flush(15.0)
    emit(
        "done",
        pool_pids=sorted(set(pids)),
        exitcodes=[p.exitcode for p in processes],
        flush=result(flushed),
        problems=PROBLEMS.snapshot(),
    )


ROLES = {
    "producer": producer,
    "hold_lock": hold_lock,
    "fork_basic": fork_basic,
    "fork_mid_cycle": fork_mid_cycle,
    "mp_fork": mp_fork,
    "fork_storm": fork_storm,
}

if __name__ == "__main__":
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))
