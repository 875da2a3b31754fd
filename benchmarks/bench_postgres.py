"""The PostgreSQL store, next to raw psycopg on the same server.

Runs against ``$WHISPERR_TEST_POSTGRES`` (a server URL) if set, else a throwaway server of
its own (``scripts/postgres.py``) where this machine has PostgreSQL; otherwise the result
says why it did not run. Each measurement gets a database of its own.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional

from bench_cases import IDLE, Context, _ours, _raw_row
from bench_common import (
    API_KEY,
    EVENT_TYPE,
    PROPERTIES,
    USER_ID,
    Result,
    ServerProcess,
    child_env,
    closed_port_url,
    gc_paused,
    log,
    process_cpu_seconds,
    summarize_ns,
    time_calls,
)

HERE = os.path.dirname(os.path.abspath(__file__))
_databases = itertools.count()

# A table like the outbox's, for the raw baselines.
_RAW_TABLE = (
    "CREATE TABLE raw_ops (key_fp text NOT NULL, id bigint GENERATED ALWAYS AS IDENTITY, "
    "kind smallint NOT NULL, body text NOT NULL, created_ms bigint NOT NULL, "
    "attempts integer NOT NULL DEFAULT 0, PRIMARY KEY (key_fp, id))"
)
_RAW_INSERT = "INSERT INTO raw_ops (key_fp, kind, body, created_ms) VALUES (%s, 0, %s, %s)"


@contextmanager
def _server() -> Iterator[Optional[str]]:
    url = os.environ.get("WHISPERR_TEST_POSTGRES")
    if url:
        yield url
        return
    sys.path.insert(0, os.path.join(HERE, "..", "scripts"))
    from postgres import throwaway_server  # type: ignore[import-not-found]

    with throwaway_server() as server:
        yield None if server is None else server.url


def _database(server_url: str) -> str:
    import psycopg

    name = f"whisperr_bench_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name


def _interleaved(
    variants: dict[str, Callable[[], Any]], calls: int, rounds: int, warmup: int
) -> dict[str, dict[str, float]]:
    samples: dict[str, list[int]] = {name: [] for name in variants}
    for fn in variants.values():
        time_calls(fn, (), warmup)
    for r in range(rounds):
        order = list(variants.items())
        if r % 2:
            order.reverse()
        for name, fn in order:
            with gc_paused():
                samples[name] += time_calls(fn, (), calls // rounds)
    return {name: summarize_ns(s) for name, s in samples.items()}


def bench_postgres(ctx: Context) -> Result:
    result = Result("postgres", "the PostgreSQL store: track(), the caller's transaction, drain")
    try:
        import psycopg
    except ImportError:
        result.error = "psycopg is not installed (the postgres extra)"
        return result
    with _server() as server_url:
        if server_url is None:
            result.error = "no PostgreSQL on this machine (set WHISPERR_TEST_POSTGRES)"
            return result
        _calls(ctx, result, server_url, psycopg)
        _drains(ctx, result, server_url)
        _bloat(ctx, result, server_url)
    return result


def _calls(ctx: Context, result: Result, server_url: str, psycopg: Any) -> None:
    sizes = ctx.sizes
    calls, rounds, warmup = sizes.track_calls // 2, sizes.rounds, sizes.track_warmup
    db = _database(server_url)
    client = _ours(db, base_url=closed_port_url(), max_queue_size=10**9, **IDLE)
    client.track(USER_ID, EVENT_TYPE, PROPERTIES)  # the tables, made
    raw = psycopg.connect(db, autocommit=True)
    raw.execute(_RAW_TABLE)
    tx = psycopg.connect(db)

    def raw_commit() -> None:
        raw.execute(_RAW_INSERT, ("k", _raw_row(), 0))

    def ours() -> None:
        client.track(USER_ID, EVENT_TYPE, PROPERTIES)

    def raw_in_tx() -> None:
        tx.execute(_RAW_INSERT, ("k", _raw_row(), 0))

    def ours_in_tx() -> None:
        client.track(USER_ID, EVENT_TYPE, PROPERTIES, connection=tx)

    log("track() and raw INSERT + commit")
    own = _interleaved({"ours": ours, "raw": raw_commit}, calls, rounds, warmup)
    log("in the caller's transaction")
    joined = _interleaved({"ours": ours_in_tx, "raw": raw_in_tx}, calls, rounds, warmup)
    tx.rollback()
    tx.close()
    raw.close()
    client.shutdown(0)
    result.data.update(own_connection=own, in_transaction=joined)
    result.latency("track(), its own connection", own["ours"])
    result.latency("raw psycopg INSERT + commit of the same row", own["raw"])
    ratio = own["ours"]["median_us"] / own["raw"]["median_us"]
    result.add("track() / raw INSERT + commit, median", ratio, "x", "<= 1.2x", ratio <= 1.2)
    result.latency("track(connection=tx), in the caller's transaction", joined["ours"])
    result.latency("raw INSERT in the caller's transaction", joined["raw"])
    ratio = joined["ours"]["median_us"] / joined["raw"]["median_us"]
    result.add("track(connection=tx) / raw INSERT, median", ratio, "x", "<= 1.2x", ratio <= 1.2)
    result.notes.append(
        f"{rounds} interleaved rounds, {calls:,} calls each variant; the raw rows are built "
        "with json.dumps around a fresh id (as the SQLite raw floor), into a table shaped "
        "like the outbox's; the server on 127.0.0.1."
    )


# A process of its own: made and connected, it says so, then drains when told to.
_DRAIN_CHILD = """
import sys
from whisperr_durable import DurableWhisperr
db, url, key = sys.argv[1:4]
client = DurableWhisperr(key, path=db, base_url=url, flush_at=10**9, flush_interval=3600)
client.stats()  # connected, the tables seen
print("ready", flush=True)
sys.stdin.readline()
print(client.flush(timeout=600).pending, flush=True)
"""


def _load(db: str, key: str, n: int) -> None:
    """A backlog of ``n`` undelivered rows of ``key``."""
    from whisperr_durable import DurableWhisperr

    loader = DurableWhisperr(key, path=db, base_url=closed_port_url(), max_queue_size=10**9, **IDLE)
    loader.track_many((USER_ID, EVENT_TYPE, PROPERTIES) for _ in range(n))
    loader.shutdown(0)


def _drains(ctx: Context, result: Result, server_url: str) -> None:
    n = ctx.sizes.backlog_rows
    db = _database(server_url)
    log(f"a backlog of {n:,} rows, drained by one sender into the sink")
    _load(db, API_KEY, n)
    with ServerProcess(ctx.workdir, sink=True) as sink:
        client = _ours(db, base_url=sink.url, max_queue_size=10**9)
        cpu = process_cpu_seconds()
        start = time.perf_counter()
        left = client.flush(timeout=600).pending
        elapsed = time.perf_counter() - start
        cpu = process_cpu_seconds() - cpu
        client.shutdown(5)
    rate = n / elapsed
    result.data["drain_one"] = {"rows": n, "seconds": elapsed, "rate": rate, "left": left}
    result.add(
        f"drain {n:,} rows into the sink: one sender",
        rate,
        "events/s",
        ">= 100,000/s",
        rate >= 100_000,
        f"{elapsed:.1f} s; client CPU {cpu / n * 1e6:.1f} µs/event",
    )

    procs = 4
    db = _database(server_url)
    keys = [f"{API_KEY}_{p}" for p in range(procs)]
    log(f"{procs} backlogs of {n // procs:,} rows (a key each), drained by {procs} processes")
    for key in keys:
        _load(db, key, n // procs)
    with ServerProcess(ctx.workdir, sink=True) as sink:
        children = [
            subprocess.Popen(
                [sys.executable, "-c", _DRAIN_CHILD, db, sink.url, key],
                env=child_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for key in keys
        ]
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        start = time.perf_counter()
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outs = [child.communicate(timeout=900)[0].strip() for child in children]
        elapsed = time.perf_counter() - start
    rate = (n // procs * procs) / elapsed
    result.data["drain_four"] = {"seconds": elapsed, "rate": rate, "left": outs}
    result.add(
        f"drain: {procs} processes together",
        rate,
        "events/s",
        note=f"{elapsed:.1f} s, each its own key, timed from when all were connected",
    )


def _bloat(ctx: Context, result: Result, server_url: str) -> None:
    """The ops table's size under a steady stream tracked and delivered for a while."""
    import psycopg

    seconds = 10.0 if ctx.quick else 120.0
    db = _database(server_url)
    log(f"the ops table's size under {seconds:.0f} s of steady tracking and delivery")
    sizes: list[tuple[int, int, int]] = []  # bytes, live rows, dead rows
    with ServerProcess(ctx.workdir, sink=True) as sink, psycopg.connect(db, autocommit=True) as c:
        client = _ours(db, base_url=sink.url, flush_at=200, flush_interval=0.5)
        start = time.perf_counter()
        tracked = 0
        next_sample = start
        while time.perf_counter() - start < seconds:
            client.track(USER_ID, EVENT_TYPE, PROPERTIES)
            tracked += 1
            if time.perf_counter() >= next_sample:
                ((size, live, dead),) = c.execute(
                    "SELECT pg_total_relation_size(relid), n_live_tup, n_dead_tup "
                    "FROM pg_stat_user_tables WHERE schemaname = 'whisperr_durable' "
                    "AND relname = 'ops'"
                ).fetchall()
                sizes.append((int(size), int(live), int(dead)))
                next_sample += seconds / 10
        client.flush(timeout=30)
        client.shutdown(1)
    result.data["bloat"] = {"tracked": tracked, "sizes": sizes, "seconds": seconds}
    for label, (size, live, dead) in (
        ("ops table after a tenth of the run", sizes[1]),
        ("ops table at half time", sizes[len(sizes) // 2]),
        ("ops table at the end", sizes[-1]),
    ):
        result.add(label, size / 1024, "KiB", note=f"{live:,} live rows, {dead:,} dead (estimates)")
    result.add("ops tracked and delivered meanwhile", tracked, "ops", note=f"in {seconds:.0f} s")
    result.notes.append(
        "bloat: one client tracking flat out while its sender delivers to the sink; the "
        "table's size (with its indexes and TOAST) sampled ten times. Autovacuum is the "
        "server's default (a pass a minute at most), with the table's own scale factors (2%): "
        "the table grows until a pass, then its free space is used again."
    )
