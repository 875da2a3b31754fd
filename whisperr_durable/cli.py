"""The operator's command line: ``whisperr-durable`` (also ``python -m whisperr_durable``).

Look into an outbox file, deliver it now, enqueue from a shell script, mend dead letters::

    whisperr-durable status [--json]                  what is queued, leased, dead; the sender
    whisperr-durable flush [--timeout S]              deliver now (cron, systemd timers)
    whisperr-durable track USER EVENT [--prop k=v]... enqueue an event (no network needed)
    whisperr-durable identify USER [--email E] [--trait k=v]...
    whisperr-durable peek [-n N] [--json]             the next ops, in delivery order
    whisperr-durable dead-letters list|requeue|purge  what the server refused
    whisperr-durable dev-server [--port P]            a local Whisperr-compatible server
    whisperr-durable demo                             kill a producer mid-run, lose nothing

``--path`` (before or after the command) names the outbox: default ``$WHISPERR_DB_PATH``,
else ``~/.whisperr.db``. The key comes from ``--api-key`` or ``$WHISPERR_API_KEY`` (the
environment keeps it out of ``ps``); the base URL from ``--base-url`` or
``$WHISPERR_BASE_URL``. No command prints the key; the file only holds a fingerprint of it.
Every failure is one line on stderr (a traceback only with ``--debug``).

Exit codes:

    0  ok
    1  the operation failed (e.g. some dead-letter ids were not found; demo: events lost)
    2  usage error: bad arguments, a missing API key, an invalid event
    3  no outbox at --path
    4  the file is not a usable outbox: not SQLite, corrupt, locked, a newer schema, a
       directory, or it cannot be written
    5  the server rejected the API key (HTTP 401/403)
    6  the server is unreachable or kept failing (retries exhausted)
    7  flush timed out with ops still queued
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from typing import IO, TYPE_CHECKING, Any, Callable, NoReturn, Optional, TypeVar

from ._errors import WhisperrError
from ._options import DEFAULT_BASE_URL, DEFAULT_REQUEST_TIMEOUT, setting
from ._store import DeadLetter, OutboxStats, StoreError, is_database_url, shown
from ._version import __version__

if TYPE_CHECKING:
    from ._admin import KeyStatus, OutboxFile, OutboxStatus, QueuedOp
    from ._client import DurableWhisperr
    from ._sender import FlushResult

PROG = "whisperr-durable"
T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_OUTBOX = 3
EXIT_BAD_OUTBOX = 4
EXIT_AUTH = 5
EXIT_UNREACHABLE = 6
EXIT_TIMEOUT = 7
EXIT_REFUSED = 8
EXIT_WRONG_URL = 9

_EXIT_MEANINGS = {
    EXIT_OK: "ok",
    EXIT_FAILED: "the operation failed (an unexpected error; for dead-letters requeue and\n"
    "     purge, some ids were not found)",
    EXIT_USAGE: "usage error: bad arguments, a missing API key, an invalid event",
    EXIT_NO_OUTBOX: "no outbox at --path",
    EXIT_BAD_OUTBOX: "the file is not a usable outbox: not SQLite, corrupt, locked, a newer "
    "schema,\n     a directory, or it cannot be written",
    EXIT_AUTH: "the server rejected the API key (HTTP 401/403)",
    EXIT_UNREACHABLE: "the server is unreachable or kept failing (retries exhausted)",
    EXIT_TIMEOUT: "flush timed out with ops still queued",
    EXIT_REFUSED: "flush delivered what it could, but the server refused some ops (now in "
    "the dead\n     letters) or some were lost (evicted, dropped)",
    EXIT_WRONG_URL: "the server answered 404 or 405: --base-url (or $WHISPERR_BASE_URL) is wrong",
}


def exit_codes(*codes: int) -> str:
    """The ``exit codes:`` section of a help text, for the codes a command can return."""
    return "exit codes:\n" + "\n".join(f"  {code}  {_EXIT_MEANINGS[code]}" for code in codes)


EXIT_CODES = exit_codes(*_EXIT_MEANINGS)
# What each command can return, beside 0, 1 (an unexpected error) and 2 (usage).
_FILE_CODES = (EXIT_NO_OUTBOX, EXIT_BAD_OUTBOX)
_WRITE_CODES = (EXIT_BAD_OUTBOX,)  # track and identify create the file
_FLUSH_CODES = (
    *_FILE_CODES,
    EXIT_AUTH,
    EXIT_UNREACHABLE,
    EXIT_TIMEOUT,
    EXIT_REFUSED,
    EXIT_WRONG_URL,
)

ENVIRONMENT = """\
environment:
  WHISPERR_DB_PATH   the outbox file (default ~/.whisperr.db)
  WHISPERR_API_KEY   the server key (wrk_...); safer than --api-key, which ps shows
  WHISPERR_BASE_URL  the ingestion API (default https://api.whisperr.net)"""

USER_DATA_WARNING = (
    "The output holds user data (user ids, properties, email addresses): do not paste it "
    "into tickets or chats. The API key is never printed."
)

# The command line never bounds another process's queue: a client's own max_queue_size
# applies on its next write, and an op enqueued here must never evict older ones.
_UNBOUNDED = 2**62
# The sender of a command-line client only runs when asked (flush, shutdown).
_NEVER = 365 * 24 * 3600.0
# Progress bar: redrawn this often, and only once a flush has run this long.
_REDRAW_INTERVAL = 0.2
_PROGRESS_AFTER = 0.5
_BAR_WIDTH = 24


class CliError(Exception):
    """A failure the user gets as one line on stderr, and an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---- formatting ----


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def format_duration(seconds: float) -> str:
    """``45s``, ``3m 12s``, ``2h 5m``, ``3d 4h``."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def format_age(ms: Optional[int], now_ms: int) -> str:
    """``3m 12s ago`` for a past time, ``in 8s`` for a future one, ``-`` for none."""
    if ms is None:
        return "-"
    delta = (now_ms - ms) / 1000
    if delta >= 0:
        return f"{format_duration(delta)} ago"
    return f"in {format_duration(-delta)}"


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _plural(n: int, word: str, plural: str = "") -> str:
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


def _pairs(rows: Sequence[tuple[str, str]], indent: str = "") -> list[str]:
    width = max((len(label) for label, _ in rows), default=0)
    return [f"{indent}{label.ljust(width)}  {value}".rstrip() for label, value in rows]


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned columns; the last one is left ragged."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip()
        for row in [header, *rows]
    ]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def render_status(status: OutboxStatus, now_ms: int, *, filtered: bool) -> list[str]:
    lines = _pairs(
        [
            ("outbox", status.path),
            ("size", f"{format_bytes(status.file_bytes)} (schema version {status.schema_version})"),
            (
                "reclaimable",
                f"{format_bytes(status.reclaimable_bytes)} (what '{PROG} compact' gives back)",
            ),
        ]
    )
    if not status.keys:
        lines += ["", "nothing for this key" if filtered else "empty: no ops, no dead letters"]
    for key in status.keys:
        lines += ["", f"key {key.key_fingerprint}"]
        lines += _pairs(_key_rows(key, now_ms), indent="  ")
    return lines


