"""Pure tests of ``whisperr_durable._wire``: the exact bytes the SDK stores and sends."""

from __future__ import annotations

import json
import math
import re
import sys
import types
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import IntEnum
from functools import partial
from time import perf_counter
from typing import Any, Callable, Optional

import pytest
from conftest import API_KEY
from hypothesis import given, settings
from hypothesis import strategies as st

from whisperr_durable import _wire
from whisperr_durable._options import MAX_OP_BYTES
from whisperr_durable._wire import (
    EVENT_TYPE,
    InvalidOp,
    TrackEncoder,
    batch_body,
    encode_identify,
    encode_track,
    format_timestamp,
    message_id,
    message_ids,
    shortcut_channels,
)
from whisperr_durable.devserver import DevServer

ENV = {"sdk_name": "whisperr-durable-python", "sdk_version": "9.9.9"}
MID = "0123456789abcdef0123456789abcdef"
# 2026-05-31T12:00:00.123Z
T0_MS = 1_780_228_800_123


def track(
    properties: Any = None,
    context: Any = None,
    *,
    user: Any = "user_8842",
    event_type: Any = "payment_failed",
    env: Optional[Mapping[str, str]] = None,
) -> str:
    return encode_track(
        ENV if env is None else env, user, event_type, properties, context, MID, T0_MS
    )


def props_of(properties: Any) -> Any:
    return json.loads(track(properties))["properties"]


def identify(
    *,
    user: Any = "user_8842",
    traits: Any = None,
    preferred_channel: Any = None,
    channels: Any = None,
    email: Optional[str] = None,
    phone: Optional[str] = None,
    push_token: Optional[str] = None,
) -> dict[str, Any]:
    """What DurableWhisperr.identify() encodes (shortcuts unless channels is given)."""
    if channels is None:
        channels = shortcut_channels(email, phone, push_token)
    body: dict[str, Any] = json.loads(encode_identify(user, traits, preferred_channel, channels))
    return body


# ---- the event: field order and bytes ----


def test_track_bytes_match_the_official_sdk_encoding() -> None:
    text = track({"amount_cents": 4900, "reason": "card_declined"})
    expected = json.dumps(
        {
            "external_user_id": "user_8842",
            "event_type": "payment_failed",
            "occurred_at": "2026-05-31T12:00:00.123Z",
            "properties": {"amount_cents": 4900, "reason": "card_declined"},
            "context": {**ENV, "$message_id": MID},
        }
    )
    assert text == expected
    # Spelled out, so a change of separators or field order cannot hide behind json.dumps.
    assert text == (
        '{"external_user_id": "user_8842", "event_type": "payment_failed", '
        '"occurred_at": "2026-05-31T12:00:00.123Z", '
        '"properties": {"amount_cents": 4900, "reason": "card_declined"}, '
        '"context": {"sdk_name": "whisperr-durable-python", "sdk_version": "9.9.9", '
        '"$message_id": "0123456789abcdef0123456789abcdef"}}'
    )


def test_track_escapes_non_ascii_like_json_dumps() -> None:
    text = track({"name": "Zoë ☕"}, user="ü")
    assert text.isascii()
    assert '"Zo\\u00eb \\u2615"' in text
    assert text.startswith('{"external_user_id": "\\u00fc"')
    assert json.loads(text)["properties"] == {"name": "Zoë ☕"}


@pytest.mark.parametrize("properties", [None, {}])
def test_missing_or_empty_properties_serialise_as_an_empty_object(properties: Any) -> None:
    text = track(properties)
    assert '"properties": {}' in text
    assert json.loads(text)["properties"] == {}


def test_environment_is_optional_and_message_id_is_always_present() -> None:
    ctx = json.loads(track(env={}))["context"]
    assert ctx == {"$message_id": MID}


# ---- batch bodies ----


def test_batch_body_joins_stored_rows_exactly_as_json_dumps_writes_the_batch() -> None:
    rows = [
        encode_track(ENV, f"user_{i}", "feature_used", {"i": i}, None, f"{i:032x}", T0_MS + i)
        for i in range(3)
    ]
    body = batch_body(
        b", ".join(r.encode("ascii") for r in rows)
    )  # rows as the outbox returns them
    assert isinstance(body, bytes)
    assert body == json.dumps({"events": [json.loads(r) for r in rows]}).encode("utf-8")
    assert body.startswith(b'{"events": [{"external_user_id": "user_0"')
    assert json.loads(body)["events"][2]["occurred_at"] == "2026-05-31T12:00:00.125Z"


def test_batch_body_of_one_row() -> None:
    row = track()
    assert batch_body(row.encode()) == ('{"events": [' + row + "]}").encode()
    assert batch_body(row.encode()) == json.dumps({"events": [json.loads(row)]}).encode()


# ---- timestamps ----


@pytest.mark.parametrize(
    ("epoch_ms", "expected"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1, "1970-01-01T00:00:00.001Z"),
        (999, "1970-01-01T00:00:00.999Z"),
        (1000, "1970-01-01T00:00:01.000Z"),
        (T0_MS, "2026-05-31T12:00:00.123Z"),
        (1_709_208_000_050, "2024-02-29T12:00:00.050Z"),
        (4_102_444_799_999, "2099-12-31T23:59:59.999Z"),
    ],
)
def test_format_timestamp(epoch_ms: int, expected: str) -> None:
    assert format_timestamp(epoch_ms) == expected


