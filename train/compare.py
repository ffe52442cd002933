"""`edgebc compare`: several models scored on the same cases, in the papers' table, tested in pairs.

Each model is scored by the one scoring path (evaluate_with_predictions: the card's decision
rule, metrics.score_predictions), a cross-validation run fold by fold on the folds it validated
on. Models are compared only on identical cases (else it refuses and names the cases that
differ): DeLong's test for the AUC, McNemar's for the decisions at each model's operating point,
both clustered by patient where patients repeat. Beside the accuracy: parameters, ONNX file size
and latency measured here (batch 1, one thread, the runtime's ONNX Runtime backend, models timed
in turn). Papers' own numbers, given by the user, sit in their own column, never mixed in.
"""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgebc import metrics, sysinfo
from edgebc.atomic import atomic_write_text
from edgebc.bench.timing import Variant, time_interleaved
from edgebc.data.sample_image import sample_input
from edgebc.decision import DecisionRule
from edgebc.errors import EdgebcError
from edgebc.optional import require
from edgebc.train import plots
from edgebc.train.compare_report import REPORTED_METRICS, TABLE_METRICS, render_markdown
from edgebc.train.evaluate import Predictions, evaluate_with_predictions

log = logging.getLogger(__name__)

REPORTED_KEYS = ("source", "data", "note", *REPORTED_METRICS)
PARITY_TOLERANCE = 1e-3  # largest probability difference between the scored and the timed model
BLOCK = 5  # consecutive calls per model per timing round (the first untimed: the cache warms)


@dataclass(frozen=True)
class ModelEntry:
    """One model as the user named it: a run folder, its best.pt, an exported .onnx, or a
    cross-validation run folder (with cv_summary.json); and what the user says about its budget."""

    name: str
    path: Path
    reduced_budget: str | None = None
    budget: str | None = None
    hardware: str | None = None


@dataclass
class Scored:
    """A model's reports (one per fold for cross-validation) and its pooled predictions."""

    entry: ModelEntry
    kind: str  # "checkpoint", "onnx" or "cross-validation"
    reports: list[dict[str, Any]]
    predictions: list[Predictions]
    timed_model: Path | None = None  # the checkpoint or .onnx whose speed stands for the row
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> list[Any]:
        return [s for p in self.predictions for s in p.samples]

    @property
    def probs(self) -> np.ndarray:
        return np.concatenate([p.probs for p in self.predictions])

    @property
    def correct(self) -> np.ndarray:
        """Whether each decision (the card's rule, per fold its own card) was right about the
        positive class: called positive exactly where the case is. Models of different tasks (a
        three-class model beside a malignant-vs-rest one) are then judged on the one question
        they share, not each on its own task's accuracy."""
        return np.concatenate([_right_about_positive(p) for p in self.predictions])

    @property
    def positive(self) -> np.ndarray:
        """Whether each case is of the positive class, by the task's own encoding (a derived
        task's positive class, `abnormal` say, is no raw label)."""
        return np.concatenate([p.y == p.card.positive for p in self.predictions])

    @property
    def card(self) -> Any:
        return self.predictions[0].card


