"""The Whisperr wire format: op -> final JSON, batch bodies, timestamps, ids. No I/O.

Ops are encoded exactly as the official ``whisperr`` SDK encodes them (``json.dumps`` with its
default separators and ASCII escaping, the same field order), so a stored row is the final
wire JSON and a batch body is built by joining stored strings.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta, timezone
from datetime import time as dtime
from decimal import Decimal
from json.encoder import c_make_encoder  # type: ignore[attr-defined]
from json.encoder import encode_basestring_ascii as _quote
from types import TracebackType
from typing import Any, Callable, Optional

from ._options import MAX_OP_BYTES

# The context.sdk_name value on every event this SDK sends.
SDK_NAME = "whisperr-durable-python"

EVENT_TYPE = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")
CHANNEL_TYPES = ("email", "sms", "push")
# Optional fields of a push channel that travel as given.
_PUSH_FIELDS = ("kind", "platform", "push_env")

TRACK = 0
IDENTIFY = 1


class InvalidOp(ValueError):
    """A track or identify call that can never be delivered; it is not queued."""


def message_id() -> str:
    """A fresh idempotency key: 128 random bits as 32 hex digits."""
    return os.urandom(16).hex()


def message_ids(n: int) -> list[str]:
    """``n`` fresh idempotency keys from one read of the random source."""
    text = os.urandom(16 * n).hex()
    return [text[i : i + 32] for i in range(0, 32 * n, 32)]


def format_timestamp(epoch_ms: int) -> str:
    """RFC 3339 UTC with exactly three fraction digits and ``Z`` (years 1 to 9999)."""
    seconds, millis = divmod(epoch_ms, 1000)
    return f"{_second(seconds)}.{millis:03d}Z"


_EPOCH = datetime(1970, 1, 1)
_UTC_EPOCH = _EPOCH.replace(tzinfo=timezone.utc)
_MILLISECOND = timedelta(milliseconds=1)
# The instants format_timestamp() can write: 0001-01-01T00:00:00.000Z to 9999-12-31T23:59:59.999Z.
_MIN_MS = (datetime(1, 1, 1) - _EPOCH) // _MILLISECOND
_MAX_MS = (datetime(9999, 12, 31, 23, 59, 59, 999_000) - _EPOCH) // _MILLISECOND


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    # Calls come many to a second: format each second once. Not time.strftime(): "%Y" does
    # not pad a year before 1000 on every platform, and gmtime() fails before 1970 on some.
    return (_EPOCH + timedelta(seconds=seconds)).isoformat()


# Integers of more digits are rejected: Python 3.11+ (and 3.9.14+, 3.10.7+) refuses to write
# them by default, and without that limit int -> text takes time quadratic in the digits.
_MAX_INT_DIGITS = 4300
_INT_BOUND = 10**_MAX_INT_DIGITS
_NEG_INT_BOUND = -_INT_BOUND  # not negated per call: that builds a 4300-digit int
# Value types whose JSON text needs no look inside (int is checked against _INT_BOUND).
_SCALARS = frozenset((str, float, bool, type(None)))
_CONTAINERS = (dict, list, tuple)


def _json_default(value: Any) -> Any:
    """How values that ``json`` does not know are encoded (documented in the README)."""
    from uuid import UUID  # here, not at import: few events carry one

    if isinstance(value, datetime):
        if value.utcoffset() is None:  # naive, whether or not it has a tzinfo
            return value.isoformat()
        epoch_ms = _floor_ms(value)
        if not _MIN_MS <= epoch_ms <= _MAX_MS:
            raise InvalidOp("an aware datetime outside the years 1 to 9999 in UTC")
        return format_timestamp(epoch_ms)
    if isinstance(value, (date, dtime)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return _decimal_number(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Mapping):
        converted = dict(value)
        _check_tree(converted)
        return converted
    raise InvalidOp(f"not JSON serialisable: a value of type {type(value).__name__[:100]}")


def _decimal_number(value: Decimal) -> Any:
    # Never int(value) for a huge exponent: it takes seconds for 1E+300000.
    if not value.is_finite():
        raise InvalidOp("a Decimal NaN or infinity is not a JSON number")
    if value.is_zero():
        return 0
    if value == value.to_integral_value():
        digits = value.adjusted() + 1
        if digits > _MAX_INT_DIGITS:
            raise InvalidOp(f"a Decimal of more than {_MAX_INT_DIGITS} digits is not encoded")
        if digits <= 40:
            return int(value)
        # int(Decimal) is quadratic in the digits; through text it is several times faster.
        return int(format(value.to_integral_value(), "f"))
    # Over 1E+309 a float is inf, and json would refuse it (after a float() as long as it).
    number = float(value) if value.adjusted() < 309 else math.inf
    if math.isinf(number):
        raise InvalidOp("a Decimal too large for a JSON number")
    return number


def _floor_ms(value: datetime) -> int:
    # Truncate (never round) sub-millisecond digits, as for occurred_at. Exact: no float, and
    # floored even before 1970 or for an offset of a fraction of a second.
    return (value - _UTC_EPOCH) // _MILLISECOND


def _check(tree: dict[Any, Any]) -> None:
    """Reject what ``json`` would write with a duplicate key or take too long to write.

    The common case, a flat dict of str keys and scalar values, is one pass over it.
    """
    for key, value in tree.items():
        if type(key) is str:
            kind = type(value)
            if kind in _SCALARS:
                continue
            if kind is int and _NEG_INT_BOUND < value < _INT_BOUND:
                continue
        _check_tree(tree)
        return


def _check_tree(root: dict[Any, Any]) -> None:
    """:func:`_check` for any tree: every dict and list inside, as ``json`` will walk them.

    Keys that collide once written as JSON strings (``1`` and ``"1"``, ``True`` and
    ``"true"``, ``None`` and ``"null"``, ``1.0`` and ``"1.0"``) are rejected: parsers differ on
    which of the two a duplicate key keeps. Mappings that are not dicts are checked when
    ``_json_default`` converts them; values of other types are left to the encoder.
    """
    # Every container met, held so that its id is not reused while we walk. A container
    # met twice is checked once: json rejects a cycle itself.
    seen: dict[int, Any] = {id(root): root}
    todo: list[Any] = [root]
    while todo:
        node = todo.pop()
        kind = type(node)
        values: Iterable[Any]
        if kind is dict:
            for key in node:
                if type(key) is not str:
                    _check_keys(node.items())
                    break
            values = node.values()
        elif kind is list or kind is tuple:
            values = node
        elif isinstance(node, dict):
            # json writes a dict subclass from its items(), and so do we.
            pairs = list(node.items())
            _check_keys(pairs)
            values = [value for _, value in pairs]
        else:
            # And a list or tuple subclass from its iterator.
            values = list(node)
        for value in values:
            kind = type(value)
            if kind in _SCALARS:
                continue
            if kind is int and _NEG_INT_BOUND < value < _INT_BOUND:
                continue
            if kind is dict or kind is list or kind is tuple or isinstance(value, _CONTAINERS):
                if id(value) not in seen:
                    seen[id(value)] = value
                    todo.append(value)
            elif isinstance(value, int):  # too long, or an int subclass (bool is a scalar)
                _check_int(value)


def _check_keys(pairs: Iterable[tuple[Any, Any]]) -> None:
    # The JSON text of each key, converted as json converts it.
    texts: set[str] = set()
    for key, _ in pairs:
        if isinstance(key, str):
            text = str.__str__(key)
        elif isinstance(key, float):
            if not math.isfinite(key):
                continue  # json rejects it
            text = float.__repr__(key)
        elif key is True:
            text = "true"
        elif key is False:
            text = "false"
        elif key is None:
            text = "null"
        elif isinstance(key, int):
            _check_int(key)
            text = int.__repr__(key)
        else:
            continue  # json rejects it
        if text in texts:
            raise InvalidOp("two keys of one object are the same JSON string (e.g. 1 and '1')")
        texts.add(text)


def _check_int(value: int) -> None:
    if not _NEG_INT_BOUND < value < _INT_BOUND:
        raise InvalidOp(f"an integer of more than {_MAX_INT_DIGITS} digits is not encoded")


# One encoder for every op: json.dumps() with options builds a new one per call. Its output
# is json.dumps()'s own (the same separators and ASCII escaping).
_ENCODER = json.JSONEncoder(allow_nan=False, default=_json_default)
_JSON_ERRORS = (TypeError, ValueError, OverflowError, RecursionError)


def _dumps(obj: Any, tree: dict[Any, Any], other: Optional[dict[Any, Any]] = None) -> str:
    """``obj`` as JSON, after checking ``tree`` and ``other``: the caller's dicts inside it."""
    try:
        _check(tree)
        if other:
            _check(other)
        text = _ENCODER.encode(obj)
    except _JSON_ERRORS as exc:
        raise _invalid(exc) from None
    return _within_limit(text)