def test_format_timestamp_is_rfc3339_utc_with_three_fraction_digits() -> None:
    pattern = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
    for ms in (0, 7, 1_234_567_890_123, _wire.utc_now_ms()):
        assert pattern.match(format_timestamp(ms))


def test_occurred_at_truncates_sub_millisecond_digits() -> None:
    # 12:00:00.123999 in microseconds: the whole-millisecond clock truncates, never rounds.
    instant = datetime(2026, 5, 31, 12, 0, 0, 123_999, tzinfo=timezone.utc)
    epoch_ms = int(instant.replace(microsecond=0).timestamp()) * 1000 + instant.microsecond // 1000
    text = encode_track(ENV, "u", "x", None, None, MID, epoch_ms)
    assert json.loads(text)["occurred_at"] == "2026-05-31T12:00:00.123Z"


def test_utc_now_ms_is_the_wall_clock_in_milliseconds() -> None:
    before = datetime.now(timezone.utc).timestamp() * 1000
    now = _wire.utc_now_ms()
    after = datetime.now(timezone.utc).timestamp() * 1000
    assert isinstance(now, int)
    assert before - 1 <= now <= after + 1


# ---- event_type ----


@pytest.mark.parametrize(
    ("given", "wire"),
    [
        ("payment_failed", "payment_failed"),
        ("  payment_failed\n", "payment_failed"),
        ("a", "a"),
        ("v2_checkout_3", "v2_checkout_3"),
        ("0", "0"),
    ],
)
def test_event_type_is_trimmed_and_accepted(given: str, wire: str) -> None:
    assert json.loads(track(event_type=given))["event_type"] == wire


@pytest.mark.parametrize(
    "given",
    [
        "",
        "   ",
        "PaymentFailed",
        "payment-failed",
        "payment failed",
        "payment__failed",
        "_payment",
        "payment_",
        "payment.failed",
        "paymént",
        "payment_failed\nx",
        None,
        42,
        b"payment_failed",
    ],
)
def test_invalid_event_type_is_rejected(given: Any) -> None:
    with pytest.raises(InvalidOp):
        track(event_type=given)


def test_event_type_pattern_is_the_contracts() -> None:
    assert EVENT_TYPE.pattern == r"^[a-z0-9]+(?:_[a-z0-9]+)*$"


# ---- user id, properties, context ----


@pytest.mark.parametrize("user", ["", "   ", None, 42, b"user_1", ["user_1"]])
def test_empty_or_non_string_user_id_is_rejected(user: Any) -> None:
    with pytest.raises(InvalidOp):
        track(user=user)
    with pytest.raises(InvalidOp):
        encode_identify(user, None, None, None)


def test_user_id_travels_as_given() -> None:
    assert json.loads(track(user=" user 1 "))["external_user_id"] == " user 1 "


@pytest.mark.parametrize("bad", [[1, 2], [("a", 1)], "props", 5, {"a", "b"}])
def test_properties_and_context_must_be_mappings(bad: Any) -> None:
    with pytest.raises(InvalidOp):
        track(properties=bad)
    with pytest.raises(InvalidOp):
        track(context=bad)


def test_invalid_op_is_a_value_error() -> None:
    assert issubclass(InvalidOp, ValueError)


def test_caller_context_wins_over_sdk_keys_but_never_over_message_id() -> None:
    env = {"sdk_name": "whisperr-durable-python", "sdk_version": "1.0", "app_version": "3.2"}
    caller = {
        "sdk_name": "mine",
        "sdk_version": "0",
        "app_version": "4.0",
        "$message_id": "forged",
        "$mode": "test",
    }
    text = encode_track(env, "u", "x", None, caller, MID, T0_MS)
    ctx = json.loads(text)["context"]
    assert ctx == {
        "sdk_name": "mine",
        "sdk_version": "0",
        "app_version": "4.0",
        "$message_id": MID,
        "$mode": "test",
    }
    # The official SDK's order: {**env, **caller, "$message_id": id}.
    assert text.endswith(json.dumps({**env, **caller, "$message_id": MID}) + "}")


def test_caller_context_keys_follow_the_sdk_keys() -> None:
    text = track(context={"ip": "1.2.3.4", "$occurrence_key": "k1"})
    assert text.endswith(
        '"context": {"sdk_name": "whisperr-durable-python", "sdk_version": "9.9.9", '
        '"ip": "1.2.3.4", "$occurrence_key": "k1", '
        '"$message_id": "0123456789abcdef0123456789abcdef"}}'
    )


# ---- values json does not know ----


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_rejected(value: float) -> None:
    with pytest.raises(InvalidOp):
        track({"v": value})
    with pytest.raises(InvalidOp):
        track(context={"v": [value]})
    with pytest.raises(InvalidOp):
        encode_identify("u", {"v": value}, None, None)


@pytest.mark.parametrize("value", [{1, 2}, object(), b"bytes", 1 + 2j, frozenset()])
def test_unserialisable_values_are_rejected(value: Any) -> None:
    with pytest.raises(InvalidOp, match="not JSON serialisable"):
        track({"v": value})
    with pytest.raises(InvalidOp):
        encode_identify("u", {"v": {"nested": value}}, None, None)


