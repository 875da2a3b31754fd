"""Pure tests of ``whisperr_durable._wire``: the exact bytes the SDK stores and sends."""

from __future__ import annotations

import json
import math
import re
import types
import uuid
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, Optional

import pytest
from conftest import API_KEY

from whisperr_durable import _wire
from whisperr_durable._options import MAX_OP_BYTES
from whisperr_durable._wire import (
    EVENT_TYPE,
    InvalidOp,
    batch_body,
    encode_identify,
    encode_track,
    format_timestamp,
    message_id,
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
    body = batch_body(rows)
    assert isinstance(body, bytes)
    assert body == json.dumps({"events": [json.loads(r) for r in rows]}).encode("utf-8")
    assert body.startswith(b'{"events": [{"external_user_id": "user_0"')
    assert json.loads(body)["events"][2]["occurred_at"] == "2026-05-31T12:00:00.125Z"


def test_batch_body_of_one_row() -> None:
    row = track()
    assert batch_body([row]) == ('{"events": [' + row + "]}").encode()
    assert batch_body([row]) == json.dumps({"events": [json.loads(row)]}).encode()


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
    assert sent() == [("/v1/events/batch", batch_body(ours))]
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