def compare_models(
    entries: Sequence[ModelEntry],
    out_dir: str | Path,
    data: str | Path | None = None,
    split: str | None = "test",
    reported: str | Path | None = None,
    n_boot: int = 1000,
    latency_rounds: int = 50,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Score every model, check they saw the same cases, test them in pairs, time them, and write
    comparison.md, comparison.json and roc.png (and each model's own eval report) into out_dir."""
    if len(entries) < 2:
        raise EdgebcError(f"compare needs at least two models, got {len(entries)}")
    if n_boot < 1:
        raise EdgebcError(f"the table's 95% intervals need bootstrap resamples, got {n_boot}")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise EdgebcError(f"model names must differ, got {names}: name them NAME=PATH")
    reported_rows = read_reported(reported, names) if reported else {}
    if any(_needs_torch(e.path) for e in entries):  # before anything is scored
        require("torch", "scoring a checkpoint in edgebc compare (.onnx models need no torch)")
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="edgebc-compare-") as scratch:
        scored = [
            _score_entry(e, Path(scratch) / e.name, data, split, n_boot, device, seed)
            for e in entries
        ]
        cases = check_same_cases(scored)  # refuses before anything is written
        latency = measure_latency(scored, Path(scratch) / "onnx", latency_rounds)
        out.mkdir(parents=True, exist_ok=True)
        for s in scored:
            shutil.copytree(
                Path(scratch) / s.entry.name, out / "models" / s.entry.name, dirs_exist_ok=True
            )
    rows = [_row(s, latency.get(s.entry.name, {}), reported_rows.get(s.entry.name)) for s in scored]
    clusters = [s.unit for s in scored[0].samples]
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": {
            "cpu": sysinfo.cpu_description(),
            "onnxruntime": sysinfo._version("onnxruntime"),
        },
        "latency_protocol": f"batch 1, one thread, ONNX Runtime CPU, {latency_rounds} rounds, models "
        f"timed in turn, {BLOCK} consecutive calls each (the first untimed), A B C A B C, after each one's outputs were checked against its scored ones",
        "cases": cases,
        "rows": rows,
        "paired": paired_tests(scored, clusters),
    }
    _roc(scored, out / "roc.png")
    atomic_write_text(out / "comparison.json", json.dumps(report, indent=2, default=_json) + "\n")
    atomic_write_text(out / "comparison.md", render_markdown(report))
    return report


def _needs_torch(path: Path) -> bool:
    return path.suffix.lower() != ".onnx"


