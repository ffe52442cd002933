"""A fusion model's INT8 variant (each branch calibrated on its own modality, the head FP32, the
parity per presence pattern), its Triton repository (branch models, head and an ensemble taking
every input) and its TensorRT optimisation profiles (one per named input of each graph)."""

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
onnx = pytest.importorskip("onnx", reason="onnx (the [export] extra) is not installed")


from edgebc.archive import iter_frames
from edgebc.backends.tensorrt.build import engine_batch, optimisation_profiles
from edgebc.cli import main
from edgebc.data import read_dataset
from edgebc.errors import EdgebcError
from edgebc.export.fusion_quantize import quantize_fusion, read_cases
from edgebc.export.quantize import QuantPlan
from edgebc.fusion import FusionClassifier
from edgebc.fusion_graphs import HEAD, read_layout
from edgebc.integrity import read_manifest
from edgebc.model_card import read_card

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fusion_phantoms.yaml"
# the 104 px paired phantoms' mammograms read as speckled to the gate tuned on real films
PHANTOM_GATE = "mammography_quality.max_speckle_contrast=0.12"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The phantom fusion config (ultrasound + four-view mammogram branch) trained briefly on 60
    paired cases, exported with --int8 (calibration split, checked on the test split) and --triton."""
    root = tmp_path_factory.mktemp("fusionx")
    torch.set_num_threads(1)
    settings = [f"out_dir={root / 'runs'}", f"data.manifest={root / 'split.csv'}",
                f"data.phantoms.folder={root / 'paired'}", "data.phantoms.paired_cases=60",
                "data.phantoms.us_per_case=1",
                "optim.epochs=3", "threads=1", "loader_workers=1"]  # fmt: skip
    torch.manual_seed(0)
    assert (
        main(["train", "--config", str(CONFIG), *(a for s in settings for a in ("--set", s))]) == 0
    )
    checkpoint = root / "runs" / "fusion-phantoms" / "best.pt"
    out = root / "export"
    split = str(root / "split.csv")
    code = main(["export", str(checkpoint), "--out", str(out), "--name", "fusion", "--int8",
                 "--calibration", split, "--calibration-split", "calibration", "--check", split,
                 "--check-split", "test", "--triton"])  # fmt: skip
    assert code == 0
    return root, out, json.loads((out / "export.json").read_text())


def _cases(manifest, split):
    cases = {}
    for sample in read_dataset(manifest):
        if sample.split == split:
            cases.setdefault(sample.patient_id, []).append(sample)
    return cases


def _ops(path):
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_int8_calibrates_each_branch_on_its_own_modality_and_reports_every_pattern(exported):
    root, out, report = exported
    q = report["int8"]
    calibration = _cases(root / "split.csv", "calibration")
    us_images = sum(s.modality == "us" for c in calibration.values() for s in c)
    mg_cases = sum(any(s.modality != "us" for s in c) for c in calibration.values())
    # the ultrasound branch saw every calibration ultrasound image, the mammogram branch every
    # calibration case's view set: each its own modality, nothing of the other
    assert q["calibration_rows"] == {"us": us_images, "mg": mg_cases} and us_images and mg_cases
    assert set(q["patterns"]) == {"us+mg", "us", "mg"} and q["budget_met"]
    test = _cases(root / "split.csv", "test")
    assert q["patterns"]["mg"]["n"] == sum(
        any(s.modality != "us" for s in c) for c in test.values()
    )
    for p in q["patterns"].values():
        assert p["n"] > 0 and p["agreement"] >= 0.99 and p["budget_met"]
    for branch in ("us", "mg"):  # really quantized, and close
        error = q["branches"][branch]
        assert 0 < error["max_abs_diff"] < 0.05 and error["relative_rms"] < 0.05
        assert "QuantizeLinear" in _ops(out / f"fusion.int8.{branch}.onnx")
    assert "QuantizeLinear" not in _ops(out / "fusion.int8.onnx")  # the head stays FP32
    assert _ops(out / "fusion.int8.onnx") == _ops(out / "fusion.onnx")
    listed = set(read_manifest(out))
    assert {
        "fusion.int8.onnx",
        "fusion.int8.us.onnx",
        "fusion.int8.mg.onnx",
        "fusion.onnx",
    } <= listed
    assert "INT8 vs FP32 embedding" in (out / "export.md").read_text()


def test_the_runtime_runs_the_int8_variant_when_its_file_is_named(exported):
    """As for a single model, naming `fusion.int8.onnx` runs the INT8 graphs (the head FP32)."""
    root, out, _ = exported
    test = _cases(root / "split.csv", "test")
    frames = [next(iter(iter_frames([s.path]))).image for c in test.values() for s in c
              if s.modality == "us"][:6]  # fmt: skip
    fp32, int8 = (
        FusionClassifier.open(out / "fusion.onnx"),
        FusionClassifier.open(out / "fusion.int8.onnx"),
    )
    try:
        assert int8.card.precision == "int8" and fp32.card.precision == "fp32"
        assert {g: read_card(out / f).precision for g, f in int8.layout.files.items()} == {
            "us": "int8", "mg": "int8", HEAD: "int8"}  # fmt: skip
        assert int8.card.quantization["graphs"] == {"us": "int8", "mg": "int8", HEAD: "fp32"}
        a = np.array([d.decision.positive_probability for d in fp32.classify_batch(frames)], float)
        b = np.array([d.decision.positive_probability for d in int8.classify_batch(frames)], float)
        assert np.all(np.isfinite(a)) and not np.array_equal(a, b)  # the INT8 graphs ran
        np.testing.assert_allclose(a, b, atol=0.02)
    finally:
        fp32.close()
        int8.close()


def test_int8_that_breaks_the_decision_budget_is_refused_and_writes_nothing(exported, tmp_path):
    root, out, _ = exported
    card = read_card(out / "fusion.onnx")
    calibration = read_cases(root / "split.csv", "calibration", card, 8)
    check = read_cases(root / "split.csv", "test", card, 8)
    impossible = QuantPlan(min_agreement=1.01, max_excluded_nodes=0)  # no agreement reaches it
    with pytest.raises(EdgebcError, match="break the decision budget"):
        quantize_fusion(out / "fusion.onnx", tmp_path, "fusion", calibration, check, impossible)
    assert list(tmp_path.iterdir()) == []


def test_int8_without_a_case_manifest_is_refused_before_anything(exported, tmp_path, capsys):
    root, _, _ = exported
    checkpoint = str(root / "runs" / "fusion-phantoms" / "best.pt")
    assert main(["export", checkpoint, "--out", str(tmp_path / "x"), "--int8"]) != 0
    assert "--int8 needs --calibration and --check" in capsys.readouterr().err
    assert main(["export", checkpoint, "--out", str(tmp_path / "y"), "--fp16"]) != 0
    assert "--fp16 not done for fusion models" in capsys.readouterr().err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


# -- Triton ---------------------------------------------------------------------------------------


def _pbtxt(text):
    """A protobuf text message as nested dicts (repeated fields as lists): enough to read a
    Triton config.pbtxt without Triton's protos."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+', text)

    def value(k):
        t = tokens[k]
        if t == "{":
            return message(k + 1)
        if t == "[":
            items, k = [], k + 1
            while tokens[k] != "]":
                item, k = value(k)
                items.append(item)
                k += tokens[k] == ","
            return items, k + 1
        return (json.loads(t) if t.startswith('"') else t), k + 1

    def message(k):
        fields = {}
        while k < len(tokens) and tokens[k] != "}":
            key = tokens[k]
            k += 1 + (tokens[k + 1] == ":" if k + 1 < len(tokens) else 0)
            item, k = value(k)
            items = item if isinstance(item, list) else [item]
            fields.setdefault(key, []).extend(items)
            k += k < len(tokens) and tokens[k] == ","
        return fields, k + 1

    return message(0)[0]


_DTYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}


def _io(path):
    graph = onnx.load(str(path)).graph

    def of(values):
        return {v.name: (_DTYPES[v.type.tensor_type.elem_type],
                         [str(d.dim_value) for d in v.type.tensor_type.shape.dim[1:]])
                for v in values}  # fmt: skip

    return of(graph.input), of(graph.output)


def _config_io(config):
    def of(items):
        return {i["name"][0]: (i["data_type"][0], i["dims"]) for i in items}

    return of(config["input"]), of(config["output"])


def test_triton_repository_has_the_branches_the_head_and_an_ensemble_taking_every_input(exported):
    _, out, report = exported
    repo = out / report["triton"]["path"]
    layout = read_layout(out / "fusion.onnx")
    assert repo == out / "model_repository" / "fusion"
    configs = {g: _pbtxt((repo.parent / f"fusion_{g}" / "config.pbtxt").read_text())
               for g in layout.files}  # fmt: skip
    for graph, config in configs.items():
        assert _config_io(config) == _io(out / layout.files[graph]), graph
        assert "dynamic_batching" in config and config["platform"] == ["onnxruntime_onnx"]
        copied = repo.parent / f"fusion_{graph}" / "1" / "model.onnx"
        assert copied.read_bytes() == (out / layout.files[graph]).read_bytes()
    ensemble = _pbtxt((repo / "config.pbtxt").read_text())
    assert ensemble["platform"] == ["ensemble"] and (repo / "1").is_dir()
    inputs, outputs = _config_io(ensemble)
    us, mg = _io(out / "fusion.us.onnx")[0], _io(out / "fusion.mg.onnx")[0]
    head_in, head_out = _io(out / "fusion.onnx")
    # one input per modality and view, the views' presence and the branches' presence
    assert inputs == {**us, **mg, "present": head_in["present"]}
    assert set(inputs) == {
        "us",
        "mg_L_CC",
        "mg_L_MLO",
        "mg_R_CC",
        "mg_R_MLO",
        "mg_present",
        "present",
    }
    assert inputs["mg_present"] == ("TYPE_FP32", ["4"]) and inputs["us"] == (
        "TYPE_FP32",
        ["1", "40", "40"],
    )
    assert outputs == head_out
    steps = ensemble["ensemble_scheduling"][0]["step"]
    assert [s["model_name"][0] for s in steps] == ["fusion_us", "fusion_mg", "fusion_head"]
    head_step = steps[-1]
    assert {m["key"][0] for m in head_step["input_map"]} == set(head_in)
    card = json.loads(ensemble["parameters"][0]["value"][0]["string_value"][0])
    assert [i["name"] for i in card["inputs"]] == [
        "us",
        "mg_L_CC",
        "mg_L_MLO",
        "mg_R_CC",
        "mg_R_MLO",
    ]


