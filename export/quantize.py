"""INT8 with evidence: static post-training quantization that proves it kept the accuracy.

ONNX Runtime static quantization (QDQ, per-channel int8 weights) calibrated on real frames that
went through the shared preprocessing, with MinMax, Entropy or Percentile calibration. Then a
parity report on a labelled set: FP32 vs INT8 agreement of the decisions the cart shows (the card's rule and threshold), malignant-vs-rest AUC and
sensitivity at the card's threshold for both, probability differences, and per-node SQNR
(signal-to-quantization-noise, dB) to find the nodes that lose most. The accuracy budget is the
statistical one every reduced precision passes (edgebc.precision_budget: one-sided confidence
bounds on decision agreement, the paired AUC drop and the paired sensitivity drop, with the
binding criterion named), judged on every labelled check frame given — `edgebc export` gives
every labelled frame not used for calibration. When the budget is missed, the least accurate
nodes stay in float and quantization is retried; what was excluded is reported. Latency of both
on this machine is part of the evidence.

On x86, ONNX Runtime's fast int8 kernels (VNNI) take uint8 activations with int8 weights (U8S8),
so that is the default here; S8S8 is an option.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgebc import metrics
from edgebc.atomic import atomic_write_bytes
from edgebc.decision import DecisionRule
from edgebc.errors import EdgebcError
from edgebc.export.onnx_export import run_onnx
from edgebc.model_card import ModelCard, read_card
from edgebc.optional import require
from edgebc.precision_budget import PrecisionBudget, judge
from edgebc.preprocess import preprocess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantPlan:
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_size: int = 200
    per_channel: bool = True
    activations: Literal["uint8", "int8"] = "uint8"
    format: Literal["qdq", "qoperator"] = "qdq"
    budget: PrecisionBudget = field(
        default_factory=PrecisionBudget
    )  # a one-input model's budget (precision_budget)
    # The fusion path's point budget (export/fusion_quantize.py), until it is judged by `budget`.
    min_agreement: float = 0.99
    max_auc_drop: float = 0.01
    max_sensitivity_drop: float = 0.01
    max_excluded_nodes: int = 32
    seed: int = 0


@dataclass
class QuantReport:
    plan: dict[str, Any]
    calibration_frames: int
    fp32: dict[str, float]
    int8: dict[str, float]
    agreement: float
    max_prob_diff: float
    mean_prob_diff: float
    budget_met: bool
    excluded_nodes: list[str]
    attempts: list[dict[str, Any]]
    sensitive_nodes: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    recommendation: str = ""
    check_frames: int = 0
    check_labels_left_out: dict[str, int] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)  # the last verdict (precision_budget)
    binding: str = ""  # the criterion that bound it


class _Reader:
    """ONNX Runtime CalibrationDataReader over preprocessed inputs, one row per batch: `feeds` maps
    each input name to its (N, ...) array (one input for a classifier; a fusion branch's views and
    their presence together)."""

    def __init__(self, feeds: Mapping[str, np.ndarray]) -> None:
        self.feeds = dict(feeds)
        self.rows = len(next(iter(self.feeds.values())))
        self._iter: Iterator[int] = iter(range(self.rows))

    def get_next(self) -> dict[str, np.ndarray] | None:
        row = next(self._iter, None)
        return None if row is None else {k: v[row : row + 1] for k, v in self.feeds.items()}

    def rewind(self) -> None:
        self._iter = iter(range(self.rows))

    def __iter__(self) -> _Reader:  # the QDQ debugging helpers iterate readers directly
        self.rewind()
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def prepared_for_quantization(fp32_path: str | Path, scratch: Path) -> Path:
    """The FP32 graph after ONNX Runtime's quantization pre-processing (shape inference, fusions),
    or the graph as it is when that fails (pre-processing is an optimisation)."""
    from onnxruntime import quantization as q

    prepared = scratch / f"prepared-{Path(fp32_path).stem}.onnx"
    try:
        q.quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    except Exception as exc:  # any failure of the optimisation leaves the original graph usable
        log.warning(
            "quantization pre-processing failed (%s); quantizing the exported graph as is", exc
        )
        prepared = Path(fp32_path)
    return named_nodes(prepared, scratch / f"named-{Path(fp32_path).stem}.onnx")


def named_nodes(model: Path, out: Path) -> Path:
    """`model` with every node named: the pre-processing's fusions leave nodes unnamed (39 of a
    MobileNetV3-Small's HardSigmoid/Mul), and an unnamed node can be neither excluded from
    quantization nor reported (the kept-in-float list showed an empty name). Unnamed nodes get
    `<op>_unnamed_<index>`; `model` itself is returned when every node has a name."""
    onnx = require("onnx", "INT8 quantization")
    graph = onnx.load(str(model))
    taken = {node.name for node in graph.graph.node}
    unnamed = [node for node in graph.graph.node if not node.name]
    if not unnamed:
        return model
    for index, node in enumerate(graph.graph.node):
        if not node.name:
            name = f"{node.op_type}_unnamed_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    onnx.save(graph, str(out))
    return out


def quantize_pass(prepared: Path, out: Path, calibration: Mapping[str, np.ndarray], plan: QuantPlan,
                  excluded: Sequence[str] = (), quant_format: str | None = None) -> None:  # fmt: skip
    """One static quantization of `prepared` into `out`, calibrated on `calibration` (input name
    -> rows), with `plan`'s method, format and types, `excluded` nodes left in float."""
    from onnxruntime import quantization as q

    method = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
              "percentile": q.CalibrationMethod.Percentile}[plan.method]  # fmt: skip
    activation = q.QuantType.QUInt8 if plan.activations == "uint8" else q.QuantType.QInt8
    chosen = quant_format or plan.format
    q.quantize_static(str(prepared), str(out), _Reader(calibration),
                      quant_format=q.QuantFormat.QDQ if chosen == "qdq" else q.QuantFormat.QOperator,
                      per_channel=plan.per_channel, activation_type=activation, weight_type=q.QuantType.QInt8,
                      calibrate_method=method, nodes_to_exclude=list(excluded),
                      extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})  # fmt: skip


