"""What the store hands out: rows, claims, dead letters, reports, stats; and its error."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Optional

from .._wire import EVENT_SEPARATOR, IDENTIFY, TRACK


class StoreError(Exception):
    """The outbox file could not be read or written (disk full, read-only, locked, ...)."""


class Row(NamedTuple):
    id: int
    kind: int
    body: bytes  # the wire JSON, ASCII
    created_ms: int
    attempts: int


class Run(NamedTuple):
    """Ops of one queue to send in one request: one identify alone, or a run of tracks.
    ``body`` is their wire JSON: the identify's own, or the tracks' joined by
    ``EVENT_SEPARATOR``."""

    first: int  # the ids of the first and the last op
    last: int
    ops: int
    kind: int
    body: bytes


def run_of(rows: Sequence[Row]) -> Run:
    """The run of ``rows`` (one identify, or tracks in id order)."""
    joined = EVENT_SEPARATOR.encode().join(r.body for r in rows)
    return Run(rows[0].id, rows[-1].id, len(rows), rows[0].kind, joined)


class Claim(NamedTuple):
    """What one claim took: the run to send now (``None``: nothing to send), and rows it
    dead-lettered instead: expired (the server would refuse them) or damaged (not an op's
    wire JSON any more); ``pruned`` older dead letters removed to keep ``max_dead_letters``."""

    run: Optional[Run]
    expired: int = 0
    damaged: int = 0
    pruned: int = 0


def sound(kind: object, body: object, created_ms: object, attempts: object) -> bool:
    """Whether a queued row is still an op we wrote: the wire JSON (ASCII, one object) of a
    known kind. Anything else (a damaged page, another program's row) is never sent."""
    return (
        kind in (TRACK, IDENTIFY)
        and isinstance(body, bytes)
        and isinstance(created_ms, int)
        and isinstance(attempts, int)
        and body.isascii()
        and body[:1] == b"{"
        and body[-1:] == b"}"
    )


class DeadLetter(NamedTuple):
    id: int
    op_id: int
    kind: str
    body: str
    created_ms: int
    failed_ms: int
    attempts: int
    status: Optional[int]
    reason: str
    key_fingerprint: str = ""


class KeyReport(NamedTuple):
    """One key's part of an outbox file, as ``key_reports`` reads it."""

    key_fp: str
    pending_tracks: int = 0
    pending_identifies: int = 0
    oldest_created_ms: Optional[int] = None
    leased: int = 0
    lease_owner: Optional[str] = None
    lease_until_ms: Optional[int] = None
    dead_letters: int = 0
    evicted: int = 0
    sender_pid: Optional[int] = None
    last_attempt_ms: Optional[int] = None
    last_success_ms: Optional[int] = None
    last_error: Optional[str] = None
    last_error_ms: Optional[int] = None

    @classmethod
    def from_parts(cls, parts: dict[str, Any]) -> KeyReport:
        sender = parts.get("sender") or (None, None, None, None, None)
        return cls(
            key_fp=parts["key_fp"],
            pending_tracks=parts.get("tracks", 0),
            pending_identifies=parts.get("identifies", 0),
            oldest_created_ms=parts.get("oldest_ms"),
            leased=parts.get("leased", 0),
            lease_owner=parts.get("lease_owner"),
            lease_until_ms=parts.get("lease_until_ms"),
            dead_letters=parts.get("dead_letters", 0),
            evicted=parts.get("evicted", 0),
            sender_pid=sender[0],
            last_attempt_ms=sender[1],
            last_success_ms=sender[2],
            last_error=sender[3],
            last_error_ms=sender[4],
        )


def text_of(body: object) -> str:
    """A stored body as text, whatever damage it took (shown to operators, never sent)."""
    if isinstance(body, bytes):
        return body.decode("utf-8", "replace")
    return str(body)


def int_or_zero(value: object) -> int:
    return value if isinstance(value, int) else 0


def dead_letter_filters(
    ids: Optional[Sequence[int]], key_fp: Optional[str]
) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """WHERE clauses that select the given dead letters (in chunks SQLite can take)."""
    key_clause, key_params = (" AND key_fp = ?", (key_fp,)) if key_fp else ("", ())
    if ids is None:
        yield (f"WHERE 1{key_clause}", key_params)
        return
    ids = list(ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        yield (f"WHERE id IN ({marks}){key_clause}", (*chunk, *key_params))


class OutboxStats(NamedTuple):
    """What the outbox holds for one key, and what became of the ops that left it.

    ``oldest_created_ms``: when the op at the head of the queue, the next to be sent, was
    made (the oldest queued, unless dead letters were put back at the end of the queue or
    the processes that wrote it had different clocks).

    ``evicted`` (by ``max_queue_size``), ``refused`` (moved to the dead letters: refused by
    the server, expired or damaged) and ``dead_letters_pruned`` (removed by
    ``max_dead_letters``) are totals kept in the file, for every process. ``store_errors``
    (failed writes), ``held`` (ops waiting in memory while the file cannot be written) and
    ``lost`` (ops dropped from memory, or left in a file replaced under the process) and
    ``delivered`` are this process's own. ``error`` says why the file could not be read; the
    file's counts are then 0.
    """

    pending_tracks: int
    pending_identifies: int
    oldest_created_ms: Optional[int]
    dead_letters: int
    evicted: int
    schema_version: int
    store_errors: int = 0
    refused: int = 0
    dead_letters_pruned: int = 0
    held: int = 0
    lost: int = 0
    error: Optional[str] = None
    delivered: int = 0  # ops this process's sender delivered (2xx)

    @property
    def pending(self) -> int:
        return self.pending_tracks + self.pending_identifies
