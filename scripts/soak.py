#!/usr/bin/env python3
"""Soak: the chaos loop of ``tests/chaos.py`` for as long as you like.

    python scripts/soak.py --seconds 600
    python scripts/soak.py --seconds 3600 --producers 3 --senders 2 --seed 42

Rounds of producer and sender processes sharing one outbox file are SIGKILLed at random
moments while a local server fails a share of requests, and each round injects faults: a
server that trickles its answers, one that answers 404, an outbox that cannot be written for
a moment, a damaged row, the sender-lock holder stopped (SIGSTOP). Each round prints how many
ops were
tracked (their ``track()`` returned), delivered (unique), still queued and lost, and the
duplicate rate. The run is cut into epochs (``--epoch-seconds``), each with a fresh server and
outbox, so that memory stays bounded: at the end of each, the server stops failing, a fresh
client drains the file and the epoch is audited. Exit status 1 on any loss or other
violation, 0 otherwise.

Run it with the project's interpreter (``.venv/bin/python``, made by ``scripts/dev.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import chaos


def build_parser() -> argparse.ArgumentParser:
    defaults = chaos.ChaosConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="start no round after this")
    parser.add_argument(
        "--epoch-seconds",
        type=float,
        default=120.0,
        help="each epoch (a fresh server and file, drained and audited at its end) lasts "
        "about this long; keeps memory bounded on long runs",
    )
    parser.add_argument("--producers", type=int, default=3, help="producers per round")
    parser.add_argument("--senders", type=int, default=2, help="pure senders per round")
    parser.add_argument("--kills", type=int, default=6, help="aimed kills per round")
    parser.add_argument(
        "--faults",
        default=",".join(chaos.FAULT_KINDS),
        help=f"faults to inject, comma-separated, from {', '.join(chaos.FAULT_KINDS)} "
        "('' for none); default: all",
    )
    parser.add_argument("--faults-per-round", type=int, default=1)
    parser.add_argument("--ops", type=int, default=5_000, help="ops per producer process")
    parser.add_argument("--failure-rate", type=float, default=defaults.failure_rate)
    parser.add_argument("--latency", type=float, default=defaults.latency)
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--workdir", help="keep each epoch's outbox and children's stderr here")
    parser.add_argument(
        "--sabotage",
        action="store_true",
        help="check the checker: producers record ops they never tracked, so the run must FAIL",
    )
    return parser


def run_epoch(config: chaos.ChaosConfig, workdir: str | None) -> chaos.ChaosReport:
    def log(line: str) -> None:
        print(line, flush=True)

    if workdir:
        os.makedirs(workdir, exist_ok=True)
        return chaos.run_chaos(config, workdir, log=log)
    with tempfile.TemporaryDirectory(prefix="whisperr-soak-") as tmp:
        return chaos.run_chaos(config, tmp, log=log)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    faults = tuple(f for f in args.faults.split(",") if f)
    unknown = set(faults) - set(chaos.FAULT_KINDS)
    if unknown:
        print(f"soak: unknown faults {sorted(unknown)}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    print(f"soak: seed {seed}, {args.seconds:.0f}s in epochs of {args.epoch_seconds:.0f}s")
    started = time.monotonic()
    tracked = delivered = lost = duplicates = 0
    failed: list[str] = []
    epoch = 0
    while epoch == 0 or time.monotonic() - started < args.seconds:
        epoch += 1
        left = args.seconds - (time.monotonic() - started)
        config = chaos.ChaosConfig(
            rounds=None,
            seconds=max(1.0, min(args.epoch_seconds, left)),
            producers=args.producers,
            senders=args.senders,
            kills_per_round=args.kills,
            faults=faults,
            faults_per_round=args.faults_per_round,
            ops_per_producer=args.ops,
            failure_rate=args.failure_rate,
            latency=args.latency,
            drain_timeout=120.0,
            child_life=args.epoch_seconds + 600.0,
            seed=seed + epoch - 1,
            sabotage=args.sabotage,
        )
        print(f"epoch {epoch} (seed {config.seed})", flush=True)
        workdir = os.path.join(args.workdir, f"epoch-{epoch}") if args.workdir else None
        report = run_epoch(config, workdir)
        print(report.summary(), flush=True)
        tracked += report.tracked
        delivered += report.delivered_unique
        lost += len(report.lost)
        duplicates += report.duplicates
        for violation in report.violations():
            failed.append(f"epoch {epoch}: {violation}")
            print(f"VIOLATION: {violation}", flush=True)
    rate = duplicates / delivered if delivered else 0.0
    print(
        f"soak done in {time.monotonic() - started:.0f}s, {epoch} epoch(s): tracked {tracked}, "
        f"delivered unique {delivered}, lost {lost}, duplicate rate {rate:.3%}"
    )
    if failed:
        print(f"FAIL: {len(failed)} violation(s)")
        return 1
    print("OK: nothing lost")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
