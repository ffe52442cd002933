"""A fusion model's INT8 variant (each branch calibrated on its own modality, the head FP32, the
parity per presence pattern), its Triton repository (branch models, head and an ensemble taking
every input) and its TensorRT optimisation profiles (one per named input of each graph)."""

import importlib.util
import json
import re
import shutil
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


def test_an_int8_variant_its_folder_manifest_does_not_list_is_refused(exported, tmp_path):
    """A later export into the same folder that wrote no INT8 (refused, or not asked) leaves the
    earlier INT8 files behind, unlisted: naming them must not run the earlier model."""
    _, out, _ = exported
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    manifest = copy / "MANIFEST.sha256"
    manifest.write_text("".join(line for line in manifest.read_text().splitlines(keepends=True)
                                if ".int8." not in line))  # fmt: skip
    with pytest.raises(EdgebcError, match=r"fusion\.int8\.mg\.onnx, .* not listed in MANIFEST"):
        FusionClassifier.open(copy / "fusion.int8.onnx")
    FusionClassifier.open(copy / "fusion.onnx").close()  # the listed FP32 graphs still open


def test_int8_that_breaks_the_decision_budget_is_refused_and_writes_nothing(exported, tmp_path):
    root, out, _ = exported
    card = read_card(out / "fusion.onnx")
    calibration = read_cases(root / "split.csv", "calibration", card, 8)
    check = read_cases(root / "split.csv", "test", card, 8)
    impossible = QuantPlan(min_agreement=1.01, max_excluded_nodes=0)  # no agreement reaches it
    with pytest.raises(EdgebcError, match="break the decision budget"):
        quantize_fusion(out / "fusion.onnx", tmp_path, "fusion", calibration, check, impossible)
    assert list(tmp_path.iterdir()) == []


def test_int8_checked_on_unpaired_cases_is_refused_the_fused_path_unjudged(exported, tmp_path):
    root, out, _ = exported
    card = read_card(out / "fusion.onnx")
    calibration = read_cases(root / "split.csv", "calibration", card, 8)
    # each case split in two: its ultrasound alone and its mammograms alone (an unpaired set):
    # every branch is checked alone, and the path every fused decision takes never would be
    unpaired = [part for case in read_cases(root / "split.csv", "test", card, 8) for part in (
        replace(case, mammograms={}), replace(case, ultrasound=()))]  # fmt: skip
    with pytest.raises(EdgebcError, match=r"cannot judge INT8 with inputs \['us\+mg'\]"):
        quantize_fusion(out / "fusion.onnx", tmp_path, "fusion", calibration, unpaired)
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


def _head_plan_specs(width=32, branches=2, max_batch=8, dtype=np.float32):
    """The tensors a fusion head engine declares (TensorRT's view: -1 for the dynamic batch)."""
    from edgebc.backends.tensorrt.io_plan import TensorSpec

    return [TensorSpec("us_embedding", True, (-1, width), np.dtype(dtype), max_batch),
            TensorSpec("mg_embedding", True, (-1, width), np.dtype(np.float32), max_batch),
            TensorSpec("present", True, (-1, branches), np.dtype(np.float32), max_batch),
            TensorSpec("logits", False, (-1, 2), np.dtype(np.float32)),
            TensorSpec("features", False, (-1, width), np.dtype(np.float32))]  # fmt: skip


