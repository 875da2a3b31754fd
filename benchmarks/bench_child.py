"""Work the benchmark runner does in child processes. Each mode prints one JSON line last.

python benchmarks/bench_child.py build-backlog PATH N URL
python benchmarks/bench_child.py mp-track PATH URL N WARMUP SAMPLES_OUT
python benchmarks/bench_child.py rss PATH URL
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from array import array
from collections.abc import Iterator
from typing import Any

from bench_common import API_KEY, EVENT_TYPE, PROPERTIES, USER_ID, stored_count

# Large enough that the sender never wakes on its own while we work.
IDLE: dict[str, Any] = {"flush_at": 10**9, "flush_interval": 3600.0}


def events(n: int) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for i in range(n):
        yield (f"user_{i % 1000}", EVENT_TYPE, PROPERTIES)


def build_backlog(path: str, n: int, url: str) -> dict[str, Any]:
    """N undelivered track rows in the outbox at PATH (the sender stays idle; URL is closed)."""
    from whisperr_durable import Whisperr

    client = Whisperr(
        api_key=API_KEY,
        path=path,
        base_url=url,
        max_queue_size=n + 1000,
        shutdown_timeout=0,
        **IDLE,
    )
    start = time.perf_counter()
    if hasattr(client, "track_many"):
        method = "track_many"
        stored = stored_count(client.track_many(events(n)))
    else:  # before track_many existed: the outbox's own bulk append
        from whisperr_durable._client import key_fingerprint
        from whisperr_durable._store import Outbox
        from whisperr_durable._wire import TRACK, encode_track, message_id, utc_now_ms

        method = "Outbox.append_many"
        outbox = Outbox(path, key_fingerprint(API_KEY))
        env = {"sdk_name": "whisperr-durable-python", "sdk_version": "bench"}
        chunk: list[tuple[int, str, int]] = []
        for user, event_type, props in events(n):
            now = utc_now_ms()
            chunk.append(
                (TRACK, encode_track(env, user, event_type, props, None, message_id(), now), now)
            )
            if len(chunk) == 1000:
                outbox.append_many(chunk, n + 1000)
                chunk = []
        if chunk:
            outbox.append_many(chunk, n + 1000)
        outbox.close()
        stored = n
    elapsed = time.perf_counter() - start
    client.shutdown(0)
    return {"rows": stored, "seconds": elapsed, "method": method}


def mp_track(path: str, url: str, n: int, warmup: int, samples_out: str) -> dict[str, Any]:
    """One of several processes tracking into one file: wait for 'go' on stdin, time N calls."""
    from whisperr_durable import Whisperr, WhisperrError

    errors: dict[str, int] = {}

    def on_error(error: WhisperrError) -> None:
        errors[error.type] = errors.get(error.type, 0) + 1

    client = Whisperr(
        api_key=API_KEY, path=path, base_url=url, max_queue_size=10**9, on_error=on_error
    )
    for _ in range(warmup):
        client.track(USER_ID, EVENT_TYPE, PROPERTIES)
    client.flush(timeout=30)
    print("ready", flush=True)
    sys.stdin.readline()  # the barrier: every process starts together
    clock = time.perf_counter_ns
    samples = array("q", bytes(8 * n))
    track = client.track
    gc.collect()
    gc.disable()
    start = time.monotonic_ns()
    for i in range(n):
        t = clock()
        track(USER_ID, EVENT_TYPE, PROPERTIES)
        samples[i] = clock() - t
    end = time.monotonic_ns()
    gc.enable()
    with open(samples_out, "wb") as f:
        samples.tofile(f)
    flushed = client.flush(timeout=60)
    client.shutdown(1)
    return {
        "start_ns": start,
        "end_ns": end,
        "errors": errors,
        "flush_pending": flushed.pending,
        "flush_reason": flushed.reason,
    }


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (-1 where there is none)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _memory() -> dict[str, int]:
    return {f: _status_kib(f) for f in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


def rss(path: str, url: str) -> dict[str, Any]:
    """RSS of a process whose client works on the outbox at PATH (URL refuses connections)."""
    from whisperr_durable import Whisperr

    before = _memory()
    # max_queue_size above the backlog: a smaller one would evict the excess at the first
    # track(), in one large transaction, and this would measure that instead.
    client = Whisperr(
        api_key=API_KEY,
        path=path,
        base_url=url,
        max_retries=0,
        shutdown_timeout=0,
        max_queue_size=10**9,
    )
    for _ in range(100):
        client.track(USER_ID, EVENT_TYPE, PROPERTIES)
    # One delivery attempt: the sender claims a batch from the head, fails, gives it back.
    flushed = client.flush(timeout=10)
    start = time.perf_counter()
    stats = client.stats()
    stats_seconds = time.perf_counter() - start
    memory = _memory()
    result = {
        "before_client_kib": before,
        "rss_kib": memory["VmRSS"],
        "anon_kib": memory["RssAnon"],
        "file_kib": memory["RssFile"],
        "hwm_kib": memory["VmHWM"],
        "pending": stats.pending,
        "stats_seconds": stats_seconds,
        "flush_reason": flushed.reason,
    }
    client.shutdown(0)
    return result


def evict_cliff(path: str, url: str) -> dict[str, Any]:
    """The first track() of a client whose max_queue_size (default) is below the backlog
    (it also opens the file, a few ms), and the one after."""
    from whisperr_durable import Whisperr

    client = Whisperr(api_key=API_KEY, path=path, base_url=url, shutdown_timeout=0, **IDLE)
    start = time.perf_counter()
    client.track(USER_ID, EVENT_TYPE, PROPERTIES)
    first = time.perf_counter() - start
    start = time.perf_counter()
    client.track(USER_ID, EVENT_TYPE, PROPERTIES)
    second = time.perf_counter() - start
    stats = client.stats()
    client.shutdown(0)
    return {
        "first_seconds": first,
        "second_seconds": second,
        "evicted": stats.evicted,
        "pending": stats.pending,
        "rss_kib": _status_kib("VmRSS"),
    }


def main(argv: list[str]) -> int:
    mode, args = argv[0], argv[1:]
    if mode == "build-backlog":
        out = build_backlog(args[0], int(args[1]), args[2])
    elif mode == "mp-track":
        out = mp_track(args[0], args[1], int(args[2]), int(args[3]), args[4])
    elif mode == "rss":
        out = rss(args[0], args[1])
    elif mode == "evict-cliff":
        out = evict_cliff(args[0], args[1])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.pop("WHISPERR_API_KEY", None)
    raise SystemExit(main(sys.argv[1:]))
