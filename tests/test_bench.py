"""The latency benchmark: its timing helpers measure what they claim, and a torch-free run on the
demo model produces every section, the files and a working comparison."""

import json
import time

import pytest

from edgebc.bench.report import compare, to_csv, to_markdown, to_png
from edgebc.bench.run import run
from edgebc.bench.timing import realtime_headroom, time_call
from edgebc.demo import DEMO_MODEL


def test_time_call_reports_the_sleep_it_timed():
    result = time_call(lambda: time.sleep(0.004), warmup=1, iterations=10, items_per_call=4)
    assert (
        3.9 <= result["p50_ms"] <= 12 and result["max_ms"] >= result["p99_ms"] >= result["p50_ms"]
    )
    assert result["per_s"] == pytest.approx(4000 / (result["p50_ms"] * 10 / 10), rel=0.6)
    busy = time_call(lambda: _spin(0.004), warmup=1, iterations=10)
    assert busy["cpu_ms"] >= 0.8 * busy["p50_ms"]  # a busy call costs its time in CPU
    assert result["cpu_ms"] < busy["cpu_ms"] - 2  # a sleeping one does not (other threads may run)


def _spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_headroom_counts_late_and_dropped_frames():
    fast = realtime_headroom(lambda: None, fps=50, seconds=0.4)
    assert (fast["frames"], fast["processed"], fast["late"], fast["dropped"]) == (20, 20, 0, 0)
    slow = realtime_headroom(
        lambda: time.sleep(0.05), fps=50, seconds=0.4
    )  # 50 ms work, 20 ms period
    assert slow["late"] == slow["processed"] and slow["dropped"] >= 10
    assert slow["processed"] + slow["dropped"] == 20 and slow["core_fraction"] < 0.2


@pytest.fixture(scope="module")
def report():
    return run(quick=True, archs=[], batches=[1, 2], threads=[1], model=DEMO_MODEL, fps=30)


def test_a_torch_free_run_on_a_given_model_has_every_section(report):
    assert report["machine"]["cpu"] and report["settings"]["batches"] == [1, 2]
    assert report["stages"]["crop_preprocess_1920x1080"]["p50_ms"] > 0
    sections = report["models"]["demo-phantom"]
    ort = sections["backends"]["ort-cpu-fp32-t1"]["batches"]
    assert ort["b2"]["p50_ms"] > 0 and ort["b1"]["per_s"] > 0
    assert "opencv-dnn-cpu" in sections["backends"]  # numbers, or the reason it could not run
    pipeline = sections["pipeline"]
    stages = pipeline["fp32_1920x1080"]["stages_p50_ms"]
    assert set(stages) == {"crop", "quality", "preprocess", "inference", "postprocess"}
    assert sum(stages.values()) <= pipeline["fp32_1920x1080"]["p90_ms"] * 1.5
    headroom = pipeline["headroom_1920x1080_fp32"]
    assert headroom["frames"] == 60 and 0 < headroom["core_fraction"] < 1.5
    assert report["peak_rss_mb"] > 50


def test_outputs_and_comparison(report, tmp_path):
    markdown = to_markdown(report)
    assert "| model | demo-phantom | ort-cpu-fp32-t1 | 1 |" in markdown
    assert "of one core" in markdown
    csv_text = to_csv(report)
    assert csv_text.splitlines()[0].startswith("section,model,what,batch,p50_ms")
    assert to_png(report, tmp_path / "bench.png").stat().st_size > 10_000
    lines, regressed = compare(report, report, 0.1)
    assert lines and not regressed and all("(1.00x)" in line for line in lines)
    faster = json.loads(json.dumps(report))
    faster["models"]["demo-phantom"]["backends"]["ort-cpu-fp32-t1"]["batches"]["b1"]["p50_ms"] /= 2
    lines, regressed = compare(report, faster, 0.1)
    assert regressed and any("REGRESSION" in line and "ort-cpu-fp32-t1" in line for line in lines)
