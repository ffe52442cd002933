"""The benchmark refuses to time wrong answers and says when the machine was busy: every backend's
outputs are checked against ONNX Runtime FP32 on a trained model before it is timed, compared
variants are timed interleaved, the load around a run is judged, and the report names the real
CPU. No timings are asserted here: speed is measured by benchmarks/."""

import argparse

import numpy as np
import onnxruntime
import pytest

from edgebc import sysinfo
from edgebc.bench.accuracy import check_frames, check_outputs, dataset_set, run_batched
from edgebc.bench.backends import BenchModel, Candidate
from edgebc.bench.report import fastest_checked, rows, to_markdown
from edgebc.bench.timing import BUSY_LOAD_PER_CORE, Variant, busy_warning, time_interleaved
from edgebc.demo import DEMO_MODEL
from edgebc.model_card import read_card


def _reference_logits(frames):
    session = onnxruntime.InferenceSession(str(DEMO_MODEL), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {session.get_inputs()[0].name: frames})[0]


@pytest.fixture(scope="module")
def demo():
    card = read_card(DEMO_MODEL)
    frames = check_frames(card)
    return card, frames, _reference_logits(frames)


def test_the_demo_model_discriminates_the_check_frames(demo):
    """The check is only worth something on a model whose outputs follow the input: the demo
    model, trained on phantoms, ranks the check phantoms' classes apart."""
    card, frames, reference = demo
    assert frames.shape == (24, *card.input_shape)
    top1 = reference.argmax(axis=1)
    assert len(set(top1.tolist())) == 3  # all three classes among its answers
    labels = np.arange(24) % 3  # phantom_stills cycles normal, benign, malignant
    assert np.mean(top1 == labels) > 0.6
    assert check_outputs(reference, reference, card.temperature).discriminating


def test_constant_logits_are_wrong_whatever_their_value(demo):
    card, _, reference = demo
    for constant in (reference.mean(axis=0), reference[0]):  # even one frame's right answer
        check = check_outputs(reference, np.tile(constant, (len(reference), 1)), card.temperature)
        assert check.wrong == "the same outputs for every frame"
        assert check.variation == 0.0
    # OpenCV DNN's kind of failure: outputs that move 1e-6 of what they should
    tiny = reference.mean(axis=0) + 1e-6 * (reference - reference.mean(axis=0))
    assert check_outputs(reference, tiny, card.temperature).wrong == (
        "the same outputs for every frame"
    )


def test_correct_and_reduced_precision_outputs_pass_and_flips_fail(demo):
    card, _, reference = demo
    same = check_outputs(reference, reference + 1e-6, card.temperature)
    assert same.wrong is None and same.top1_agreement == 1.0 and same.max_prob_change < 1e-5
    noisy = reference + np.random.default_rng(0).normal(0, 0.03, reference.shape)  # INT8-like
    check = check_outputs(reference, noisy, card.temperature)
    assert check.wrong is None and 0.9 < check.variation < 1.1 and check.max_prob_change > 1e-3
    swapped = reference[:, ::-1].copy()  # classes in the wrong order: varies, but wrong answers
    flipped = check_outputs(reference, swapped, card.temperature)
    assert flipped.wrong is not None and flipped.wrong.startswith("top-1 agrees on")
    assert flipped.top1_agreement < 0.9
    scaled = check_outputs(reference, 3 * reference, card.temperature)  # too sure, same top-1
    assert scaled.top1_agreement == 1.0 and scaled.wrong is not None
    assert "vary 3x as much" in scaled.wrong
    assert "NaN" in check_outputs(reference, reference * np.nan, card.temperature).wrong
    assert "shape" in check_outputs(reference, reference[:, :2], card.temperature).wrong


def test_an_undiscriminating_reference_is_judged_on_variation_only():
    """Untrained weights: every backend agrees on top-1 and probabilities, so those prove
    nothing; the variation still catches a backend that ignores its input."""
    rng = np.random.default_rng(1)
    reference = 1e-4 * rng.normal(size=(12, 3))  # logits of an untrained network: all ~equal
    check = check_outputs(reference, reference * 1.0001)
    assert not check.discriminating and check.wrong is None
    constant = check_outputs(reference, np.tile(reference[0], (12, 1)))
    assert not constant.discriminating and constant.wrong == "the same outputs for every frame"


