"""`edgebc export`: from a checkpoint to every artifact a device runs, each checked against the original.

Writes into one folder: `<name>.onnx` (FP32, card embedded, ONNX Runtime vs PyTorch parity) — for
a fusion model (one branch per modality) that is the fusion head, beside one `<name>.<branch>.onnx`
per branch (edgebc.export.fusion_export), each checked alone and end to end —, optionally `<name>.fp16.onnx`, `<name>.int8.onnx` (with its parity report and latency evidence),
a TensorRT engine with sidecar, a Triton repository; for a classifier trained on lesion-localiser
crops, `<name>.localiser.onnx` (the localiser it was trained behind, linked from its card; every
check frame cropped as it was trained); then `export.json` / `export.md` with every
number, and `MANIFEST.sha256` over the artifacts so a device can refuse a damaged copy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.atomic import atomic_write_bytes, atomic_write_text
from edgebc.errors import EdgebcError
from edgebc.export.frames import load_frame_set, load_frames
from edgebc.export.onnx_export import export_fp16, export_onnx
from edgebc.fusion_graphs import HEAD
from edgebc.integrity import sha256_file, write_manifest
from edgebc.localiser import LesionCrop, lesion_crop_of
from edgebc.model_card import read_card


@dataclass(frozen=True)
class ExportOptions:
    out_dir: Path
    name: str = "model"
    opset: int = 18
    max_batch: int = 64
    exporter: str = "dynamo"
    verify_data: str | None = None
    verify_count: int = 16
    fp16: bool = False
    int8: bool = False
    calibration: str | None = None
    calibration_size: int = 200
    calibration_split: str | None = "train"
    calibration_method: str = "minmax"
    check_data: str | None = None
    check_split: str | None = None  # every split: all labelled frames not used for calibration
    check_count: int = 0  # 0: every one
    int8_search: bool = True
    tensorrt: str | None = None  # "fp16" | "int8"
    triton: bool = False


def run_export(checkpoint: str | Path, options: ExportOptions) -> dict[str, Any]:
    from edgebc.fusion_graphs import is_fusion
    from edgebc.train.checkpoint import load_checkpoint

    out = Path(options.out_dir)
    trained = load_checkpoint(checkpoint).card  # read once, for what kind of export this is
    if is_fusion(trained):  # refuses what it cannot do before making a folder
        return _run_fusion_export(checkpoint, options)
    crop = lesion_crop_of(trained)  # a classifier trained on localiser crops checks on crops
    out.mkdir(parents=True, exist_ok=True)
    frames = (
        _cropped(load_frames(options.verify_data, options.verify_count)[0], crop)
        if options.verify_data
        else []
    )
    fp32_path, card, parity = export_onnx(
        checkpoint,
        out / f"{options.name}.onnx",
        options.opset,
        options.max_batch,
        options.exporter,
        frames,
    )
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "card": card.to_dict(),
        "onnx": {"path": fp32_path.name, "parity_vs_torch": asdict(parity)},
    }
    artifacts = [fp32_path]
    if crop is not None and crop.path is not None:
        artifacts.append(_ship_localiser(fp32_path, crop.path, crop.margin))
        card = read_card(fp32_path)
        report["card"] = card.to_dict()
        report["localiser"] = {"path": artifacts[-1].name, "margin": crop.margin}
    if options.fp16:
        fp16_path, _, fp16_parity = export_fp16(
            fp32_path, out / f"{options.name}.fp16.onnx", frames
        )
        report["fp16"] = {"path": fp16_path.name, "parity_vs_fp32": asdict(fp16_parity)}
        artifacts.append(fp16_path)
    int8_path = None
    if options.int8:
        from edgebc.export.quantize import QuantPlan, quantize_int8, search_int8

        if not options.calibration or not options.check_data:
            raise EdgebcError(
                "--int8 needs --calibration (frames to calibrate on) and --check (a labelled set to prove accuracy held)"
            )
        calibration = load_frame_set(
            options.calibration, options.calibration_size, split=options.calibration_split
        )
        # every labelled frame not used for calibration (options.check_count <= 0: no limit)
        check = load_frame_set(options.check_data, options.check_count,
                               split=options.check_split, exclude=calibration.paths)  # fmt: skip
        # a classifier trained on localiser crops is calibrated and checked on crops
        calibration = replace(calibration, frames=_cropped(calibration.frames, crop))
        check = replace(check, frames=_cropped(check.frames, crop))
        if not check.labels:
            raise EdgebcError(
                f"{options.check_data}: the check set must be labelled (a manifest or class folders), not a video"
            )
        plan = QuantPlan(
            method=options.calibration_method, calibration_size=options.calibration_size
        )  # type: ignore[arg-type]
        int8_path = out / f"{options.name}.int8.onnx"
        quantize = search_int8 if options.int8_search else quantize_int8
        quant = quantize(fp32_path, int8_path, calibration.frames, check.frames, check.labels,
                         plan, check_units=check.units,
                         calibration_ids=[sha256_file(p)[:16] for p in calibration.paths])  # fmt: skip
        report["int8"] = {"path": int8_path.name, **asdict(quant)}
        artifacts.append(int8_path)
    if options.tensorrt:
        from edgebc.backends.tensorrt import build_engine, run_engine
        from edgebc.export.onnx_export import parity_of, run_onnx, verification_feeds

        source = int8_path if options.tensorrt == "int8" else fp32_path
        if source is None:
            raise EdgebcError(
                "--tensorrt int8 needs --int8 in the same export (the engine is built from the QDQ model)"
            )
        engine = build_engine(
            source,
            out / f"{options.name}.{options.tensorrt}.engine",
            options.tensorrt,
            batch=(1, 1, min(8, options.max_batch)),
        )  # type: ignore[arg-type]
        inputs = verification_feeds(card, frames)[card.input_name][:8]
        report["tensorrt"] = {
            "path": engine.name,
            "parity_vs_onnx_fp32": asdict(
                parity_of(run_onnx(fp32_path, inputs), run_engine(engine, inputs), 0.05, card)
            ),
        }
        artifacts.append(engine)
    if options.triton:
        from edgebc.export.triton import write_triton_repository

        folder = write_triton_repository(fp32_path, out / "model_repository", options.name)
        report["triton"] = {"path": str(folder.relative_to(out))}
    atomic_write_text(out / "export.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(out / "export.md", render_markdown(report))
    write_manifest(out, artifacts)
    return report


def _cropped(frames: list[np.ndarray], crop: LesionCrop | None) -> list[np.ndarray]:
    return frames if crop is None else [crop(frame) for frame in frames]


def _ship_localiser(model: Path, localiser: Path, margin: float) -> Path:
    """Copy the localiser the model was trained behind beside it and link the model's card to the
    copy (edgebc.export.localiser_export.link_classifier): the export runs on a cart as trained,
    localise -> crop -> classify, and the two files travel under one MANIFEST."""
    from edgebc.export.localiser_export import link_classifier

    shipped = model.parent / f"{model.stem}.localiser.onnx"
    atomic_write_bytes(shipped, localiser.read_bytes())
    link_classifier(model, shipped, model, margin)
    return shipped


def _run_fusion_export(checkpoint: str | Path, options: ExportOptions) -> dict[str, Any]:
    """The branch graphs and the head, their parity, and the manifest over all of them; with
    `--int8` the INT8 variant (each branch calibrated on its own modality's cases, the head FP32,
    the parity per presence pattern: edgebc.export.fusion_quantize), with `--triton` a repository
    of the branch models, the head and an ensemble taking every input, with `--tensorrt fp16|int8`
    an engine per graph (edgebc.backends.tensorrt.build_fusion_engines: FP16 from the FP32 graphs;
    INT8 from the INT8 variant's QDQ branches, its head FP16), each with its sidecar, checked
    against the ONNX graphs it was built from with every presence pattern. The FP32 export is
    written (report and manifest) before the INT8 variant is tried, so a refused INT8 leaves a
    whole FP32 export. FP16 ONNX and `--verify` are not done for fusion models and are refused
    rather than answered with a part of the model; what is missing (TensorRT, cuda-python, the
    `--int8` an INT8 engine is built from) is refused before anything is written."""
    from edgebc.export.fusion_export import export_fusion

    asked = [flag for flag, on in (("--fp16", options.fp16), ("--verify", options.verify_data))
             if on]  # fmt: skip
    if asked:
        raise EdgebcError(
            f"{checkpoint}: a fusion model exports as FP32 branch and head graphs, with --int8, "
            f"--tensorrt and --triton; {', '.join(asked)} not done for fusion models (export "
            "without them)"
        )
    if options.int8 and (not options.calibration or not options.check_data):
        raise EdgebcError(
            "--int8 needs --calibration and --check: a case manifest (patient_id, modality, view) "
            "whose calibration split calibrates each branch and whose held-out split checks them"
        )
    if options.int8 and options.check_split in (None, options.calibration_split):
        # read_cases takes one split: the check set must be another than calibration's
        raise EdgebcError(
            "a fusion model's --int8 needs --check-split naming a split other than "
            f"--calibration-split ({options.calibration_split}), e.g. --check-split test"
        )
    if options.tensorrt:
        _check_fusion_tensorrt(options)
    Path(options.out_dir).mkdir(parents=True, exist_ok=True)
    exported = export_fusion(checkpoint, options.out_dir, options.name, options.opset,
                             options.max_batch, options.exporter)  # fmt: skip
    parity = exported.parity
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "card": exported.card.to_dict(),
        "onnx": {"path": exported.head.name, "graphs": {g: p.name for g, p in exported.files.items()},
                 "parity_vs_torch": asdict(parity.end_to_end["+".join(exported.layout.order)]),
                 "fusion_parity_vs_torch": asdict(parity)},
    }  # fmt: skip
    out = Path(options.out_dir)
    artifacts = list(exported.files.values())
    _write_report(out, report, artifacts)
    if options.int8:
        from edgebc.export.fusion_quantize import quantize_fusion, read_cases
        from edgebc.export.quantize import QuantPlan

        card = exported.card
        calibration = read_cases(options.calibration, options.calibration_split, card,
                                 options.calibration_size)  # fmt: skip
        check = read_cases(options.check_data, options.check_split, card,
                           options.check_count if options.check_count > 0 else 1 << 31)  # fmt: skip
        plan = QuantPlan(
            method=options.calibration_method,
            calibration_size=options.calibration_size,
        )
        quant = quantize_fusion(exported.head, out, options.name, calibration, check, plan)
        report["int8"] = {"path": quant.files["head"], **asdict(quant)}
        artifacts += [out / f for f in quant.files.values()]
    if options.tensorrt:
        from edgebc.backends.tensorrt.build import build_fusion_engines
        from edgebc.backends.tensorrt.sidecar import sidecar_path
        from edgebc.export.fusion_export import compare_fusion_engines

        source = out / report["int8"]["path"] if options.tensorrt == "int8" else exported.head
        engines = build_fusion_engines(source, out, options.tensorrt, options.name)  # type: ignore[arg-type]
        engine_parity = compare_fusion_engines(source, engines)
        report["tensorrt"] = {
            "path": engines[HEAD].name, "engines": {g: p.name for g, p in engines.items()},
            "precision": options.tensorrt, "onnx": source.name,
            "fusion_parity_vs_onnx": asdict(engine_parity), "within_tolerance": engine_parity.ok,
        }  # fmt: skip
        artifacts += [f for p in engines.values() for f in (p, sidecar_path(p))]
    if options.triton:
        from edgebc.export.triton import write_fusion_repository

        folder = write_fusion_repository(exported.head, out / "model_repository", options.name)
        report["triton"] = {"path": str(folder.relative_to(out))}
    _write_report(out, report, artifacts)
    return report


def _check_fusion_tensorrt(options: ExportOptions) -> None:
    """What fusion engines need, checked before anything is written: TensorRT and cuda-python
    (building and the parity check run them), and `--int8` for INT8 engines."""
    from edgebc.optional import require

    require("tensorrt", "--tensorrt (building TensorRT engines)")
    require(
        "cuda.bindings.runtime", "--tensorrt (running TensorRT engines: pip install cuda-python)"
    )
    if options.tensorrt == "int8" and not options.int8:
        raise EdgebcError(
            "--tensorrt int8 needs --int8 in the same export: a fusion model's INT8 engines are "
            "built from its INT8 variant's calibrated branch graphs"
        )


def _write_report(out: Path, report: dict[str, Any], artifacts: list[Path]) -> None:
    atomic_write_text(out / "export.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(out / "export.md", render_markdown(report))
    write_manifest(out, artifacts)


def render_markdown(report: dict[str, Any]) -> str:
    card = report["card"]
    lines = [
        f"# Export of {card['arch']} ({report['checkpoint']})",
        "",
        "| artifact | check | result |",
        "|---|---|---|",
    ]
    p = report["onnx"]["parity_vs_torch"]
    lines.append(
        f"| {report['onnx']['path']} | ONNX Runtime vs PyTorch, {p['n']} inputs | max abs logit diff {p['max_abs_logit_diff']:.2e}, decision agreement {p['decision_agreement']:.3f} |"
    )
    fusion = report["onnx"].get("fusion_parity_vs_torch")
    if fusion:
        graphs = report["onnx"]["graphs"]
        for branch, diff in fusion["branches"].items():
            lines.append(
                f"| {graphs[branch]} | {branch} branch embedding, ONNX Runtime vs PyTorch | max abs diff {diff:.2e} |"
            )
        head = fusion["head"]
        lines.append(
            f"| {graphs['head']} | fusion head, every presence pattern | max abs logit diff {head['max_abs_logit_diff']:.2e}, features {fusion['head_features']:.2e} |"
        )
        for present, p in fusion["end_to_end"].items():
            lines.append(
                f"| all graphs | end to end with {present} present | max abs logit diff {p['max_abs_logit_diff']:.2e}, decision agreement {p['decision_agreement']:.3f} |"
            )
    if "fp16" in report:
        p = report["fp16"]["parity_vs_fp32"]
        lines.append(
            f"| {report['fp16']['path']} | FP16 vs FP32 | max abs logit diff {p['max_abs_logit_diff']:.2e}, decision agreement {p['decision_agreement']:.3f} |"
        )
    if "int8" in report and "patterns" in report["int8"]:
        lines += _fusion_int8_rows(report["int8"])
    elif "int8" in report:
        q = report["int8"]
        lines.append(
            f"| {q['path']} | INT8 vs FP32 on the check set | agreement {q['agreement']:.3f}, AUC {q['fp32']['auc_positive']:.3f} -> {q['int8']['auc_positive']:.3f}, budget {'met' if q['budget_met'] else 'NOT met'} |"
        )
        if q.get("latency_ms"):
            lines.append(
                f"| | latency, batch 1, 1 thread | FP32 {q['latency_ms']['fp32']:.2f} ms, INT8 {q['latency_ms']['int8']:.2f} ms |"
            )
        lines += ["", f"Recommendation: {q['recommendation']}"]
        if q["excluded_nodes"]:
            lines.append(f"Kept in float to meet the budget: {', '.join(q['excluded_nodes'])}")
    if "tensorrt" in report and "fusion_parity_vs_onnx" in report["tensorrt"]:
        lines += _fusion_tensorrt_rows(report["tensorrt"])
    elif "tensorrt" in report:
        p = report["tensorrt"]["parity_vs_onnx_fp32"]
        lines.append(
            f"| {report['tensorrt']['path']} | TensorRT vs ONNX FP32 | max abs logit diff {p['max_abs_logit_diff']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def _fusion_int8_rows(q: dict[str, Any]) -> list[str]:
    """The fusion INT8 parity: each branch's embedding error, each presence pattern's decisions."""
    rows = []
    for branch, e in q["branches"].items():
        rows.append(
            f"| {q['files'][branch]} | {branch} branch INT8 vs FP32 embedding, {e['rows']} held-out rows | max abs diff {e['max_abs_diff']:.3g}, relative RMS {e['relative_rms']:.3g}, {len(e['excluded_nodes'])} nodes kept in float |"
        )
    for pattern, p in q["patterns"].items():
        rows.append(
            f"| {q['files']['head']} (FP32 head) | end to end with {pattern} present, {p['n']} held-out instances | agreement {p['agreement']:.3f}, AUC {p['fp32']['auc_positive']:.3f} -> {p['int8']['auc_positive']:.3f}, budget {'met' if p['budget_met'] else 'NOT met'} |"
        )
    return rows


def _fusion_tensorrt_rows(t: dict[str, Any]) -> list[str]:
    """The fusion engines against the ONNX graphs they were built from."""
    parity = t["fusion_parity_vs_onnx"]
    rows = [
        f"| {t['engines'][branch]} | {branch} branch embedding, TensorRT vs {t['onnx']} graphs | max abs diff {diff:.2e} |"
        for branch, diff in parity["branches"].items()
    ]
    head = parity["head"]
    rows.append(
        f"| {t['path']} | fusion head (FP16), every presence pattern | max abs logit diff {head['max_abs_logit_diff']:.2e}, features {parity['head_features']:.2e} |"
    )
    for present, p in parity["end_to_end"].items():
        rows.append(
            f"| all engines | end to end with {present} present, vs ONNX | max abs logit diff {p['max_abs_logit_diff']:.2e}, decision agreement {p['decision_agreement']:.3f} |"
        )
    if not t["within_tolerance"]:
        rows += [
            "",
            f"TensorRT differs from ONNX by more than {parity['tolerance']}: check before deploying the engines.",
        ]
    return rows