def test_circular_properties_are_rejected() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(InvalidOp):
        track({"loop": loop})


def test_aware_datetime_becomes_utc_wire_format_truncated() -> None:
    plus_two = timezone(timedelta(hours=2))
    value = datetime(2026, 5, 31, 14, 0, 0, 123_999, tzinfo=plus_two)
    assert props_of({"at": value}) == {"at": "2026-05-31T12:00:00.123Z"}
    utc = datetime(2026, 5, 31, 12, 0, 0, 999_999, tzinfo=timezone.utc)
    assert props_of({"at": utc}) == {"at": "2026-05-31T12:00:00.999Z"}
    assert props_of({"at": utc.replace(microsecond=0)}) == {"at": "2026-05-31T12:00:00.000Z"}


def test_naive_datetime_date_and_time_use_isoformat() -> None:
    assert props_of(
        {
            "naive": datetime(2026, 5, 31, 12, 0, 0, 123_456),
            "day": date(2026, 5, 31),
            "clock": time(9, 30, 5),
        }
    ) == {"naive": "2026-05-31T12:00:00.123456", "day": "2026-05-31", "clock": "09:30:05"}


def test_decimal_encoding() -> None:
    encoded = track(
        {
            "a": Decimal("3"),
            "b": Decimal("3.0"),
            "c": Decimal("1E+2"),
            "d": Decimal("2.50"),
            "e": Decimal("-0.125"),
        }
    )
    assert '"a": 3, "b": 3, "c": 100, "d": 2.5, "e": -0.125' in encoded
    values = json.loads(encoded)["properties"]
    assert values == {"a": 3, "b": 3, "c": 100, "d": 2.5, "e": -0.125}
    assert isinstance(values["b"], int)
    assert isinstance(values["d"], float)


@pytest.mark.parametrize("value", ["NaN", "sNaN", "Infinity", "-Infinity", "1" + "0" * 400 + ".5"])
def test_non_finite_decimal_is_rejected(value: str) -> None:
    with pytest.raises(InvalidOp):
        track({"v": Decimal(value)})


def test_uuid_becomes_its_string() -> None:
    value = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert props_of({"id": value, "ids": [value]}) == {
        "id": "12345678-1234-5678-1234-567812345678",
        "ids": ["12345678-1234-5678-1234-567812345678"],
    }


def test_known_values_nest_inside_lists_and_dicts() -> None:
    assert props_of({"a": [{"d": date(2020, 1, 2)}], "b": (1, Decimal("2"))}) == {
        "a": [{"d": "2020-01-02"}],
        "b": [1, 2],
    }


def test_any_mapping_is_accepted_as_properties_and_traits() -> None:
    frozen = types.MappingProxyType({"plan": "pro"})
    assert props_of(frozen) == {"plan": "pro"}
    assert identify(traits=frozen)["traits"] == {"plan": "pro"}


# ---- size limit ----


def test_op_size_limit_is_inclusive() -> None:
    overhead = len(track({"pad": ""}))
    at_limit = track({"pad": "x" * (MAX_OP_BYTES - overhead)})
    assert len(at_limit) == MAX_OP_BYTES
    with pytest.raises(InvalidOp, match="byte limit"):
        track({"pad": "x" * (MAX_OP_BYTES - overhead + 1)})


