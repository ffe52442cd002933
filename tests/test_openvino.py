"""The OpenVINO backend: FP32 with its precision stated agrees with ONNX Runtime FP32 on a trained
model (OpenVINO's own default on a BF16 CPU does not), BF16 and INT8 from the QDQ export run and
are reported, and it keeps the guarantees of the ONNX Runtime backend (manifest, release card,
input checks, close). Skipped, with the reason, where openvino is not installed; the README's test
command installs it (the [dev] extra)."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgebc.backends import open_backend
from edgebc.decode import read_image
from edgebc.demo import DEMO_MODEL
from edgebc.errors import EdgebcError
from edgebc.integrity import write_manifest
from edgebc.optional import is_installed
from edgebc.preprocess import preprocess_chw
from edgebc.synth.ultrasound import phantom_stills

needs_openvino = pytest.mark.skipif(
    not is_installed("openvino"), reason="openvino (the [openvino] extra) is not installed"
)


def _cpu_has_bf16() -> bool:
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def phantom_batch() -> np.ndarray:
    """Phantom frames of every class through the shared preprocessing, as the demo model takes them."""
    card = open_backend(DEMO_MODEL, warmup=0).card
    frames, _ = phantom_stills(24, seed=91)
    return np.stack([preprocess_chw(f, card.preprocess) for f in frames])


def _agreement(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and the largest change of any class probability."""
    from edgebc.metrics import softmax

    p, q = softmax(reference.astype(np.float64)), softmax(candidate.astype(np.float64))
    return float((p.argmax(1) == q.argmax(1)).mean()), float(np.abs(p - q).max())


