"""Chaos: producers and senders SIGKILLed at random moments never lose a returned op.

A short run of the loop in ``chaos.py`` (``scripts/soak.py`` runs it for longer). Run with
``-s`` to see the per-round lines and the summary (loss and duplicate rate).
"""

from __future__ import annotations

import os
from pathlib import Path

import chaos
import pytest
from chaos import (
    FAULT_404,
    FAULT_DAMAGED_ROW,
    FAULT_KINDS,
    FAULT_TRICKLE,
    KILL_IN_FLUSH,
    SABOTAGE_EVERY,
    SABOTAGE_SKIP,
    SABOTAGE_TWICE,
    ChaosConfig,
)

pytestmark = pytest.mark.slow  # processes killed at random: dev.py test --quick leaves it out


def test_no_returned_op_is_lost_when_processes_are_killed_at_random(tmp_path: Path) -> None:
    # Rounds of 2 producers and 1 sender, 4 aimed kills each (one of every kind) and one
    # fault (each kind once in five rounds: a trickling server, a 404-answering one, a
    # read-only file, a damaged row, the lock holder stopped); then the final drain and audit.
    seed = int.from_bytes(os.urandom(4), "big")
    config = ChaosConfig(rounds=5, kills_per_round=4, seed=seed)
    print(f"\nchaos seed {config.seed}")
    report = chaos.run_chaos(config, workdir=str(tmp_path))
    print(report.summary())
    print(f"loss: {len(report.lost)}, duplicate rate: {report.duplicate_rate:.3%}")

    assert report.lost == [], f"seed {config.seed}"
    assert report.violations() == [], f"seed {config.seed}"
    assert report.delivered_unique >= report.tracked
    assert report.duplicates == report.duplicates_on_wire

    # The chaos happened: work was done, the server failed requests, deliveries were under
    # way during the rounds, and every kind of kill landed.
    assert report.tracked >= 200
    assert report.failed_requests > 0
    assert report.delivered_before_drain > 0
    assert report.kills[KILL_IN_FLUSH] >= report.rounds
    assert report.in_flush_by_kind[KILL_IN_FLUSH] >= 1, "no sender was killed inside flush()"
    if os.path.exists("/proc/locks"):
        assert report.leader_kills >= 1, "no sender was killed while holding the sender lock"
    assert set(report.faults) == set(FAULT_KINDS)
    for fault in (FAULT_TRICKLE, FAULT_404, FAULT_DAMAGED_ROW):  # the others may find no target
        assert report.fault_effects[fault] >= 1, f"the {fault} fault never bit"
    assert report.dead_letters == report.damaged_rows == 1


def test_the_audit_catches_lost_and_regenerated_ops(tmp_path: Path) -> None:
    # The same loop with producers that lie: op i is recorded without being tracked when
    # i % 50 == 49, and tracked twice (two message ids) when i % 50 == 24.
    config = ChaosConfig(rounds=1, kills_per_round=2, faults=(), sabotage=True, seed=7)
    report = chaos.run_chaos(config, workdir=str(tmp_path), log=lambda line: None)

    recorded = report.returned
    skipped = {(p, i) for p, i in recorded if i % SABOTAGE_EVERY == SABOTAGE_SKIP}
    doubled = {(p, i) for p, i in recorded if i % SABOTAGE_EVERY == SABOTAGE_TWICE}
    assert skipped and doubled, "the producers did not get far enough to lie"
    assert set(report.lost) == skipped
    assert set(report.lost_between_rounds) == skipped
    for p, i in doubled:
        assert any(entry.startswith(f"{(p, i)} accepted twice") for entry in report.regenerated)
    assert report.final_pending == 0
    assert report.violations()