def _key_rows(key: KeyStatus, now_ms: int) -> list[tuple[str, str]]:
    pending = f"{key.pending:,} ({_plural(key.pending_tracks, 'track')}, "
    pending += f"{_plural(key.pending_identifies, 'identify', 'identifies')})"
    if key.oldest_created_ms is not None:
        pending += f", oldest {format_age(key.oldest_created_ms, now_ms)}"
    rows = [("pending", pending)]
    if key.leased:
        owner = ""
        if key.lease_owner_pid is not None:
            gone = "" if _pid_alive(key.lease_owner_pid) else ", not running"
            owner = f" by pid {key.lease_owner_pid}{gone}"
        rows.append(
            (
                "in flight",
                f"{key.leased:,} leased{owner}, lease ends "
                f"{format_age(key.lease_until_ms, now_ms)}",
            )
        )
    else:
        rows.append(("in flight", "0"))
    rows.append(("dead letters", f"{key.dead_letters:,}"))
    rows.append(("evicted", f"{key.evicted:,}"))
    if key.sender_active:
        sender = "delivering now"
        if key.sender_pid is not None:
            sender += f" (last cycle by pid {key.sender_pid})"
    elif key.sender_pid is not None:
        gone = "" if _pid_alive(key.sender_pid) else " (not running)"
        sender = f"idle; last cycle by pid {key.sender_pid}{gone}"
    else:
        sender = "idle; no delivery recorded yet"
    rows.append(("sender", sender))
    rows.append(("last attempt", format_age(key.last_attempt_ms, now_ms)))
    rows.append(("last success", format_age(key.last_success_ms, now_ms)))
    if key.last_error:
        rows.append(("last error", f"{key.last_error} ({format_age(key.last_error_ms, now_ms)})"))
    else:
        rows.append(("last error", "-"))
    return rows


def status_json(status: OutboxStatus) -> dict[str, Any]:
    data = asdict(status)
    for key, raw in zip(data["keys"], status.keys):
        key["pending"] = raw.pending
    return data


