"""Helpers shared by the benchmark runner: sizes, statistics, result rows, subprocesses.

Standard library only (plus the packages being measured), no numpy.
"""

from __future__ import annotations

import atexit
import gc
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CHILD = os.path.join(HERE, "bench_child.py")
API_KEY = "wrk_bench_key"

# What every track() call sends, in every variant (ours, the official SDK, raw SQLite).
USER_ID = "user_8842"
EVENT_TYPE = "payment_failed"
PROPERTIES: dict[str, Any] = {"amount_cents": 4900, "currency": "usd"}


# ---- sizes ----


@dataclass(frozen=True)
class Sizes:
    """How much work each benchmark does; ``--quick`` picks the small set."""

    track_calls: int  # timed calls per variant, over `rounds` interleaved rounds
    track_warmup: int
    rounds: int
    fsync_seconds: float  # per FULL-mode measurement
    bulk_events: int
    official_bulk_events: int
    sustained_seconds: float
    backlog_rows: int  # the drain and the RSS benchmarks
    mp_calls: int  # per process
    mp_warmup: int
    import_runs: int
    cron_runs: int
    eviction_calls: int  # timed calls per variant (an empty queue must not fill up)
    eviction_queue: int  # max_queue_size

    @staticmethod
    def pick(quick: bool) -> Sizes:
        if quick:
            return Sizes(
                track_calls=5_000,
                track_warmup=500,
                rounds=5,
                fsync_seconds=0.5,
                bulk_events=50_000,
                official_bulk_events=50_000,
                sustained_seconds=2.0,
                backlog_rows=50_000,
                mp_calls=2_000,
                mp_warmup=200,
                import_runs=3,
                cron_runs=1,
                eviction_calls=2_000,
                eviction_queue=10_000,
            )
        return Sizes(
            track_calls=100_000,
            track_warmup=2_000,
            rounds=5,
            fsync_seconds=3.0,
            bulk_events=1_000_000,
            official_bulk_events=300_000,
            sustained_seconds=10.0,
            backlog_rows=1_000_000,
            mp_calls=20_000,
            mp_warmup=1_000,
            import_runs=5,
            cron_runs=3,
            eviction_calls=8_000,
            eviction_queue=10_000,
        )


# ---- statistics ----


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (p in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summarize_ns(samples: Sequence[int]) -> dict[str, float]:
    """Per-call latencies in ns -> median/p99/p99.9/max in µs and calls/s (from the mean)."""
    ordered = sorted(samples)
    total = sum(ordered)
    return {
        "n": len(ordered),
        "median_us": percentile(ordered, 50) / 1000,
        "p99_us": percentile(ordered, 99) / 1000,
        "p999_us": percentile(ordered, 99.9) / 1000,
        "max_us": ordered[-1] / 1000 if ordered else float("nan"),
        "mean_us": total / len(ordered) / 1000 if ordered else float("nan"),
        "calls_per_s": len(ordered) / (total / 1e9) if total else float("nan"),
    }


def time_calls(fn: Callable[..., Any], args: tuple[Any, ...], n: int) -> list[int]:
    """Call ``fn(*args)`` n times; the duration of each call in ns (perf_counter_ns around it)."""
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        start = clock()
        fn(*args)
        samples[i] = clock() - start
    return samples


@contextmanager
def gc_paused() -> Iterator[None]:
    """Collect first, then keep the cyclic GC off while timing."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def timer_overhead_ns(n: int = 20_000) -> float:
    """The median cost of two perf_counter_ns calls around nothing (included in every sample)."""
    with gc_paused():
        samples = sorted(time_calls(lambda: None, (), n))
    return percentile(samples, 50)


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points (y per unit of x); 0 for fewer than 2 points."""
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def process_cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads)."""
    usage = os.times()
    return usage.user + usage.system


def pid_cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process, from /proc (Linux); NaN elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    # After the ")" that ends the command name, utime and stime are the 12th and 13th fields.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def dir_size(path: str, prefix: str) -> int:
    """Bytes in the files of ``path`` whose names start with ``prefix`` (a db and its -wal)."""
    return sum(
        os.path.getsize(os.path.join(path, name))
        for name in os.listdir(path)
        if name.startswith(prefix) and not name.endswith(".lock")
    )


def stored_count(result: Any) -> int:
    """What ``track_many`` committed: its result's ``stored``, or the int older versions
    returned."""
    return result if isinstance(result, int) else int(result.stored)


def queue_size(path: str) -> int:
    """Rows queued in the outbox (all keys), in O(log n) per key: the span of ids of each
    key's queue table. Rows only leave a queue from its head, so the span is the count."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        tables = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'ops:%'"
        ).fetchall()
        total = 0
        for (name,) in tables:
            quoted = '"' + name.replace('"', '""') + '"'
            # Two subqueries: each takes SQLite's min/max shortcut (one b-tree step), which
            # a single "SELECT min(id), max(id)" does not (it scans the table).
            low, high = conn.execute(
                f"SELECT (SELECT min(id) FROM {quoted}), (SELECT max(id) FROM {quoted})"
            ).fetchone()
            total += 0 if low is None else high - low + 1
        return total
    finally:
        conn.close()


