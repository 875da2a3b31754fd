"""How long ``track()`` and ``flush()`` hold up an asyncio event loop.

    .venv/bin/python benchmarks/bench_async.py            # about 5 s
    .venv/bin/python benchmarks/bench_async.py --n 2000   # fewer calls per phase

A lag probe (a task that sleeps 1 ms again and again and records how late it wakes) runs
beside each phase; the devserver runs in its own process, and the client's sender delivers
while the loop works (default ``flush_at``/``flush_interval`` in the track phases):

- idle: the probe alone, the baseline;
- track: ``track()`` called from a coroutine, the loop given back after each call (as a
  server does between requests), first with the sender idle (nothing due to be sent), then
  with it delivering every 20 events (the defaults);
- track via to_thread: ``await asyncio.to_thread(client.track, ...)`` for each call;
- burst inline: K ``track()`` calls in one go, never yielding (bulk work in a handler),
  then the same K events as one ``track_many()`` call;
- burst to_thread: the same K events as ``await asyncio.to_thread(client.track_many, ...)``;
- flush(): K events queued, then ``client.flush()`` called directly in the loop;
- aflush(): K events queued, then ``await client.aflush()``.

Standalone: needs only the package (and ``httpx``, which it depends on).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from typing import Callable, Optional

from whisperr_durable import DurableWhisperr

API_KEY = "wrk_bench_async"
EVENT = ("user_8842", "payment_failed", {"amount": 49.0, "currency": "usd"})
PROBE_INTERVAL = 0.001


class DevServerProcess:
    """``python -m whisperr_durable.devserver --port 0`` in a child process."""

    def __init__(self, workdir: str) -> None:
        self.log_path = os.path.join(workdir, "devserver.log")
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.url = ""

    def __enter__(self) -> DevServerProcess:
        cmd = [sys.executable, "-m", "whisperr_durable.devserver", "--port", "0"]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [*cmd, "--api-key", API_KEY], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 20
        while not self.url:
            with open(self.log_path, "rb") as f:
                first = f.readline()
            if first.endswith(b"\n") and first.startswith(b"http://"):
                self.url = first.decode().strip()
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the devserver did not start: {first!r}")
            else:
                time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LagProbe:
    """Sleeps ``PROBE_INTERVAL`` repeatedly; each sample is how late it woke, in seconds."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._running = True
        self._task: Optional[asyncio.Task[None]] = None

    async def __aenter__(self) -> LagProbe:
        self._task = asyncio.ensure_future(self._run())
        await asyncio.sleep(0.02)  # let it settle into its rhythm
        self.lags.clear()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._running = False
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        clock = time.perf_counter
        while self._running:
            start = clock()
            await asyncio.sleep(PROBE_INTERVAL)
            self.lags.append(clock() - start - PROBE_INTERVAL)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


def report(name: str, lags: list[float], calls: Optional[list[float]] = None) -> None:
    """One row: per-call cost (µs) if timed, then the probe's lag percentiles (µs)."""
    if calls:
        cost = f"{us(statistics.median(calls)):>7} {us(pct(calls, 0.99)):>7} {us(max(calls)):>8}"
    else:
        cost = f"{'':>7} {'':>7} {'':>8}"
    print(
        f"{name:<32} {cost} | {len(lags):>6} {us(pct(lags, 0.5)):>6} {us(pct(lags, 0.99)):>7}"
        f" {us(max(lags)):>8}",
        flush=True,
    )


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def phases(args: argparse.Namespace, url: str, workdir: str) -> None:
    n, k = args.n, args.k
    items = [EVENT] * k
    live = DurableWhisperr(API_KEY, path=os.path.join(workdir, "live.db"), base_url=url)
    held = DurableWhisperr(
        API_KEY,
        path=os.path.join(workdir, "held.db"),
        base_url=url,
        flush_at=10**9,
        flush_interval=3600.0,
    )
    print(
        f"{'phase':<32} {'call µs: p50':>12} {'p99':>7} {'max':>8} |"
        f" {'probe lag µs: n':>15} {'p50':>6} {'p99':>7} {'max':>8}"
    )

    async with LagProbe() as probe:
        await asyncio.sleep(1.0)
    report("idle", probe.lags)

    clock = time.perf_counter
    for name, client in (("sender idle", held), ("sending", live)):
        calls: list[float] = []
        async with LagProbe() as probe:
            for _ in range(n):
                start = clock()
                client.track(*EVENT)
                calls.append(clock() - start)
                await asyncio.sleep(0)
        report(f"track x{n}, {name}", probe.lags, calls)
    assert await held.aflush(timeout=60), "held client did not drain"

    calls = []
    async with LagProbe() as probe:
        for _ in range(n):
            start = clock()
            await asyncio.to_thread(live.track, *EVENT)
            calls.append(clock() - start)
    report(f"track via to_thread x{n}", probe.lags, calls)

    async def inline_burst() -> None:
        for item in items:
            live.track(*item)

    async with LagProbe() as probe:
        burst = await timed(inline_burst)
    report(f"burst inline x{k}", probe.lags, [burst])

    async def inline_track_many() -> None:
        live.track_many(items)

    async with LagProbe() as probe:
        burst = await timed(inline_track_many)
    report(f"burst inline track_many x{k}", probe.lags, [burst])

    async with LagProbe() as probe:
        burst = await timed(lambda: asyncio.to_thread(live.track_many, items))
    report(f"burst to_thread x{k}", probe.lags, [burst])
    assert await live.aflush(timeout=60), "live client did not drain"

    async def flush_inline() -> None:
        assert held.flush(timeout=60)

    async def aflush() -> None:
        assert await held.aflush(timeout=60)

    for name, flush in (("flush()", flush_inline), ("await aflush()", aflush)):
        held.track_many(items)
        async with LagProbe() as probe:
            took = await timed(flush)
        report(f"{name} of {k}", probe.lags, [took])

    live.shutdown(timeout=10)
    held.shutdown(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="calls in the per-call phases")
    parser.add_argument("--k", type=int, default=2000, help="events in a burst and a flush")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs, load {load:.2f}, switch interval "
        f"{sys.getswitchinterval() * 1e3:.0f} ms"
    )
    with tempfile.TemporaryDirectory() as workdir, DevServerProcess(workdir) as server:
        asyncio.run(phases(args, server.url, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