def test_a_missing_openvino_fails_with_its_install_command():
    script = (
        'import sys; sys.modules["openvino"] = None\n'
        "from edgebc.backends import open_backend\nfrom edgebc.demo import DEMO_MODEL\n"
        "try:\n    open_backend(DEMO_MODEL, runtime='openvino')\n"
        "except ImportError as e:\n    print(type(e).__name__, e)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.stdout.startswith("MissingDependencyError openvino is needed for the OpenVINO backend: pip install"), result.stdout + result.stderr  # fmt: skip


def test_unknown_runtimes_and_precisions_are_refused_not_substituted():
    with pytest.raises(EdgebcError, match="unknown runtime 'openvno'; choose one of onnxruntime, openvino, tensorrt"):  # fmt: skip
        open_backend(DEMO_MODEL, runtime="openvno")
    with pytest.raises(EdgebcError, match=r"not bf16 \(bf16 runs on OpenVINO"):
        open_backend(DEMO_MODEL, precision="bf16")
    with pytest.raises(EdgebcError, match=r"TensorRT runs \.engine files"):
        open_backend(DEMO_MODEL, runtime="tensorrt")
    assert open_backend(DEMO_MODEL, precision="fp32", warmup=0).name.startswith("onnxruntime")


@needs_openvino
def test_fp32_equals_onnxruntime_fp32_and_bf16_does_not(phantom_batch):
    reference = open_backend(DEMO_MODEL, threads=1).run(phantom_batch)
    fp32 = open_backend(DEMO_MODEL, threads=1, runtime="openvino", precision="fp32")
    assert fp32.name == "openvino:CPU:fp32"
    assert np.abs(fp32.run(phantom_batch) - reference).max() < 1e-5
    assert np.abs(fp32.run_named({"input": phantom_batch})["logits"] - reference).max() < 1e-5
    if not _cpu_has_bf16():
        pytest.skip("this CPU has no BF16 instructions: the bf16 half of the test needs them")
    bf16 = open_backend(DEMO_MODEL, threads=1, runtime="openvino", precision="bf16")
    difference = np.abs(bf16.run(phantom_batch) - reference).max()
    assert difference > 1e-4  # really bf16: 8 bits of mantissa
    top1, max_dp = _agreement(reference, bf16.run(phantom_batch))
    assert top1 >= 0.95 and max_dp < 0.05
    # what the explicit hint prevents: OpenVINO left to itself runs bf16 on this CPU
    import openvino

    core = openvino.Core()
    silent = core.compile_model(
        core.read_model(str(DEMO_MODEL)), "CPU", {"INFERENCE_NUM_THREADS": 1}
    )
    assert silent.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"


@needs_openvino
def test_bf16_is_refused_on_a_cpu_without_bf16(monkeypatch):
    import openvino

    real = openvino.Core.get_property

    def without_bf16(self, device, name):
        value = real(self, device, name)
        return [c for c in value if c != "BF16"] if name == "OPTIMIZATION_CAPABILITIES" else value

    monkeypatch.setattr(openvino.Core, "get_property", without_bf16)
    with pytest.raises(EdgebcError, match="no BF16 instructions: OpenVINO would run FP32 under the name bf16"):  # fmt: skip
        open_backend(DEMO_MODEL, runtime="openvino", precision="bf16")


@needs_openvino
@pytest.mark.data
def test_fp32_parity_on_real_frames(data_dir):
    """Real BUSI frames through the shared preprocessing (read as the device reads them)."""
    paths = sorted((data_dir / "busi" / "Dataset_BUSI_with_GT").glob("*/* (1?).png"))
    paths = [p for p in paths if "_mask" not in p.name][:24]
    assert len(paths) >= 12
    card = open_backend(DEMO_MODEL, warmup=0).card
    batch = np.stack([preprocess_chw(read_image(p), card.preprocess) for p in paths])
    reference = open_backend(DEMO_MODEL, threads=1).run(batch)
    got = open_backend(DEMO_MODEL, threads=1, runtime="openvino").run(batch)
    assert np.abs(got - reference).max() < 1e-5
    assert np.ptp(reference[:, 0]) > 0.01  # the frames really differ to the model


@pytest.fixture(scope="module")
def qdq_demo(tmp_path_factory, phantom_batch):
    """The demo model quantized to QDQ INT8 as `edgebc export --int8 --no-int8-search` does
    (every node quantized, calibrated on other phantom seeds), with its manifest."""
    pytest.importorskip("onnx", reason="onnx (the [export] extra) is not installed")
    from edgebc.export.quantize import QuantPlan, quantize_int8

    folder = tmp_path_factory.mktemp("qdq")
    card = open_backend(DEMO_MODEL, warmup=0).card
    frames, labels = phantom_stills(24, seed=92)
    out = folder / "demo.int8.onnx"
    quantize_int8(DEMO_MODEL, out, frames, frames, labels, QuantPlan(calibration_size=24, max_excluded_nodes=0))  # fmt: skip
    write_manifest(folder, [out])
    assert card.precision == "fp32" and open_backend(out, warmup=0).card.quantization["format"] == "qdq"  # fmt: skip
    return out


@needs_openvino
def test_int8_runs_the_qdq_export_and_agrees(qdq_demo, phantom_batch):
    reference = open_backend(DEMO_MODEL, threads=1).run(phantom_batch)
    ort_int8 = open_backend(qdq_demo, threads=1).run(phantom_batch)
    backend = open_backend(qdq_demo, threads=1, runtime="openvino")  # the file's precision: int8
    assert backend.name == "openvino:CPU:int8"
    got = backend.run(phantom_batch)
    assert np.abs(got - reference).max() > 1e-4  # really quantized
    top1, max_dp = _agreement(reference, got)
    assert top1 >= 0.9 and max_dp < 0.2
    assert _agreement(ort_int8, got)[0] >= 0.9
    with pytest.raises(EdgebcError, match="a model exported as int8 cannot run as OpenVINO fp32"):
        open_backend(qdq_demo, runtime="openvino", precision="fp32")
    with pytest.raises(EdgebcError, match="a model exported as fp32 cannot run as OpenVINO int8"):
        open_backend(DEMO_MODEL, runtime="openvino", precision="int8")


def _demo_with_card(folder: Path, **changes) -> Path:
    """The demo graph under a changed card, with its manifest."""
    onnx = pytest.importorskip("onnx", reason="onnx (the [export] extra) is not installed")
    from edgebc.model_card import CARD_KEY

    card = open_backend(DEMO_MODEL, warmup=0).card
    graph = onnx.load(str(DEMO_MODEL))
    for entry in graph.metadata_props:
        if entry.key == CARD_KEY:
            entry.value = dataclasses.replace(card, **changes).to_json()
    path = folder / "model.onnx"
    onnx.save(graph, str(path))
    write_manifest(folder, [path])
    return path


@needs_openvino
def test_an_int8_model_in_qoperator_format_is_refused_with_the_fix(tmp_path):
    path = _demo_with_card(tmp_path, precision="int8", quantization={"format": "qoperator"})
    with pytest.raises(EdgebcError, match=r"this model is qoperator .*`edgebc export --int8 --no-int8-search`"):  # fmt: skip
        open_backend(path, runtime="openvino")


@needs_openvino
def test_the_guarantees_of_the_onnxruntime_backend(tmp_path, phantom_batch):
    from edgebc.release import write_release

    # a file that differs from its manifest is refused before OpenVINO reads it
    copy = tmp_path / "altered" / "model.onnx"
    copy.parent.mkdir()
    copy.write_bytes(DEMO_MODEL.read_bytes())
    write_manifest(copy.parent, [copy])
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(EdgebcError, match=r"does not match MANIFEST\.sha256"):
        open_backend(copy, runtime="openvino")
    # a release's card.json is the card it runs by, and its sha256 the manifest's
    card = open_backend(DEMO_MODEL, warmup=0).card
    release = write_release(tmp_path / "release", DEMO_MODEL, dataclasses.replace(card, temperature=2.5))  # fmt: skip
    backend = open_backend(release / "model.onnx", runtime="openvino", threads=1)
    assert backend.card.temperature == 2.5 and backend.card.temperature != card.temperature
    manifest = (release / "MANIFEST.sha256").read_text()
    assert backend.model_sha256 in manifest
    # every input checked before inference, with what was wrong
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, 128, 128\)"):
        backend.run(np.zeros((1, 1, 64, 64), np.float32))
    with pytest.raises(ValueError, match="expected input as float32, got float64"):
        backend.run(phantom_batch[:1].astype(np.float64))
    bad = phantom_batch[:1].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        backend.run(bad)
    with pytest.raises(ValueError, match="unknown features"):
        backend.run_named({"input": phantom_batch[:1], "features": phantom_batch[:1]})
    backend.close()
    with pytest.raises(EdgebcError, match="this backend was closed"):
        backend.run(phantom_batch[:1])


