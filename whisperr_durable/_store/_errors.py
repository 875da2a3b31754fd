"""What a sqlite3 error says about the file: busy, corrupt, or kept by the connection."""

from __future__ import annotations

import sqlite3
from typing import Optional

# SQLite's result codes for a file that is not (or no longer) a usable database, and its
# words for them where the error carries no code (Python before 3.11).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26
# Errors a connection keeps for as long as it lives (opened read-only, or on a file it can
# no longer reach): after one, the next attempt needs a fresh connection.
_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CANTOPEN = 3, 8, 10, 14
_STICKY = ("readonly database", "unable to open", "disk I/O error", "access permission denied")
_CORRUPT = (
    "file is not a database",
    "database disk image is malformed",
    "malformed database schema",
)


def _primary_code(exc: BaseException) -> Optional[int]:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def is_corrupt(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = _primary_code(exc)
    if code is not None:
        return code in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    return any(m in str(exc) for m in _CORRUPT)


def is_sticky(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    code = _primary_code(exc)
    if code is not None:
        return code in (_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CANTOPEN)
    return any(m in str(exc) for m in _STICKY)


def is_busy(exc: BaseException) -> bool:
    code = _primary_code(exc)
    if code is not None:
        return code in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(exc)
    return "database is locked" in text or "database table is locked" in text
