"""The live loop and its sinks: every result to every sink in order, a failing sink kept apart,
each hand-off timed, everything closed at the end; and the statistics computed once per result."""

import json
import time

import numpy as np
import pytest

from edgebc.audit_trail import AuditTrail, read_trail
from edgebc.classifier import Decision
from edgebc.classifier_settings import ClassifierSettings, build_classifier
from edgebc.live import LiveReader
from edgebc.quality import QualityResult
from edgebc.serve.live_loop import LivePipeline, LiveResult
from edgebc.serve.sinks import STAGES, AuditSink, LiveStatistics, PageBroadcast, RollingStats
from edgebc.smoothing import Smoothed
from edgebc.sources import Frame, PhantomCineSource


class Recording:
    name = "recording"

    def __init__(self):
        self.results, self.closed = [], 0

    def handle(self, result):
        self.results.append(result)

    def close(self):
        self.closed += 1


class Failing(Recording):
    name = "failing"

    def handle(self, result):
        raise RuntimeError("this sink is broken")


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_every_result_reaches_every_sink_in_order_and_a_failing_sink_harms_none(tmp_path):
    classifier = build_classifier(ClassifierSettings())  # the demo model
    reader = LiveReader(lambda: PhantomCineSource("benign", fps=60, size=128, frames=8))
    first, broken, last = Recording(), Failing(), Recording()
    trail = AuditTrail(tmp_path / "audit.sqlite")
    audit = AuditSink(trail)
    pipeline = LivePipeline(classifier, reader, [first, broken, last], audit=audit).start()
    try:
        wait_until(lambda: len(last.results) >= 12)
    finally:
        pipeline.stop()
    assert pipeline.sinks[0] is audit  # the audit trail first: nothing is shown before it is logged
    assert pipeline.sinks[-1] is pipeline.statistics  # the statistics come last and see it all
    handled = [r.sequence for r in last.results]
    assert [r.sequence for r in first.results] == handled == list(range(1, len(handled) + 1))
    assert pipeline.counts["frames"] == len(handled)
    assert pipeline.counts["errors"] == len(handled)  # the broken sink, counted once per result
    assert first.closed == last.closed == broken.closed == 1
    timings = last.results[0].timings_ms
    assert {"audit", "end_to_end", "inference"} <= set(timings)  # the result, as published
    handoff = pipeline.handoff_ms(pipeline.latest().sequence)  # the later sinks' times, apart
    assert set(handoff) == {"recording", "failing", "statistics"}
    rows = read_trail(tmp_path / "audit.sqlite")  # committed by the audit sink's close
    assert [row["frame_index"] for row in rows] == [r.frame.index for r in last.results]
    assert json.loads(rows[0]["latencies_ms"])["inference"] == pytest.approx(timings["inference"])


def test_the_broadcast_wakes_each_subscriber_until_it_leaves():
    broadcast, woken = PageBroadcast(), []
    first, second = (lambda: woken.append(1)), (lambda: woken.append(2))
    broadcast.subscribe(first)
    broadcast.subscribe(second)
    broadcast.handle(None)
    broadcast.unsubscribe(first)
    broadcast.handle(None)
    broadcast.close()
    broadcast.handle(None)
    assert woken == [1, 2, 2]


def result(sequence, label="benign", inference=5.0):
    decision = Decision(label, None, None, 0.3, QualityResult(label is not None, None if label else "blank"), "ab" * 32)  # fmt: skip
    frame = Frame(np.zeros((4, 4), np.uint8), sequence, time.time(), time.monotonic(), "test")
    timings = {stage: float(sequence) for stage in STAGES} | {"inference": inference}
    return LiveResult(sequence, frame, decision, Smoothed(label, None), "0" * 64, timings, time.monotonic())  # fmt: skip