def _within_limit(text: str) -> str:
    if len(text) > MAX_OP_BYTES:
        raise InvalidOp(f"encoded op is {len(text)} bytes, over the {MAX_OP_BYTES} byte limit")
    return text


def _invalid(exc: BaseException) -> InvalidOp:
    # The text of our own InvalidOp, and of json's own errors (a circular reference, a key of
    # a type it refuses, a float out of range, an int over the digit limit, nesting too
    # deep), names no caller data. Anything raised from the caller's code (a Mapping's
    # __getitem__, a dict subclass's items(), an isoformat()) may: it is only described.
    module = _innermost_module(exc)
    if isinstance(exc, InvalidOp) and module == __name__:
        return exc
    text = None
    if type(exc) in _JSON_ERRORS and module == "json.encoder":
        try:
            text = str(exc)
        except Exception:
            text = None
    return InvalidOp(f"not JSON serialisable: {text or describe_error(exc)}")


def _innermost(exc: BaseException) -> Optional[TracebackType]:
    tb = exc.__traceback__
    if not isinstance(tb, TracebackType):
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def _innermost_module(exc: BaseException) -> Any:
    try:
        tb = _innermost(exc)
        return None if tb is None else tb.tb_frame.f_globals.get("__name__")
    except Exception:
        return None