def test_op_size_counts_escaped_bytes() -> None:
    # "é" is 6 bytes once escaped; a limit on characters would let this through.
    with pytest.raises(InvalidOp):
        track({"pad": "é" * (MAX_OP_BYTES // 6 + 1)})
    with pytest.raises(InvalidOp):
        encode_identify("u", {"bio": "x" * MAX_OP_BYTES}, None, None)


# ---- identify ----


def test_identify_minimal_body_omits_everything_optional() -> None:
    assert encode_identify("user_1", None, None, None) == '{"external_user_id": "user_1"}'
    assert identify(user="user_1", traits={}) == {"external_user_id": "user_1"}
    assert identify(user="user_1", channels=[]) == {"external_user_id": "user_1"}


def test_identify_full_body_bytes() -> None:
    text = encode_identify(
        "user_8842",
        {"plan": "pro"},
        "email",
        shortcut_channels("ada@example.com", None, None),
    )
    assert text == (
        '{"external_user_id": "user_8842", "traits": {"plan": "pro"}, '
        '"preferred_channel": "email", '
        '"channels": [{"channel": "email", "address": "ada@example.com", "opted_in": true}]}'
    )


@pytest.mark.parametrize("channel", ["email", "sms", "push"])
def test_preferred_channel_is_validated(channel: str) -> None:
    assert identify(preferred_channel=channel)["preferred_channel"] == channel


@pytest.mark.parametrize("channel", ["EMAIL", "whatsapp", "phone", 1, ["email"]])
def test_invalid_preferred_channel_is_rejected(channel: Any) -> None:
    with pytest.raises(InvalidOp):
        identify(preferred_channel=channel)


def test_preferred_channel_omitted_unless_given() -> None:
    assert "preferred_channel" not in identify(email="a@b.c")
    assert "preferred_channel" not in identify(preferred_channel="")


def test_shortcuts_expand_in_order_to_opted_in_channels() -> None:
    body = identify(push_token="tok", phone="+15551234567", email="ada@example.com")
    assert body["channels"] == [
        {"channel": "email", "address": "ada@example.com", "opted_in": True},
        {"channel": "sms", "address": "+15551234567", "opted_in": True},
        {"channel": "push", "address": "tok", "opted_in": True},
    ]
    assert all("type" not in c for c in body["channels"])
    assert identify(phone="+1555")["channels"] == [
        {"channel": "sms", "address": "+1555", "opted_in": True}
    ]


def test_shortcut_channels_skip_missing_values() -> None:
    assert shortcut_channels(None, None, None) == []
    assert shortcut_channels("", None, "t") == [{"type": "push", "address": "t", "opted_in": True}]


def test_explicit_channels_replace_the_shortcuts() -> None:
    # DurableWhisperr.identify() only expands shortcuts when channels is None.
    explicit = [{"type": "push", "address": "tok"}]
    body = json.loads(encode_identify("u", None, None, explicit))
    assert body["channels"] == [{"channel": "push", "address": "tok", "opted_in": True}]


@pytest.mark.parametrize("key", ["type", "channel"])
def test_channel_kind_from_type_or_channel_key(key: str) -> None:
    body = identify(channels=[{key: "sms", "address": "+1555", "opted_in": False}])
    assert body["channels"] == [{"channel": "sms", "address": "+1555", "opted_in": False}]


def test_channel_field_order_and_verified_only_when_set() -> None:
    text = encode_identify(
        "u",
        None,
        None,
        [
            {"verified": True, "address": "+1555", "type": "sms", "opted_in": True},
            {"type": "email", "address": "a@b.c", "verified": False},
            {"type": "email", "address": "c@d.e"},
        ],
    )
    assert text == (
        '{"external_user_id": "u", "channels": ['
        '{"channel": "sms", "address": "+1555", "opted_in": true, "verified": true}, '
        '{"channel": "email", "address": "a@b.c", "opted_in": true, "verified": false}, '
        '{"channel": "email", "address": "c@d.e", "opted_in": true}]}'
    )


def test_push_extras_pass_through_for_push_only() -> None:
    extras = {"kind": "fcm", "platform": "android", "push_env": "production"}
    body = identify(
        channels=[
            {"type": "push", "address": "tok", **extras},
            {"type": "email", "address": "a@b.c", **extras},
        ]
    )
    assert body["channels"] == [
        {"channel": "push", "address": "tok", "opted_in": True, **extras},
        {"channel": "email", "address": "a@b.c", "opted_in": True},
    ]
    partial = identify(channels=[{"type": "push", "address": "tok", "platform": "ios"}])
    assert partial["channels"] == [
        {"channel": "push", "address": "tok", "opted_in": True, "platform": "ios"}
    ]


def test_unknown_channel_keys_are_not_sent() -> None:
    # The server fails the whole request on an unknown field inside a channel.
    body = identify(channels=[{"type": "email", "address": "a@b.c", "label": "work"}])
    assert body["channels"] == [{"channel": "email", "address": "a@b.c", "opted_in": True}]


@pytest.mark.parametrize(
    "channel",
    [
        {"type": "email", "address": "a@b.c", "opted_in": "yes"},
        {"type": "email", "address": "a@b.c", "opted_in": 1},
        {"type": "email", "address": "a@b.c", "opted_in": None},
        {"type": "email", "address": "a@b.c", "verified": "true"},
        {"type": "fax", "address": "123"},
        {"address": "a@b.c"},
        {"type": "email"},
        {"type": "email", "address": ""},
        {"type": "email", "address": 5},
        "email",
        ("email", "a@b.c"),
    ],
)
def test_invalid_channel_is_rejected(channel: Any) -> None:
    with pytest.raises(InvalidOp):
        identify(channels=[channel])


@pytest.mark.parametrize(
    "channels",
    [{"type": "email", "address": "a@b.c"}, "email", b"email"],
)
def test_channels_given_as_a_dict_or_string_are_rejected(channels: Any) -> None:
    with pytest.raises(InvalidOp):
        identify(channels=channels)


def test_channels_may_be_any_iterable_of_dicts() -> None:
    body = identify(channels=(c for c in [{"type": "sms", "address": "+1"}]))
    assert body["channels"] == [{"channel": "sms", "address": "+1", "opted_in": True}]


def test_traits_must_be_a_mapping() -> None:
    with pytest.raises(InvalidOp):
        identify(traits=[("plan", "pro")])
    assert identify(traits={"plan": "pro", "seats": 3})["traits"] == {"plan": "pro", "seats": 3}


# ---- message ids ----


def test_message_id_is_32_hex_digits_and_fresh_each_call() -> None:
    ids = {message_id() for _ in range(1000)}
    assert len(ids) == 1000
    for mid in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", mid)


def test_message_ids_drawn_together_are_as_fresh_as_one_at_a_time() -> None:
    drawn = message_ids(1000) + message_ids(1000)
    assert len(set(drawn)) == 2000
    for mid in drawn:
        assert re.fullmatch(r"[0-9a-f]{32}", mid)
    assert message_ids(0) == []


# ---- byte compatibility with the official SDK, where it is installed ----


def test_byte_compatible_with_the_official_sdk(server: DevServer) -> None:
    whisperr = pytest.importorskip("whisperr")
    official_client = pytest.importorskip("whisperr.client")
    official_transport = pytest.importorskip("whisperr.transport")

    assert whisperr.__version__ == "0.2.1"
    assert official_client._SNAKE.pattern == EVENT_TYPE.pattern
    build_channels = official_client._build_channels

    # The official transport, unchanged, posting to the devserver, which records the bytes.
    official = official_transport.Transport(server.url, API_KEY, 5.0, lambda _msg: None)

    def sent() -> list[tuple[str, bytes]]:
        return [(r.path, r.body) for r in server.requests]

    env = {"sdk_name": "whisperr-python", "sdk_version": "0.2.1", "app_version": "3.1"}
    calls: list[tuple[str, str, Any, Any]] = [
        ("user_8842", "payment_failed", {"amount_cents": 4900, "note": "Zoë"}, None),
        ("user_1", "trial_started", None, {"$mode": "test", "sdk_name": "override"}),
        ("ü", "feature_used", {"nested": {"a": [1, 2.5, True, None]}}, {"$message_id": "x"}),
    ]
    now_ms = _wire.utc_now_ms()
    official_ops = []
    ours = []
    for i, (user, name, props, ctx) in enumerate(calls):
        mid = f"{i:032x}"
        official_ops.append(
            {
                "kind": "track",
                "external_user_id": user,
                "event_type": name,
                "properties": props,
                "context": {**env, **(ctx or {})},
                "occurred_at": format_timestamp(now_ms + i),
                "message_id": mid,
            }
        )
        ours.append(encode_track(env, user, name, props, ctx, mid, now_ms + i))
    assert official.send_batch(official_ops) == "ok"
    assert sent() == [("/v1/events/batch", batch_body(b", ".join(o.encode() for o in ours)))]
    assert len(server.events) == 3  # and the server took all three

    identifies: list[dict[str, Any]] = [
        {
            "user": "user_8842",
            "traits": {"plan": "pro"},
            "preferred_channel": "email",
            "email": "ada@example.com",
            "phone": "+1555",
            "push_token": "tok",
        },
        {
            "user": "user_7",
            "traits": None,
            "preferred_channel": None,
            "channels": [
                {"type": "sms", "address": "+1555", "opted_in": True, "verified": True},
                {"type": "email", "address": "a@b.c", "opted_in": False},
            ],
        },
        {"user": "user_9", "traits": {}, "preferred_channel": None, "channels": []},
    ]
    for case in identifies:
        server.reset()
        if "channels" in case:
            official_channels = case["channels"]
            our_channels = case["channels"]
        else:
            official_channels = build_channels(case["email"], case["phone"], case["push_token"])
            our_channels = shortcut_channels(case["email"], case["phone"], case["push_token"])
        result = official.send_identify(
            {
                "kind": "identify",
                "external_user_id": case["user"],
                "traits": case["traits"],
                "preferred_channel": case["preferred_channel"],
                "channels": official_channels,
            }
        )
        assert result == "ok"
        ours_body = encode_identify(
            case["user"], case["traits"], case["preferred_channel"], our_channels
        )
        assert sent() == [("/v1/identify", ours_body.encode("ascii"))]


# ---- values that would take too long to write ----

# Generous: the work is microseconds; today's int(Decimal("1E+300000")) takes seconds.
FAST = 0.5


def timed(call: Any) -> float:
    start = perf_counter()
    call()
    return perf_counter() - start


@contextmanager
def int_digit_limit(limit: int) -> Iterator[None]:
    """Python's int <-> text digit limit set to ``limit`` (0: none, as before 3.11)."""
    if not hasattr(sys, "set_int_max_str_digits"):
        if limit == 0:
            yield  # this interpreter has no limit at all
            return
        pytest.skip("no int digit limit on this interpreter")
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(limit)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(before)


def rejected(call: Any) -> InvalidOp:
    with pytest.raises(InvalidOp) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(
    "value", ["1e300000", "1e999999", "-1e999999", "1e4300", "9.99e999999999", "1.5e4300"]
)
def test_huge_decimal_is_rejected_quickly(value: str) -> None:
    amount = Decimal(value)
    assert timed(lambda: rejected(lambda: track({"amount": amount}))) < FAST
    assert timed(lambda: rejected(lambda: track({"a": [{"amount": amount}]}))) < FAST


NINES = "9" * 4300


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("1e4299", "1" + "0" * 4299),
        ("-" + NINES, "-" + NINES),
        (NINES + ".000", NINES),
        ("0E+999999", "0"),
        ("-0E+999999", "0"),
        ("1e-999999", "0.0"),
        ("-1.5e-999999", "-0.0"),
    ],
    ids=["1e4299", "-(1e4300-1)", "1e4300-1.000", "0e999999", "-0e999999", "1e-999999", "-1.5e-99"],
)
def test_decimal_with_many_digits_or_a_huge_exponent_encodes_quickly(value: str, text: str) -> None:
    encoded: list[str] = []
    assert timed(lambda: encoded.append(track({"n": Decimal(value)}))) < FAST
    assert '"properties": {"n": ' + text + "}" in encoded[0]


def test_decimal_too_big_for_a_float_is_rejected() -> None:
    # Not an integer, and over 1.8e308: the float would be inf.
    with pytest.raises(InvalidOp):
        track({"n": Decimal("2" + "0" * 308 + ".5")})
    assert props_of({"n": Decimal("1" + "0" * 300 + ".5")}) == {"n": 1e300}


@pytest.mark.parametrize("limit", [0, 4300])
def test_huge_int_is_rejected_quickly_with_or_without_the_interpreter_limit(limit: int) -> None:
    # Without Python's limit (3.9/3.10 before their 2022 patches, or set to 0), writing
    # 300,000 digits takes seconds.
    huge = 10**300_000
    with int_digit_limit(limit):
        for call in (
            lambda: track({"n": huge}),
            lambda: track({"n": -huge}),
            lambda: track({"a": [1, (2, huge)]}),
            lambda: track(context={"n": {"m": huge}}),
            lambda: track({huge: 1}),
            lambda: encode_identify("u", {"n": [huge]}, None, None),
        ):
            assert timed(lambda c=call: rejected(c)) < FAST


def test_int_of_4300_digits_is_encoded() -> None:
    biggest = 10**4300 - 1
    with int_digit_limit(0):
        assert props_of({"n": biggest, "m": [-biggest]}) == {"n": biggest, "m": [-biggest]}
        with pytest.raises(InvalidOp):
            track({"n": biggest + 1})


# ---- push channel fields ----


@pytest.mark.parametrize("field", ["kind", "platform", "push_env"])
@pytest.mark.parametrize("value", [None, 1, True, ["ios"], {"os": "ios"}, b"ios"])
def test_push_fields_that_are_not_strings_are_rejected(field: str, value: Any) -> None:
    # The server answers 400 to the whole identify.
    with pytest.raises(InvalidOp, match=field):
        identify(channels=[{"type": "push", "address": "tok", field: value}])


def test_push_fields_of_other_channels_are_not_sent_nor_checked() -> None:
    body = identify(channels=[{"type": "email", "address": "a@b.c", "kind": 5}])
    assert body["channels"] == [{"channel": "email", "address": "a@b.c", "opted_in": True}]


# ---- keys json would write twice ----

COLLIDING: list[dict[Any, Any]] = [
    {1: "a", "1": "b"},
    {True: 1, "true": 2},
    {False: 1, "false": 2},
    {None: 1, "null": 2},
    {1.0: 1, "1.0": 2},
    {"1.5": 1, 1.5: 2},
    {-7: 1, "-7": 2},
]


class Level(IntEnum):
    LOW = 1


class Attributes(dict):  # type: ignore[type-arg]
    """A dict subclass: json writes it from its items()."""


@pytest.mark.parametrize("keys", COLLIDING)
def test_keys_that_collide_as_json_strings_are_rejected(keys: dict[Any, Any]) -> None:
    nested: list[Any] = [
        keys,
        {"a": keys},
        {"a": [1, {"b": keys}]},
        {"a": ("x", keys)},
        {"a": types.MappingProxyType(keys)},
        {"a": [types.MappingProxyType({"b": keys})]},
        {"a": Attributes(keys)},
        Attributes({"a": keys}),
    ]
    for properties in nested:
        with pytest.raises(InvalidOp, match="same JSON string"):
            track(properties)
        with pytest.raises(InvalidOp, match="same JSON string"):
            track(context=properties)
        with pytest.raises(InvalidOp, match="same JSON string"):
            encode_identify("u", properties, None, None)
    with pytest.raises(InvalidOp, match="same JSON string"):
        track(types.MappingProxyType(keys))


def test_int_enum_key_colliding_with_its_number_is_rejected() -> None:
    with pytest.raises(InvalidOp):
        track({Level.LOW: "x", "1": "y"})


def test_keys_that_do_not_collide_are_written_as_json_dumps_writes_them() -> None:
    properties = {
        7: "a",
        2.5: "b",
        True: "c",
        None: "d",
        "x": {3: [{False: 1, -4: 2}], "3.0": 4},
        Level.LOW.name: 5,
        "a": Attributes({7: 8}),
        "t": ({0: 1},),
    }
    text = track(properties)
    assert '"properties": ' + json.dumps(properties) + ", " in text
    assert json.dumps(properties).startswith('{"7": "a", "2.5": "b", "true": "c", "null": "d"')
    # The same list or dict twice is no collision.
    shared = {1: "one"}
    assert props_of({"a": shared, "b": [shared, shared]}) == {
        "a": {"1": "one"},
        "b": [{"1": "one"}, {"1": "one"}],
    }


# Keys of every kind json converts, and strings that some of them become.
JSON_KEYS = st.one_of(
    st.sampled_from(["0", "1", "-1", "true", "false", "null", "0.0", "-0.0", "1.5", "1e-07"]),
    st.text(max_size=3),
    st.integers(-2, 2),
    st.booleans(),
    st.none(),
    st.sampled_from([0.0, -0.0, 1.5, 1e-7, 1e16]),
)
JSON_TREES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=3)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(JSON_KEYS, inner, max_size=4),
    ),
    max_leaves=12,
)