def test_statistics_compute_the_percentiles_once_per_result_and_count_decisions(monkeypatch):
    calls = []
    original = RollingStats.percentiles
    monkeypatch.setattr(RollingStats, "percentiles",
                        lambda self, stage, *a: calls.append(stage) or original(self, stage, *a))  # fmt: skip
    statistics = LiveStatistics(["normal", "benign", "malignant"])
    statistics.handle(result(1, inference=4.0))
    first = [statistics.summary() for _ in range(5)]
    assert len(calls) == len(STAGES)  # five readers, one computation
    assert first[0]["latency_ms"]["inference"] == {"p50": 4.0, "p90": 4.0, "p99": 4.0, "max": 4.0}
    statistics.handle(result(2, label=None, inference=8.0))
    summary = statistics.summary()
    assert len(calls) == 2 * len(STAGES)  # a new result: computed again
    assert summary["latency_ms"]["inference"]["max"] == 8.0
    assert summary["counts"] == {"frames": 2, "decided": 1, "no_decision": 1, "errors": 0,
                                 "out_of_distribution": 0}  # fmt: skip
    assert summary["decisions_by_class"] == {"normal": 0, "benign": 1, "malignant": 0}


def test_a_live_results_json_is_its_decisions_json_with_the_frame_and_smoothing():
    live = result(7)
    fields = live.to_json()
    assert {k: v for k, v in fields.items() if k not in ("timings_ms", "smoothed", "frame")} == {
        k: v for k, v in live.decision.to_json().items() if k != "timings_ms"
    }
    assert fields["smoothed"] == {"label": "benign", "probabilities": None}
    assert fields["frame"] == {"sequence": 7, "index": 7, "captured_at": live.frame.captured,
                               "width": 4, "height": 4, "sha256": "0" * 64, "source": "test"}  # fmt: skip
    assert fields["timings_ms"]["inference"] == 5.0


class Snapshot(Recording):
    """Keeps each result with a copy of its timings as they were when handed over."""

    name = "snapshot"

    def handle(self, result):
        self.results.append((result, dict(result.timings_ms)))


def test_a_published_result_never_changes_afterwards():
    classifier = build_classifier(ClassifierSettings())
    reader = LiveReader(lambda: PhantomCineSource("benign", fps=60, size=128, frames=8))
    early, late = Snapshot(), Recording()
    pipeline = LivePipeline(classifier, reader, [early, late]).start()
    try:
        wait_until(lambda: len(late.results) >= 8)
    finally:
        pipeline.stop()
    for result, seen in early.results:  # the later sinks' hand-offs left the result as it was
        assert result.timings_ms == seen
        assert {"inference", "smoothing", "end_to_end"} <= set(seen)


class Refusing(Recording):
    """An audit sink whose trail can take nothing for a while (a full disk), then recovers."""

    name = "audit"

    def __init__(self):
        super().__init__()
        self.refuse = True

    def handle(self, result):
        from edgebc.audit_trail import AuditUnavailableError

        if self.refuse:
            raise AuditUnavailableError("256 records held and none can be written")
        super().handle(result)


def test_a_refusing_audit_trail_is_logged_once_when_it_starts_and_once_when_it_ends(caplog):
    """A full disk refuses every frame at 30 fps: one error line (and no traceback for the
    expected refusal) when it begins and one when records are taken again, not one per frame."""
    classifier = build_classifier(ClassifierSettings())
    reader = LiveReader(lambda: PhantomCineSource("benign", fps=60, size=128, frames=8))
    audit, shown = Refusing(), Recording()
    pipeline = LivePipeline(classifier, reader, [shown], audit=audit).start()
    try:
        wait_until(lambda: pipeline.counts["errors"] >= 10)
        assert shown.results == []  # nothing shown that was not recorded
        audit.refuse = False
        wait_until(lambda: len(shown.results) >= 3)
    finally:
        pipeline.stop()
    lines = [r for r in caplog.records if r.name == "edgebc.serve.live_loop"]
    refused = [r for r in lines if "refused frame" in r.getMessage()]
    again = [r for r in lines if "records again;" in r.getMessage()]
    assert (
        len(refused) == 1
        and not refused[0].exc_info
        and "256 records held" in refused[0].getMessage()
    )
    assert (
        len(again) == 1
        and f"{pipeline.counts['errors']} results were withheld" in again[0].getMessage()
    )