class _ConstantLogits:
    """A backend wrapper that answers the same logits whatever the frame."""

    def __init__(self, logits):
        self.logits = np.asarray(logits, np.float32)

    def run(self, batch):
        return np.tile(self.logits, (len(batch), 1))

    def close(self):
        pass


class _Ort:
    def __init__(self):
        self.session = onnxruntime.InferenceSession(
            str(DEMO_MODEL), providers=["CPUExecutionProvider"]
        )

    def run(self, batch):
        return self.session.run(["logits"], {self.session.get_inputs()[0].name: batch})[0]

    def close(self):
        pass


def test_a_backend_with_constant_logits_is_reported_wrong_and_not_timed_or_ranked(demo):
    from edgebc.bench.run import model_section

    _, _, reference = demo
    model = BenchModel(
        "demo-phantom",
        DEMO_MODEL,
        extra_backends=[
            # a first answer that is right for the first check frame, and fast
            Candidate("constant", lambda: _ConstantLogits(reference[0])),
            Candidate("copy-of-reference", _Ort),
        ],
    )
    section = model_section(model, 128, [1, 2], [1], 1, 4)
    wrong = section["constant"]
    assert wrong["check"]["wrong"] == "the same outputs for every frame"
    assert "batches" not in wrong  # never timed
    good = section["copy-of-reference"]
    assert good["check"]["wrong"] is None and good["check"]["max_prob_change"] < 1e-5
    assert good["batches"]["b2"]["p50_ms"] > 0 and good["batches"]["b1"]["iterations"] == 20
    assert fastest_checked(section) != "constant" and fastest_checked(section) is not None
    # even if the wrong backend had numbers, it is not the fastest
    faked = {**section, "constant": {**wrong, "batches": {"b1": {"p50_ms": 1e-9}}}}
    assert fastest_checked(faked) != "constant"
    report = {"stages": {}, "models": {"demo-phantom": {"backends": section, "pipeline": {}}}}
    (row,) = [r for r in rows(report) if r["what"] == "constant"]
    assert "p50_ms" not in row and row["note"].startswith("WRONG, not timed")


def test_the_markdown_flags_wrong_backends_and_a_busy_machine(demo):
    report = {
        "edgebc": "x",
        "date": "d",
        "quick": True,
        "machine": {
            "cpu": {
                "model": "AMD EPYC",
                "logical_cores": 2,
                "family_model_stepping": "26/2/1",
                "hypervisor": True,
            },
            "python": "3",
            "opencv": "5",
            "gpus": [],
        },
        "load": {"busy": "busy machine: load average 3.00 per core"},
        "stages": {},
        "models": {
            "m": {
                "backends": {
                    "opencv-dnn-cpu": {
                        "check": {
                            "wrong": "the same outputs for every frame",
                            "top1_agreement": 0.333,
                            "max_prob_change": 0.39,
                            "variation": 5e-7,
                            "discriminating": True,
                        }
                    },
                },
                "pipeline": {},
            }
        },
        "peak_rss_mb": 1.0,
        "seconds": 1.0,
    }
    text = to_markdown(report)
    assert "AMD EPYC (family/model/stepping 26/2/1, virtual machine, 2 logical cores)" in text
    assert "**busy machine: load average 3.00 per core**" in text
    assert "| opencv-dnn-cpu |  | WRONG, not timed: the same outputs for every frame |" in text
    assert "**WRONG**: the same outputs for every frame (top-1 33.3%" in text
    assert "fastest at batch 1" not in text  # nothing passed, nothing ranked


