"""The store: every SQL statement of the SDK lives in this package.

``_schema`` (the tables, the version and the marker), ``_paths`` (trusting the file's
path), ``_errors`` (what an sqlite3 error says), ``_records`` (what the store hands out),
``_connection`` (a connection to the file: opened, checked, kept or dropped) and
``_outbox`` (the queues, on a connection).
"""

from ._outbox import Outbox
from ._paths import check_usable
from ._records import Claim, DeadLetter, KeyReport, OutboxStats, Row, Run, StoreError, run_of
from ._schema import APPLICATION_ID, MIN_READER_VERSION, SCHEMA_VERSION, queue_table

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
    "StoreError",
    "check_usable",
    "queue_table",
    "run_of",
]
