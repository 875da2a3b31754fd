"""OpenTelemetry metrics, read by the SDK's in-memory reader from a real outbox and the
devserver."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from conftest import MakeClient

from whisperr_durable.devserver import DevServer

sdk_metrics = pytest.importorskip("opentelemetry.sdk.metrics")
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402

from whisperr_durable.metrics import instrument  # noqa: E402


def collected(reader: InMemoryMetricReader) -> dict[str, Any]:
    """name -> (value, attributes) of each point, as the reader collects now."""
    data = reader.get_metrics_data()
    points: dict[str, Any] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                (point,) = metric.data.data_points
                value = getattr(point, "value", None)
                points[metric.name] = (value, dict(point.attributes or {}), metric.unit)
    return points


def test_the_metrics_follow_the_queue_and_what_left_it(
    make_client: MakeClient, server: DevServer, db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from whisperr_durable import metrics

    monkeypatch.setattr(metrics, "_FRESH_FOR", 0.0)  # each collection reads the file afresh
    reader = InMemoryMetricReader()
    provider = sdk_metrics.MeterProvider(metric_readers=[reader])
    client = make_client(max_queue_size=4, max_batch_size=1)  # a request per op
    instrument(client, meter_provider=provider)
    for i in range(6):  # two evicted
        client.track("u1", "metered", {"i": i})
    before = collected(reader)
    assert before["whisperr_durable.queue.depth"][:1] == (4,)
    assert before["whisperr_durable.evicted"][0] == 2
    assert before["whisperr_durable.queue.oldest_age"][0] >= 0
    assert before["whisperr_durable.queue.oldest_age"][2] == "s"
    assert before["whisperr_durable.delivered"][0] == 0
    _, attributes, unit = before["whisperr_durable.queue.depth"]
    assert attributes["whisperr.outbox"] == db_path and unit == "{op}"
    assert "wrk_" not in str(attributes)  # a fingerprint, never the key

    server.push_script(400)  # the first request, one op, is refused
    client.track("u1", "metered", {"i": 6})
    queued = client.stats().pending
    result = client.flush(timeout=10)
    assert result.refused >= 1
    after = collected(reader)
    assert after["whisperr_durable.queue.depth"][0] == 0
    assert after["whisperr_durable.queue.oldest_age"][0] == 0
    assert after["whisperr_durable.refused"][0] == result.refused
    assert after["whisperr_durable.dead_letters"][0] == result.refused
    assert after["whisperr_durable.delivered"][0] == len(server.events) == queued - result.refused
    assert after["whisperr_durable.evicted"][0] == client.stats().evicted
    assert after["whisperr_durable.store_errors"][0] == 0


def test_importing_the_package_loads_no_opentelemetry() -> None:
    import subprocess

    code = (
        "import sys, whisperr_durable; "
        "print(any(m.startswith('opentelemetry') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
