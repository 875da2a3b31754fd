"""A demonstration of what the outbox survives: ``python -m whisperr_durable.demo``.

1. A local Whisperr-compatible server starts; it fails a share of the requests it gets.
2. A producer process tracks events into an outbox file in a temporary directory and is
   killed with SIGKILL, with no chance to flush, while part of its events are unsent.
3. What it left on disk is shown.
4. A new process opens the same file and delivers the rest.
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
import time
from typing import Optional

from . import DurableWhisperr
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
        _say(f"   every track() returned; SIGKILL after the server had {at_kill} of them")

        probe = DurableWhisperr(DEMO_KEY, path=path, base_url=server.url)
        stats = probe.stats()
        _say(f"3. on disk after the kill: {stats.pending} events still queued")
        probe.shutdown(0)

        _say("4. a new process opens the same file and delivers what is left")
        server.failure_rate = failure_rate / 2
        started = time.monotonic()
        client = DurableWhisperr(DEMO_KEY, path=path, base_url=server.url, max_retries=20)
        result = client.flush(timeout=60)
        client.shutdown(1)
        took = time.monotonic() - started

        received = {event["properties"]["i"] for event in server.events}
        lost = count - len(received & set(range(count)))
        _say(f"   done in {took:.1f} s: {result.pending} still pending")
        _say("5. verdict:")
        _say(f"   tracked                      {count}")
        _say(f"   delivered (unique)           {len(received)}")
        _say(f"   lost                         {lost}")
        _say(f"   duplicates suppressed by $message_id: {server.duplicates}")
    if not keep:
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
    return 0 if lost == 0 else 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m whisperr_durable.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=3000, help="events to track")
    parser.add_argument("--failure-rate", type=float, default=0.3)
    parser.add_argument("--keep", metavar="DIR", help="keep the outbox in DIR")
    parser.add_argument("--produce", nargs=3, metavar=("PATH", "URL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.produce:
        _produce(args.produce[0], args.produce[1], int(args.produce[2]))
        return 0
    return run(args.events, args.failure_rate, args.keep)


if __name__ == "__main__":
    sys.exit(main())