@dataclass(frozen=True)
class PreparedCheck:
    """What every INT8 pass of one FP32 model is judged on, independent of the INT8 format: the
    calibration and check frames through the card's preprocessing, the check labels on the card's
    task, and FP32's answers on them; `graph`, when set, the FP32 graph already pre-processed
    for quantization (prepared_for_quantization). search_int8 makes it once for its formats (each
    format made it again: the whole check set's preprocessing and FP32 run, three times)."""

    card: ModelCard
    calibration: np.ndarray
    check: np.ndarray
    truth: np.ndarray
    units: list[str] | None
    left_out: dict[str, int]
    fp32_logits: np.ndarray
    fp32_stats: dict[str, float]
    graph: Path | None = None


def prepare_check(
    fp32_path: str | Path,
    calibration: Sequence[np.ndarray],
    check_frames: Sequence[np.ndarray],
    check_labels: Sequence[str],
    check_units: Sequence[str] | None = None,
) -> PreparedCheck:
    """The frames of an INT8 check prepared once (PreparedCheck); the check set is scored on the
    model's task: labels it leaves out are counted, not scored."""
    card = read_card(fp32_path)
    keep, left_out = card.task.partition(list(check_labels), "INT8 check labels")
    kept_frames = [f for f, kept in zip(check_frames, keep, strict=True) if kept]
    if len(calibration) == 0 or not kept_frames:
        raise EdgebcError(
            "INT8 quantization needs calibration frames and labelled frames of the model's task to check against"
        )
    calib = np.stack([preprocess(f, card.preprocess)[0] for f in calibration])
    check = np.stack([preprocess(f, card.preprocess)[0] for f in kept_frames])
    truth = card.task.encode(
        [label for label, kept in zip(check_labels, keep, strict=True) if kept]
    )
    units = None
    if check_units is not None:
        units = [u for u, kept in zip(check_units, keep, strict=True) if kept]
    fp32_logits = run_onnx(fp32_path, check)
    return PreparedCheck(card, calib, check, truth, units, left_out, fp32_logits,
                         _clinical(fp32_logits, truth, card))  # fmt: skip


