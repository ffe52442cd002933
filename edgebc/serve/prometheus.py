"""Prometheus metrics for `edgebc serve`, read from the live pipeline at scrape time.

A custom collector on a registry of its own (not the process-global one), so the numbers are
the pipeline's own counters, never a second copy that could drift, and several apps in one
process (tests) do not collide. Latency percentiles are gauges over the recent window.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from edgebc.optional import require

if TYPE_CHECKING:
    from edgebc.serve.runtime import ServeRuntime


def metrics_text(runtime: ServeRuntime) -> tuple[bytes, str]:
    """The exposition text and its content type."""
    client = require("prometheus_client", "edgebc serve /metrics")
    registry = client.CollectorRegistry(auto_describe=False)
    registry.register(_Collector(runtime))
    return client.generate_latest(registry), client.CONTENT_TYPE_LATEST


class _Collector:
    def __init__(self, runtime: ServeRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        runtime = self.runtime
        pipeline = runtime.pipeline
        summary = pipeline.summary()
        feed = pipeline.feed()
        trail = runtime.audit.status()
        counts = summary["counts"]

        yield CounterMetricFamily(
            "edgebc_frames", "Frames classified from the live source", value=counts["frames"]
        )
        decisions = CounterMetricFamily(
            "edgebc_decisions", "Per-frame decisions by class", labels=["label"]
        )
        for label, count in summary["decisions_by_class"].items():
            decisions.add_metric([label], count)
        yield decisions
        yield CounterMetricFamily(
            "edgebc_no_decisions", "Frames refused by the quality gate", value=counts["no_decision"]
        )
        yield CounterMetricFamily(
            "edgebc_pipeline_errors", "Frames the live loop failed on", value=counts["errors"]
        )
        yield CounterMetricFamily(
            "edgebc_frames_dropped",
            "Frames superseded before they were classified",
            value=feed.dropped,
        )
        yield CounterMetricFamily(
            "edgebc_source_reopenings", "Times the source was reopened", value=feed.reopenings
        )
        yield GaugeMetricFamily(
            "edgebc_feed_ok", "1 while the source delivers fresh frames", value=int(feed.ok)
        )
        yield GaugeMetricFamily(
            "edgebc_fps", "Classified frames per second (last 2 s)", value=summary["fps"]
        )
        latency = GaugeMetricFamily(
            "edgebc_latency_milliseconds",
            "Per-stage latency percentiles over the recent window",
            labels=["stage", "quantile"],
        )
        for stage, values in summary["latency_ms"].items():
            for name, value in (values or {}).items():
                latency.add_metric([stage, name], value)
        yield latency
        yield CounterMetricFamily(
            "edgebc_audit_records_written", "Audit records committed", value=trail.written
        )
        yield GaugeMetricFamily(
            "edgebc_audit_records_pending",
            "Audit records held in memory, not yet in the trail or the fallback journal",
            value=trail.pending,
        )
        yield GaugeMetricFamily(
            "edgebc_audit_records_journalled",
            "Audit records in the fallback journal, waiting to be replayed into the trail",
            value=trail.journalled,
        )
        yield GaugeMetricFamily(
            "edgebc_audit_unarchived_bytes",
            "Bytes of sealed audit segments without a verified archive copy (edgebc audit archive)",
            value=trail.unarchived_bytes,
        )
        yield CounterMetricFamily(
            "edgebc_audit_records_lost",
            "Audit records that could be written neither to the trail nor to the fallback journal",
            value=trail.lost,
        )
        yield CounterMetricFamily(
            "edgebc_audit_decisions_withheld",
            "Decisions not shown because neither the trail nor the journal could record them",
            value=trail.withheld,
        )
        yield GaugeMetricFamily(
            "edgebc_audit_healthy", "1 while the audit log is writable", value=int(trail.healthy)
        )
        yield GaugeMetricFamily(
            "edgebc_audit_chain_head_record",
            "Id of the newest record in the audit trail's hash chain (0: none yet)",
            value=trail.head_id or 0,
        )
        uploads = CounterMetricFamily(
            "edgebc_uploads", "POST /v1/classify requests by outcome", labels=["outcome"]
        )
        for outcome, count in sorted(runtime.uploads.outcomes.items()):
            uploads.add_metric([outcome], count)
        yield uploads
        checks = runtime.readiness()
        yield GaugeMetricFamily(
            "edgebc_ready",
            "1 when every readiness check passes",
            value=int(all(c["ok"] for c in checks.values())),
        )
        info = GaugeMetricFamily(
            "edgebc_model_info", "The loaded model", labels=["name", "sha256", "precision", "demo"]
        )
        card = runtime.backend.card
        info.add_metric(
            [
                card.name,
                runtime.backend.model_sha256,
                getattr(runtime.backend, "precision", None) or card.precision,  # what runs
                str(runtime.demo).lower(),
            ],
            1,
        )
        yield info
