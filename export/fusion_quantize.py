"""INT8 for a fusion model: each branch calibrated on its own modality, the whole path checked per
presence pattern against FP32 on held-out cases, refused when the decision budget is broken.

Each branch graph (edgebc.fusion_graphs) is quantized by the single-model machinery
(edgebc.export.quantize: static QDQ, per-node SQNR, nodes kept in float to meet the budget) with
calibration rows of that branch's modality only: the ultrasound branch on the calibration cases'
ultrasound images, the mammogram branch on their mammogram views (a multi-view branch on each
case's view set, absent views zeros and marked so), each through its card input's preprocessing
(edgebc.data.sample_image.sample_input, what training reads). A branch calibrated on the other
modality's images would take scales from intensities it never sees.

The head stays FP32. It is a few small matrix products over embeddings (no backbone), so INT8
would save almost nothing per frame, while its input is exactly where the branches' quantization
error arrives and its presence mask switches modalities on and off: quantizing it would add a
second error on top of the first in the one place every decision passes through. The INT8
variant's head is the FP32 head's graph with the variant's layout (its branch files) in it.

The parity report: per branch, how far the INT8 embedding is from the FP32 one on the check rows;
end to end, the INT8 branches into the FP32 head against the FP32 graphs, with every branch present
and with each alone (`us+mg`, `us`, `mg`), each instance (a case's ultrasound image with its views,
as training cross-combines them; a case's views alone for `mg`) scored with the card's rule:
decision agreement, AUC and sensitivity at the card's threshold. Every pattern must meet the
budget (edgebc.export.quantize.QuantPlan); otherwise no INT8 file is written and the export says
which pattern broke it by how much.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.atomic import atomic_write_bytes
from edgebc.data import read_dataset
from edgebc.data.records import Sample
from edgebc.data.sample_image import sample_input
from edgebc.errors import EdgebcError
from edgebc.export.fusion_export import describe_graph
from edgebc.export.onnx_export import run_onnx
from edgebc.export.quantize import (
    QuantPlan,
    _clinical,
    _decisions_agree,
    _within_budget,
    node_sqnr,
    prepared_for_quantization,
    quantize_pass,
)
from edgebc.fusion_graphs import HEAD, FusionLayout, embedding_name, view_presence_name
from edgebc.model_card import ModelCard, read_card
from edgebc.optional import require

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class CaseImages:
    """One case's model inputs: its ultrasound images' tensors and its mammogram views' by input."""

    label: str
    ultrasound: tuple[np.ndarray, ...]
    mammograms: Mapping[str, np.ndarray]


@dataclass
class FusionQuantReport:
    plan: dict[str, Any]
    files: dict[str, str]  # graph -> file of the INT8 variant (the head is FP32)
    calibration_rows: dict[str, int]  # branch -> calibration rows of its modality
    check_cases: int
    branches: dict[str, dict[str, Any]]  # branch -> embedding error, excluded and sensitive nodes
    patterns: dict[str, dict[str, Any]]  # "us+mg", "us", "mg" -> n, fp32, int8, agreement, met
    budget_met: bool
    attempts: list[dict[str, Any]] = field(default_factory=list)
    check_labels_left_out: dict[str, int] = field(default_factory=dict)


def int8_files(name: str, order: Sequence[str]) -> dict[str, str]:
    """The INT8 variant's files: `<name>.int8.onnx` (the head, the file to name) and a branch
    file each, beside the FP32 ones."""
    return {**{n: f"{name}.int8.{n}.onnx" for n in order}, HEAD: f"{name}.int8.onnx"}