def test_tensorrt_io_plan_sizes_a_buffer_per_tensor_and_splits_batches_by_the_profile():
    from edgebc.backends.tensorrt.io_plan import TensorSpec, plan_io

    declared = [("us_embedding", (32,)), ("mg_embedding", (32,)), ("present", (2,))]
    plan = plan_io(_head_plan_specs(), declared, ("logits", "features"), "head.engine")
    # float32 at the profile's largest batch (8): 8 rows x 32 x 4 bytes, 8 x 2 x 4, ...
    assert plan.buffer_bytes() == {"us_embedding": 1024, "mg_embedding": 1024, "present": 64,
                                   "logits": 64, "features": 1024}  # fmt: skip
    assert plan.max_batch == 8
    assert plan.input_shapes(3) == {
        "us_embedding": (3, 32),
        "mg_embedding": (3, 32),
        "present": (3, 2),
    }
    assert plan.output_shapes(3) == {"logits": (3, 2), "features": (3, 32)}
    assert plan.runs(19) == [slice(0, 8), slice(8, 16), slice(16, 19)]
    assert plan.runs(8) == [slice(0, 8)]
    # a single model asks for its logits only, but its features output still gets a buffer
    # (TensorRT needs an address for every output)
    single = plan_io([TensorSpec("image", True, (-1, 3, 4, 4), np.dtype(np.float32), 4),
                      TensorSpec("logits", False, (-1, 2), np.dtype(np.float32)),
                      TensorSpec("features", False, (-1, 6), np.dtype(np.float32))],
                     [("image", (3, 4, 4))], ("logits",), "m.engine")  # fmt: skip
    assert single.buffer_bytes() == {"image": 4 * 48 * 4, "logits": 32, "features": 96}
    assert single.output_shapes(2) == {"logits": (2, 2)}
    # the smallest profile limit among the inputs bounds a run
    specs = _head_plan_specs()
    specs[2] = TensorSpec("present", True, (-1, 2), np.dtype(np.float32), 4)
    assert plan_io(specs, declared, ("logits",), "h").runs(9) == [
        slice(0, 4),
        slice(4, 8),
        slice(8, 9),
    ]
    with pytest.raises(
        EdgebcError, match=r"inputs \['mg_embedding', 'present', 'us_embedding'\] are not"
    ):
        plan_io(_head_plan_specs(), declared[:2], ("logits",), "h")
    with pytest.raises(EdgebcError, match="no output scores"):
        plan_io(_head_plan_specs(), declared, ("scores",), "h")
    with pytest.raises(EdgebcError, match="us_embedding is float16"):
        plan_io(_head_plan_specs(dtype=np.float16), declared, ("logits",), "h")
    with pytest.raises(EdgebcError, match=r"\(N, 16\) in the engine but \(N, 32\) in its card"):
        plan_io(_head_plan_specs(width=16), declared, ("logits",), "h")
    fixed = [TensorSpec("image", True, (1, 3, 4, 4), np.dtype(np.float32), 1)]
    with pytest.raises(EdgebcError, match="dynamic batch"):
        plan_io(fixed, [("image", (3, 4, 4))], (), "m")
    with pytest.raises(ValueError, match="at least one row"):
        plan.runs(0)