def has_duplicate_keys(text: str) -> bool:
    found = False

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        found = found or len({key for key, _ in pairs}) < len(pairs)
        return dict(pairs)

    json.loads(text, object_pairs_hook=pairs_hook)
    return found


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(JSON_KEYS, JSON_TREES, max_size=4))
def test_rejected_exactly_when_json_dumps_writes_a_key_twice(properties: dict[Any, Any]) -> None:
    written = json.dumps(properties)
    if has_duplicate_keys(written):
        with pytest.raises(InvalidOp, match="same JSON string"):
            track(properties)
    else:
        assert '"properties": ' + written + ", " in track(properties)


def test_colliding_keys_of_the_caller_context_are_rejected_not_the_sdks() -> None:
    with pytest.raises(InvalidOp):
        track(context={"$mode": "test", 1: "a", "1": "b"})
    ctx = json.loads(track(context={1: "a"}))["context"]
    assert ctx == {**ENV, "1": "a", "$message_id": MID}


def test_unusable_keys_keep_json_s_own_message() -> None:
    with pytest.raises(InvalidOp, match="keys must be str"):
        track({(1, 2): "a", "x": 1})
    with pytest.raises(InvalidOp, match="Out of range float"):
        track({math.inf: "a", "inf": 1})


# ---- timestamps before the year 1000 ----