def test_interleaved_timing_rotates_the_order_of_the_variants():
    order = []
    variants = {name: Variant(lambda name=name: order.append(name)) for name in "ABC"}
    result = time_interleaved(variants, warmup=1, iterations=4, block=1)
    assert order[:3] == ["A", "B", "C"]  # the warm-up, one variant after the other
    assert order[3:] == list("ABCBCACABABC")
    assert set(result) == {"A", "B", "C"} and all(r["iterations"] == 4 for r in result.values())
    # by default in blocks of consecutive calls (the first of each untimed), so each variant is
    # timed warm as a cart runs its one model, the blocks' order still rotating
    order.clear()
    result = time_interleaved(variants, warmup=0, iterations=4, block=3)
    assert order == list("AAABBBCCCBBBCCCAAA")
    assert all(r["iterations"] == 4 for r in result.values())
    assert all(r["cpu_ms"] >= 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in result.values())


def test_a_run_is_flagged_busy_only_when_other_processes_loaded_the_cores():
    half = 0.5  # this run's own busy thread on a 2-core machine
    assert busy_warning(0.1, 0.55, half) is None  # the run's own thread alone: quiet
    assert busy_warning(None, None, half) is None  # no load average on this system: no claim
    before = busy_warning(BUSY_LOAD_PER_CORE + 0.5, 0.6, half)
    assert before is not None and "load average 1.00 per core from other processes" in before
    after = busy_warning(0.0, 0.5 + BUSY_LOAD_PER_CORE + 0.25, half)  # others started during it
    assert after is not None and "0.75 per core" in after and "after 1.25" in after
    assert busy_warning(BUSY_LOAD_PER_CORE, None, half) is None  # at the limit: not flagged


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 hypervisor

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
"""


def test_the_cpu_is_named_as_lscpu_names_it_not_as_platform_processor(monkeypatch):
    """platform.processor() says "x86_64" on many Linux builds: /proc/cpuinfo's model name wins."""
    monkeypatch.setattr(sysinfo.platform, "processor", lambda: "x86_64")
    cpu = sysinfo.cpu_description(CPUINFO)
    assert cpu["model"] == "AMD EPYC" and cpu["vendor"] == "AuthenticAMD"
    assert cpu["family_model_stepping"] == "26/2/1" and cpu["hypervisor"] is True
    assert cpu["features"] == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert sysinfo.cpu_description("")["model"] == "x86_64"  # no cpuinfo: the best there is


def test_the_report_names_this_machines_cpu_as_proc_cpuinfo_does():
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this system")
    names = [
        line.partition(":")[2].strip()
        for line in cpuinfo.read_text().splitlines()
        if line.startswith("model name")
    ]
    if not names:
        pytest.skip("this CPU's /proc/cpuinfo has no model name (ARM)")
    assert sysinfo.cpu_description()["model"] == names[0]


def test_run_batched_splits_into_calls_of_the_batch_size():
    sizes = []

    class Recorder:
        def run(self, batch):
            sizes.append(len(batch))
            return batch[:, :1, 0, 0]

    x = np.arange(11 * 4, dtype=np.float32).reshape(11, 1, 2, 2)
    out = run_batched(Recorder(), x, 4)
    assert sizes == [4, 4, 3] and out[:, 0].tolist() == x[:, 0, 0, 0].tolist()