def test_fusion_engine_plan_names_precisions_sources_profiles_and_sidecars(exported):
    import onnxruntime

    from edgebc.backends.tensorrt.build import engine_description, fusion_engine_plan
    from edgebc.backends.tensorrt.sidecar import sidecar_layout
    from edgebc.model_card import ModelCard

    _, out, _ = exported
    card = read_card(out / "fusion.onnx")
    fp16 = {p.graph: p for p in fusion_engine_plan(out / "fusion.onnx", "fp16")}
    assert {g: (p.engine, p.precision, p.source.name) for g, p in fp16.items()} == {
        "us": ("fusion.fp16.us.engine", "fp16", "fusion.us.onnx"),
        "mg": ("fusion.fp16.mg.engine", "fp16", "fusion.mg.onnx"),
        HEAD: ("fusion.fp16.engine", "fp16", "fusion.onnx")}  # fmt: skip
    int8 = {p.graph: p for p in fusion_engine_plan(out / "fusion.int8.onnx", "int8")}
    # INT8 branches from the variant's QDQ graphs, its head (FP32 in ONNX) built at FP16
    assert {g: (p.engine, p.precision, p.source.name) for g, p in int8.items()} == {
        "us": ("fusion.int8.us.engine", "int8", "fusion.int8.us.onnx"),
        "mg": ("fusion.int8.mg.engine", "int8", "fusion.int8.mg.onnx"),
        HEAD: ("fusion.int8.engine", "fp16", "fusion.int8.onnx")}  # fmt: skip
    with pytest.raises(EdgebcError, match="INT8 engines are built from the INT8 variant"):
        fusion_engine_plan(out / "fusion.onnx", "int8")
    with pytest.raises(
        EdgebcError, match=r"not the head graph \(\.onnx\) of an exported fusion model"
    ):
        fusion_engine_plan(Path(__file__))
    for graph, planned in fp16.items():
        # a profile per named input of the ONNX graph, the batch 1..8
        inputs = {i.name: i.shape[1:] for i in onnxruntime.InferenceSession(
            str(planned.source), providers=["CPUExecutionProvider"]).get_inputs()}  # fmt: skip
        assert set(planned.profiles) == set(inputs) and planned.batch == (1, 1, 8)
        for name, (low, opt, high) in planned.profiles.items():
            assert low == opt == (1, *inputs[name]) and high == (8, *inputs[name])
        # the layout names the engines and which graph this one is
        assert planned.layout.graph == graph
        assert dict(planned.layout.files) == {g: p.engine for g, p in fp16.items()}
        # the sidecar's card is the graph's own card, its layout the engines'
        described = engine_description(planned.source, read_card(planned.source), "fp16",
                                       planned.batch, 1024, planned.layout)  # fmt: skip
        assert ModelCard.from_json(described["card"]) == card
        assert sidecar_layout(described, "x") == planned.layout
        assert described["onnx"] == planned.source.name and described["batch"] == [1, 1, 8]
    assert ModelCard.from_json(engine_description(
        int8["us"].source, read_card(int8["us"].source), "int8", (1, 1, 8), 1024)["card"]
    ).precision == "int8"  # fmt: skip


def _write_planned_engines(out, folder, precision="fp16", head="fusion.onnx"):
    """The files build_fusion_engines writes, minus TensorRT's bytes: each planned engine (a
    placeholder) with the sidecar build_engine writes for it (its card and the engines' layout)."""
    from edgebc.backends.tensorrt.build import engine_description, fusion_engine_plan
    from edgebc.backends.tensorrt.sidecar import write_sidecar

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for p in fusion_engine_plan(out / head, precision):
        engine = folder / p.engine
        engine.write_bytes(b"not an engine: no TensorRT here")
        write_sidecar(engine, {"tensorrt": "10.0", "gpu": {"name": "x", "compute_capability": "9.0"},
                               **engine_description(p.source, read_card(p.source), p.precision,
                                                    p.batch, 1024, p.layout)})  # fmt: skip
        paths[p.graph] = engine
    return paths