def read_cases(source: str | Path, split: str | None, card: ModelCard, limit: int,
               seed: int = 0) -> list[CaseImages]:  # fmt: skip
    """Up to `limit` cases (seeded random order) of a case manifest's `split`, each image through
    its card input's preprocessing, mammograms fed to the input of their view."""
    from edgebc.train.fusion_data import group_fusion_cases

    ultrasound = [i for i in card.inputs if i.modality == "us"]
    mammography = [i for i in card.inputs if i.modality == "mg"]
    if len(ultrasound) != 1 or any(i.view is None for i in mammography):
        raise EdgebcError(
            f"model {card.name}: fusion INT8 calibrates one ultrasound input and mammogram inputs "
            f"named by their view; its inputs are {[(i.name, i.modality, i.view) for i in card.inputs]}"
        )
    samples: list[Sample] = read_dataset(source)
    if split:
        samples = [s for s in samples if s.split == split]
    by_view = {str(i.view): i for i in mammography}
    cases = group_fusion_cases(samples, list(by_view)) if samples else []
    if not cases:
        raise EdgebcError(
            f"{source}: no fusion case{f' in split {split!r}' if split else ''} (a case manifest "
            "with patient_id, modality and view columns) to calibrate or check the INT8 graphs on"
        )
    order = np.random.default_rng(seed).permutation(len(cases))[:limit]
    us = ultrasound[0]
    chosen = [cases[k] for k in order]
    return [
        CaseImages(
            case.label,
            tuple(sample_input(s, us.preprocess) for s in case.ultrasound),
            {
                by_view[v].name: sample_input(s, by_view[v].preprocess)
                for v, s in case.mammograms.items()
            },
        )
        for case in chosen
    ]


def branch_rows(layout: FusionLayout, branch: str, card: ModelCard,
                cases: Sequence[CaseImages]) -> tuple[Feeds, list[tuple[int, int | None]]]:  # fmt: skip
    """A branch graph's rows over `cases` and whose each row is, (case, ultrasound image or None):
    the ultrasound branch one row per image; a mammogram branch one row per case holding any of
    its inputs (a multi-view branch with absent views as zeros and its views' presence)."""
    names = layout.branches[branch]
    shapes = {i.name: i.shape for i in card.inputs}
    modality = {i.name: i.modality for i in card.inputs}
    if modality[names[0]] == "us":
        keys = [(c, k) for c, case in enumerate(cases) for k in range(len(case.ultrasound))]
        stacked = [cases[c].ultrasound[k] for c, k in keys if k is not None]
        empty = np.empty((0, *shapes[names[0]]), np.float32)
        return {names[0]: np.stack(stacked) if stacked else empty}, list(keys)
    rows = [c for c, case in enumerate(cases) if any(n in case.mammograms for n in names)]
    feeds: Feeds = {
        n: np.stack([cases[c].mammograms.get(n, np.zeros(shapes[n], np.float32)) for c in rows])
        if rows else np.empty((0, *shapes[n]), np.float32)
        for n in names
    }  # fmt: skip
    if len(names) > 1:
        feeds[view_presence_name(branch)] = np.array(
            [[n in cases[c].mammograms for n in names] for c in rows], np.float32
        ).reshape(len(rows), len(names))
    return feeds, [(c, None) for c in rows]


