"""What a store offers the writer, the sender and the operators' views: the interface that
the SQLite file (``_outbox.Outbox``) and PostgreSQL (``_postgres.PgOutbox``) implement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Protocol

from ._records import Claim, DeadLetter, KeyReport, OutboxStats, Row


class Store(Protocol):
    """One key's queue in an outbox (``path``), and views of the whole outbox."""

    path: str
    key_fp: str

    @property
    def is_open(self) -> bool: ...

    @property
    def lost(self) -> int: ...

    def open(self) -> None: ...

    def close(self) -> None: ...

    def schema_version(self) -> int: ...

    # The writer's.
    def append(
        self, kind: int, body: str, created_ms: int, max_queue_size: int
    ) -> tuple[int, int]: ...

    def append_many(self, ops: Sequence[tuple[int, str, int]], max_queue_size: int) -> int: ...

    # The sender's.
    def claim(
        self,
        owner: str,
        *,
        max_rows: int,
        max_bytes: int,
        lease_ms: int,
        max_age_ms: int,
        now_ms: int,
        take_over: bool = False,
    ) -> Claim: ...

    def rows(self, first_id: int, last_id: int) -> list[Row]: ...

    def ack(self, first_id: int, last_id: int, owner: str) -> int: ...

    def renew(self, first_id: int, last_id: int, owner: str, until_ms: int) -> int: ...

    def release(self, first_id: int, last_id: int, owner: str, *, failed: bool) -> None: ...

    def dead_letter(
        self,
        first_id: int,
        last_id: int,
        owner: str,
        status: Optional[int],
        reason: str,
        now_ms: int,
    ) -> tuple[int, int]: ...

    def head(self) -> Optional[tuple[int, Optional[str], int]]: ...

    def record_sender(
        self, pid: int, attempt_ms: int, success_ms: Optional[int], error: Optional[str]
    ) -> None: ...

    def sync_wal(self) -> None: ...

    def checkpoint(self, *, truncate: bool = False) -> None: ...

    def reclaim(self, max_pages: int) -> None: ...

    # Reading.
    def last_id(self) -> int: ...

    def pending_through(self, last_id: int, *, exact: bool = True) -> int: ...

    def span(self) -> int: ...

    def has_pending(self) -> bool: ...

    def counters(self) -> dict[str, int]: ...

    def stats(self) -> OutboxStats: ...

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]: ...

    # The whole outbox, for operators (key_fp=None: every key).
    def key_reports(self, key_fp: Optional[str], now_ms: int) -> list[KeyReport]: ...

    def queued(self, limit: int, key_fp: Optional[str]) -> list[Any]: ...

    def all_dead_letters(self, limit: Optional[int], key_fp: Optional[str]) -> list[DeadLetter]: ...

    def requeue(self, ids: Optional[Sequence[int]], key_fp: Optional[str]) -> int: ...

    def purge(self, ids: Optional[Sequence[int]], key_fp: Optional[str]) -> int: ...

    def file_bytes(self) -> int: ...

    def reclaimable(self) -> int: ...

    def compact(self) -> tuple[int, int]: ...