def test_a_head_engine_finds_its_sibling_engines_from_the_sidecars(exported, tmp_path):
    from edgebc.backends.tensorrt.sidecar import engine_siblings, sidecar_path

    _, out, _ = exported
    engines = _write_planned_engines(out, tmp_path / "set")
    assert engine_siblings(engines[HEAD]) == engines
    # what `serve` and `classify` read to know a fusion model: the engines' layout, no TensorRT
    layout = read_layout(engines[HEAD])
    assert layout is not None and layout.graph == HEAD
    assert {g: layout.files[g] for g in engines} == {g: p.name for g, p in engines.items()}
    assert read_layout(engines["us"]).for_graph(HEAD) == layout
    assert engine_siblings(engines["us"]) == engines  # any graph's engine finds the others
    # an engine of another export (the INT8 set's) in place of a sibling is refused
    other = _write_planned_engines(out, tmp_path / "int8", "int8", "fusion.int8.onnx")
    engines["mg"].write_bytes(other["mg"].read_bytes())
    sidecar_path(engines["mg"]).write_text(sidecar_path(other["mg"]).read_text())
    with pytest.raises(
        EdgebcError,
        match=re.escape("fusion.fp16.mg.engine: is not the mg engine of the same export"),
    ):
        engine_siblings(engines[HEAD])
    sidecar_path(engines["mg"]).unlink()
    with pytest.raises(
        EdgebcError, match=r"the mg engine of fusion.fp16.engine \(or its sidecar\) is missing"
    ):
        engine_siblings(engines[HEAD])
    # a single model's engine is no fusion export's
    single = tmp_path / "single.engine"
    single.write_bytes(b"x")
    (tmp_path / "single.engine.json").write_text(
        json.dumps({"card": read_card(out / "fusion.onnx").to_json()})
    )
    with pytest.raises(EdgebcError, match="not an engine of an exported fusion model"):
        engine_siblings(single)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed"
)
def test_fusion_engines_without_tensorrt_are_refused_with_the_install_command(
    exported, tmp_path, capsys
):
    """Exporting engines is refused before anything is written; opening them names the install."""
    from edgebc.errors import MissingDependencyError

    root, out, _ = exported
    checkpoint = str(root / "runs" / "fusion-phantoms" / "best.pt")
    for precision in ("fp16", "int8"):
        target = tmp_path / precision
        assert main(["export", checkpoint, "--out", str(target), "--tensorrt", precision]) != 0
        assert "pip install 'edgebc[tensorrt]'" in capsys.readouterr().err
        assert not target.exists()
    engines = _write_planned_engines(out, tmp_path / "set")
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgebc\[tensorrt\]'"):
        FusionClassifier.open(engines[HEAD])
    engines["us"].unlink()  # a missing sibling is found before TensorRT is needed
    with pytest.raises(EdgebcError, match=re.escape("the us engine of fusion.fp16.engine")):
        FusionClassifier.open(engines[HEAD])


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_builds_an_engine_per_fusion_graph_with_a_profile_per_input(exported, tmp_path):
    import tensorrt as trt

    from edgebc.backends.tensorrt.build import build_fusion_engines, graph_inputs

    _, out, _ = exported
    engines = build_fusion_engines(out / "fusion.int8.onnx", tmp_path, "int8")
    assert {g: p.name for g, p in engines.items()} == {
        "us": "fusion.int8.us.engine", "mg": "fusion.int8.mg.engine",
        HEAD: "fusion.int8.engine"}  # fmt: skip
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


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_fusion_export_matches_onnx_per_pattern_and_runs_the_classifier(
    exported, tmp_path
):
    """`edgebc export --tensorrt fp16`: engines per graph in the manifest, their parity against
    the ONNX graphs with every presence pattern, and FusionClassifier on the head engine deciding
    as on the ONNX head (a batch larger than the profile's runs in pieces)."""
    root, _, _ = exported
    checkpoint = str(root / "runs" / "fusion-phantoms" / "best.pt")
    target = tmp_path / "trt"
    assert main(["export", checkpoint, "--out", str(target), "--name", "fusion",
                 "--tensorrt", "fp16"]) == 0  # fmt: skip
    report = json.loads((target / "export.json").read_text())["tensorrt"]
    assert report["engines"] == {"us": "fusion.fp16.us.engine", "mg": "fusion.fp16.mg.engine",
                                 HEAD: "fusion.fp16.engine"}  # fmt: skip
    parity = report["fusion_parity_vs_onnx"]
    assert set(parity["end_to_end"]) == {"us+mg", "us", "mg"} and report["within_tolerance"]
    assert all(p["decision_agreement"] == 1.0 for p in parity["end_to_end"].values())
    manifest = read_manifest(target)
    assert all(e in manifest and f"{e}.json" in manifest for e in report["engines"].values())
    test = _cases(root / "split.csv", "test")
    frames = [next(iter(iter_frames([s.path]))).image for c in test.values() for s in c
              if s.modality == "us"][:12]  # fmt: skip
    onnx_model, engine_model = (FusionClassifier.open(target / "fusion.onnx"),
                                FusionClassifier.open(target / "fusion.fp16.engine"))  # fmt: skip
    try:
        assert engine_model.graphs[HEAD].name == "tensorrt:fp16"
        a = [d.decision.positive_probability for d in onnx_model.classify_batch(frames)]
        b = [d.decision.positive_probability for d in engine_model.classify_batch(frames)]
        np.testing.assert_allclose(np.array(a, float), np.array(b, float), atol=0.02)
    finally:
        onnx_model.close()
        engine_model.close()
