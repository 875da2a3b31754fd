"""The Whisperr wire format: op -> final JSON, batch bodies, timestamps, ids. No I/O.

Ops are encoded exactly as the official ``whisperr`` SDK encodes them (``json.dumps`` with its
default separators and ASCII escaping, the same field order), so a stored row is the final
wire JSON and a batch body is built by joining stored strings.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from datetime import time as dtime
from decimal import Decimal
from typing import Any, Optional

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


def format_timestamp(epoch_ms: int) -> str:
    """RFC 3339 UTC with exactly three fraction digits and ``Z``."""
    seconds, millis = divmod(epoch_ms, 1000)
    return f"{_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    # Calls come many to a second: format each second once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _json_default(value: Any) -> Any:
    """How values that ``json`` does not know are encoded (documented in the README)."""
    from uuid import UUID  # here, not at import: few events carry one

    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.isoformat()
        return format_timestamp(_floor_ms(value))
    if isinstance(value, (date, dtime)):
        return value.isoformat()
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"Decimal {value} is not a JSON number")
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"a value of type {type(value).__name__} is not JSON serialisable")


def _floor_ms(value: datetime) -> int:
    # Truncate (never round) sub-millisecond digits, as for occurred_at.
    whole = value.replace(microsecond=0)
    return int(whole.timestamp()) * 1000 + value.microsecond // 1000


# One encoder for every op: json.dumps() with options builds a new one per call. Its output
# is json.dumps()'s own (the same separators and ASCII escaping).
_ENCODER = json.JSONEncoder(allow_nan=False, default=_json_default)


def _dumps(obj: Any) -> str:
    try:
        text = _ENCODER.encode(obj)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise InvalidOp(f"not JSON serialisable: {exc}") from None
    if len(text) > MAX_OP_BYTES:
        raise InvalidOp(f"encoded op is {len(text)} bytes, over the {MAX_OP_BYTES} byte limit")
    return text


def _require_user_id(external_user_id: Any) -> None:
    if not isinstance(external_user_id, str) or not external_user_id.strip():
        raise InvalidOp("external_user_id must be a non-empty string")


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
    if not isinstance(event_type, str):
        raise InvalidOp("event_type must be a string")
    name = event_type.strip()
    if not EVENT_TYPE.match(name):
        raise InvalidOp(f'invalid event_type "{name[:100]}": expected snake_case')
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
    return _dumps(event)


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
        out.update((k, channel[k]) for k in _PUSH_FIELDS if k in channel)
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
    return _dumps(body)


def batch_body(events: Sequence[str]) -> bytes:
    """``{"events": [...]}`` from stored event JSON, byte for byte as ``json.dumps`` writes it."""
    return ('{"events": [' + ", ".join(events) + "]}").encode("ascii")


def utc_now_ms() -> int:
    return time.time_ns() // 1_000_000

