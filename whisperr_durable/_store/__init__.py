"""The store: every SQL statement of the SDK lives in this package.

``_schema`` (the tables, the version and the marker), ``_paths`` (trusting the file's
path), ``_errors`` (what an sqlite3 error says), ``_records`` (what the store hands out),
``_connection`` (a connection to the file: opened, checked, kept or dropped) and
``_outbox`` (the queues, on a connection) make the SQLite store, the default.
``_postgres`` is the PostgreSQL store, for a ``path`` that is a ``postgresql://`` URL
(psycopg is imported only then). ``_interface`` is what both offer, ``_claims`` the claim
logic they share.
"""

from typing import Any

from ._interface import Store
from ._outbox import Outbox
from ._paths import check_usable
from ._records import Claim, DeadLetter, KeyReport, OutboxStats, Row, Run, StoreError, run_of
from ._schema import APPLICATION_ID, MIN_READER_VERSION, SCHEMA_VERSION, queue_table

DATABASE_SCHEMES = ("postgresql://", "postgres://")


def is_database_url(path: str) -> bool:
    """Whether an outbox ``path`` names a PostgreSQL database rather than a file."""
    return path.startswith(DATABASE_SCHEMES)


def shown(path: str) -> str:
    """An outbox path as logs and messages show it: a database URL without its password."""
    if is_database_url(path):
        from ._postgres import redacted

        return redacted(path)
    return path


def open_store(path: str, key_fp: str, **options: Any) -> Store:
    """The store of one key's queue at ``path``: a PostgreSQL database or a SQLite file."""
    if is_database_url(path):
        from ._postgres import PgOutbox

        return PgOutbox(path, key_fp, **options)
    return Outbox(path, key_fp, **options)


__all__ = [
    "APPLICATION_ID",
    "MIN_READER_VERSION",
    "SCHEMA_VERSION",
    "Claim",
    "DeadLetter",
    "KeyReport",
    "Outbox",
    "OutboxStats",
    "Row",
    "Run",
    "Store",
    "StoreError",
    "check_usable",
    "is_database_url",
    "open_store",
    "queue_table",
    "run_of",
    "shown",
]
