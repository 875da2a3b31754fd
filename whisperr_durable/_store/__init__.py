"""The store: every SQL statement of the SDK lives in this package.

``_schema`` (the tables, the version and the marker), ``_paths`` (trusting the file's
path), ``_errors`` (what an sqlite3 error says), ``_records`` (what the store hands out),
``_connection`` (a connection to the file: opened, checked, kept or dropped) and
``_outbox`` (the queues, on a connection) make the SQLite store, the default.
``_postgres`` is the PostgreSQL store, for a ``path`` that is a ``postgresql://`` URL
(psycopg is imported only then; ``_urls`` tells such paths apart). ``_interface`` is
what both offer, ``_claims`` the claim logic they share.
"""

from typing import Any

from ._interface import Store
from ._outbox import Outbox
from ._paths import check_usable
from ._records import Claim, DeadLetter, KeyReport, OutboxStats, Row, Run, StoreError, run_of
from ._schema import APPLICATION_ID, MIN_READER_VERSION, SCHEMA_VERSION, queue_table
from ._urls import DRIVER_MISSING, is_database_url, redacted, shown


def open_store(path: str, key_fp: str, **options: Any) -> Store:
    """The store of one key's queue at ``path``: a PostgreSQL database or a SQLite file.
    ``StoreError`` for a database URL where psycopg is not installed."""
    if is_database_url(path):
        try:
            from ._postgres import PgOutbox
        except ImportError as exc:
            raise StoreError(f"{redacted(path)}: {DRIVER_MISSING}") from exc
        return PgOutbox(path, key_fp, **options)
    return Outbox(path, key_fp, **options)


__all__ = [
    "APPLICATION_ID",
    "DRIVER_MISSING",
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
