"""What a claim takes from the head of a queue, whatever the store: the lease row it must
respect and the plan that picks the run (no SQL here)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from .._options import MAX_LEASE
from .._wire import TRACK
from ._records import Row, Run, sound

MAX_LEASE_MS = int(MAX_LEASE * 1000)
# Why a claim moves a row to the dead letters instead of sending it.
EXPIRED = "expired: older than the server's 30-day window"
DAMAGED = "damaged: the stored row is not the wire JSON of an op"


class Lease(NamedTuple):
    """A key's lease row: ``owner`` holds rows ``first``..``last`` until ``until_ms``."""

    owner: str
    first: int
    last: int
    until_ms: int

    def live(self, now_ms: int) -> bool:
        # A lease further ahead than any sender gives means the clock went back.
        until = self.until_ms if type(self.until_ms) is int else 0
        return now_ms < until <= now_ms + MAX_LEASE_MS

    def covers(self, op_id: int) -> bool:
        return self.first <= op_id <= self.last


NO_LEASE = Lease("", 1, 0, 0)  # covers nothing, never live


class Plan:
    """Which of the rows at the head of a queue one claim takes: the leading run of tracks
    (or one identify alone) not under another owner's live lease, within ``max_bytes``;
    and the rows to move to the dead letters on the way (expired, damaged)."""

    def __init__(
        self, owner: str, max_bytes: int, max_age_ms: int, now_ms: int, take_over: bool
    ) -> None:
        self.owner = owner
        self.max_bytes = max_bytes
        self.max_age_ms = max_age_ms
        self.now_ms = now_ms
        self.take_over = take_over

    def blocked_by(self, lease: Lease) -> bool:
        """Whether ``lease`` keeps this claim off the rows it covers: another owner's, live,
        and not to be taken over."""
        return lease.owner != self.owner and not self.take_over and lease.live(self.now_ms)

    def quick(self, summary: Any, lease: Lease) -> Optional[Run]:
        """The run, from a summary of the whole head window (``Outbox._window_sql``) when
        every row of it is a sound track young enough to send (the common case); ``None``
        otherwise. A text or blob sorts above every number: a maximum that is an int
        means that no row has one there."""
        count, first, last, joined, kind_lo, kind_hi, created_lo, created_hi, attempts, braced = (
            summary
        )
        if (
            not count
            or braced != 1
            or not (type(kind_lo) is type(kind_hi) is int and kind_lo == kind_hi == TRACK)
            or not (type(created_lo) is type(created_hi) is type(attempts) is int)
            or created_lo < self.now_ms - self.max_age_ms
            or type(joined) is not bytes
            or len(joined) + 2 > self.max_bytes
            or not joined.isascii()
            or (self.blocked_by(lease) and lease.first <= last and first <= lease.last)
        ):
            return None
        return Run(first, last, count, TRACK, joined)

    def run(self, head: list[Any], lease: Lease) -> tuple[list[Row], list[int], list[int]]:
        now_ms = self.now_ms
        blocked = self.blocked_by(lease)
        oldest_allowed = now_ms - self.max_age_ms
        room = self.max_bytes
        batch: list[Row] = []
        expired: list[int] = []
        damaged: list[int] = []
        for op_id, kind, body, created_ms, attempts in head:
            if blocked and lease.covers(op_id):
                break  # under another owner's live lease
            if (
                kind == TRACK
                and type(body) is bytes
                and type(created_ms) is int
                and type(attempts) is int
                and body.isascii()
                and body.startswith(b"{")
                and body.endswith(b"}")
            ):
                if created_ms < oldest_allowed:
                    expired.append(op_id)
                    continue
                room -= len(body) + 2
                if batch and room < 0:
                    break
                batch.append(Row(op_id, kind, body, created_ms, attempts))
                continue
            if not sound(kind, body, created_ms, attempts):
                damaged.append(op_id)
                continue
            # An identify goes alone.
            if not batch:
                batch.append(Row(op_id, kind, body, created_ms, attempts))
            break
        return batch, expired, damaged
