"""Pure tests of ``whisperr_durable._retry``: status classes, backoff, Retry-After."""

from __future__ import annotations

from datetime import datetime, timezone
from email.utils import format_datetime

import pytest

from whisperr_durable._options import BACKOFF_CAP, BACKOFF_JITTER, RETRY_AFTER_CAP
from whisperr_durable._retry import (
    AUTH,
    CONFIG,
    DROP,
    OK,
    RETRY,
    backoff,
    classify,
    parse_retry_after,
)

# ---- classify ----


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_ok(status: int) -> None:
    assert classify(status) == OK


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_are_auth(status: int) -> None:
    assert classify(status) == AUTH


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 599])
def test_429_and_5xx_are_retried(status: int) -> None:
    assert classify(status) == RETRY


@pytest.mark.parametrize("status", [404, 405])
def test_404_and_405_say_the_url_is_wrong_not_the_events(status: int) -> None:
    assert classify(status) == CONFIG


@pytest.mark.parametrize("status", [400, 402, 408, 409, 410, 413, 415, 422, 428, 451, 499])
def test_other_4xx_are_dropped(status: int) -> None:
    assert classify(status) == DROP


@pytest.mark.parametrize("status", [100, 301, 302, 304, 307])
def test_statuses_the_api_never_gives_are_retried_not_dropped(status: int) -> None:
    # Documented choice: never lose data on an answer that is not in the contract.
    assert classify(status) == RETRY


def test_classes_are_distinct_strings() -> None:
    assert len({OK, RETRY, AUTH, CONFIG, DROP}) == 5
    assert (OK, RETRY, AUTH, CONFIG, DROP) == ("ok", "retry", "auth", "config", "drop")


# ---- backoff ----


def test_contract_backoff_constants() -> None:
    assert (BACKOFF_CAP, BACKOFF_JITTER, RETRY_AFTER_CAP) == (30.0, 0.25, 60.0)


@pytest.mark.parametrize(
    ("retry", "base"),
    [
        (0, 1.0),
        (1, 2.0),
        (2, 4.0),
        (3, 8.0),
        (4, 16.0),
        (5, 30.0),
        (6, 30.0),
        (100, 30.0),
        (10_000, 30.0),
    ],
)
def test_backoff_is_min_30_two_to_the_n_without_jitter(retry: int, base: float) -> None:
    assert backoff(retry, rand=lambda: 0.0) == base


@pytest.mark.parametrize("retry", [1, 3, 6])
def test_backoff_jitter_is_under_a_quarter_second(retry: int) -> None:
    base = min(30.0, 2.0**retry)
    assert backoff(retry, rand=lambda: 0.5) == pytest.approx(base + 0.125)
    top = backoff(retry, rand=lambda: 0.999_999_9)
    assert base + 0.2499 < top < base + 0.25


def test_backoff_default_jitter_stays_in_range() -> None:
    for _ in range(200):
        delay = backoff(2)
        assert 4.0 <= delay < 4.25
    assert len({backoff(2) for _ in range(50)}) > 1


def test_backoff_calls_rand_for_jitter() -> None:
    calls: list[int] = []

    def rand() -> float:
        calls.append(1)
        return 0.0

    backoff(1, rand=rand)
    assert calls == [1]


# ---- Retry-After ----

NOW = datetime(2026, 6, 14, 12, 0, 0, tzinfo=timezone.utc).timestamp()


def http_date(offset: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + offset, timezone.utc), usegmt=True)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("5", 5.0),
        (" 7 ", 7.0),
        ("60", 60.0),
        ("61", 60.0),
        ("3600", 60.0),
        ("99999999999999999999999", 60.0),
    ],
)
def test_retry_after_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_retry_after_http_date_is_relative_to_now() -> None:
    assert http_date(30) == "Sun, 14 Jun 2026 12:00:30 GMT"
    assert parse_retry_after(http_date(30), NOW) == pytest.approx(30.0)
    assert parse_retry_after("Sun, 14 Jun 2026 12:00:45 GMT", NOW) == pytest.approx(45.0)
    # The same date measured from a later "now" is a shorter wait.
    assert parse_retry_after(http_date(30), NOW + 20) == pytest.approx(10.0)


def test_retry_after_date_in_the_past_is_zero() -> None:
    assert parse_retry_after(http_date(-10), NOW) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW) == 0.0


def test_retry_after_date_is_capped() -> None:
    assert parse_retry_after(http_date(3600), NOW) == RETRY_AFTER_CAP


@pytest.mark.parametrize(
    "value",
    [
        "soon",
        "5 seconds",
        "1,5",
        "Sun, 32 Jun 2026 12:00:00 GMT",
        "nan",
        "NaN",
        "   ",
        "tomorrow",
        # Whole seconds only: a fraction, a sign, an exponent or non-ASCII digits is not one.
        "1.5",
        "0.25",
        "-5",
        "+5",
        "1e3",
        "inf",
        "\u0665",
    ],
)
def test_unreadable_retry_after_is_none(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize("value", [None, ""])
def test_missing_retry_after_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None