@needs_openvino
def test_bench_times_openvino_only_after_it_runs_the_reference_s_logits(qdq_demo, phantom_batch):
    from edgebc.bench.backends import BenchModel, candidates

    rows = {c.name: c for c in candidates(BenchModel("demo", DEMO_MODEL, qdq_demo), [1])}
    assert {"openvino-cpu-fp32-t1", "openvino-cpu-bf16-t1", "openvino-cpu-int8-t1"} <= set(rows)
    reference = open_backend(DEMO_MODEL, threads=1).run(phantom_batch)
    fp32 = rows["openvino-cpu-fp32-t1"].make()
    assert np.abs(fp32.run(phantom_batch) - reference).max() < 1e-5


@needs_openvino
def test_an_answer_of_the_wrong_batch_size_is_refused(phantom_batch):
    """Seen: OpenVINO BF16 under ONEDNN_MAX_CPU_ISA=AVX2 answered (0, classes) for any batch."""
    backend = open_backend(DEMO_MODEL, threads=1, runtime="openvino")
    infer = backend._request.infer
    backend._request.infer = lambda feeds: {k: v[:0] for k, v in infer(feeds).items()}
    with pytest.raises(EdgebcError, match=r"answered \{'logits': \(0, 3\), .*\} for a batch of 2: refusing"):  # fmt: skip
        backend.run(phantom_batch[:2])