def quantize_int8(
    fp32_path: str | Path,
    out: str | Path,
    calibration: Sequence[np.ndarray],
    check_frames: Sequence[np.ndarray],
    check_labels: Sequence[str],
    plan: QuantPlan = QuantPlan(),
    check_units: Sequence[str] | None = None,
    calibration_ids: Sequence[str] = (),
    prepared: PreparedCheck | None = None,
) -> QuantReport:
    """Write an INT8 QDQ model to `out` that meets `plan`'s accuracy budget, or say it could not.
    `check_units` names each check frame's patient where patients repeat (clustered bounds);
    `calibration_ids` (the calibration files' sha256, 16 hex digits) go into the card, so a
    deployment plan made later leaves those frames out of its check set. `prepared`: the same
    frames already prepared by `prepare_check` (search_int8 prepares them once for every format)."""
    require("onnx", "INT8 quantization")
    if prepared is None:
        prepared = prepare_check(fp32_path, calibration, check_frames, check_labels, check_units)
    card, calib, check, y, units = (prepared.card, prepared.calibration, prepared.check,
                                    prepared.truth, prepared.units)  # fmt: skip
    fp32_logits, fp32_stats = prepared.fp32_logits, prepared.fp32_stats
    excluded: list[str] = []
    attempts: list[dict[str, Any]] = []
    sensitive: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        graph_in = prepared.graph or prepared_for_quantization(fp32_path, Path(scratch))
        candidate = Path(scratch) / "int8.onnx"
        calibration_feeds = {card.input_name: calib}
        while True:
            quantize_pass(graph_in, candidate, calibration_feeds, plan, excluded)
            int8_logits = run_onnx(candidate, check)
            int8_stats = _clinical(int8_logits, y, card)
            verdict = judge(fp32_logits, int8_logits, y, card, units, plan.budget)
            met = verdict.allowed
            attempts.append(
                {
                    "excluded": len(excluded),
                    "agreement": verdict.agreement,
                    **{f"int8_{k}": v for k, v in int8_stats.items()},
                    "budget_met": met,
                    "binding": verdict.binding,
                    "verdict": verdict.summary(),
                }
            )
            if not sensitive:  # part of every report, and the ranking the exclusion loop follows
                if plan.format == "qdq":
                    sensitive = node_sqnr(graph_in, candidate, _rows(calibration_feeds, 16))
                else:  # per-node SQNR is measured on a QDQ build (QOperator hides the floats)
                    qdq = Path(scratch) / "sensitivity.onnx"
                    quantize_pass(graph_in, qdq, calibration_feeds, plan, quant_format="qdq")
                    sensitive = node_sqnr(graph_in, qdq, _rows(calibration_feeds, 16))
            if met or len(excluded) >= plan.max_excluded_nodes:
                break
            step = max(1, len(excluded))  # exclude 1, 2, 4, 8, ... of the least accurate nodes
            remaining = [s["nodes"] for s in sensitive if not set(s["nodes"]) <= set(excluded)]
            if not remaining:
                break
            for nodes in remaining[:step]:
                excluded += [n for n in nodes if n not in excluded]
            log.info(
                "INT8 misses the budget (%s); keeping %d nodes in float and retrying",
                verdict.summary(),
                len(excluded),
            )
        graph = require("onnx", "INT8 quantization").load(str(candidate))
    from edgebc.export.onnx_export import embed_card

    embed_card(
        graph,
        replace(
            card,
            precision="int8",
            name=Path(out).stem,
            quantization={
                **asdict(plan),
                "excluded_nodes": excluded,
                "calibration_frames": len(calib),
                "calibration_sha256": sorted(set(calibration_ids)),
                "check_frames": len(check),
                "budget_met": verdict.allowed,
                "budget_verdict": verdict.summary(),
            },
        ),
    )
    atomic_write_bytes(out, graph.SerializeToString())
    fp32_probs, int8_probs = (
        metrics.softmax(fp32_logits, card.temperature),
        metrics.softmax(int8_logits, card.temperature),
    )
    diff = np.abs(fp32_probs - int8_probs)
    return QuantReport(
        plan=asdict(plan), calibration_frames=len(calib), fp32=fp32_stats, int8=int8_stats, agreement=attempts[-1]["agreement"],
        max_prob_diff=float(diff.max()), mean_prob_diff=float(diff.mean()), budget_met=attempts[-1]["budget_met"],
        excluded_nodes=excluded, attempts=attempts, sensitive_nodes=sensitive[:10],
        check_frames=len(check), check_labels_left_out=prepared.left_out, budget=verdict.to_dict(),
        binding=verdict.binding,
    )  # fmt: skip