def _squeeze_excite_graph(path, alpha, identity=False):
    """Mul(x, HardSigmoid(Conv(ReduceMean(x)))): MobileNetV3's squeeze-excite gate."""
    onnx = pytest.importorskip("onnx", reason="building the graph needs the [export] extra")
    from onnx import TensorProto, helper, numpy_helper

    channels = 8
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
        helper.make_node("Conv", ["m", "w"], ["z"], kernel_shape=[1, 1]),
        helper.make_node("HardSigmoid", ["z"], ["g"], alpha=alpha, beta=0.5),
    ]
    if identity:
        nodes.append(helper.make_node("Identity", ["g"], ["g1"]))
    nodes.append(helper.make_node("Mul", ["x", "g1" if identity else "g"], ["y"]))
    weights = np.random.default_rng(0).normal(size=(channels, channels, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        nodes,
        "se",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 6, 6])],
        [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
         numpy_helper.from_array(weights, "w")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize(
    ("alpha", "identity", "opencv_right"),
    [(1 / 6, False, False), (0.2, False, True), (1 / 6, True, True)],
)
def test_opencv_dnn_fuses_a_squeeze_excite_gate_into_hardswish_of_the_gate(
    tmp_path, alpha, identity, opencv_right
):
    """The root cause in docs/BENCHMARKS.md: OpenCV DNN's ONNX importer rewrites
    Mul(x, HardSigmoid(z)) with HardSwish's constants (alpha 1/6, beta 1/2) into HardSwish(z)
    without checking that x is z, so a squeeze-excite block returns the gate's hard-swish
    (N, C, 1, 1) instead of the gated feature map. Another alpha, or an Identity between the
    two, is left alone. If an OpenCV release fixes the fusion, this test says so."""
    import cv2

    path = _squeeze_excite_graph(tmp_path / "se.onnx", alpha, identity)
    x = np.random.default_rng(1).normal(size=(1, 8, 6, 6)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = session.run(None, {"x": x})[0]
    net = cv2.dnn.readNetFromONNX(str(path))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setInput(x)
    got = np.asarray(net.forward())
    if opencv_right:
        assert got.shape == reference.shape and np.abs(got - reference).max() < 1e-5
    else:
        assert got.shape == (1, 8, 1, 1)
        z = session_z(path, x)
        assert np.allclose(got, z * np.clip(z / 6 + 0.5, 0, 1), atol=1e-5)  # hardswish(z)


def session_z(path, x):
    """The gate's input z (the Conv's output) from ONNX Runtime."""
    import onnx

    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(["z"], {"x": x})[0]


def test_the_check_runs_on_the_given_real_frames(tmp_path):
    """--check-data: the frames of a manifest or dataset folder replace the phantoms."""
    import cv2

    from edgebc.bench.cli import add_arguments
    from edgebc.bench.run import model_section
    from edgebc.synth import make_ultrasound_phantom
    from edgebc.synth.ultrasound import phantom_rng

    for k, label in enumerate(("normal", "benign", "malignant") * 2):
        (tmp_path / label).mkdir(exist_ok=True)
        image = make_ultrasound_phantom(label, phantom_rng(k, 95), 200, 200).image
        cv2.imwrite(str(tmp_path / label / f"{k}.png"), image)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--check-data", str(tmp_path), "--check-limit", "5"])
    check_set = dataset_set(args.check_data, args.check_split, args.check_limit)
    assert len(check_set.frames) == 5
    model = BenchModel("demo-phantom", DEMO_MODEL, extra_backends=[Candidate("copy", _Ort)])
    section = model_section(model, 128, [1], [1], 1, 2, check_set=check_set)
    assert section["copy"]["check"]["frames"] == 5 and section["copy"]["check"]["wrong"] is None


def test_an_int8_model_that_ignores_its_input_is_not_timed_in_the_pipeline(tmp_path):
    """The demo model with its input multiplied by zero: same card, one answer for every frame."""
    onnx = pytest.importorskip("onnx", reason="editing the graph needs the [export] extra")
    from onnx import helper, numpy_helper

    from edgebc.bench.report import to_markdown
    from edgebc.bench.run import pipeline_section, screens

    model = onnx.load(str(DEMO_MODEL))
    name = model.graph.input[0].name
    for node in model.graph.node:
        node.input[:] = [f"{name}_zeroed" if i == name else i for i in node.input]
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "zero"))
    model.graph.node.insert(0, helper.make_node("Mul", [name, "zero"], [f"{name}_zeroed"]))
    blind = tmp_path / "blind.onnx"
    onnx.save(model, str(blind))
    pipeline = pipeline_section(
        BenchModel("demo-phantom", DEMO_MODEL, int8=blind), screens(), 1, 3, 30, 0.1
    )
    assert pipeline["not_timed"] == {"int8": "the same outputs for every frame"}
    assert "fp32_640x480" in pipeline and not any(k.startswith("int8_") for k in pipeline)
    report = {
        "edgebc": "x", "date": "d", "quick": True, "stages": {}, "peak_rss_mb": 1.0, "seconds": 1.0,
        "machine": {"cpu": {"model": "c"}, "python": "3", "opencv": "5", "gpus": []},
        "models": {"m": {"backends": {}, "pipeline": pipeline}},
    }  # fmt: skip
    assert "m: the int8 pipeline was not timed: **WRONG**, the same outputs" in to_markdown(report)
