"""The latency benchmark: its timing helpers measure what they claim, a torch-free run on the
demo model produces every section, the files and a working comparison, and the development side
(benchmarks/) adds PyTorch rows and the notebook pipeline that agree with the runtime's."""

import importlib
import json
import sys
import time
from pathlib import Path

import pytest

from edgebc.bench.backends import BenchModel, given_model
from edgebc.bench.report import compare, to_csv, to_markdown, to_png
from edgebc.bench.run import run
from edgebc.bench.timing import realtime_headroom, time_call
from edgebc.demo import DEMO_MODEL

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name):
    """A script of benchmarks/ (the development side), imported as it imports its siblings."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    return importlib.import_module(name)


def test_time_call_reports_the_sleep_it_timed():
    result = time_call(lambda: time.sleep(0.004), warmup=1, iterations=10, items_per_call=4)
    assert (
        3.9 <= result["p50_ms"] <= 12 and result["max_ms"] >= result["p99_ms"] >= result["p50_ms"]
    )
    assert result["per_s"] == pytest.approx(4000 / (result["p50_ms"] * 10 / 10), rel=0.6)
    busy = time_call(lambda: _spin(0.004), warmup=1, iterations=10)
    assert busy["cpu_ms"] >= 0.95 * 4.0  # a busy call costs its CPU time, however long the wait
    # A sleeping one does not. Process CPU time counts every thread, and just after the imports
    # a library's worker threads can still be busy for a few ms: take the quieter of two runs.
    again = time_call(lambda: time.sleep(0.004), warmup=1, iterations=10)
    assert min(result["cpu_ms"], again["cpu_ms"]) < busy["cpu_ms"] - 2


def _spin(cpu_seconds):
    """Burn this much process CPU time. Counted in CPU, not wall time, so a shared machine that
    gives this process only part of a core stretches the call instead of shrinking its cost."""
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
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
    return run(quick=True, batches=[1, 2], threads=[1], models=[given_model(DEMO_MODEL)], fps=30)


def test_a_torch_free_run_on_a_given_model_has_every_section(report):
    assert report["machine"]["cpu"] and report["settings"]["batches"] == [1, 2]
    assert report["stages"]["crop_preprocess_1920x1080"]["p50_ms"] > 0
    sections = report["models"]["demo-phantom"]
    ort = sections["backends"]["ort-cpu-fp32-t1"]["batches"]
    assert ort["b2"]["p50_ms"] > 0 and ort["b1"]["per_s"] > 0
    assert "opencv-dnn-cpu" in sections["backends"]  # numbers, or the reason it could not run
    assert not any(name.startswith("torch") for name in sections["backends"])  # the device's own
    pipeline = sections["pipeline"]
    stages = pipeline["fp32_1920x1080"]["stages_p50_ms"]
    assert set(stages) == {"crop", "quality", "preprocess", "inference", "shift", "postprocess"}
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


def test_edgebc_bench_times_the_given_model_else_the_demo_model(capsys):
    from edgebc.bench.cli import given_models
    from edgebc.cli import build_parser
    from edgebc.errors import EdgebcError

    def parse(*args):
        return build_parser().parse_args(["bench", "--quick", *args])

    assert given_models(parse()) == [BenchModel("demo-phantom", DEMO_MODEL)]
    assert "no --model: timing the embedded demo model" in capsys.readouterr().err
    given = given_models(parse("--model", str(DEMO_MODEL), "--int8", str(DEMO_MODEL)))
    assert given == [BenchModel("demo-phantom", DEMO_MODEL, DEMO_MODEL)]
    with pytest.raises(EdgebcError, match="--int8 goes with --model"):
        given_models(parse("--int8", str(DEMO_MODEL)))
    with pytest.raises(SystemExit):  # the torch-side options are benchmarks/latency.py's
        parse("--checkpoint", "m.pt")


def test_gpu_lines_state_device_memory_and_speedup_over_eager_cuda():
    from edgebc.bench.report import _gpu_lines

    def timed(p50):
        return {"batches": {"b1": {"p50_ms": p50}}}

    backends = {
        "torch-eager-cuda": {**timed(4.0), "gpu": True, "device_memory_mb": 600.0},
        "torch-cuda-fp16-graphs": {**timed(0.5), "gpu": True, "device_memory_mb": 700.0},
        "tensorrt-fp16": {**timed(0.8), "gpu": True, "device_memory_mb": None},
        "ort-cpu-fp32-t1": timed(2.0),
    }
    text = "".join(_gpu_lines("m", backends))
    assert "torch-cuda-fp16-graphs held 700 MB" in text and "tensorrt-fp16 held" not in text
    assert "torch-cuda-fp16-graphs is 8.0x faster than PyTorch eager CUDA" in text
    assert "tensorrt-fp16 is 5.0x faster" in text and "ort-cpu-fp32-t1 is" not in text
    assert _gpu_lines("m", {"ort-cpu-fp32-t1": timed(2.0)}) == []  # a CPU machine: nothing


@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
    pytest.importorskip("torch", reason="the PyTorch backends need the [train] extra")
    pytest.importorskip("onnx", reason="exporting needs the [export] extra")
    import torch

    from edgebc.export.onnx_export import export_onnx
    from tests.helpers import make_checkpoint

    threads = torch.get_num_threads()  # the torch rows set the process's threads: restore them
    folder = tmp_path_factory.mktemp("bench-models")
    # ShuffleNet: depthwise convolutions and channel shuffles, and logits far from zero even
    # untrained (an untrained MobileNetV3's are ~1e-10, which any backend would "match")
    checkpoint = make_checkpoint(folder / "m.pt", "shufflenet_v2_x0_5", 64)
    fp32, _, _ = export_onnx(checkpoint, folder / "m.onnx")
    latency = benchmark_script("latency")
    model = latency.with_torch_rows(BenchModel("m", fp32), checkpoint, [1])
    yield {"model": model, "checkpoint": checkpoint, "folder": folder}
    torch.set_num_threads(threads)


def test_torch_rows_and_the_notebook_pipeline_agree_with_the_runtime(torch_models):
    """The development side's additions on the CPU: PyTorch eager gives the exported model's
    logits, and the notebook pipeline runs beside the edgebc pipeline on the same frames."""
    from edgebc.bench.run import model_section, pipeline_section, screens

    model = torch_models["model"]
    result = model_section(model, 64, [1, 4], [1], 1, 8, torch_models["folder"])
    assert (
        next(iter(result)) == "torch-eager-cpu-t1"
    )  # first: the reference of benchmarks/accuracy.py
    reference = result["ort-cpu-fp32-t1"]["logits_b1"]
    assert max(map(abs, reference)) > 5e-3  # a comparison that can fail
    assert result["torch-eager-cpu-t1"]["logits_b1"] == pytest.approx(reference, abs=1e-4)
    assert result["torch-eager-cpu-t1"]["batches"]["b4"]["p50_ms"] > 0
    pipeline = pipeline_section(model, screens(), 1, 5, 30, 0.2)
    for tag in ("1920x1080", "640x480"):
        assert pipeline[f"naive_pil_torch_{tag}"]["p50_ms"] > 0
        assert pipeline[f"speedup_vs_naive_{tag}"] == pytest.approx(
            pipeline[f"naive_pil_torch_{tag}"]["p50_ms"] / pipeline[f"fp32_{tag}"]["p50_ms"]
        )
        assert pipeline[f"cpu_speedup_vs_naive_{tag}"] == pytest.approx(
            pipeline[f"naive_pil_torch_{tag}"]["cpu_ms"] / pipeline[f"fp32_{tag}"]["cpu_ms"]
        )
        # timed interleaved: the notebook and the edgebc pipeline ran the same number of times
        assert (
            pipeline[f"naive_pil_torch_{tag}"]["iterations"]
            == pipeline[f"fp32_{tag}"]["iterations"]
        )


def test_accuracy_takes_pytorch_on_the_checkpoint_as_its_reference(torch_models, tmp_path):
    main = benchmark_script("accuracy").main
    model = torch_models["model"]
    arguments = ["--model", str(model.fp32), "--checkpoint", str(torch_models["checkpoint"])]
    assert (
        main([*arguments, "--per-class", "4", "--bootstrap", "20", "--out", str(tmp_path / "a")])
        == 0
    )
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["reference"] == "torch-eager-cpu-t1"
    ort = report["backends"]["ort-cpu-fp32-t1"]
    assert ort["agreement"] == 1.0 and ort["max_positive_prob_change"] < 1e-4


@pytest.mark.gpu
def test_cuda_backends_agree_with_the_cpu_and_report_device_memory(torch_models):
    from edgebc.bench.run import model_section

    result = model_section(torch_models["model"], 64, [1, 4], [1], 2, 20, torch_models["folder"])
    reference = result["ort-cpu-fp32-t1"]["logits_b1"]
    assert max(map(abs, reference)) > 5e-3  # a comparison that can fail
    for name in ("torch-eager-cuda", "torch-cuda-fp16-graphs"):
        assert result[name]["gpu"] and result[name]["device_memory_mb"] > 0, result[name]
        assert result[name]["batches"]["b4"]["p50_ms"] > 0  # a second graph for batch 4
        assert result[name]["logits_b1"] == pytest.approx(reference, abs=1e-3), name  # FP16


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_native_tensorrt_fp16_row_agrees_with_onnx_runtime(torch_models):
    from edgebc.bench.run import model_section

    result = model_section(torch_models["model"], 64, [1, 4], [1], 2, 20, torch_models["folder"])
    row = result["tensorrt-fp16"]
    assert "unavailable" not in row, row
    assert row["batches"]["b4"]["p50_ms"] > 0
    assert row["logits_b1"] == pytest.approx(result["ort-cpu-fp32-t1"]["logits_b1"], abs=1e-3)


def test_accuracy_per_backend_on_phantoms_and_a_class_folder(tmp_path, capsys):
    import cv2

    from edgebc.synth import make_ultrasound_phantom
    from edgebc.synth.ultrasound import phantom_rng

    main = benchmark_script("accuracy").main
    make_int8 = ["--make-int8"] if _installed("onnx") else []
    assert (
        main(["--per-class", "20", "--bootstrap", "200", "--out", str(tmp_path / "a"), *make_int8])
        == 0
    )
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["class_counts"] == {"normal": 20, "benign": 20, "malignant": 20}
    reference = report["backends"][report["reference"]]
    assert report["reference"] == "ort-cpu-fp32-t1" and reference["agreement"] == 1.0
    # the demo model was trained on phantoms: well above chance on unseen seeds
    low, high = reference["auc_ci95"]
    assert 0.65 < reference["auc_positive"] <= 1.0 and low <= reference["auc_positive"] <= high
    assert reference["sensitivity"] >= 0.7  # its threshold was chosen for high sensitivity
    if make_int8:
        int8 = report["backends"]["ort-cpu-int8-t1"]
        assert int8["agreement"] >= 0.9 and int8["max_positive_prob_change"] > 0  # really INT8
    assert "| ort-cpu-fp32-t1 |" in (tmp_path / "a.md").read_text()

    for k, label in enumerate(("normal", "benign", "malignant") * 3):
        (tmp_path / "set" / label).mkdir(parents=True, exist_ok=True)
        image = make_ultrasound_phantom(label, phantom_rng(k, 90), 200, 200).image
        cv2.imwrite(str(tmp_path / "set" / label / f"{k}.png"), image)
    assert main(["--data", str(tmp_path / "set"), "--limit", "6", "--bootstrap", "50"]) == 0
    assert "6 frames of" in capsys.readouterr().out
    for label in ("benign", "cyst"):  # not BUSI's three folders: read as class folders
        (tmp_path / "other" / label).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "other" / label / "x.png"), image)
    assert main(["--data", str(tmp_path / "other"), "--bootstrap", "50"]) == 2
    assert "labels ['cyst'] are not classes of this model" in capsys.readouterr().out


def _installed(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_the_mammogram_benchmark_checks_its_stages_against_the_runtime_and_traces_memory(tmp_path):
    """benchmarks/mammogram.py on an MG model: the stages agree with the runtime's classifier on
    the 4096x3328 12-bit DICOM before they are timed, and the full pass's traced memory stays
    within a few frames' size (the decoder works in blocks of rows)."""
    pytest.importorskip("pydicom")
    from tests.helpers import demo_model_as

    mammogram = benchmark_script("mammogram")
    model = demo_model_as(tmp_path, "mg", "mg", breast_crop=True, laterality="left")
    assert (
        mammogram.main(["--model", str(model), "--iterations", "1", "--out", str(tmp_path / "r")])
        == 0
    )
    report = json.loads((tmp_path / "r" / "mammogram.json").read_text())
    assert report["check_max_abs_diff"] < 1e-5
    assert set(report["p50_ms"]["dicom-4096x3328-12bit"]) == {*mammogram.STAGES, "total"}
    assert 1.0 < report["peak_memory"]["traced_per_frame"] < 4.0