def quantize_fusion(
    head_path: str | Path,
    out_dir: str | Path,
    name: str,
    calibration: Sequence[CaseImages],
    check: Sequence[CaseImages],
    plan: QuantPlan | None = None,
) -> FusionQuantReport:
    """Quantize every branch of the FP32 fusion export whose head is `head_path` into `out_dir`
    (files by `int8_files`), or raise EdgebcError and write nothing when the budget is broken."""
    onnx = require("onnx", "INT8 quantization")
    from edgebc.fusion_graphs import read_layout

    plan = plan or QuantPlan()
    head_path = Path(head_path)
    layout, card = read_layout(head_path), read_card(head_path)
    if layout is None:
        raise EdgebcError(f"{head_path}: not the head of an exported fusion model")
    keep, left_out = card.task.partition([c.label for c in check], "INT8 check labels")
    check = [c for c, kept in zip(check, keep, strict=True) if kept]
    if not check:
        raise EdgebcError("fusion INT8 needs held-out cases of the model's task to check against")
    fp32 = {g: head_path.parent / f for g, f in layout.files.items()}
    calib = {b: branch_rows(layout, b, card, calibration)[0] for b in layout.order}
    empty = [b for b, feeds in calib.items() if len(next(iter(feeds.values()))) == 0]
    if empty:
        raise EdgebcError(
            f"no calibration image of the {', '.join(empty)} branch's modality among the "
            "calibration cases; each branch is calibrated on its own modality"
        )
    rows = {b: branch_rows(layout, b, card, check) for b in layout.order}
    unseen = [b for b, (_, keys) in rows.items() if not keys]
    if unseen:
        raise EdgebcError(
            f"no held-out image of the {', '.join(unseen)} branch's modality among the check "
            "cases; the INT8 parity is measured on every branch"
        )
    reference = {b: _embed(fp32[b], b, rows[b][0]) for b in layout.order}
    files = int8_files(name, layout.order)
    variant = replace(layout, files=files)
    excluded: dict[str, list[str]] = {b: [] for b in layout.order}
    sensitive: dict[str, list[dict[str, Any]]] = {}
    attempts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        prepared = {b: prepared_for_quantization(fp32[b], scratch) for b in layout.order}
        candidate = {b: scratch / f"int8-{b}.onnx" for b in layout.order}
        while True:
            for b in layout.order:
                quantize_pass(prepared[b], candidate[b], calib[b], plan, excluded[b])
                if b not in sensitive:  # the ranking the exclusion steps follow
                    first = {k: v[:16] for k, v in calib[b].items()}
                    sensitive[b] = node_sqnr(prepared[b], candidate[b], first)
            embedded = {b: _embed(candidate[b], b, rows[b][0]) for b in layout.order}
            patterns = _patterns(fp32[HEAD], layout, card, check, rows, reference, embedded, plan)
            missing = {k: p["n"] for k, p in patterns.items() if "missing" in p}
            if missing:  # no exclusion of nodes can make up for cases the check set lacks
                raise EdgebcError(
                    f"{head_path}: the check set cannot judge INT8 with inputs {sorted(missing)} "
                    f"(instances: {missing}): it holds no cases of both classes with them, so "
                    "that path would ship unchecked; check on paired cases of both classes (no "
                    "INT8 graph written, keep FP32)"
                )
            met = all(p["budget_met"] for p in patterns.values())
            attempts.append({"excluded": {b: len(v) for b, v in excluded.items()},
                             **{k: p["agreement"] for k, p in patterns.items()}, "budget_met": met})  # fmt: skip
            if met or max(map(len, excluded.values())) >= plan.max_excluded_nodes:
                break
            if not _exclude_more(excluded, sensitive):
                break
            log.info("fusion INT8 misses the budget; keeping %s nodes in float and retrying",
                     {b: len(v) for b, v in excluded.items()})  # fmt: skip
        report = FusionQuantReport(
            plan=asdict(plan), files=files,
            calibration_rows={b: len(next(iter(f.values()))) for b, f in calib.items()},
            check_cases=len(check),
            branches={b: {**_embedding_error(reference[b], embedded[b]),
                          "excluded_nodes": excluded[b], "sensitive_nodes": sensitive[b][:5]}
                      for b in layout.order},
            patterns=patterns, budget_met=met, attempts=attempts, check_labels_left_out=left_out,
        )  # fmt: skip
        if not met:
            broken = {k: (round(p["agreement"], 4), p["fp32"]["auc_positive"], p["int8"]["auc_positive"])
                      for k, p in patterns.items() if not p["budget_met"]}  # fmt: skip
            raise EdgebcError(
                f"{head_path}: the INT8 branches break the decision budget (agreement >= "
                f"{plan.min_agreement}, AUC drop <= {plan.max_auc_drop}) with {broken} "
                "(pattern: agreement, FP32 AUC, INT8 AUC); no INT8 graph written, keep FP32"
            )
        quantization = {**asdict(plan), "graphs": {**{b: "int8" for b in layout.order}, HEAD: "fp32"},
                        "calibration_rows": report.calibration_rows,
                        "excluded_nodes": excluded}  # fmt: skip
        variant_card = replace(
            card, precision="int8", name=f"{name}.int8", quantization=quantization
        )
        out = Path(out_dir)
        for graph in [*layout.order, HEAD]:
            proto = onnx.load(str(candidate[graph] if graph != HEAD else fp32[HEAD]))
            describe_graph(variant_card, variant.for_graph(graph))(proto)
            atomic_write_bytes(out / files[graph], proto.SerializeToString())
    return report


def _embed(path: Path, branch: str, feeds: Feeds) -> np.ndarray:
    return run_onnx(path, feeds, embedding_name(branch))