_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid"}
_QUANTIZED_OPS = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "Concat",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "HardSwish",
    "HardSigmoid",
    "Sigmoid",
    "Resize",
}


def _rows(feeds: Mapping[str, np.ndarray], limit: int) -> dict[str, np.ndarray]:
    return {k: v[:limit] for k, v in feeds.items()}


CANDIDATES: tuple[dict[str, Any], ...] = (
    {"format": "qdq", "per_channel": True},
    {"format": "qdq", "per_channel": False},
    {"format": "qoperator", "per_channel": True},
)


def search_int8(
    fp32_path: str | Path,
    out: str | Path,
    calibration: Sequence[np.ndarray],
    check_frames: Sequence[np.ndarray],
    check_labels: Sequence[str],
    plan: QuantPlan = QuantPlan(),
    candidates: Sequence[dict[str, Any]] = CANDIDATES,
    latency_runs: int = 100,
    check_units: Sequence[str] | None = None,
    calibration_ids: Sequence[str] = (),
) -> QuantReport:
    """Quantize with each candidate format, time each against FP32 on this machine, keep the fastest
    that meets the accuracy budget, and say plainly when none beats FP32."""
    require("onnx", "INT8 quantization")
    out = Path(out)
    tried = []
    with tempfile.TemporaryDirectory() as scratch:
        prepared = replace(
            prepare_check(fp32_path, calibration, check_frames, check_labels, check_units),
            graph=prepared_for_quantization(fp32_path, Path(scratch)),
        )
        for index, options in enumerate(candidates):
            path = Path(scratch) / f"candidate{index}.onnx"
            report = quantize_int8(fp32_path, path, calibration, check_frames, check_labels,
                                   replace(plan, **options), check_units, calibration_ids, prepared)  # fmt: skip
            tried.append((options, path, report))
        card = prepared.card
        shape = (1, *card.input_shape)
        latency = interleaved_latency(
            [Path(fp32_path), *(p for _, p, _ in tried)], shape, latency_runs
        )
        fp32_ms = latency[0]
        rows = [
            {
                **options,
                "latency_ms": ms,
                "speedup_vs_fp32": fp32_ms / ms,
                "budget_met": r.budget_met,
                "agreement": r.agreement,
                "binding": r.binding,
                "excluded_nodes": len(r.excluded_nodes),
            }
            for (options, _, r), ms in zip(tried, latency[1:], strict=True)
        ]
        eligible = [i for i, row in enumerate(rows) if row["budget_met"]] or list(range(len(rows)))
        best = min(eligible, key=lambda i: rows[i]["latency_ms"])
        options, path, report = tried[best]
        atomic_write_bytes(out, path.read_bytes())
    report.latency_ms = {"fp32": fp32_ms, "int8": rows[best]["latency_ms"]}
    report.attempts.append({"format_search": rows})
    faster = rows[best]["speedup_vs_fp32"] > 1.0
    if not report.budget_met:
        report.recommendation = (
            "FP32: no INT8 variant kept accuracy within the budget (see attempts)"
        )
    elif not faster:
        report.recommendation = f"FP32: INT8 is not faster on this machine ({rows[best]['latency_ms']:.2f} ms vs {fp32_ms:.2f} ms FP32)"
    else:
        report.recommendation = f"INT8 ({options['format']}, {'per-channel' if options['per_channel'] else 'per-tensor'}): {rows[best]['speedup_vs_fp32']:.2f}x faster than FP32 within the accuracy budget"
    return report