UTC = timezone.utc


def epoch_ms_of(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000Z"),
        (datetime(9, 2, 3, 4, 5, 6, 7_999, tzinfo=UTC), "0009-02-03T04:05:06.007Z"),
        (datetime(999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), "0999-12-31T23:59:59.999Z"),
        (datetime(1000, 1, 1, tzinfo=UTC), "1000-01-01T00:00:00.000Z"),
        (datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC), "1969-12-31T23:59:59.500Z"),
        (datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), "9999-12-31T23:59:59.999Z"),
    ],
)
def test_format_timestamp_pads_the_year(moment: datetime, expected: str) -> None:
    assert format_timestamp(epoch_ms_of(moment)) == expected
    assert props_of({"at": moment}) == {"at": expected}


def test_aware_datetime_before_year_1000_in_another_zone() -> None:
    plus_two = timezone(timedelta(hours=2))
    moment = datetime(5, 6, 7, 1, 2, 3, 456_789, tzinfo=plus_two)
    assert props_of({"at": moment, "list": [moment]}) == {
        "at": "0005-06-06T23:02:03.456Z",
        "list": ["0005-06-06T23:02:03.456Z"],
    }


@pytest.mark.parametrize(
    "moment",
    [
        datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))),
        datetime(1, 1, 1, tzinfo=timezone(timedelta(microseconds=1))),
        datetime(9999, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-1))),
    ],
)
def test_aware_datetime_outside_years_1_to_9999_in_utc_is_rejected(moment: datetime) -> None:
    with pytest.raises(InvalidOp, match="years 1 to 9999"):
        track({"at": moment})


