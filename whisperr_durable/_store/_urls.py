"""Outbox paths that are database URLs: told apart from files, and shown without a password.
No psycopg here: a process with a file outbox never imports it."""

from __future__ import annotations

DATABASE_SCHEMES = ("postgresql://", "postgres://")
# What a database URL needs, and how to get it.
DRIVER_MISSING = 'a PostgreSQL URL needs psycopg 3: pip install "whisperr-durable[postgres]"'


def is_database_url(path: str) -> bool:
    """Whether an outbox ``path`` names a PostgreSQL database rather than a file."""
    return path.startswith(DATABASE_SCHEMES)


def redacted(url: str) -> str:
    """A database URL without its password, for logs and messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


def shown(path: str) -> str:
    """An outbox path as logs and messages show it: a database URL without its password."""
    return redacted(path) if is_database_url(path) else path
