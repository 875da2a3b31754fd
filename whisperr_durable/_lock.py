"""Sender leadership: at most one process at a time sends one key's ops from one outbox file
(a PostgreSQL outbox has its own lock, in the database: see ``sender_lock``).

A ``filelock`` lock file beside the outbox, held for one delivery cycle. On POSIX it is an
``flock``, which the kernel releases when its holder dies, so the process that takes the
lock next knows that any lease it finds on the key's rows belongs to a sender that is gone.
Network filesystems may not honour ``flock``; the leases in the outbox still keep two
senders apart there, at the cost of waiting for a dead sender's lease to expire.
"""

from __future__ import annotations

import logging
import os
from contextlib import suppress
from typing import Any

import filelock

log = logging.getLogger(__name__)

_FILELOCK_MAJOR = int(filelock.__version__.split(".")[0])


def lock_path(db_path: str, key_fp: str) -> str:
    return f"{db_path}.sender-{key_fp}.lock"


def sender_lock(path: str, key_fp: str, store_timeout: float) -> Any:
    """The leadership lock of one key's queue: a lock file beside an outbox file, or an
    advisory lock in a PostgreSQL outbox (``_postgres.PgSenderLock``)."""
    from ._store import is_database_url

    if is_database_url(path):
        from ._store._postgres import PgSenderLock

        return PgSenderLock(path, key_fp, store_timeout)
    return SenderLock(lock_path(path, key_fp))


def _new_lock(path: str) -> filelock.BaseFileLock:
    options: dict[str, Any] = {"timeout": 0, "mode": 0o600, "thread_local": False}
    if _FILELOCK_MAJOR >= 4:
        # A lock file that merely exists must never pass for a held lock: only a kernel
        # lock is released when its holder dies.
        options["fallback_to_soft"] = False
    return filelock.FileLock(path, **options)


class SenderLock:
    """Non-blocking leadership for one (outbox file, key)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = _new_lock(path)
        self._broken = False

    def try_acquire(self) -> bool | None:
        """``True``: we lead. ``False``: another sender leads. ``None``: locking is unavailable
        here (the caller falls back to leases alone)."""
        if self._broken:
            return None
        try:
            self._lock.acquire()
        except filelock.Timeout:
            return False
        except (OSError, NotImplementedError) as exc:
            self._broken = True
            log.warning(
                "cannot lock %s (%s); relying on the outbox's leases alone",
                self.path,
                exc,
            )
            return None
        return True

    def release(self) -> None:
        if self._lock.is_locked:
            try:
                self._lock.release(force=True)
            except OSError:
                log.debug("releasing %s failed", self.path, exc_info=True)

    def close(self) -> None:
        """Nothing to end: between cycles a file lock holds nothing open."""

    def after_fork_in_child(self) -> None:
        """Forget the parent's lock without unlocking it (the parent still holds it)."""
        old, self._lock = self._lock, _new_lock(self.path)
        if _FILELOCK_MAJOR < 4:
            # filelock 3 leaves the parent's descriptor open in the child, which would keep
            # the parent's flock alive after the parent dies. (filelock 4 closes it itself.)
            fd = getattr(getattr(old, "_context", None), "lock_file_fd", None)
            if fd is not None:
                with suppress(OSError):
                    os.close(fd)