def interleaved_latency(
    paths: Sequence[Path], shape: tuple[int, ...], runs: int = 100, threads: int = 1
) -> list[float]:
    """Median batch-1 milliseconds of each model, measured round-robin so machine noise hits all alike."""
    import onnxruntime

    sessions = []
    for path in paths:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        sessions.append(
            onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        )
    x = np.random.default_rng(0).normal(0, 1, shape).astype(np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for session, feed in zip(sessions, feeds, strict=True):
        for _ in range(10):
            session.run(None, feed)
    samples: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for index, (session, feed) in enumerate(zip(sessions, feeds, strict=True)):
            start = time.perf_counter()
            session.run(None, feed)
            samples[index].append(time.perf_counter() - start)
    return [float(np.median(s) * 1e3) for s in samples]


def node_sqnr(
    float_model: Path, qdq_model: Path, feeds: Mapping[str, np.ndarray]
) -> list[dict[str, Any]]:
    """Per quantizable node: SQNR (dB) of its output in the INT8 model against the FP32 model, and
    the dB it loses relative to its inputs (its own contribution), worst contributor first."""
    onnx = require("onnx", "INT8 quantization")
    from onnxruntime.quantization import qdq_loss_debug as debug

    with tempfile.TemporaryDirectory() as scratch:
        float_aug, qdq_aug = Path(scratch) / "float.onnx", Path(scratch) / "qdq.onnx"
        debug.modify_model_output_intermediate_tensors(str(float_model), str(float_aug))
        debug.modify_model_output_intermediate_tensors(str(qdq_model), str(qdq_aug))
        float_acts = debug.collect_activations(str(float_aug), _Reader(feeds))
        qdq_acts = debug.collect_activations(str(qdq_aug), _Reader(feeds))
    errors = debug.compute_activation_error(debug.create_activation_matching(qdq_acts, float_acts))
    sqnr = {
        name: float(e["xmodel_err"])
        for name, e in errors.items()
        if "xmodel_err" in e and np.isfinite(e["xmodel_err"])
    }
    graph = onnx.load(str(float_model)).graph
    producer = {output: node for node in graph.node for output in node.output}

    def upstream_sqnr(tensor: str, depth: int = 4) -> float:
        """SQNR of the nearest measured tensor feeding `tensor` (graph inputs arrive exact)."""
        if tensor in sqnr:
            return sqnr[tensor]
        node = producer.get(tensor)
        if node is None or depth == 0:
            return 120.0
        return min(
            (upstream_sqnr(i, depth - 1) for i in node.input if i in producer or i in sqnr),
            default=120.0,
        )

    rows = []
    for tensor, value in sqnr.items():
        node = producer.get(tensor)
        if node is None:
            continue
        # A fused block (Conv/Gemm followed by its activation) is quantized as one: exclude both.
        block = [node]
        if (
            node.op_type in _ACTIVATIONS
            and node.input
            and node.input[0] in producer
            and producer[node.input[0]].op_type in _QUANTIZED_OPS
        ):
            block.insert(0, producer[node.input[0]])
        if not any(n.op_type in _QUANTIZED_OPS for n in block):
            continue
        incoming = min(
            (upstream_sqnr(i) for i in block[0].input if i in producer or i in sqnr), default=120.0
        )
        rows.append(
            {
                "nodes": [n.name for n in block],
                "op": "+".join(n.op_type for n in block),
                "tensor": tensor,
                "sqnr_db": value,
                "loss_db": incoming - value,
            }
        )
    return sorted(rows, key=lambda r: -r["loss_db"])


def _clinical(logits: np.ndarray, y: np.ndarray, card: ModelCard) -> dict[str, float]:
    """The INT8 budget's figures, scored with the card's own decision rule (what the cart shows)."""
    scores = metrics.score_predictions(
        metrics.softmax(logits, card.temperature), y, DecisionRule.of(card)
    )
    result = {"accuracy": scores["accuracy"], "auc_positive": scores["auc_positive"]}
    if card.threshold is not None:
        result["sensitivity_at_threshold"] = scores["sensitivity"]
        result["specificity_at_threshold"] = scores["specificity"]
    return result


def _decisions_agree(reference: np.ndarray, candidate: np.ndarray, card: ModelCard) -> float:
    """The share of frames the cart would decide the same with either model's logits."""
    rule = DecisionRule.of(card)
    decided = [rule.indices(metrics.softmax(x, card.temperature)) for x in (reference, candidate)]
    return float(np.mean(decided[0] == decided[1]))


def _within_budget(
    fp32: dict[str, float], int8: dict[str, float], agreement: float, plan: QuantPlan
) -> bool:
    if agreement < plan.min_agreement:
        return False
    if (
        np.isfinite(fp32["auc_positive"])
        and fp32["auc_positive"] - int8["auc_positive"] > plan.max_auc_drop
    ):
        return False
    return not (
        "sensitivity_at_threshold" in fp32
        and fp32["sensitivity_at_threshold"] - int8["sensitivity_at_threshold"]
        > plan.max_sensitivity_drop
    )
