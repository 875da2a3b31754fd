"""The outbox file's schema: its tables, its version and its marker."""

from __future__ import annotations

from .._wire import IDENTIFY

# The file's tables, beside one queue table per key (``CREATE_QUEUE``).
SCHEMA = (
    """CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key_fp TEXT NOT NULL,
        op_id INTEGER NOT NULL,
        kind INTEGER NOT NULL,
        body TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        failed_ms INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        status INTEGER,
        reason TEXT NOT NULL
    )""",
    "CREATE INDEX dead_letters_by_key ON dead_letters (key_fp, id)",
    """CREATE TABLE counters (
        key_fp TEXT NOT NULL,
        name TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (key_fp, name)
    ) WITHOUT ROWID""",
    # What each key's sender last did, for operators (``whisperr-durable status``).
    """CREATE TABLE sender_state (
        key_fp TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        last_attempt_ms INTEGER,
        last_success_ms INTEGER,
        last_error TEXT,
        last_error_ms INTEGER
    ) WITHOUT ROWID""",
    # The lease on the run of a key's queue that a sender is delivering: at most one per
    # key, since a sender claims from the head of the queue only. Rows first_id..last_id
    # are the owner's until until_ms (wall clock); the owner ends it when the run is
    # settled, or gives it back.
    """CREATE TABLE leases (
        key_fp TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        first_id INTEGER NOT NULL,
        last_id INTEGER NOT NULL,
        until_ms INTEGER NOT NULL
    ) WITHOUT ROWID""",
    # Where a key's queue may have gaps: at or below through_id, a row left the queue while
    # an older one stayed (evicted beside a leased run, refused out of the middle of one).
    # Above it, ids run without a gap to the newest row, so stats() counts the rows there
    # from two ids instead of one by one. Raised by whoever leaves such a gap; gone when
    # the queue empties.
    """CREATE TABLE gaps (
        key_fp TEXT PRIMARY KEY,
        through_id INTEGER NOT NULL
    ) WITHOUT ROWID""",
    # Facts about the file itself: min_reader_version (see MIN_READER_VERSION).
    """CREATE TABLE meta (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID""",
)

# One table per key, so that an append writes one page: no index on the key, no trigger
# kept count, no AUTOINCREMENT sequence, no lease column (a claim writes one row of
# ``leases``, not one per op). A new id is one above the newest queued row, so ids grow by
# one per op and the id window bounds the queue; the id of a deleted newest row can come
# back, so the sender names rows by id and lease, never by id alone. Beside it, an index of
# its identifies only (a track's append does not write it), which stats() counts.
CREATE_QUEUE = """CREATE TABLE IF NOT EXISTS {table} (
    id INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
)"""
CREATE_IDENTIFY_INDEX = (
    f"CREATE INDEX IF NOT EXISTS {{index}} ON {{table}} (id) WHERE kind = {IDENTIFY}"
)
QUEUE_PREFIX = "ops:"
IDENTIFY_INDEX_PREFIX = "identifies:"


def queue_table(key_fp: str) -> str:
    """The quoted name of one key's queue table."""
    return _quoted(QUEUE_PREFIX + key_fp)


def queue_schema(key_fp: str) -> tuple[str, str]:
    """The statements that make one key's queue, if it is not there yet."""
    table = queue_table(key_fp)
    index = _quoted(IDENTIFY_INDEX_PREFIX + key_fp)
    return CREATE_QUEUE.format(table=table), CREATE_IDENTIFY_INDEX.format(index=index, table=table)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# The file's schema (``PRAGMA user_version``). Versions 1 to 4 were development schemas,
# never released, and are not read.
SCHEMA_VERSION = 5
# The oldest SDK schema that can still read and write a file of this schema, kept in the
# file (``meta``). A later schema that only adds (a table, a column with a default) keeps
# it where it is, so that an older process sharing the file goes on using it; one that
# changes what rows mean raises it, and older processes then refuse the file.
MIN_READER_VERSION = 5

# What marks a SQLite file as an outbox (``PRAGMA application_id``, in the file's header):
# no other database is ever written to.
APPLICATION_ID = 0x77687264  # "whrd"