def test_naive_datetime_and_date_before_year_1000_keep_isoformat() -> None:
    assert props_of({"at": datetime(7, 1, 2, 3, 4, 5), "day": date(42, 1, 2)}) == {
        "at": "0007-01-02T03:04:05",
        "day": "0042-01-02",
    }


# ---- exceptions from the caller's objects ----

SECRET = "ada@example.com"


class Unprintable(ValueError):
    """An exception whose own text cannot be made."""

    def __str__(self) -> str:
        raise RuntimeError(SECRET)

    def __repr__(self) -> str:
        raise RuntimeError(SECRET)


class NamelessMeta(type):
    def __getattribute__(cls, name: str) -> Any:
        if name in ("__qualname__", "__module__", "__name__"):
            raise RuntimeError(SECRET)
        return super().__getattribute__(name)


class Nameless(Exception, metaclass=NamelessMeta):
    """An exception whose type will not say its name."""


class Profile(Mapping[str, Any]):
    """A caller's Mapping that fails with the caller's data in the message."""

    def __init__(self, error: type[Exception]) -> None:
        self.error = error

    def __getitem__(self, key: str) -> Any:
        raise self.error(SECRET)

    def __iter__(self) -> Iterator[str]:
        return iter(["email"])

    def __len__(self) -> int:
        return 1


class Birthday(date):
    def isoformat(self) -> str:
        raise ValueError(SECRET)


class UnprintableDay(date):
    def isoformat(self) -> str:
        raise Unprintable()


class BadId(uuid.UUID):
    def __str__(self) -> str:
        raise TypeError(SECRET)


