"""Export: ONNX with its card and proven parity, FP16, INT8 with evidence, Triton, integrity, engine sidecars."""

import hashlib
import json
import re

import numpy as np
import onnxruntime
import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
pytest.importorskip("onnx", reason="onnx (the [export] extra) is not installed")

from edgebc.backends.tensorrt.sidecar import check_engine_compatible
from edgebc.errors import EdgebcError
from edgebc.export.frames import load_frames
from edgebc.export.onnx_export import export_fp16, export_onnx
from edgebc.export.quantize import QuantPlan, quantize_int8, search_int8
from edgebc.export.triton import write_triton_repository
from edgebc.integrity import verify_artifact
from edgebc.integrity import write_manifest as write_sha_manifest
from edgebc.model_card import ModelCard, read_card
from edgebc.precision_budget import PrecisionBudget
from edgebc.train.models import list_models
from tests.helpers import make_checkpoint, split_phantoms


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return split_phantoms(tmp_path_factory.mktemp("ph"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    path, card, parity = export_onnx(make_checkpoint(folder / "ckpt.pt"), folder / "model.onnx")
    return path, card, parity


def test_onnx_carries_its_card_and_agrees_with_torch(exported):
    path, card, parity = exported
    assert parity.ok and parity.max_abs_logit_diff < 1e-4 and parity.decision_agreement == 1.0
    read = read_card(path)
    assert read == card
    assert (read.temperature, read.threshold, read.target_sensitivity) == (1.5, 0.3, 0.95)
    # the checkpoint (an absolute tmp path here) is named by its folder and file, no machine path
    assert read.source_checkpoint == f"{path.parent.name}/ckpt.pt"
    assert str(path.parent) not in path.read_bytes().decode("latin-1")  # nor anywhere in the file
    assert "/site-packages/" not in path.read_bytes().decode("latin-1")  # torch's stack traces
    assert read.preprocess.input_shape == (1, 48, 48) and read.class_names == (
        "normal",
        "benign",
        "malignant",
    )
    assert (
        read.weights_sha256 == "ab" * 32 and read.edgebc_version and read.exported.startswith("20")
    )
    assert sorted(p.name for p in path.parent.iterdir() if p.suffix != ".pt") == [
        "model.onnx"
    ]  # one self-contained file


def test_dynamic_batch_gives_the_same_answer_per_frame(exported):
    path, card, _ = exported
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).normal(0, 1, (5, *card.input_shape)).astype(np.float32)
    together = session.run(None, {"input": batch})[0]
    alone = np.concatenate([session.run(None, {"input": batch[i : i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_fp16_copy_keeps_float32_io_and_agrees(exported, tmp_path):
    path, _, _ = exported
    fp16, card, parity = export_fp16(path, tmp_path / "model.fp16.onnx")
    assert card.precision == "fp16" and parity.ok and parity.decision_agreement == 1.0
    assert (
        onnxruntime.InferenceSession(str(fp16), providers=["CPUExecutionProvider"])
        .get_inputs()[0]
        .type
        == "tensor(float)"
    )


def test_torchscript_exporter_matches_dynamo(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "c.pt", "shufflenet_v2_x0_5", 64)
    _, _, parity = export_onnx(checkpoint, tmp_path / "ts.onnx", exporter="torchscript")
    assert parity.ok


def test_damaged_or_foreign_models_are_refused(exported, tmp_path):
    path, _, _ = exported
    truncated = tmp_path / "model.onnx"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(EdgebcError, match="not a loadable ONNX model"):
        read_card(truncated)
    import onnx

    bare = onnx.load(str(path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(EdgebcError, match="has no edgebc model card"):
        read_card(tmp_path / "bare.onnx")


def test_manifest_refuses_an_altered_artifact(exported, tmp_path):
    path, _, _ = exported
    copy = tmp_path / "model.onnx"
    copy.write_bytes(path.read_bytes())
    write_sha_manifest(tmp_path, [copy])
    assert verify_artifact(copy) == hashlib.sha256(copy.read_bytes()).hexdigest()
    data = bytearray(copy.read_bytes())
    data[-10] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(EdgebcError, match=r"does not match MANIFEST\.sha256"):
        verify_artifact(copy)


def test_int8_report_has_parity_sqnr_and_budget(exported, phantoms, tmp_path):
    path, _, _ = exported
    calibration, _ = load_frames(phantoms, 24, split="train")
    check, labels = load_frames(phantoms, 40, split="val")
    impossible = PrecisionBudget(max_disagreement=0.0, max_auc_drop=0.0, max_sensitivity_drop=0.0)
    strict = QuantPlan(budget=impossible, max_excluded_nodes=2)
    report = quantize_int8(path, tmp_path / "model.int8.onnx", calibration, check, labels, strict)
    assert read_card(tmp_path / "model.int8.onnx").precision == "int8"
    assert 0 <= report.agreement <= 1 and 0 <= report.max_prob_diff <= 1
    assert {"auc_positive", "sensitivity_at_threshold"} <= set(report.int8)
    assert report.sensitive_nodes and all(
        "sqnr_db" in n and "loss_db" in n for n in report.sensitive_nodes
    )
    if not report.attempts[0]["budget_met"]:  # then it must have tried keeping nodes in float
        assert len(report.attempts) > 1 and report.excluded_nodes
    card = read_card(tmp_path / "model.int8.onnx")
    assert card.quantization["excluded_nodes"] == report.excluded_nodes


def test_int8_search_times_every_format_and_recommends_honestly(exported, phantoms, tmp_path):
    path, _, _ = exported
    calibration, _ = load_frames(phantoms, 16, split="train")
    check, labels = load_frames(phantoms, 30, split="val")
    report = search_int8(
        path,
        tmp_path / "m.int8.onnx",
        calibration,
        check,
        labels,
        QuantPlan(max_excluded_nodes=0),
        latency_runs=20,
    )
    rows = report.attempts[-1]["format_search"]
    assert {(r["format"], r["per_channel"]) for r in rows} == {
        ("qdq", True),
        ("qdq", False),
        ("qoperator", True),
    }
    faster = report.latency_ms["int8"] < report.latency_ms["fp32"]
    assert report.recommendation.startswith("INT8" if (faster and report.budget_met) else "FP32")


def test_triton_config_matches_the_model(exported, tmp_path):
    path, card, _ = exported
    folder = write_triton_repository(path, tmp_path / "repo", "edgebc_demo")
    config = (folder / "config.pbtxt").read_text()
    assert (folder / "1" / "model.onnx").read_bytes() == path.read_bytes()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    blocks = re.findall(r'name: "(\w+)"\s+data_type: (\w+)\s+dims: \[ ([\d, ]+) \]', config)
    declared = {name: (dtype, [int(d) for d in dims.split(",")]) for name, dtype, dims in blocks}
    for tensor in (*session.get_inputs(), *session.get_outputs()):
        assert declared[tensor.name] == ("TYPE_FP32", list(tensor.shape[1:]))
    assert f"max_batch_size: {card.max_batch}" in config and "dynamic_batching" in config
    card_json = json.loads(json.loads(re.search(r"string_value: (\".*\") }", config).group(1)))
    assert ModelCard.from_dict(card_json).class_names == ("normal", "benign", "malignant")


def test_eval_scores_an_onnx_model_without_torch(exported, phantoms, tmp_path):
    import subprocess
    import sys

    path, _, _ = exported
    script = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from edgebc.train.evaluate import evaluate_checkpoint\n"
        f"r = evaluate_checkpoint({str(path)!r}, {str(phantoms)!r}, {str(tmp_path / 'ev')!r}, 'test', n_boot=100)\n"
        "print(json.dumps({'backend': r['backend'], 'auc': r['auc_positive'], 'threshold': r['operating_point']['threshold']}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (
        report["backend"] == "onnxruntime (fp32)"
        and report["threshold"] == 0.3
        and 0 <= report["auc"] <= 1
    )
    assert (tmp_path / "ev" / "report.md").is_file()


def test_engine_sidecar_refuses_other_versions_and_gpus():
    sidecar = {"tensorrt": "10.3.0", "gpu": {"name": "Orin", "compute_capability": "8.7"}}
    check_engine_compatible(sidecar, "10.3.0", {"name": "Orin", "compute_capability": "8.7"})
    with pytest.raises(
        EdgebcError,
        match=r"TensorRT 10\.3\.0 but this device has 10\.7\.0; engines are not portable",
    ):
        check_engine_compatible(sidecar, "10.7.0", {"name": "Orin", "compute_capability": "8.7"})
    with pytest.raises(
        EdgebcError,
        match=r"built for Orin \(compute capability 8\.7\) but this GPU is NVIDIA H200 \(9\.0\)",
    ):
        check_engine_compatible(
            sidecar, "10.3.0", {"name": "NVIDIA H200", "compute_capability": "9.0"}
        )


def test_export_cli_writes_every_artifact_and_the_manifest(phantoms, tmp_path, capsys):
    from edgebc.cli import main

    checkpoint = make_checkpoint(tmp_path / "c.pt")
    out = tmp_path / "out"
    code = main(["export", str(checkpoint), "--out", str(out), "--fp16", "--int8", "--calibration", str(phantoms),
                 "--calibration-size", "16", "--check", str(phantoms), "--no-int8-search", "--triton"])  # fmt: skip
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "model.onnx",
        "model.fp16.onnx",
        "model.int8.onnx",
        "export.json",
        "export.md",
        "MANIFEST.sha256",
        "model_repository",
    } <= names
    manifest = (out / "MANIFEST.sha256").read_text()
    assert all(name in manifest for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"))
    for artifact in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        assert verify_artifact(out / artifact)
    assert "INT8 vs FP32" in capsys.readouterr().out


# vgg16 is vgg16_bn without its BatchNorm layers: the BN variant exports every op it has, and
# each VGG costs over a minute of CI at full width
@pytest.mark.slow
@pytest.mark.parametrize(
    "arch", [name for name in list_models() if name not in ("simple_cnn", "vgg16")]
)
def test_every_architecture_exports_with_parity(arch, tmp_path):
    size = 80 if arch == "inception_v3" else 64  # its stem and grid reductions need 75 px
    _, card, parity = export_onnx(
        make_checkpoint(tmp_path / "c.pt", arch, size), tmp_path / f"{arch}.onnx"
    )
    assert parity.ok and parity.decision_agreement == 1.0, parity
    assert card.arch == arch


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_fp16_engine_builds_with_sidecar_and_parity(exported, tmp_path):
    from edgebc.backends.tensorrt import build_engine, run_engine
    from edgebc.backends.tensorrt.sidecar import read_sidecar
    from edgebc.export.onnx_export import verification_feeds

    path, card, _ = exported
    engine = build_engine(path, tmp_path / "model.fp16.engine", "fp16", batch=(1, 2, 4))
    sidecar = read_sidecar(engine)
    assert sidecar["precision"] == "fp16" and sidecar["gpu"]["compute_capability"]
    inputs = verification_feeds(card)[card.input_name][:4]
    reference = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": inputs}
    )[0]
    np.testing.assert_allclose(run_engine(engine, inputs), reference, atol=0.05)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_normal_export_says_nothing_alarming(tmp_path, exporter):
    """torch's exporters warn about torch itself (LeafSpec, the legacy exporter, "torchvision is
    not installed. Skipping torchvision::nms"); a fresh process exporting once shows none of it."""
    import subprocess
    import sys

    script = (
        "import warnings; warnings.simplefilter('default')\n"
        "from tests.helpers import make_checkpoint, split_phantoms\n"
        "from edgebc.export.onnx_export import export_onnx\n"
        f"export_onnx(make_checkpoint({str(tmp_path / 'c.pt')!r}), {str(tmp_path / 'm.onnx')!r}, "
        f"exporter={exporter!r})\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    noise = [line for line in run.stderr.splitlines()
             if re.search(r"Warning|torchvision is not installed|deprecated", line)]  # fmt: skip
    assert noise == [], noise


def test_calibration_and_check_frames_are_one_seeded_draw(phantoms):
    from edgebc.export.frames import load_frame_set

    frames, labels = load_frames(phantoms, 6, split="val", seed=3)
    drawn = load_frame_set(phantoms, 0, split="val", seed=3)
    assert labels == drawn.labels[:6] and len(drawn.labels) > 6
    assert all(np.array_equal(a, b) for a, b in zip(frames, drawn.frames[:6], strict=True))
    left = load_frame_set(phantoms, 0, split="val", seed=3, exclude=drawn.paths[:6])
    assert not set(left.paths) & set(drawn.paths[:6])
    assert len(left.paths) == len(drawn.paths) - 6
    with pytest.raises(EdgebcError, match="at least 1"):
        load_frames(phantoms, 0)
    with pytest.raises(EdgebcError, match=r"no samples in split 'nope' to calibrate or check with"):
        load_frame_set(phantoms, 4, split="nope")