# ---- results ----


@dataclass
class Row:
    """One line of the printed table."""

    label: str
    value: Optional[float]
    unit: str
    target: str = ""
    met: Optional[bool] = None
    note: str = ""


@dataclass
class Latency:
    """One line of a section's latency sub-table (figures from summarize_ns)."""

    label: str
    stats: dict[str, float]
    target: str = ""
    met: Optional[bool] = None


@dataclass
class Result:
    """What one benchmark measured: table rows, raw figures for the JSON, notes."""

    name: str
    title: str
    latencies: list[Latency] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: Optional[str] = None

    def add(
        self,
        label: str,
        value: Optional[float],
        unit: str,
        target: str = "",
        met: Optional[bool] = None,
        note: str = "",
    ) -> None:
        self.rows.append(Row(label, value, unit, target, met, note))

    def latency(
        self, label: str, stats: dict[str, float], target: str = "", met: Optional[bool] = None
    ) -> None:
        self.latencies.append(Latency(label, stats, target, met))

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "seconds": round(self.seconds, 2),
            "error": self.error,
            "latencies": [asdict(r) for r in self.latencies],
            "rows": [asdict(r) for r in self.rows],
            "notes": self.notes,
            "data": self.data,
        }


def fmt_value(value: Optional[float], unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    suffix = f" {unit}" if unit else ""
    if unit in ("/s", "events/s", "calls/s", "") or abs(value) >= 100:
        return f"{value:,.0f}{suffix}"
    if abs(value) >= 10:
        return f"{value:.1f}{suffix}"
    return f"{value:.2f}{suffix}"


def _verdict(met: Optional[bool]) -> str:
    return "" if met is None else ("met" if met else "NOT MET")


def _columns(rows: Sequence[Sequence[str]], right: Sequence[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        ]
        out.append(("  " + "  ".join(cells)).rstrip())
    return out


def render_table(results: Sequence[Result]) -> str:
    out: list[str] = []
    for result in results:
        out.append(f"== {result.name}: {result.title} ({result.seconds:.1f} s)")
        if result.error:
            out.append(f"  ERROR: {result.error}")
        if result.latencies:
            head = [
                "per call (µs)",
                "median",
                "p99",
                "p99.9",
                "max",
                "calls/s",
                "target",
                "verdict",
            ]
            rows = [head]
            for lat in result.latencies:
                s = lat.stats
                rows.append(
                    [lat.label]
                    + [
                        fmt_value(s[k], "") if s[k] >= 100 else f"{s[k]:.1f}"
                        for k in ("median_us", "p99_us", "p999_us", "max_us")
                    ]
                    + [fmt_value(s["calls_per_s"], ""), lat.target, _verdict(lat.met)]
                )
            out += _columns(rows, right=(1, 2, 3, 4, 5))
            out.append("")
        if result.rows:
            rows = [["measurement", "value", "target", "verdict", "note"]]
            rows += [
                [r.label, fmt_value(r.value, r.unit), r.target, _verdict(r.met), r.note]
                for r in result.rows
            ]
            out += _columns(rows, right=(1,))
        out.append("")
    notes = [(r.name, n) for r in results for n in r.notes]
    if notes:
        out.append("notes:")
        out.extend(f"  [{name}] {note}" for name, note in notes)
    return "\n".join(out)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    with suppress(Exception):
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    with suppress(Exception):
        from importlib.metadata import version

        info["whisperr_durable"] = version("whisperr-durable")
        info["whisperr"] = version("whisperr")
    return info


def log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


# ---- subprocesses ----

_children: list[subprocess.Popen[Any]] = []


_pycache: list[str] = []


def _pycache_dir() -> str:
    if not _pycache:
        _pycache.append(tempfile.mkdtemp(prefix="whisperr-bench-pycache-"))
        atexit.register(shutil.rmtree, _pycache[0], True)
    return _pycache[0]


def child_env() -> dict[str, str]:
    """The environment for child processes: the checkout importable even if not installed.

    Bytecode is written and reused (in a cache of the run's own), whatever the caller's
    environment says: an installed package is imported from its .pyc files, and a
    checkout compiled afresh on every import would measure the compiler, not the SDK."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env.pop("WHISPERR_API_KEY", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = _pycache_dir()
    return env


def spawn(args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a child that the runner will kill if it is still running at the end."""
    kwargs.setdefault("env", child_env())
    proc: subprocess.Popen[Any] = subprocess.Popen(list(args), **kwargs)
    _children.append(proc)
    return proc


def reap_children() -> None:
    """Stop every child this runner started that is still running (SIGTERM, then SIGKILL)."""
    for proc in _children:
        if proc.poll() is None:
            proc.terminate()
    for proc in _children:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _children.clear()


def run_child(mode: str, *args: str, timeout: float = 600) -> dict[str, Any]:
    """Run ``bench_child.py MODE ARGS...``; its last stdout line is a JSON object."""
    proc = spawn(
        [sys.executable, CHILD, mode, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"child {mode} timed out after {timeout} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} exited {proc.returncode}: {err.strip()[-800:]}")
    return dict(json.loads(out.strip().splitlines()[-1]))


def closed_port_url() -> str:
    """A URL on 127.0.0.1 whose port nobody listens on (connections are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _devserver_has_quiet() -> bool:
    """Whether the devserver of the code measured takes ``--quiet`` (older ones print no
    line per event, and refuse the flag)."""
    import whisperr_durable.devserver as devserver

    with open(devserver.__file__, encoding="utf-8") as f:
        return '"--quiet"' in f.read()


class ServerProcess:
    """The real devserver (or, ``sink=True``, the minimal sink of ``sink.py``) in its own
    process, so its CPU is not counted as the client's.

    ``python -m whisperr_durable.devserver --port 0 --api-key K`` prints its URL on the first
    line, then one line per request; its output goes to a file so nothing can block it. The
    sink does the same.
    """

    def __init__(self, workdir: str, api_key: str = API_KEY, *, sink: bool = False) -> None:
        name = "sink" if sink else "devserver"
        self._log_path = os.path.join(workdir, f"{name}-{time.monotonic_ns()}.log")
        if sink:
            self._command = [sys.executable, os.path.join(HERE, "sink.py"), "--port", "0"]
        else:
            self._command = [
                sys.executable,
                "-m",
                "whisperr_durable.devserver",
                "--port",
                "0",
                "--api-key",
                api_key,
                # No line per event received (a cost the devserver's ceiling would count),
                # where the devserver has such lines.
                *(["--quiet"] if _devserver_has_quiet() else []),
            ]
        self.proc: Optional[subprocess.Popen[Any]] = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        with open(self._log_path, "wb") as out:
            self.proc = spawn(self._command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            with open(self._log_path, "rb") as f:
                first = f.readline()
            if first.endswith(b"\n"):
                self.url = first.decode().strip()
                if not self.url.startswith("http://"):
                    raise RuntimeError(f"devserver said {self.url!r}")
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"devserver did not start: {first!r}")
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in _children:
            _children.remove(proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return pid_cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        """The server's resident memory (it keeps every event it accepted)."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def accepted(self) -> int:
        """Events the server accepted so far, summed from its per-request log lines."""
        total = 0
        with open(self._log_path, "rb") as f:
            for line in f:
                marker = line.find(b"accepted=")
                if marker >= 0:
                    total += int(line[marker + 9 :].split(None, 1)[0])
        return total


class OkTransport:
    """For the official SDK: every batch 'delivered' at once, so no network is involved."""

    def send_batch(self, batch: Any) -> str:
        return "ok"

    def send_identify(self, op: Any) -> str:
        return "ok"
