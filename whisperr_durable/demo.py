"""A demonstration of what the outbox survives: ``whisperr-durable demo``.

1. A local Whisperr-compatible server starts; it fails a share of the requests it gets.
2. A producer process tracks events into an outbox file in a temporary directory and is
   killed with SIGKILL, with no chance to flush, while part of its events are unsent.
3. What it left on disk is shown by the operator's command, ``whisperr-durable status``.
4. ``whisperr-durable flush``, a new process on the same file, delivers the rest.
5. The verdict: every event tracked reached the server once; duplicates that a retry
   after a lost answer could cause are suppressed by ``$message_id``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from typing import Optional

from ._client import DurableWhisperr
from .devserver import DevServer

DEMO_KEY = "wrk_demo"


def _produce(path: str, url: str, count: int) -> None:
    # A short request timeout keeps the lease on the batch in flight at the kill short.
    client = DurableWhisperr(
        DEMO_KEY,
        path=path,
        base_url=url,
        flush_at=50,
        flush_interval=0.2,
        max_retries=1,
        request_timeout=1.0,
    )
    for i in range(count):
        client.track(f"user_{i % 50}", "payment_failed", {"i": i, "amount_cents": 4900})
    print("tracked", count, flush=True)
    # Stay alive, mid-delivery, until the demo kills this process.
    sys.stdin.read()


def _say(text: str) -> None:
    print(text, flush=True)


def _run_cli(*args: str, env: Optional[dict[str, str]] = None) -> int:
    """Run ``python -m whisperr_durable ARGS`` as its own process; show its output indented.

    Its stderr is left on the terminal, so that ``flush`` can draw its progress bar there.
    """
    prefix = "".join(f"{name}={value} " for name, value in (env or {}).items())
    _say(f"   $ {prefix}whisperr-durable {' '.join(args)}")
    done = subprocess.run(
        [sys.executable, "-m", "whisperr_durable", *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    for line in done.stdout.splitlines():
        _say(f"   | {line}".rstrip())
    return done.returncode


def run(count: int, failure_rate: float, keep: Optional[str]) -> int:
    workdir = keep or tempfile.mkdtemp(prefix="whisperr-demo-")
    path = os.path.join(workdir, "outbox.db")
    with DevServer(api_key=DEMO_KEY, failure_rate=failure_rate, seed=7, latency=0.002) as server:
        _say(f"1. local Whisperr server at {server.url}, failing {failure_rate:.0%} of requests")
        _say(f"2. a producer process tracks {count} events into {path}")
        command = [sys.executable, "-m", "whisperr_durable.demo", "--produce", path, server.url]
        producer = subprocess.Popen(
            [*command, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert producer.stdout is not None
        line = producer.stdout.readline().strip()
        if line != f"tracked {count}":
            _say(f"   the producer failed: {line!r}")
            producer.kill()
            return 1
        # Let its sender get part of the way, then kill it without warning.
        server.wait_for_events(count // 4, timeout=10)
        producer.send_signal(signal.SIGKILL)
        producer.wait()
        at_kill = len(server.events)
        _say(
            f"   every track() returned, so all {count} are on disk; SIGKILL (no flush, no "
            f"exit handler) after the server had {at_kill}"
        )

        _say("3. what the killed process left on disk, seen by the operator's status command:")
        _run_cli("status", "--path", path)

        server.failure_rate = failure_rate / 2
        failing = f" (the server now fails {server.failure_rate:.0%}: it retries)"
        _say(
            "4. a new process, the operator's flush, takes over the dead sender's batch at once "
            f"and delivers the rest{failing if server.failure_rate else ''}"
        )
        code = _run_cli(
            "flush",
            "--path",
            path,
            "--base-url",
            server.url,
            "--timeout",
            "60",
            "--max-retries",
            "10",
            # The key travels in the environment, where ps does not show it.
            env={"WHISPERR_API_KEY": DEMO_KEY},
        )

        received = {event["properties"]["i"] for event in server.events}
        lost = count - len(received & set(range(count)))
        _say(f"5. verdict (the flush exited with {code}):")
        rows = [
            ("tracked", count),
            ("delivered (unique)", len(received)),
            ("lost", lost),
            ("duplicates suppressed by $message_id", server.duplicates),
        ]
        for label, value in rows:
            _say(f"   {label:<38}{value}")
    if not keep:
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
    return 0 if lost == 0 and code == 0 else 1


def main(argv: Optional[list[str]] = None, prog: str = "python -m whisperr_durable.demo") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(__doc__ or "").replace("``", "'"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--events",
        type=int,
        default=3000,
        metavar="N",
        help="events to track (default %(default)s)",
    )
    parser.add_argument(
        "--failure-rate",
        type=float,
        default=0.3,
        metavar="P",
        help="share of requests the server fails (default %(default)s)",
    )
    parser.add_argument(
        "--keep", metavar="DIR", help="keep the outbox in DIR (default: a temporary directory)"
    )
    parser.add_argument("--produce", nargs=3, metavar=("PATH", "URL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.produce:
        _produce(args.produce[0], args.produce[1], int(args.produce[2]))
        return 0
    return run(args.events, args.failure_rate, args.keep)


if __name__ == "__main__":
    sys.exit(main())