def _summary(kind: str, body: Any) -> str:
    """What an op is about, in a few words (holds the user id)."""
    if not isinstance(body, dict):
        return ""
    user = str(body.get("external_user_id", ""))
    if kind == "track":
        return f"{body.get('event_type', '')} {user}".strip()
    return user


def render_peek(ops: Sequence[QueuedOp], now_ms: int) -> list[str]:
    if not ops:
        return ["nothing queued"]
    keys = {op.key_fingerprint for op in ops}
    header = ["ID", "KIND", "CREATED", "ATTEMPTS", "BODY"]
    if len(keys) > 1:
        header.insert(1, "KEY")
    rows = []
    for op in ops:
        row = [
            str(op.id),
            op.kind,
            format_age(op.created_ms, now_ms),
            str(op.attempts),
            json.dumps(op.body, separators=(",", ":"), ensure_ascii=False),
        ]
        if len(keys) > 1:
            row.insert(1, op.key_fingerprint)
        rows.append(row)
    return _columns(header, rows)


def _parsed_body(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def dead_letter_json(letter: DeadLetter) -> dict[str, Any]:
    data = letter._asdict()
    data["body"] = _parsed_body(letter.body)
    return data


def render_dead_letters(letters: Sequence[DeadLetter], now_ms: int) -> list[str]:
    if not letters:
        return ["no dead letters"]
    header = ["ID", "KIND", "FAILED", "STATUS", "ATTEMPTS", "WHAT", "REASON"]
    rows = [
        [
            str(d.id),
            d.kind,
            format_age(d.failed_ms, now_ms),
            "-" if d.status is None else str(d.status),
            str(d.attempts),
            _summary(d.kind, _parsed_body(d.body)) or "-",
            d.reason,
        ]
        for d in letters
    ]
    return _columns(header, rows)


class Progress:
    """A one-line progress bar on a terminal: done/total, events/s, what is left."""

    def __init__(self, total: int, out: IO[str]) -> None:
        self.total = total
        self.out = out
        self.drawn = False

    def line(self, remaining: int, elapsed: float, width: int = 80) -> str:
        """The bar and its figures in fewer than ``width`` columns: a narrow terminal gets a
        shorter bar, then fewer figures (a line that wraps would stack one per redraw)."""
        total = max(self.total, 1)
        done = min(max(self.total - remaining, 0), self.total)
        rate = done / elapsed if elapsed > 0 else 0.0
        figures = [
            f"{done:,}/{self.total:,} delivered",
            f"{rate:,.0f} events/s",
            f"{max(remaining, 0):,} remaining",
        ]
        if rate > 0:
            figures.append(f"about {format_duration(remaining / rate)} left")
        room = width - 1
        while True:
            text = ", ".join(figures)
            bar_width = min(_BAR_WIDTH, room - len(text) - 3)
            if bar_width >= 8 or len(figures) == 1:
                break
            figures.pop()
        if bar_width < 8:
            return text[:room]
        filled = int(bar_width * done / total)
        return f"[{'#' * filled}{'-' * (bar_width - filled)}] {text}"

    def draw(self, remaining: int, elapsed: float) -> None:
        try:
            width = os.get_terminal_size(self.out.fileno()).columns or 80
        except (AttributeError, ValueError, OSError):  # not a terminal after all
            width = shutil.get_terminal_size().columns
        self.out.write("\r\x1b[K" + self.line(remaining, elapsed, width))
        self.out.flush()
        self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.drawn = False


# ---- arguments ----


def _key_value(text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CliError(EXIT_USAGE, f"{option} expects KEY=VALUE, got {text!r}")
    return key, value


def _json_object(text: Optional[str], option: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CliError(EXIT_USAGE, f"{option} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CliError(EXIT_USAGE, f"{option} must be a JSON object, got {type(value).__name__}")
    return value


def merged_properties(
    json_text: Optional[str], pairs: Optional[Sequence[str]], json_option: str, pair_option: str
) -> dict[str, Any]:
    """``--props-json`` first, then each ``--prop k=v`` (a string) on top of it."""
    merged = _json_object(json_text, json_option)
    for text in pairs or ():
        key, value = _key_value(text, pair_option)
        merged[key] = value
    return merged


def _api_key(args: argparse.Namespace, *, required_for: Optional[str] = None) -> Optional[str]:
    key = (getattr(args, "api_key", None) or os.environ.get("WHISPERR_API_KEY") or "").strip()
    if not key and required_for:
        raise CliError(
            EXIT_USAGE, f"{required_for} needs the API key: set WHISPERR_API_KEY or pass --api-key"
        )
    return key or None


def _path(args: argparse.Namespace) -> str:
    raw = str(setting("path", args.path or None))
    return raw if is_database_url(raw) else os.path.abspath(os.path.expanduser(raw))


def _base_url(args: argparse.Namespace) -> str:
    return str(setting("base_url", getattr(args, "base_url", None) or None))


# ---- the file ----


def _check_existing(path: str) -> None:
    """Exit 3 or 4, with one line, unless ``path`` is a regular file (or a database URL)."""
    if is_database_url(path):
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CliError(
            EXIT_NO_OUTBOX, f"no outbox at {path} (use --path or set WHISPERR_DB_PATH)"
        ) from None
    except NotADirectoryError:
        raise CliError(
            EXIT_NO_OUTBOX, f"no outbox at {path}: a part of that path is not a directory"
        ) from None
    except OSError as exc:
        raise CliError(EXIT_BAD_OUTBOX, f"cannot use {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise CliError(EXIT_BAD_OUTBOX, f"{path} is a directory, not an outbox file")
    if not stat.S_ISREG(mode):
        raise CliError(EXIT_BAD_OUTBOX, f"{path} is not a regular file")


def open_outbox(path: str, api_key: Optional[str] = None) -> OutboxFile:
    """The outbox at ``path``, never created or repaired: exit 3 or 4 otherwise."""
    from ._admin import OutboxFile

    _check_existing(path)
    try:
        return OutboxFile(path, api_key=api_key)
    except FileNotFoundError:
        raise CliError(EXIT_NO_OUTBOX, f"no outbox at {path}") from None
    except StoreError as exc:
        raise _unusable(path, exc) from exc
    except OSError as exc:
        raise CliError(EXIT_BAD_OUTBOX, f"cannot use {path}: {exc.strerror or exc}") from exc


def _unusable(path: str, exc: StoreError) -> CliError:
    path = shown(path)
    if "locked" in str(exc):
        return CliError(EXIT_BAD_OUTBOX, f"{path} stayed locked by another process: {exc}")
    return CliError(EXIT_BAD_OUTBOX, f"{path} is not a usable outbox: {exc}")


def _client(
    args: argparse.Namespace, key: str, on_error: Callable[[WhisperrError], None], **options: Any
) -> DurableWhisperr:
    from ._client import DurableWhisperr

    try:
        return DurableWhisperr(
            key,
            path=_path(args),
            base_url=_base_url(args),
            flush_at=_UNBOUNDED,
            flush_interval=_NEVER,
            max_queue_size=_UNBOUNDED,
            shutdown_timeout=0.0,
            on_error=on_error,
            debug=args.debug,
            **options,
        )
    except ValueError as exc:  # a key that cannot be sent, an option out of range
        raise CliError(EXIT_USAGE, str(exc)) from exc


# ---- commands ----


def cmd_status(args: argparse.Namespace) -> int:
    key = _api_key(args)
    with open_outbox(_path(args), key) as outbox:
        status = _store_call(outbox.path, outbox.status)
    if args.json:
        print(json.dumps(status_json(status)))
    else:
        print("\n".join(render_status(status, _now_ms(), filtered=key is not None)))
    return EXIT_OK


def _list(
    args: argparse.Namespace,
    fetch: Callable[[OutboxFile], Sequence[T]],
    as_json: Callable[[T], Any],
    render: Callable[[Sequence[T], int], list[str]],
) -> int:
    """A read command that lists items: JSON lines with --json, else a table."""
    if args.n is not None and args.n < 1:
        raise CliError(EXIT_USAGE, "-n must be at least 1")
    with open_outbox(_path(args), _api_key(args)) as outbox:
        items = _store_call(outbox.path, lambda: fetch(outbox))
    if args.json:
        for item in items:
            print(json.dumps(as_json(item)))
    else:
        print("\n".join(render(items, _now_ms())))
    return EXIT_OK


def cmd_compact(args: argparse.Namespace) -> int:
    with open_outbox(_path(args)) as outbox:
        before, after = _store_call(outbox.path, outbox.compact)
    print(f"compacted {outbox.path}: {format_bytes(before)} -> {format_bytes(after)}")
    return EXIT_OK


def cmd_peek(args: argparse.Namespace) -> int:
    return _list(args, lambda outbox: outbox.peek(args.n), asdict, render_peek)


def cmd_dead_letters_list(args: argparse.Namespace) -> int:
    return _list(
        args, lambda outbox: outbox.dead_letters(args.n), dead_letter_json, render_dead_letters
    )


def _ids(args: argparse.Namespace, verb: str) -> Optional[list[int]]:
    if args.all and args.ids:
        raise CliError(EXIT_USAGE, f"{verb}: give dead-letter ids or --all, not both")
    if not args.all and not args.ids:
        raise CliError(
            EXIT_USAGE, f"{verb}: give dead-letter ids (see 'dead-letters list') or --all"
        )
    return None if args.all else list(dict.fromkeys(args.ids))


def _mend(args: argparse.Namespace, verb: str, key: Optional[str]) -> int:
    ids = _ids(args, verb)
    with open_outbox(_path(args), key) as outbox:
        action = outbox.requeue if verb == "requeue" else outbox.purge
        count = _store_call(outbox.path, lambda: action(ids))
    done = "requeued" if verb == "requeue" else "purged"
    line = f"{done} {_plural(count, 'dead letter')}"
    if verb == "requeue" and count:
        line += "; the next flush or sender of that key delivers them, with the same $message_id"
    print(line)
    if ids is not None and count < len(ids):
        scope = " for this key" if key else ""
        missing = len(ids) - count
        raise CliError(EXIT_FAILED, f"{_plural(missing, 'id')} of {len(ids)} not found{scope}")
    return EXIT_OK


def cmd_dead_letters_requeue(args: argparse.Namespace) -> int:
    return _mend(args, "requeue", _api_key(args, required_for="requeue"))


def cmd_dead_letters_purge(args: argparse.Namespace) -> int:
    # --all deletes for one key only: an operator never wipes other keys' by accident.
    key = _api_key(args, required_for="purge --all") if args.all else _api_key(args)
    return _mend(args, "purge", key)


def _client_stats(path: str, client: DurableWhisperr) -> OutboxStats:
    stats = client.stats()
    if stats.error is not None:
        raise _unusable(path, StoreError(stats.error))
    return stats


def _store_call(path: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except StoreError as exc:
        raise _unusable(path, exc) from exc


def _enqueue(args: argparse.Namespace, what: str, call: Callable[[DurableWhisperr], None]) -> int:
    key = _api_key(args, required_for=what)
    assert key is not None
    path = _path(args)
    # An existing file must be an outbox: never let a client move someone's file aside or
    # add tables to a database that is not ours. An empty file is a client's first step.
    if not is_database_url(path) and os.path.lexists(path):
        _check_existing(path)
        if os.path.getsize(path) > 0:
            open_outbox(path).close()
    errors: list[WhisperrError] = []
    client = _client(args, key, errors.append, strict=True)
    try:
        call(client)
    except ValueError as exc:  # strict=True: an invalid call raises, and is not queued
        raise CliError(EXIT_USAGE, f"invalid {what}, not queued: {exc}") from exc
    finally:
        # Returns at once: the op is durable, and delivery is for a sender or `flush`.
        client.shutdown(timeout=0)
    for error in errors:
        if error.type in ("store_error", "dropped"):
            raise CliError(EXIT_BAD_OUTBOX, f"{what} not stored in {shown(path)}: {error.message}")
    return EXIT_OK


def cmd_track(args: argparse.Namespace) -> int:
    properties = merged_properties(args.props_json, args.prop, "--props-json", "--prop")
    return _enqueue(
        args, "track", lambda client: client.track(args.user, args.event, properties or None)
    )


def cmd_identify(args: argparse.Namespace) -> int:
    traits = merged_properties(args.traits_json, args.trait, "--traits-json", "--trait")
    return _enqueue(
        args,
        "identify",
        lambda client: client.identify(
            args.user,
            traits=traits or None,
            email=args.email,
            phone=args.phone,
            push_token=args.push_token,
            preferred_channel=args.preferred_channel,
        ),
    )


def cmd_flush(args: argparse.Namespace) -> int:
    key = _api_key(args, required_for="flush")
    assert key is not None
    if not 0 <= args.timeout < _NEVER:  # also refuses nan and inf
        raise CliError(EXIT_USAGE, "--timeout must be a number of seconds, 0 for no limit")
    if args.max_retries < 0:
        raise CliError(EXIT_USAGE, "--max-retries must not be negative")
    timeout = args.timeout or None
    path = _path(args)
    with open_outbox(path) as outbox:  # exit 3 or 4 here, before a client could create one
        everyone = _store_call(path, outbox.status)
    errors: list[WhisperrError] = []
    client = _client(
        args,
        key,
        errors.append,
        max_retries=args.max_retries,
        request_timeout=args.request_timeout,
    )
    started_ms = _now_ms()
    try:
        before = _client_stats(path, client)
        if before.pending == 0:
            others = sum(k.pending for k in everyone.keys)
            note = f" ({_plural(others, 'op')} of other keys left alone)" if others else ""
            print(f"nothing to deliver for this key{note}")
            return EXIT_OK
        started = time.monotonic()
        if sys.stderr.isatty() and not args.quiet:
            result = _flush_with_progress(client, before.pending, timeout)
        else:
            result = client.flush(timeout)
        took = time.monotonic() - started
        after = _client_stats(path, client)
    finally:
        client.shutdown(timeout=0)
    if result.pending == 0 and result.reason is None:
        delivered = max(0, before.pending - after.pending - result.refused - result.lost)
        line = f"delivered {_plural(delivered, 'op')} in {took:.1f}s"
        if result.refused:
            line += (
                f"; the server refused {_plural(result.refused, 'op')}, now in the dead "
                f"letters (see '{PROG} dead-letters list')"
            )
        if result.lost:
            line += f"; {_plural(result.lost, 'op')} lost (evicted or dropped)"
        if after.pending:
            line += f"; {_plural(after.pending, 'op')} queued since the flush began"
        print(line)
        return EXIT_REFUSED if result.refused or result.lost else EXIT_OK
    left = f"{_plural(result.pending, 'op')} still queued"
    last_error = _last_error(path, key, started_ms) or _error_text(errors, result.reason)
    because = f" (last error: {last_error})" if last_error else ""
    if result.reason == "auth":
        raise CliError(
            EXIT_AUTH, f"flush stopped: the server rejected the API key{because}; {left}"
        )
    if result.reason == "config":
        raise CliError(
            EXIT_WRONG_URL,
            f"flush stopped: {_base_url(args)} answered 404/405, so the URL is wrong (check "
            f"--base-url or WHISPERR_BASE_URL){because}; {left}",
        )
    if result.reason == "retry_exhausted":
        raise CliError(
            EXIT_UNREACHABLE,
            f"flush stopped: {_base_url(args)} is unreachable or failing, "
            f"retries exhausted{because}; {left}",
        )
    if result.reason == "timeout":
        raise CliError(EXIT_TIMEOUT, f"flush timed out after {args.timeout:g}s{because}; {left}")
    if result.reason == "store":
        raise CliError(EXIT_BAD_OUTBOX, f"flush could not use {shown(path)}; {left}")
    raise CliError(EXIT_FAILED, f"flush stopped ({result.reason}); {left}")


def _last_error(path: str, key: str, since_ms: int) -> Optional[str]:
    """What this key's sender last recorded as failing, if it failed during the flush."""
    try:
        from ._admin import OutboxFile

        with OutboxFile(path, api_key=key) as outbox:
            keys = outbox.status().keys
    except (OSError, StoreError):
        return None
    for k in keys:
        if k.last_error and (k.last_error_ms or 0) >= since_ms:
            return k.last_error
    return None


def _error_text(errors: Sequence[WhisperrError], reason: Optional[str]) -> Optional[str]:
    for error in reversed(errors):
        if error.type == reason:
            return error.message if error.status is None else f"HTTP {error.status}"
    return None


def _flush_with_progress(
    client: DurableWhisperr, total: int, timeout: Optional[float]
) -> FlushResult:
    """Flush in a worker thread; redraw a progress bar on stderr from this one."""
    results: list[FlushResult] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def work() -> None:
        try:
            results.append(client.flush(timeout))
        except BaseException as exc:  # handed to the main thread, which reports it
            failures.append(exc)
        finally:
            done.set()

    started = time.monotonic()
    worker = threading.Thread(target=work, name="whisperr-durable-cli-flush", daemon=True)
    worker.start()
    bar = Progress(total, sys.stderr)
    try:
        # A UI refresh: the flush itself runs, and ends, on its own.
        while not done.wait(_REDRAW_INTERVAL):
            elapsed = time.monotonic() - started
            if elapsed < _PROGRESS_AFTER:
                continue
            try:
                remaining = client.stats().pending
            except StoreError:
                continue
            bar.draw(remaining, elapsed)
    finally:
        bar.clear()
    if failures:
        raise failures[0]
    return results[0]


def cmd_dev_server(args: argparse.Namespace) -> int:
    from . import devserver

    return devserver.main(list(args.rest), prog=f"{PROG} dev-server")


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(list(args.rest), prog=f"{PROG} demo")


# ---- the parser ----


def _wrap(text: str) -> str:
    return textwrap.fill(text, 78)


class _Parser(argparse.ArgumentParser):
    """argparse quotes the arguments it cannot place ("invalid choice: 'wrk_...'" for a key
    given before the command): an API key is never printed."""

    secrets: tuple[str, ...] = ()

    def error(self, message: str) -> NoReturn:
        for secret in _Parser.secrets:
            message = message.replace(secret, "<api key>")
        super().error(message)


def _secrets(argv: Sequence[str]) -> tuple[str, ...]:
    """The API keys in ``argv`` and the environment, wherever argparse may place them."""
    found = [os.environ.get("WHISPERR_API_KEY", "")]
    for i, arg in enumerate(argv):
        option, has_value, value = arg.partition("=")
        # "--api-k": argparse takes any unambiguous abbreviation.
        if len(option) > 2 and "--api-key".startswith(option):
            if has_value:
                found.append(value)
            elif i + 1 < len(argv):
                found.append(argv[i + 1])
    return tuple(sorted({k.strip() for k in found if k.strip()}, key=len, reverse=True))


def build_parser() -> argparse.ArgumentParser:
    # --path and --debug are taken before or after the command: on a command they are
    # SUPPRESSed when absent, so that they never overwrite the value given before it.
    path_help = "the outbox file (default: $WHISPERR_DB_PATH, else ~/.whisperr.db)"
    debug_help = "show tracebacks and the SDK's debug log"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--path", default=argparse.SUPPRESS, help=path_help)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    formatter = argparse.RawDescriptionHelpFormatter

    parser = _Parser(
        prog=PROG,
        description="Look into, deliver and mend a whisperr_durable outbox file.",
        epilog=f"{ENVIRONMENT}\n\n{EXIT_CODES}",
        formatter_class=formatter,
    )
    parser.add_argument("--path", default=None, help=path_help)
    parser.add_argument("--debug", action="store_true", default=False, help=debug_help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def subcommand(
        group: Any, name: str, help_text: str, description: str, codes: tuple[int, ...]
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(
            name,
            help=help_text,
            description=_wrap(description or help_text),
            parents=[common],
            epilog=exit_codes(EXIT_OK, EXIT_FAILED, EXIT_USAGE, *codes),
            formatter_class=formatter,
        )
        return parser

    def command(
        name: str, help_text: str, description: str = "", codes: tuple[int, ...] = _FILE_CODES
    ) -> argparse.ArgumentParser:
        return subcommand(commands, name, help_text, description, codes)

    def key_option(p: argparse.ArgumentParser, text: str) -> None:
        p.add_argument("--api-key", metavar="KEY", help=f"{text} (default: $WHISPERR_API_KEY)")

    def json_option(p: argparse.ArgumentParser, text: str) -> None:
        p.add_argument("--json", action="store_true", help=text)

    p = command(
        "status",
        "what the outbox holds: pending ops, leases, dead letters, the sender",
        "Pending ops by kind and the age of the oldest, the batch in flight (lease owner "
        "and expiry), dead letters, evictions, file size, schema version, and each key's "
        "sender: its pid, whether it is delivering now, its last success and last error. "
        "Safe while other processes use the file.",
    )
    key_option(p, "show only this key's part")
    json_option(p, "one JSON object")
    p.set_defaults(run=cmd_status)

    p = command(
        "flush",
        "deliver now: exit 0 when drained (for cron and systemd timers)",
        "Deliver every op this key had queued when the flush began, then exit 0. Otherwise "
        "exit with the reason (see the exit codes below). On a terminal, a progress bar "
        "shows a long flush.",
        _FLUSH_CODES,
    )
    key_option(p, "the server key")
    p.add_argument(
        "--base-url", metavar="URL", help=f"default: $WHISPERR_BASE_URL, else {DEFAULT_BASE_URL}"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="give up after S seconds (default %(default)g; 0: no limit)",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=3,
        metavar="N",
        help="retries of a failing request before giving up (default %(default)s)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT,
        metavar="S",
        help="seconds for one request (default %(default)g)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_flush)

    p = command(
        "track",
        "enqueue an event; returns once it is on disk (no network needed)",
        "Enqueue an event. Returns once it is committed to the outbox; a running sender or "
        "a later 'flush' delivers it. Prints nothing on success. Creates the file if "
        "needed.",
        _WRITE_CODES,
    )
    p.add_argument("user", metavar="USER", help="the external user id")
    p.add_argument("event", metavar="EVENT", help="the event type, snake_case")
    p.add_argument(
        "--prop",
        action="append",
        metavar="KEY=VALUE",
        help="a property, its value a string (repeatable; default: none)",
    )
    p.add_argument(
        "--props-json",
        metavar="JSON",
        help="properties as a JSON object, for numbers and booleans: '{\"amount_cents\": 4900}'"
        " (--prop values are applied on top; default: none)",
    )
    key_option(p, "the server key")
    p.set_defaults(run=cmd_track)

    p = command(
        "identify",
        "enqueue an identify; returns once it is on disk (no network needed)",
        "Enqueue an identify (traits and contact channels). Returns once it is committed to "
        "the outbox. Prints nothing on success. Creates the file if needed.",
        _WRITE_CODES,
    )
    p.add_argument("user", metavar="USER", help="the external user id")
    p.add_argument("--email", help="an opted-in email channel (default: none)")
    p.add_argument("--phone", help="an opted-in sms channel (default: none)")
    p.add_argument("--push-token", metavar="TOKEN", help="an opted-in push channel (default: none)")
    p.add_argument(
        "--preferred-channel",
        choices=("email", "sms", "push"),
        help="the channel to reach the user on first (default: none)",
    )
    p.add_argument(
        "--trait",
        action="append",
        metavar="KEY=VALUE",
        help="a trait, its value a string (repeatable; default: none)",
    )
    p.add_argument(
        "--traits-json",
        metavar="JSON",
        help="traits as a JSON object (--trait values on top; default: none)",
    )
    key_option(p, "the server key")
    p.set_defaults(run=cmd_identify)

    p = command(
        "compact",
        "give the file's free space back (after a large drain)",
        "Rewrite the outbox without its free pages (SQLite's VACUUM) and empty its WAL, or "
        "a PostgreSQL outbox's tables without their dead rows (VACUUM FULL), "
        "then print the size before and after. A drained queue leaves its pages free for "
        "new ops; senders give some back after each drain that empties the queue, and "
        "'status' shows what is left to reclaim. Other processes' writes wait while it runs "
        "(a few seconds for a file of hundreds of MB).",
    )
    p.set_defaults(run=cmd_compact)

    p = command(
        "peek",
        "the next ops, in delivery order (holds user data)",
        f"The next ops in delivery order (each key first in, first out; keys interleaved "
        f"by id). {USER_DATA_WARNING}",
    )
    p.add_argument("-n", type=int, default=10, metavar="N", help="how many (default %(default)s)")
    key_option(p, "show only this key's ops")
    json_option(p, "JSON lines, one op each, with its wire body")
    p.set_defaults(run=cmd_peek)

    p = command(
        "dead-letters",
        "what the server refused: list, requeue or purge",
        "Ops the server refused (or that expired), kept with the status and reason.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str, description: str = "") -> argparse.ArgumentParser:
        return subcommand(actions, name, help_text, description, _FILE_CODES)

    a = action(
        "list",
        "the dead letters, oldest first (holds user data)",
        f"The dead letters, oldest first, with the status and reason. {USER_DATA_WARNING}",
    )
    a.add_argument("-n", type=int, metavar="N", help="at most N (default: all)")
    key_option(a, "show only this key's")
    json_option(a, "JSON lines, one dead letter each, with its wire body")
    a.set_defaults(run=cmd_dead_letters_list)

    a = action(
        "requeue",
        "put dead letters back in the queue, with the same body and $message_id",
        "Put dead letters back at the end of their key's queue, with the same body and "
        "$message_id, for the next flush or sender. Exit 1 if a given id is not found.",
    )
    a.add_argument("ids", nargs="*", type=int, metavar="ID")
    a.add_argument("--all", action="store_true", help="every dead letter of this key")
    key_option(a, "the key whose dead letters these are")
    a.set_defaults(run=cmd_dead_letters_requeue)

    a = action(
        "purge",
        "delete dead letters for good",
        "Delete dead letters for good. Exit 1 if a given id is not found.",
    )
    a.add_argument("ids", nargs="*", type=int, metavar="ID")
    a.add_argument("--all", action="store_true", help="every dead letter of this key")
    key_option(a, "purge only this key's")
    a.set_defaults(run=cmd_dead_letters_purge)

    # These two take their own options, passed through: see their --help.
    p = commands.add_parser(
        "dev-server",
        help="a local Whisperr-compatible server printing what it receives (--help for options)",
        add_help=False,
    )
    p.set_defaults(run=cmd_dev_server, passthrough=True)
    p = commands.add_parser(
        "demo",
        help="the durability demo: kill a producer mid-run, lose nothing (under 30 s)",
        add_help=False,
    )
    p.set_defaults(run=cmd_demo, passthrough=True)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    _Parser.secrets = _secrets(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        code: int = args.run(args)
        return code
    except CliError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (| head): not an error. Keep the exit flush quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        hint = "" if args.debug else " (run with --debug for the traceback)"
        print(f"{PROG}: unexpected error: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
