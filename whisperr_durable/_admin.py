"""OutboxFile: an outbox file seen from outside a client, for operators and the CLI."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Optional

from ._client import key_fingerprint
from ._store import DeadLetter, KeyReport, is_database_url, open_store, shown
from ._wire import IDENTIFY, utc_now_ms


@dataclass(frozen=True)
class KeyStatus:
    """What an outbox file holds for one API key (known only by its fingerprint)."""

    key_fingerprint: str
    pending_tracks: int
    pending_identifies: int
    oldest_created_ms: Optional[int]
    leased: int  # rows claimed by a sender right now
    lease_owner_pid: Optional[int]
    lease_until_ms: Optional[int]
    dead_letters: int
    evicted: int
    sender_pid: Optional[int]  # the last process that ran a delivery cycle
    sender_active: bool  # a sender holds this key's lock right now
    last_attempt_ms: Optional[int]
    last_success_ms: Optional[int]
    last_error: Optional[str]
    last_error_ms: Optional[int]

    @property
    def pending(self) -> int:
        return self.pending_tracks + self.pending_identifies


@dataclass(frozen=True)
class OutboxStatus:
    path: str
    file_bytes: int  # the database file and its WAL
    schema_version: int
    keys: list[KeyStatus]
    reclaimable_bytes: int = 0  # free pages in the file: what compact() gives back


@dataclass(frozen=True)
class QueuedOp:
    id: int
    key_fingerprint: str
    kind: str  # "track" or "identify"
    created_ms: int
    attempts: int
    body: dict[str, Any]  # the wire JSON, as it will be sent ({"damaged": text} if not JSON)


def _parsed(body: str) -> dict[str, Any]:
    # A damaged row is shown as what it holds; the sender dead-letters it, never sends it.
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"damaged": body[:200]}


class OutboxFile:
    """Look into (and mend the dead letters of) an outbox file without running a client.

    Never creates a file: ``FileNotFoundError`` if there is none at ``path``;
    :class:`StoreError` if the file is not a usable outbox. With ``api_key``, every method
    sees only that key's ops; without, every key in the file. Safe while other processes
    use the file.
    """

    def __init__(self, path: str, api_key: Optional[str] = None) -> None:
        path = os.fspath(path)
        self._database = is_database_url(path)
        self.path = path if self._database else os.path.abspath(os.path.expanduser(path))
        if not self._database and not os.path.isfile(self.path):
            raise FileNotFoundError(f"no outbox at {self.path}")
        self._key_fp = key_fingerprint(api_key.strip()) if api_key else None
        self._outbox = open_store(self.path, self._key_fp or "", inspect_only=True)
        self._outbox.open()

    def status(self) -> OutboxStatus:
        reports = self._outbox.key_reports(self._key_fp, utc_now_ms())
        return OutboxStatus(
            path=shown(self.path),
            file_bytes=self._outbox.file_bytes(),
            schema_version=self._outbox.schema_version(),
            keys=[self._key_status(report) for report in reports],
            reclaimable_bytes=self._outbox.reclaimable(),
        )

    def compact(self) -> tuple[int, int]:
        """Give the file's free space back to the file system (``VACUUM``) and empty its
        WAL; the file's size before and after, in bytes. Safe while other processes use the
        file, which wait (up to their ``store_timeout``) while it runs."""
        return self._outbox.compact()

    def _key_status(self, r: KeyReport) -> KeyStatus:
        owner_pid = None
        if r.lease_owner:
            head = r.lease_owner.split("-", 1)[0]
            owner_pid = int(head) if head.isdigit() else None
        return KeyStatus(
            key_fingerprint=r.key_fp,
            pending_tracks=r.pending_tracks,
            pending_identifies=r.pending_identifies,
            oldest_created_ms=r.oldest_created_ms,
            leased=r.leased,
            lease_owner_pid=owner_pid,
            lease_until_ms=r.lease_until_ms,
            dead_letters=r.dead_letters,
            evicted=r.evicted,
            sender_pid=r.sender_pid,
            sender_active=self._sender_active(r.key_fp),
            last_attempt_ms=r.last_attempt_ms,
            last_success_ms=r.last_success_ms,
            last_error=r.last_error,
            last_error_ms=r.last_error_ms,
        )

    def _sender_active(self, key_fp: str) -> bool:
        from ._lock import lock_path, sender_lock

        if not self._database and not os.path.exists(lock_path(self.path, key_fp)):
            return False
        lock = sender_lock(self.path, key_fp, 5.0)
        got = lock.try_acquire()
        if got:
            lock.release()
        lock.close()
        return got is False

    def peek(self, limit: int = 10) -> list[QueuedOp]:
        """The next ``limit`` ops in delivery order. They hold user data: handle with care."""
        return [
            QueuedOp(
                id=op_id,
                key_fingerprint=fp,
                kind="identify" if kind == IDENTIFY else "track",
                created_ms=created_ms,
                attempts=attempts,
                body=_parsed(body),
            )
            for op_id, fp, kind, body, created_ms, attempts in self._outbox.queued(
                limit, self._key_fp
            )
        ]

    def dead_letters(self, limit: Optional[int] = None) -> list[DeadLetter]:
        return self._outbox.all_dead_letters(limit, self._key_fp)

    def requeue(self, ids: Optional[Sequence[int]] = None) -> int:
        """Move dead letters (all, or these ids) back to the end of their key's queue.

        Bodies, and so ``$message_id``s, are unchanged. Returns how many moved.
        """
        return self._outbox.requeue(ids, self._key_fp)

    def purge(self, ids: Optional[Sequence[int]] = None) -> int:
        """Delete dead letters (all, or these ids) for good. Returns how many."""
        return self._outbox.purge(ids, self._key_fp)

    def close(self) -> None:
        self._outbox.close()

    def __enter__(self) -> OutboxFile:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()