# -- TensorRT -------------------------------------------------------------------------------------


def test_tensorrt_profiles_cover_every_named_input_of_each_fusion_graph(exported):
    from edgebc.backends.tensorrt.build import graph_inputs

    _, out, _ = exported
    card = read_card(out / "fusion.onnx")
    batch = engine_batch(card)
    assert batch == (1, 1, 8)  # one frame at a time, up to 8 (the card allows 64)
    assert engine_batch(replace(card, max_batch=4)) == (1, 1, 4)
    mg = optimisation_profiles(card, batch, graph_inputs(out / "fusion.mg.onnx"))
    assert set(mg) == {"mg_L_CC", "mg_L_MLO", "mg_R_CC", "mg_R_MLO", "mg_present"}
    assert mg["mg_L_CC"] == ((1, 1, 64, 48), (1, 1, 64, 48), (8, 1, 64, 48))
    assert mg["mg_present"] == ((1, 4), (1, 4), (8, 4))
    head = optimisation_profiles(card, batch, graph_inputs(out / "fusion.onnx"))
    assert head == {"us_embedding": ((1, 32), (1, 32), (8, 32)),
                    "mg_embedding": ((1, 32), (1, 32), (8, 32)), "present": ((1, 2), (1, 2), (8, 2))}  # fmt: skip
    # every profile is exactly the graph's own inputs
    for file in ("fusion.us.onnx", "fusion.mg.onnx", "fusion.onnx"):
        named = optimisation_profiles(card, batch, graph_inputs(out / file))
        assert {k: list(map(str, v[0][1:])) for k, v in named.items()} == {
            k: dims for k, (_, dims) in _io(out / file)[0].items()}  # fmt: skip
    # a one-input model: the card's input; a bad range is refused
    assert graph_inputs(Path(__file__)) is None
    with pytest.raises(EdgebcError, match="1 <= min <= opt <= max"):
        optimisation_profiles(card, (2, 1, 8))


@pytest.mark.tensorrt
def test_tensorrt_builds_an_engine_per_fusion_graph_with_a_profile_per_input(exported, tmp_path):
    import tensorrt as trt

    from edgebc.backends.tensorrt.build import build_fusion_engines, graph_inputs

    _, out, _ = exported
    engines = build_fusion_engines(out / "fusion.int8.onnx", tmp_path, "int8")
    assert {g: p.name for g, p in engines.items()} == {
        "us": "fusion.int8.us.int8.engine", "mg": "fusion.int8.mg.int8.engine",
        HEAD: "fusion.int8.fp16.engine"}  # fmt: skip
    card = read_card(out / "fusion.onnx")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for graph, path in engines.items():
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        source = out / read_layout(out / "fusion.int8.onnx").files[graph]
        expected = optimisation_profiles(card, engine_batch(card), graph_inputs(source))
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        assert set(inputs) == set(expected)
        for name in inputs:
            assert tuple(map(tuple, engine.get_tensor_profile_shape(name, 0))) == expected[name]