def _json(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def _score_entry(entry: ModelEntry, scratch: Path, data: str | Path | None, split: str | None,
                 n_boot: int, device: str, seed: int) -> Scored:  # fmt: skip
    path = entry.path
    if not path.exists():
        raise EdgebcError(f"{path}: no such run folder or model file ({entry.name})")
    if path.is_dir() and (path / "cv_summary.json").is_file():
        return _score_cross_validation(entry, scratch, n_boot, device, seed)
    model = path / "best.pt" if path.is_dir() else path
    if not model.is_file():
        raise EdgebcError(f"{path}: expected a run folder with best.pt, a .pt, an .onnx or a "
                          "cross-validation folder with cv_summary.json")  # fmt: skip
    kind = "onnx" if model.suffix.lower() == ".onnx" else "checkpoint"
    if data is None:
        if kind == "onnx":
            raise EdgebcError(
                f"{model}: an exported model needs a labelled set: pass --data MANIFEST"
            )
        data = _run_config(model.parent).get("data", {}).get("manifest")
        if not data:
            raise EdgebcError(f"{model}: no config.yaml beside it naming its manifest: pass --data")
    report, predictions = evaluate_with_predictions(
        model, data, scratch, split, n_boot, gradcam_per_kind=0, device=device, seed=seed
    )
    return Scored(
        entry, kind, [report], [predictions], model, {"budget": training_budget(model.parent)}
    )


def _score_cross_validation(
    entry: ModelEntry, scratch: Path, n_boot: int, device: str, seed: int
) -> Scored:
    """Each fold's best.pt on the fold it validated on (its own config: manifest, train split,
    fold), so the pooled predictions are out of fold: every case scored once, by a model that
    did not train on it (though its epoch and threshold were chosen on that fold)."""
    folds = sorted(entry.path.glob("fold*/best.pt"), key=lambda p: p.parent.name)
    if len(folds) < 2:
        raise EdgebcError(f"{entry.path}: cv_summary.json but fewer than two fold*/best.pt")
    reports, predictions = [], []
    for best in folds:
        config = _run_config(best.parent).get("data", {})
        if config.get("fold") is None or not config.get("manifest"):
            raise EdgebcError(f"{best.parent}/config.yaml: names no data.fold and data.manifest")
        report, p = evaluate_with_predictions(
            best, config["manifest"], scratch / best.parent.name, config.get("train_split", "train"),
            n_boot, gradcam_per_kind=0, device=device, seed=seed, fold=int(config["fold"]),
        )  # fmt: skip
        reports.append(report)
        predictions.append(p)
    budgets = [training_budget(best.parent) for best in folds]
    return Scored(
        entry, "cross-validation", reports, predictions, folds[0], {"budget": _sum_budgets(budgets)}
    )


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def training_budget(run_dir: Path) -> dict[str, Any]:
    """What a run cost, from its own files: epochs planned (config.yaml) and run (history.csv),
    the best epoch (metrics.json), and the wall time between its first file and its last (which
    includes any pause before a resume). The training loop records no hardware: the user says it."""
    budget: dict[str, Any] = {}
    config = _run_config(run_dir)
    if config:
        budget["epochs_planned"] = config.get("optim", {}).get("epochs")
        budget["arch"] = config.get("model", {}).get("arch")
        budget["trained_on"] = config.get("data", {}).get("manifest")
    history = run_dir / "history.csv"
    if history.is_file():
        with history.open(newline="") as handle:
            budget["epochs_run"] = sum(1 for _ in csv.DictReader(handle))
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        budget["best_epoch"] = json.loads(metrics_file.read_text()).get("best_epoch")
        if (run_dir / "config.yaml").is_file():
            budget["wall_s"] = (
                metrics_file.stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime
            )
    return budget


def _sum_budgets(budgets: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"folds": len(budgets), **budgets[0]}
    for key in ("epochs_run", "wall_s"):
        values = [b.get(key) for b in budgets]
        total[key] = sum(values) if all(v is not None for v in values) else None
    total.pop("best_epoch", None)
    return total


def case_keys(samples: Sequence[Any]) -> list[str]:
    """Each case's identity: its file, numbered where a manifest lists one file twice."""
    seen: dict[str, int] = {}
    keys = []
    for s in samples:
        base = str(Path(s.path).resolve())
        seen[base] = seen.get(base, 0) + 1
        keys.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return keys


def check_same_cases(scored: Sequence[Scored]) -> dict[str, Any]:
    """Put every model's cases in the first one's order, or refuse, naming the cases that differ
    or the labels that disagree: a paired test (or a table) over different cases compares data."""
    first = scored[0]
    reference = case_keys(first.samples)
    labels = {k: s.label for k, s in zip(reference, first.samples, strict=True)}
    for other in scored[1:]:
        keys = case_keys(other.samples)
        only_first, only_other = (
            sorted(set(reference) - set(keys)),
            sorted(set(keys) - set(reference)),
        )
        if only_first or only_other:
            raise EdgebcError(
                f"{first.entry.name} and {other.entry.name} were scored on different cases "
                f"({len(only_first)} only in {first.entry.name}, e.g. {only_first[:3]}; "
                f"{len(only_other)} only in {other.entry.name}, e.g. {only_other[:3]}): compare "
                "models on one manifest and split (and one task: a task that leaves labels out "
                "scores fewer cases)"
            )
        if other.card.positive_class != first.card.positive_class:
            raise EdgebcError(f"{first.entry.name} and {other.entry.name} call different classes positive "
                              f"({first.card.positive_class!r}, {other.card.positive_class!r})")  # fmt: skip
        wrong = [k for k, s in zip(keys, other.samples, strict=True) if s.label != labels[k]]
        if wrong:
            raise EdgebcError(f"{first.entry.name} and {other.entry.name} label {len(wrong)} cases "
                              f"differently, e.g. {wrong[:3]}")  # fmt: skip
        order = {k: i for i, k in enumerate(keys)}
        _reorder(other, [order[k] for k in reference])
    units = [s.unit for s in first.samples]
    return {"n": len(reference), "patients": len(set(units)), "positive_class": first.card.positive_class,
            "data": sorted({r["data"] for s in scored for r in s.reports}),
            "split": sorted({str(r["split"]) for s in scored for r in s.reports})}  # fmt: skip


def _right_about_positive(p: Predictions) -> np.ndarray:
    called = DecisionRule.of(p.card).indices(p.probs) == p.card.positive
    return called == (p.y == p.card.positive)


def _reorder(scored: Scored, order: list[int]) -> None:
    """Pool a model's predictions into one block in the given case order (the table's numbers are
    the reports'; only the paired tests and the ROC read the pooled block)."""
    if order == list(range(len(order))):
        return
    p = scored.predictions
    rows = np.concatenate([_right_about_positive(q) for q in p])[order]
    samples = [s for q in p for s in q.samples]
    pooled = Predictions([samples[i] for i in order], np.concatenate([q.y for q in p])[order],
                         np.concatenate([q.probs for q in p])[order], p[0].card)  # fmt: skip
    scored.extra["correct"] = rows
    scored.extra["timed_predictions"] = p[0]  # what the timed model (the first fold's) scored
    scored.predictions = [pooled]


def _correct(scored: Scored) -> np.ndarray:
    return scored.extra.get("correct", scored.correct)


def paired_tests(scored: Sequence[Scored], clusters: Sequence[str]) -> list[dict[str, Any]]:
    """Every pair: DeLong on the positive class's probability, McNemar on the decisions."""
    positive = scored[0].positive
    results = []
    for a, b in itertools.combinations(scored, 2):
        pa, pb = a.probs[:, a.card.positive], b.probs[:, b.card.positive]
        auc = metrics.delong_test(positive, pa, pb, clusters)
        decisions = metrics.mcnemar_test(_correct(a), _correct(b), clusters)
        results.append({"first": a.entry.name, "second": b.entry.name,
                        "auc": auc.__dict__, "decisions": decisions.__dict__})  # fmt: skip
    return results


def measure_latency(
    scored: Sequence[Scored], scratch: Path, rounds: int
) -> dict[str, dict[str, Any]]:
    """Each model's ONNX file (exported here from a checkpoint) through the runtime's backend at
    batch 1 and one thread: outputs checked against the scored probabilities first, then all
    models timed in turn, round after round, so a busy moment of the machine hits them alike."""
    from edgebc.backends import open_backend

    scratch.mkdir(parents=True, exist_ok=True)
    backends, inputs, result = {}, {}, {}
    for s in scored:
        if rounds <= 0 or s.timed_model is None:
            continue
        onnx_path = (
            s.timed_model if s.timed_model.suffix.lower() == ".onnx" else _export(s, scratch)
        )
        backend = open_backend(onnx_path, threads=1, warmup=0)
        p = s.extra.get("timed_predictions", s.predictions[0])
        check = np.stack([sample_input(x, p.card.preprocess) for x in p.samples[:4]])
        got = metrics.softmax(
            np.concatenate([backend.run(c[None]) for c in check]), p.card.temperature
        )
        gap = float(np.abs(got - p.probs[: len(check)]).max())
        if gap > PARITY_TOLERANCE:
            raise EdgebcError(f"{onnx_path}: its outputs differ from the scored model's by {gap:.3g} "
                              f"(> {PARITY_TOLERANCE}); not timing a model other than the one scored")  # fmt: skip
        backends[s.entry.name], inputs[s.entry.name] = backend, check[:1]
        result[s.entry.name] = {"onnx_mb": onnx_path.stat().st_size / 1e6, "parity_max_prob_diff": gap,
                                "parameters": parameter_count(s, onnx_path)}  # fmt: skip
    # the benchmarks' interleaved timing: each round every model in a block of consecutive calls,
    # the first untimed (alternating single calls would time each with the cache the others left)
    variants = {
        name: Variant(partial(backend.run, inputs[name])) for name, backend in backends.items()
    }
    timed = (
        time_interleaved(variants, warmup=5, iterations=max(1, rounds) * (BLOCK - 1), block=BLOCK)
        if backends
        else {}
    )
    for name, backend in backends.items():
        result[name].update(
            p50_ms=timed[name]["p50_ms"], p90_ms=timed[name]["p90_ms"], rounds=rounds
        )
        backend.close()
    return result


def _export(scored: Scored, scratch: Path) -> Path:
    """An FP32 ONNX copy of the checkpoint, made here only to time it (export checks its parity)."""
    from edgebc.export.onnx_export import export_onnx

    checkpoint = scored.timed_model
    if checkpoint is None:
        raise EdgebcError(f"{scored.entry.name}: no model file to time")
    return export_onnx(checkpoint, scratch / f"{scored.entry.name}.onnx")[0]


def parameter_count(scored: Scored, onnx_path: Path) -> int | None:
    """Trainable parameters of the checkpoint (torch), or the weight elements of an ONNX graph
    (onnx, where installed): the number papers print as model size."""
    if scored.kind != "onnx" and scored.timed_model is not None:
        from edgebc.train.checkpoint import load_checkpoint, model_from_checkpoint

        module = model_from_checkpoint(load_checkpoint(scored.timed_model))
        return int(sum(p.numel() for p in module.parameters()))
    try:
        import onnx
    except ImportError:
        return None
    graph = onnx.load(str(onnx_path)).graph
    return int(sum(int(np.prod(t.dims)) for t in graph.initializer))


def _row(
    scored: Scored, latency: dict[str, Any], reported: dict[str, Any] | None
) -> dict[str, Any]:
    """The table's numbers for one model, taken from its reports; mean and sd over folds."""
    card = scored.card
    positive = card.positive_class

    def numbers(r: dict[str, Any]) -> dict[str, float]:
        stats = r["per_class"][positive]
        return {"accuracy": r["accuracy"], "sensitivity": r["sensitivity"], "specificity": r["specificity"],
                "precision": stats["precision"], "f1": stats["f1"], "auc": r["auc_positive"],
                "kappa": r["cohen_kappa"]}  # fmt: skip

    per_report = [numbers(r) for r in scored.reports]
    probs, y = scored.probs, np.concatenate([p.y for p in scored.predictions])
    row: dict[str, Any] = {
        "name": scored.entry.name, "kind": scored.kind, "path": str(scored.entry.path), "arch": card.arch,
        "classes": list(card.class_names), "reduced_budget": scored.entry.reduced_budget,
        "budget": {**scored.extra.get("budget", {}), "stated": scored.entry.budget,
                   "hardware": scored.entry.hardware},
        "data": [{"data": r["data"], "split": r["split"], "fold": r.get("fold"), "n": r["n"]} for r in scored.reports],
        "per_class_auc": {c: metrics.roc_auc(y == k, probs[:, k]) for k, c in enumerate(card.class_names)},
        "confusion_matrix": np.sum([r["confusion_matrix"] for r in scored.reports], axis=0).tolist(),
        "latency": latency, "reported": reported,
    }  # fmt: skip
    if len(per_report) == 1:
        row.update(per_report[0], auc_ci=scored.reports[0].get("auc_positive_ci"))
    else:
        row["folds"] = per_report
        for key in TABLE_METRICS:
            values = np.array([f[key] for f in per_report], np.float64)
            row[key] = float(np.nanmean(values))
            row[f"{key}_sd"] = float(np.nanstd(values, ddof=1))
        row["pooled_out_of_fold_auc"] = metrics.roc_auc(y == card.positive, probs[:, card.positive])
    return row


def _roc(scored: Sequence[Scored], path: Path) -> None:
    curves = {}
    for s in scored:
        positive = s.positive
        scores = s.probs[:, s.card.positive]
        fpr, tpr, _ = metrics.roc_curve(positive, scores)
        label = s.entry.name + (" (pooled out of fold)" if s.kind == "cross-validation" else "")
        curves[label] = (fpr, tpr, metrics.roc_auc(positive, scores))
    plots.roc_plot(curves, path)


def read_reported(path: str | Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The papers' own numbers, by model name: `NAME: {source, data, accuracy, ..., auc}`; each
    needs its source and the data it was measured on, and only the table's metrics are known."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise EdgebcError(f"{path}: cannot read the reported numbers: {exc}") from exc
    if not isinstance(loaded, dict):
        raise EdgebcError(f"{path}: expected a mapping of model name to reported numbers")
    rows = {}
    for name, entry in loaded.items():
        if name not in names:
            raise EdgebcError(f"{path}: {name!r} is none of the compared models {list(names)}")
        if not isinstance(entry, dict):
            raise EdgebcError(f"{path}: {name}: expected a mapping of reported numbers")
        unknown = sorted(set(entry) - set(REPORTED_KEYS))
        if unknown:
            raise EdgebcError(
                f"{path}: {name}: unknown keys {unknown} (known: {list(REPORTED_KEYS)})"
            )
        for needed in ("source", "data"):
            if not entry.get(needed):
                raise EdgebcError(
                    f"{path}: {name}: says no {needed!r} (where the number was printed, and on what data)"
                )
        for key in REPORTED_METRICS:
            value = entry.get(key)
            if value is not None and not (isinstance(value, int | float) and 0 <= value <= 1):
                raise EdgebcError(
                    f"{path}: {name}: {key} must be a fraction in [0, 1], got {value!r}"
                )
        rows[str(name)] = dict(entry)
    return rows