def describe_error(exc: BaseException) -> str:
    """Name an exception's type and where it was raised, never its text; never raises.

    For exceptions from the caller's objects (a Mapping, a ``default``-encoded value, a
    callback): their text may carry the caller's data (``KeyError: 'ada@example.com'``),
    so a log line or an ``on_error`` message gets only ``"KeyError raised at models.py:42
    in Profile.__getitem__"``: the exception's type (module-qualified unless built in) and
    the innermost traceback frame's file name, line and function.
    """
    try:
        kind = type(exc)
        name = kind.__qualname__
        module = kind.__module__
        if not isinstance(name, str):
            name = "exception"
        elif isinstance(module, str) and module != "builtins":
            name = f"{module}.{name}"
    except Exception:
        name = "exception"
    try:
        tb = _innermost(exc)
        if tb is None:
            return f"{name} (no traceback)"
        code = tb.tb_frame.f_code
        line = tb.tb_lineno
        where = f"{os.path.basename(code.co_filename)}:{line if isinstance(line, int) else '?'}"
        function = getattr(code, "co_qualname", code.co_name)
        return f"{name} raised at {where} in {function}"
    except Exception:
        return name


def _require_user_id(external_user_id: Any) -> None:
    if not isinstance(external_user_id, str) or not external_user_id.strip():
        raise InvalidOp("external_user_id must be a non-empty string")


def _event_name(event_type: Any) -> str:
    if not isinstance(event_type, str):
        raise InvalidOp("event_type must be a string")
    name = event_type.strip()
    if not EVENT_TYPE.match(name):
        raise InvalidOp(f'invalid event_type "{name[:100]}": expected snake_case')
    return name


