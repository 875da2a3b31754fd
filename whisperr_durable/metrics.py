"""OpenTelemetry metrics for a client: the ``otel`` extra (``pip install
"whisperr-durable[otel]"``), through the OpenTelemetry API::

    from whisperr_durable.metrics import instrument
    instrument(client)  # or instrument(client, meter_provider=provider)

Observable instruments, read from ``client.stats()`` when the SDK collects (nothing is
measured between collections, and nothing at all if this module is never imported):

- ``whisperr_durable.queue.depth`` (gauge, ``{op}``): ops queued in the outbox for the key.
- ``whisperr_durable.queue.oldest_age`` (gauge, ``s``): how long ago the op at the head of
  the queue, the next to be sent, was made (0 with an empty queue).
- ``whisperr_durable.dead_letters`` (gauge, ``{op}``): dead letters kept for the key.
- ``whisperr_durable.delivered`` (counter, ``{op}``): ops this process delivered (2xx).
- ``whisperr_durable.refused``, ``whisperr_durable.evicted`` (counters, ``{op}``): ops the
  server refused (now dead letters) and ops ``max_queue_size`` evicted, kept in the file
  for every process using it.
- ``whisperr_durable.store_errors`` (counter, ``{error}``): writes this process could not
  make to the file.
- ``whisperr_durable.held`` (gauge, ``{op}``): ops held in memory while the file fails.

Every observation carries ``whisperr.outbox`` (the file's path) and ``whisperr.key``
(the key's fingerprint, never the key).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Callable, Optional

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from ._client import DurableWhisperr, key_fingerprint
from ._store import OutboxStats
from ._version import __version__

# One stats() per collection (its instruments are read within milliseconds), whichever
# instrument asks first.
_FRESH_FOR = 0.2


def instrument(client: DurableWhisperr, *, meter_provider: Optional[Any] = None) -> None:
    """Register the client's observable instruments with ``meter_provider`` (default: the
    global one, as set up by the OpenTelemetry SDK)."""
    provider = meter_provider or metrics.get_meter_provider()
    meter = provider.get_meter("whisperr_durable", __version__)
    options = client._options
    attributes = {"whisperr.outbox": options.path, "whisperr.key": key_fingerprint(options.api_key)}
    cached: list[Any] = [0.0, None]

    def stats() -> OutboxStats:
        now = time.monotonic()
        if cached[1] is None or now - cached[0] > _FRESH_FOR:
            cached[0], cached[1] = now, client.stats()
        result: OutboxStats = cached[1]
        return result

    def observe(value: Callable[[OutboxStats], float]) -> Callable[..., Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            yield Observation(value(stats()), attributes)

        return callback

    def oldest_age(s: OutboxStats) -> float:
        if s.oldest_created_ms is None:
            return 0.0
        return max(0.0, time.time() - s.oldest_created_ms / 1000)

    gauges = (
        ("queue.depth", "{op}", "ops queued in the outbox for the key", lambda s: s.pending),
        ("queue.oldest_age", "s", "age of the op at the head of the queue", oldest_age),
        ("dead_letters", "{op}", "dead letters kept for the key", lambda s: s.dead_letters),
        ("held", "{op}", "ops held in memory while the file fails", lambda s: s.held),
    )
    for name, unit, description, value in gauges:
        meter.create_observable_gauge(
            f"whisperr_durable.{name}", [observe(value)], unit=unit, description=description
        )
    counters = (
        ("delivered", "{op}", "ops this process delivered", lambda s: s.delivered),
        ("refused", "{op}", "ops the server refused", lambda s: s.refused),
        ("evicted", "{op}", "ops evicted by max_queue_size", lambda s: s.evicted),
        ("store_errors", "{error}", "writes to the file that failed", lambda s: s.store_errors),
    )
    for name, unit, description, value in counters:
        meter.create_observable_counter(
            f"whisperr_durable.{name}", [observe(value)], unit=unit, description=description
        )