def _embedding_error(fp32: np.ndarray, int8: np.ndarray) -> dict[str, float]:
    """How far the INT8 embeddings are from FP32: largest and mean absolute difference, and the
    difference's size relative to the embedding's (root mean square over rows)."""
    diff = int8.astype(np.float64) - fp32
    relative = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(fp32, axis=1), 1e-12)
    return {"max_abs_diff": float(np.abs(diff).max()), "mean_abs_diff": float(np.abs(diff).mean()),
            "relative_rms": float(np.sqrt(np.mean(relative**2))), "rows": len(fp32)}  # fmt: skip


def _patterns(head: Path, layout: FusionLayout, card: ModelCard, cases: Sequence[CaseImages],
              rows: Mapping[str, tuple[Feeds, list[tuple[int, int | None]]]],
              reference: Mapping[str, np.ndarray], embedded: Mapping[str, np.ndarray],
              plan: QuantPlan) -> dict[str, dict[str, Any]]:  # fmt: skip
    """INT8 branches into the FP32 head against the FP32 graphs, with every branch present and with
    each alone: the instances where all the pattern's branches have a row (a case's ultrasound
    images each with its views, as training cross-combines them; the views alone once per case)."""
    frame = next(b for b in layout.order if rows[b][1][0][1] is not None)  # the ultrasound branch

    def key_in(branch: str, key: tuple[int, int | None]) -> tuple[int, int | None]:
        return key if branch == frame else (key[0], None)

    index = {b: {key: r for r, key in enumerate(rows[b][1])} for b in layout.order}
    out = {}
    for present in [tuple(layout.order), *((b,) for b in layout.order)]:
        first = frame if frame in present else present[0]
        keys = [k for k in rows[first][1] if all(key_in(b, k) in index[b] for b in present)]
        labels = card.task.encode([cases[c].label for c, _ in keys])
        if len(set(labels.tolist())) < 2:
            # a pattern the device will meet and the check set cannot speak for is not passed
            # unseen: an unpaired check set would otherwise never compare the fused path
            out["+".join(present)] = {
                "n": len(keys), "budget_met": False,
                "missing": "the check set holds no cases of both classes with these inputs",
            }  # fmt: skip
            continue
        picked = {b: [index[b][key_in(b, k)] for k in keys] for b in present}
        mask = np.array([[b in present for b in layout.order]] * len(keys), np.float32)
        logits = [
            run_onnx(head, _head_feeds(layout, picked, embeddings, mask), card.output_name)
            for embeddings in (reference, embedded)
        ]
        fp32, int8 = _clinical(logits[0], labels, card), _clinical(logits[1], labels, card)
        agreement = _decisions_agree(logits[0], logits[1], card)
        out["+".join(present)] = {"n": len(keys), "fp32": fp32, "int8": int8, "agreement": agreement,
                                  "budget_met": _within_budget(fp32, int8, agreement, plan)}  # fmt: skip
    return out


def _head_feeds(layout: FusionLayout, picked: Mapping[str, list[int]],
                embeddings: Mapping[str, np.ndarray], mask: np.ndarray) -> Feeds:  # fmt: skip
    """The head's feeds: each present branch's picked embedding rows, an absent one zeros (as the
    device feeds it), and the presence mask."""
    feeds: Feeds = {
        embedding_name(b): embeddings[b][picked[b]].astype(np.float32) if b in picked
        else np.zeros((len(mask), layout.width), np.float32)
        for b in layout.order
    }  # fmt: skip
    return {**feeds, layout.presence: mask}


def _exclude_more(
    excluded: dict[str, list[str]], sensitive: Mapping[str, list[dict[str, Any]]]
) -> bool:
    """Keep the next least accurate nodes of every branch in float (1, 2, 4, ... at a time, as
    the single-model search does); False when nothing is left to keep."""
    grew = False
    for branch, ranked in sensitive.items():
        step = max(1, len(excluded[branch]))
        remaining = [s["nodes"] for s in ranked if not set(s["nodes"]) <= set(excluded[branch])]
        for nodes in remaining[:step]:
            excluded[branch] += [n for n in nodes if n not in excluded[branch]]
            grew = True
    return grew