def _optional_mapping(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if type(value) is dict:
        return value
    if not isinstance(value, Mapping):
        raise InvalidOp(f"{name} must be a dict, got {type(value).__name__}")
    return dict(value)


def encode_track(
    environment: Mapping[str, str],
    external_user_id: Any,
    event_type: Any,
    properties: Any,
    context: Any,
    msg_id: str,
    epoch_ms: int,
) -> str:
    """The wire JSON of one event, or :class:`InvalidOp`."""
    _require_user_id(external_user_id)
    name = _event_name(event_type)
    props = _optional_mapping("properties", properties)
    ctx = _optional_mapping("context", context)
    event = {
        "external_user_id": external_user_id,
        "event_type": name,
        "occurred_at": format_timestamp(epoch_ms),
        "properties": props or {},
        # The caller's context keys win over the SDK's keys, never over $message_id.
        "context": {**environment, **ctx, "$message_id": msg_id},
    }
    # The SDK's own keys are strings: only the caller's keys can collide.
    return _dumps(event, props, ctx)


class TrackEncoder:
    """:func:`encode_track` for one client's environment, byte for byte, faster for the
    common call: a plain ``str`` user id and event type, a ``dict`` of properties (or
    none) and no context. The event's JSON is built around the properties' own, written by
    one encoder made once; anything else takes :func:`encode_track`."""

    def __init__(self, environment: Mapping[str, str]) -> None:
        self.environment = dict(environment)
        env = json.dumps(self.environment)
        self._context_head = (env[:-1] + ", " if self.environment else "{") + '"$message_id": "'
        # The C encoder json.dumps uses, made once, with no cycle check (shared by threads:
        # its memo of the containers it is inside would be too). A cycle ends in
        # RecursionError, as deep nesting does.
        self._encode_properties: Callable[[dict[Any, Any]], str] = _ENCODER.encode
        if c_make_encoder is not None:
            write = c_make_encoder(
                None, _json_default, _quote, None, ": ", ", ", False, False, False
            )
            self._encode_properties = lambda properties: "".join(write(properties, 0))

    def encode(
        self,
        external_user_id: Any,
        event_type: Any,
        properties: Any,
        context: Any,
        msg_id: str,
        epoch_ms: int,
    ) -> str:
        if (
            context is not None
            or type(external_user_id) is not str
            or type(event_type) is not str
            or not (properties is None or type(properties) is dict)
        ):
            return encode_track(
                self.environment,
                external_user_id,
                event_type,
                properties,
                context,
                msg_id,
                epoch_ms,
            )
        _require_user_id(external_user_id)
        name = _event_name(event_type)
        if properties:
            try:
                _check(properties)
                props = self._encode_properties(properties)
            except _JSON_ERRORS as exc:
                raise _invalid(exc) from None
        else:
            props = "{}"
        text = (
            '{"external_user_id": '
            + _quote(external_user_id)
            + ', "event_type": '
            + _quote(name)
            + ', "occurred_at": "'
            + format_timestamp(epoch_ms)
            + '", "properties": '
            + props
            + ', "context": '
            + self._context_head
            + msg_id
            + '"}}'
        )
        return _within_limit(text)


def _wire_channel(channel: Any) -> dict[str, Any]:
    if not isinstance(channel, Mapping):
        raise InvalidOp("each channel must be a dict")
    kind = channel.get("type") or channel.get("channel")
    if kind not in CHANNEL_TYPES:
        raise InvalidOp(f"channel type must be one of {', '.join(CHANNEL_TYPES)}")
    address = channel.get("address")
    if not isinstance(address, str) or not address:
        raise InvalidOp("a channel needs a non-empty address")
    out: dict[str, Any] = {
        "channel": kind,
        "address": address,
        "opted_in": channel.get("opted_in", True),
    }
    if "verified" in channel:
        out["verified"] = channel["verified"]
    for flag in ("opted_in", "verified"):
        if flag in out and not isinstance(out[flag], bool):
            raise InvalidOp(f"channel {flag} must be a bool")
    if kind == "push":
        for field in _PUSH_FIELDS:
            if field in channel:
                value = channel[field]
                if not isinstance(value, str):
                    raise InvalidOp(f"push channel {field} must be a string")
                out[field] = value
    return out


def shortcut_channels(
    email: Optional[str], phone: Optional[str], push_token: Optional[str]
) -> list[dict[str, Any]]:
    """``email=``, ``phone=``, ``push_token=`` as opted-in channels, in that order."""
    pairs = (("email", email), ("sms", phone), ("push", push_token))
    return [{"type": kind, "address": addr, "opted_in": True} for kind, addr in pairs if addr]


def encode_identify(
    external_user_id: Any,
    traits: Any,
    preferred_channel: Any,
    channels: Optional[Iterable[Any]],
) -> str:
    """The wire JSON of one identify body, or :class:`InvalidOp`."""
    _require_user_id(external_user_id)
    trait_map = _optional_mapping("traits", traits)
    body: dict[str, Any] = {"external_user_id": external_user_id}
    if trait_map:
        body["traits"] = trait_map
    if preferred_channel:
        if preferred_channel not in CHANNEL_TYPES:
            raise InvalidOp(f"preferred_channel must be one of {', '.join(CHANNEL_TYPES)}")
        body["preferred_channel"] = preferred_channel
    if channels is not None:
        if isinstance(channels, (str, bytes, Mapping)):
            raise InvalidOp("channels must be a list of dicts")
        wire_channels = [_wire_channel(c) for c in channels]
        if wire_channels:
            body["channels"] = wire_channels
    return _dumps(body, body)


# Between two events of a batch, as ``json.dumps`` writes a list.
EVENT_SEPARATOR = ", "


def batch_body(joined: bytes) -> bytes:
    """``{"events": [...]}`` from stored event JSON (ASCII bytes) joined by
    ``EVENT_SEPARATOR``, byte for byte as ``json.dumps`` writes the batch."""
    return b'{"events": [' + joined + b"]}"


def utc_now_ms() -> int:
    return time.time_ns() // 1_000_000