class BadItems(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        raise TypeError(SECRET)


def raise_key_error() -> None:
    raise KeyError(SECRET)


def test_describe_error_names_the_type_and_the_place_never_the_text() -> None:
    try:
        raise_key_error()
    except KeyError as exc:
        line = exc.__traceback__.tb_next.tb_lineno  # type: ignore[union-attr]
        text = _wire.describe_error(exc)
    assert text == f"KeyError raised at test_wire.py:{line} in raise_key_error"
    assert SECRET not in text


def test_describe_error_never_raises() -> None:
    assert _wire.describe_error(Unprintable()) == "test_wire.Unprintable (no traceback)"
    assert _wire.describe_error(Nameless(SECRET)) == "exception (no traceback)"
    try:
        raise Unprintable()
    except Unprintable as exc:
        text = _wire.describe_error(exc)
    assert text.startswith("test_wire.Unprintable raised at test_wire.py:")
    assert text.endswith(" in test_describe_error_never_raises")


def test_describe_error_is_public_and_documented() -> None:
    assert callable(_wire.describe_error)
    assert _wire.describe_error.__doc__


@pytest.mark.parametrize(
    ("value", "where"),
    [
        (Profile(TypeError), "Profile.__getitem__"),
        (Profile(ValueError), "Profile.__getitem__"),
        (Birthday(2020, 1, 2), "Birthday.isoformat"),
        (UnprintableDay(2020, 1, 2), "UnprintableDay.isoformat"),
        (BadId("12345678-1234-5678-1234-567812345678"), "BadId.__str__"),
        (BadItems(a=1), "BadItems.items"),
    ],
)
def test_caller_exception_text_never_reaches_the_message(value: Any, where: str) -> None:
    for call in (
        lambda: track({"v": value}),
        lambda: track({"v": [{"w": value}]}),
        lambda: track(context={"v": value}),
        lambda: encode_identify("u", {"v": value}, None, None),
    ):
        message = str(rejected(call))
        assert SECRET not in message
        assert message.startswith("not JSON serialisable: ")
        assert "test_wire.py:" in message
        assert message.endswith(f" in {where}")


def test_other_caller_exceptions_pass_through_for_the_client_to_describe() -> None:
    with pytest.raises(KeyError) as caught:
        track({"v": Profile(KeyError)})
    text = _wire.describe_error(caught.value)
    assert SECRET not in text
    assert text.startswith("KeyError raised at test_wire.py:")
    assert text.endswith(" in Profile.__getitem__")


def test_json_s_own_errors_keep_their_text() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert str(rejected(lambda: track({"loop": loop}))) == (
        "not JSON serialisable: Circular reference detected"
    )
    assert "keys must be str, int, float, bool or None, not tuple" in str(
        rejected(lambda: track({"v": {(1,): 1}}))
    )
    assert "Out of range float values are not JSON compliant" in str(
        rejected(lambda: track({"v": [math.nan]}))
    )
    with int_digit_limit(640):
        assert "Exceeds the limit (640 digits)" in str(rejected(lambda: track({"v": 10**700})))


def test_our_own_messages_are_kept() -> None:
    assert str(rejected(lambda: track({"v": {1, 2}}))) == (
        "not JSON serialisable: a value of type set"
    )
    assert str(rejected(lambda: track({"v": [types.MappingProxyType({"d": Decimal("NaN")})]}))) == (
        "a Decimal NaN or infinity is not a JSON number"
    )


# ---- the client's encoder: encode_track's bytes, on a faster path ----

USER_IDS = st.one_of(st.sampled_from(["user_8842", " ", "", "ü", 'a"b\\c\n']), st.text(max_size=5))
EVENT_TYPES = st.one_of(
    st.sampled_from(["payment_failed", " trial_expired ", "Not_Snake", "a__b", ""]),
    st.text(alphabet="abz_09 ", max_size=6),
)


def both(
    user: Any, event_type: Any, properties: Any, context: Any, env: Mapping[str, str] = ENV
) -> tuple[Any, Any]:
    """What encode_track and TrackEncoder make of the same call: the text or the error."""
    args = (user, event_type, properties, context, MID, T0_MS)
    encoder = TrackEncoder(env)
    outcomes: list[Any] = []
    encoders: list[Callable[..., str]] = [partial(encode_track, env), encoder.encode]
    for encode in encoders:
        try:
            outcomes.append(encode(*args))
        except InvalidOp as exc:
            outcomes.append(InvalidOp)
            assert str(exc)
    return outcomes[0], outcomes[1]


@settings(max_examples=300)
@given(
    USER_IDS,
    EVENT_TYPES,
    st.one_of(st.none(), st.dictionaries(JSON_KEYS, JSON_TREES, max_size=4)),
    st.one_of(st.none(), st.just({}), st.dictionaries(st.text(max_size=3), JSON_TREES, max_size=2)),
)
def test_the_clients_encoder_writes_what_encode_track_writes(
    user: str, event_type: str, properties: Optional[dict[Any, Any]], context: Any
) -> None:
    general, fast = both(user, event_type, properties, context)
    assert fast == general


def test_the_clients_encoder_handles_what_is_unusual_as_encode_track_does() -> None:
    class Props(dict):  # type: ignore[type-arg]
        pass

    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    nested: dict[str, Any] = {"when": datetime(2026, 1, 2, tzinfo=timezone.utc)}
    cases: list[tuple[Any, ...]] = [
        ("u1", "paid", Props(a=1), None),
        ("u1", "paid", {"n": Decimal("1.5"), "id": uuid.UUID(int=7)}, None),
        ("u1", "paid", nested, None),
        ("u1", "paid", {"x": float("nan")}, None),
        ("u1", "paid", {"big": "x" * MAX_OP_BYTES}, None),
        ("u1", "paid", {1: "a", "1": "b"}, None),
        (7, "paid", None, None),
        ("u1", b"paid", None, None),
        ("u1", "paid", [("a", 1)], None),
    ]
    for args in cases:
        general, fast = both(*args)
        assert fast == general, args
    assert (
        both("u1", "paid", {"a": 1}, None, env={})
        == (
            '{"external_user_id": "u1", "event_type": "paid", "occurred_at": '
            f'"{format_timestamp(T0_MS)}", "properties": {{"a": 1}}, "context": '
            f'{{"$message_id": "{MID}"}}}}',
        )
        * 2
    )
    # A cycle is refused, never written (RecursionError on the fast path, which shares one
    # encoder between threads and so keeps no memo of the containers it is inside).
    assert both("u1", "paid", cyclic, None) == (InvalidOp, InvalidOp)
