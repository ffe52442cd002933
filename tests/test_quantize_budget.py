"""INT8 judged by the statistical budget: check frames disjoint from calibration, every node that
can be kept in float has a name, the verdict and its binding criterion in the report and card."""

import pytest

pytest.importorskip("onnx", reason="onnx (the [export] extra) is not installed")
pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

import onnx

from edgebc.data import read_manifest
from edgebc.demo import DEMO_MODEL
from edgebc.export.frames import load_frame_set
from edgebc.export.onnx_export import export_onnx
from edgebc.export.quantize import QuantPlan, prepared_for_quantization, quantize_int8
from edgebc.model_card import read_card
from edgebc.precision_budget import AGREEMENT, AUC, SENSITIVITY, PrecisionBudget
from tests.helpers import make_checkpoint, split_phantoms


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return split_phantoms(tmp_path_factory.mktemp("ph"))


def test_check_set_is_every_labelled_frame_not_used_for_calibration(phantoms):
    everything = read_manifest(phantoms)
    calibration = load_frame_set(phantoms, 10, split="train")
    check = load_frame_set(phantoms, 0, exclude=calibration.paths)
    assert len(calibration.frames) == 10
    assert not {p.resolve() for p in calibration.paths} & {p.resolve() for p in check.paths}
    assert len(check.frames) == len(everything) - 10  # every other split, and the rest of train
    assert len(check.labels) == len(check.units) == len(check.frames)


def test_prepared_graph_names_every_node(tmp_path):
    """ONNX Runtime's pre-processing leaves fused nodes unnamed (one in the demo model, 39 in a
    MobileNetV3-Small); an unnamed node cannot be kept in float, yet was listed as ''."""
    from onnxruntime import quantization as q

    raw = tmp_path / "raw.onnx"
    q.quant_pre_process(str(DEMO_MODEL), str(raw), skip_symbolic_shape=True)
    assert any(not n.name for n in onnx.load(str(raw)).graph.node)  # what is being fixed
    prepared = prepared_for_quantization(DEMO_MODEL, tmp_path)
    names = [n.name for n in onnx.load(str(prepared)).graph.node]
    assert all(names) and len(set(names)) == len(names)


def test_int8_report_carries_the_verdict_and_names_real_nodes(phantoms, tmp_path):
    fp32, _, _ = export_onnx(make_checkpoint(tmp_path / "ckpt.pt"), tmp_path / "model.onnx")
    calibration = load_frame_set(phantoms, 16, split="train")
    check = load_frame_set(phantoms, 0, exclude=calibration.paths)
    impossible = PrecisionBudget(max_disagreement=0.0, max_auc_drop=0.0, max_sensitivity_drop=0.0)
    report = quantize_int8(fp32, tmp_path / "model.int8.onnx", calibration.frames, check.frames,
                           check.labels, QuantPlan(budget=impossible, max_excluded_nodes=4),
                           check_units=check.units)  # fmt: skip
    assert report.check_frames == len(check.frames) - sum(report.check_labels_left_out.values())
    assert not report.budget_met and len(report.attempts) > 1  # it tried keeping nodes in float
    assert report.excluded_nodes and all(report.excluded_nodes)  # no empty name
    assert report.binding in (AGREEMENT, AUC, SENSITIVITY)
    criteria = {c["name"]: c for c in report.budget["criteria"]}
    assert set(criteria) == {AGREEMENT, AUC, SENSITIVITY}
    assert criteria[report.binding]["bound"] > 0.0 and not criteria[report.binding]["passed"]
    assert report.attempts[-1]["binding"] == report.binding
    card = read_card(tmp_path / "model.int8.onnx")
    assert card.quantization["budget_met"] is False
    assert card.quantization["budget_verdict"].startswith("OUTSIDE the budget")
    assert card.quantization["budget"]["max_disagreement"] == 0.0
