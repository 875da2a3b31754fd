"""Benchmarks: whisperr_durable next to the official whisperr SDK, in one run.

    .venv/bin/python benchmarks/run.py [--quick] [--only NAME,...] [--json PATH]

Prints a table (each figure with its target, met or NOT MET) and writes the
figures, raw data and machine info as JSON (default: benchmarks/results/latest.json).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import whisperr_durable  # noqa: F401
except ImportError:  # a checkout that is not installed: use it from the source tree
    sys.path.insert(1, os.path.dirname(HERE))

from bench_cases import BENCHMARKS, Context  # noqa: E402
from bench_common import (  # noqa: E402
    Result,
    Sizes,
    machine_info,
    reap_children,
    render_table,
    timer_overhead_ns,
)

DEFAULT_JSON = os.path.join(HERE, "results", "latest.json")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: every benchmark in well under a minute"
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="NAME,...",
        help=f"run only these benchmarks, of: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--json", default=DEFAULT_JSON, metavar="PATH", help="default: %(default)s")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (its path is printed)"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    args.names = names
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.environ.pop("WHISPERR_API_KEY", None)
    # SIGTERM ends the run like Ctrl-C: through the clean-up below (children, temp files).
    signal.signal(signal.SIGTERM, _terminate)
    sizes = Sizes.pick(args.quick)
    # The temporary files live on the disk that TMPDIR points at: the FULL-mode figures are
    # that disk's.
    workdir = tempfile.mkdtemp(prefix="whisperr-bench-")
    started = time.time()
    results: list[Result] = []
    machine = machine_info()
    machine["timer_overhead_ns"] = timer_overhead_ns()
    machine["workdir_device"] = _device_of(workdir)
    machine["loadavg_start"] = _loadavg()
    cpu_start = _cpu_times()
    if machine["loadavg_start"] and machine["loadavg_start"][0] > 0.5:
        print(
            f"warning: load average {machine['loadavg_start'][0]:.2f} before the run: "
            "other work on this machine will skew the figures",
            file=sys.stderr,
        )
    print(
        f"whisperr_durable benchmarks ({'quick' if args.quick else 'full'}): "
        f"{', '.join(args.names)}; python {machine['python']}, SQLite {machine['sqlite']}, "
        f"{machine['cpu_count']} CPUs; in {workdir}",
        file=sys.stderr,
        flush=True,
    )
    try:
        ctx = Context(sizes=sizes, workdir=workdir, quick=args.quick)
        for name in args.names:
            print(f"[{name}]", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                result = BENCHMARKS[name](ctx)
            except Exception as exc:
                traceback.print_exc()
                result = Result(name, "failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                reap_children()
            result.seconds = time.perf_counter() - t0
            print(f"[{name}] {result.seconds:.1f} s", file=sys.stderr, flush=True)
            results.append(result)
    finally:
        reap_children()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    machine["loadavg_end"] = _loadavg()
    machine["steal_percent"] = _steal_percent(cpu_start, _cpu_times())
    print(render_table(results))
    print(
        f"\nmachine: {machine['cpu_count']} CPUs ({machine.get('cpu_model', '?')}), python "
        f"{machine['python']}, SQLite {machine['sqlite']}, {machine['platform']}; temporary "
        f"files on {machine['workdir_device']}; load average at start "
        f"{_fmt_load(machine['loadavg_start'])}, at end {_fmt_load(machine['loadavg_end'])}; "
        f"CPU time stolen by the hypervisor during the run: {_fmt_steal(machine['steal_percent'])}"
    )
    steal = machine["steal_percent"]
    if steal is not None and steal > 5:
        print(
            f"warning: the hypervisor took {steal:.0f}% of this machine's CPU time during the "
            "run: every figure is slower than the machine's own, ratios less so",
            file=sys.stderr,
        )
    report = {
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "seconds": round(time.time() - started, 1),
        "mode": "quick" if args.quick else "full",
        "machine": machine,
        "sizes": sizes.__dict__,
        "benchmarks": {r.name: r.to_json() for r in results},
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"\nJSON: {args.json} (total {report['seconds']} s)")
    return 1 if any(r.error for r in results) else 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_times() -> Optional[list[int]]:
    """The machine's CPU time counters (``/proc/stat``'s first line), or ``None``."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def _steal_percent(start: Optional[list[int]], end: Optional[list[int]]) -> Optional[float]:
    """How much of the CPU time between two readings a hypervisor gave to other guests (the
    8th counter, ``steal``): a machine under steal runs everything slower, unevenly."""
    if not start or not end or len(start) < 8 or len(end) < 8:
        return None
    total = sum(end[:8]) - sum(start[:8])
    return round(100 * (end[7] - start[7]) / total, 1) if total > 0 else None


def _fmt_steal(steal: Optional[float]) -> str:
    return "?" if steal is None else f"{steal:.0f}%"


def _fmt_load(load: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load) or "?"


def _device_of(path: str) -> str:
    """The filesystem the temporary files are on (from /proc/mounts), for the record."""
    try:
        best = ("", "")
        real = os.path.realpath(path)
        with open("/proc/mounts") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                if real.startswith(mount) and len(mount) >= len(best[0]):
                    best = (mount, f"{device} on {mount} ({fstype})")
        return best[1]
    except OSError:
        return ""


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("\ninterrupted (child processes stopped, temporary files removed)", file=sys.stderr)
        raise SystemExit(130) from None
