"""The cross-site report: does a model hold at a clinic whose scanner it never saw?

One command trains the same recipe once per site (leave the other sites out) and once on every
site pooled, then scores every model on every site: a site the arm trained on is scored on its
test split, a site it never saw on all of that site's patients. Each score is per frame and per
patient with **patient-clustered** bootstrap intervals (the two panels of one BUS-BRA lesion are one
case, and near-duplicate BUSI frames one group), at the card's operating point against its stated
bound, with calibration (ECE with the card's temperature and without), and split by scanner and by
BI-RADS category; where the radiologists' BI-RADS is on the same images it is scored as a reference
reader and the model is compared with it, paired on the same patients. This report, not a test
split, is where remedies for cross-site failure are chosen; each site's test patients are read
once, at the end.

Arms whose run folder already holds a finished run are reused, an interrupted one is resumed, so
the report can be rerun (or extended with a site) without retraining what is done.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgebc import metrics
from edgebc.atomic import atomic_write_text
from edgebc.config import load_config
from edgebc.data import read_dataset
from edgebc.data.records import Sample
from edgebc.data.sample_image import sample_input
from edgebc.decision import DecisionRule
from edgebc.errors import EdgebcError
from edgebc.localiser import LesionCrop, lesion_crop_of
from edgebc.model_card import ModelCard

log = logging.getLogger(__name__)

BIRADS_SCORES = ("2", "3", "4", "4a", "4b", "4c", "5")  # the reference reader's ordinal scale


@dataclass(frozen=True)
class CrossSiteConfig:
    """What `edgebc cross-site --config` reads: the recipe every arm trains with, the manifest of
    every site (a `source` column, each site split by patient or near-duplicate group), and how
    the report is computed."""

    train_config: str = ""
    manifest: str = ""
    out_dir: str = "runs/cross-site"
    sites: tuple[str, ...] = ()  # default: every source in the manifest
    pooled: bool = True
    pooled_name: str = "pooled"  # the pooled arm's run folder (a recipe's own run can be the arm)
    report_name: str = "cross_site"  # the report's file names in out_dir (.md and .json)
    arms: tuple[str, ...] = ()  # only these arms (e.g. to train two side by side); () = all
    overrides: tuple[str, ...] = ()  # `--set`s applied to every arm, e.g. threads=1
    bootstrap: int = 1000
    seed: int = 0
    device_column: str = "device"
    reference_column: str = "birads"
    # What a site is: "source" (a hospital), or "device" (a scanner; a one-scanner site such as
    # BUSI names none and stands for its own), for leave-one-scanner-out.
    site_column: str = "source"
    # Arms trained on every site but one ("without-X", the leave-one-site-out design) instead of
    # on one site each; with two sites the two designs train the same arms.
    leave_one_out: bool = False
    # Where a site an arm trained on is scored: its test split for the report of record, its
    # validation split while remedies are being chosen (test patients are read once, at the end).
    own_split: Literal["test", "val"] = "test"
    # Named remedies, each a list of `--set`s added to `overrides`; `variant` picks the one this
    # run trains and scores (in out_dir/<variant>), `--compare` tables them against `baseline`.
    variants: dict[str, tuple[str, ...]] = field(default_factory=dict)
    variant: str = ""
    baseline: str = "baseline"

    def __post_init__(self) -> None:
        if not self.train_config or not self.manifest:
            raise ValueError("train_config (the recipe) and manifest (every site) are both needed")
        if self.variant and self.variant not in self.variants:
            raise ValueError(f"variant {self.variant!r} is not among {sorted(self.variants)}")

    @property
    def run_dir(self) -> Path:
        """Where this variant's arms and report live."""
        return Path(self.out_dir) / self.variant if self.variant else Path(self.out_dir)

    @property
    def arm_overrides(self) -> tuple[str, ...]:
        return (*self.overrides, *self.variants.get(self.variant, ()))
        if self.bootstrap < 100:
            raise ValueError(f"bootstrap needs at least 100 resamples, got {self.bootstrap}")


@dataclass(frozen=True)
class Arm:
    name: str
    sites: tuple[str, ...]  # what it trains on


def arms_of(config: CrossSiteConfig, sites: Sequence[str]) -> list[Arm]:
    if config.leave_one_out and len(sites) > 2:
        arms = [
            Arm(f"without-{_slug(site)}", tuple(s for s in sites if s != site)) for site in sites
        ]
    else:
        arms = [Arm(f"{_slug(site)}-only", (site,)) for site in sites]
    arms += [Arm(config.pooled_name, tuple(sites))] if config.pooled and len(sites) > 1 else []
    unknown = sorted(set(config.arms) - {a.name for a in arms})
    if unknown:
        raise EdgebcError(f"arms {unknown} are not among {[a.name for a in arms]}")
    return [a for a in arms if not config.arms or a.name in config.arms]


def _slug(site: str) -> str:
    """A site's name as a run-folder name ("GE Logiq 5 @10-12MHz" -> "GE-Logiq-5-10-12MHz")."""
    return re.sub(r"[^A-Za-z0-9._+]+", "-", site).strip("-") or "site"


def run_cross_site(
    config: CrossSiteConfig, show_progress: bool = True, train: bool = True
) -> dict[str, Any]:
    """Train (or reuse) every arm, score it on every site, write cross_site.{json,md}.

    With train=False an arm without a finished run is an error instead of a training run.
    """
    samples = read_dataset(config.manifest)
    present = sorted({site for s in samples if (site := s.site(config.site_column))})
    sites = list(config.sites) or present
    missing = sorted(set(sites) - set(present))
    if missing or len(sites) < 2:
        raise EdgebcError(
            f"{config.manifest}: the report needs two sites or more in its {config.site_column} column; "
            f"asked for {sites}, the manifest has {present}"
        )
    out = config.run_dir
    rows = []
    for arm in arms_of(config, sites):
        if not train and not _finished(out / arm.name):
            raise EdgebcError(f"{out / arm.name} holds no finished run: train it first")
        checkpoint = _trained(config, arm, out, show_progress, present)
        from edgebc.train.torch_backend import TorchBackend

        backend = TorchBackend(checkpoint)
        card = backend.card
        # a model trained on localiser crops is scored on them: the crop opened once per arm
        crop = lesion_crop_of(card, also=backend.trained_localiser)
        for site in sites:
            seen = site in arm.sites
            chosen = [
                s
                for s in samples
                if s.site(config.site_column) == site and (not seen or s.split == config.own_split)
            ]
            keep, left_out = card.task.partition([s.label for s in chosen], f"site {site}")
            chosen = [s for s, kept in zip(chosen, keep, strict=True) if kept]
            if not chosen:
                raise EdgebcError(
                    f"site {site}: no {config.own_split + ' ' if seen else ''}samples for task "
                    f"{card.task.name}"
                )
            probs = _probabilities(backend.run, chosen, card, crop)
            row = site_statistics(chosen, probs, card, config)
            row.update(arm=arm.name, trained_on=list(arm.sites), site=site,
                       scored_on=f"{config.own_split} split" if seen else "every shared patient", labels_left_out=left_out,
                       scores=_scores(chosen, probs, card))  # fmt: skip
            rows.append(row)
            log.info("%s on %s: AUC %.3f", arm.name, site, row["auc"]["value"])
        backend.close()
    report = {"manifest": config.manifest, "train_config": config.train_config, "sites": sites,
              "variant": config.variant, "own_split": config.own_split, "overrides": list(config.arm_overrides),
              "bootstrap": config.bootstrap, "rows": rows}  # fmt: skip
    atomic_write_text(
        out / f"{config.report_name}.json", json.dumps(report, indent=2, default=float) + "\n"
    )
    atomic_write_text(out / f"{config.report_name}.md", render_markdown(report))
    return report


def load_cross_site_config(
    path: str | Path | None, overrides: Sequence[str] = ()
) -> CrossSiteConfig:
    return load_config(CrossSiteConfig, path, overrides)


def _trained(
    config: CrossSiteConfig, arm: Arm, out: Path, show_progress: bool, every_site: Sequence[str]
) -> Path:
    """The arm's best.pt: reused when its run finished (and was trained on this recipe), resumed
    when interrupted, else trained. `every_site`: the manifest's sites (a run trained on no named
    sites trained on all of them)."""
    from edgebc.train.config import load_train_config
    from edgebc.train.loop import train_model
    from edgebc.train.reuse import refuse_other_recipe

    run_dir = out / arm.name
    train = load_train_config(config.train_config, [
        *config.arm_overrides, f"data.manifest={config.manifest}", f"data.sources={json.dumps(list(arm.sites))}",
        f"data.site_column={config.site_column}", f"name={arm.name}", f"out_dir={out}",
    ])  # fmt: skip
    resume = run_dir if (run_dir / "last.pt").is_file() else None
    if _finished(run_dir) or resume is not None:
        refuse_other_recipe(run_dir, train, every_site, resuming=not _finished(run_dir))
    if _finished(run_dir):
        log.info("%s: reusing the finished run in %s", arm.name, run_dir)
        return run_dir / "best.pt"
    return train_model(train, resume=resume, show_progress=show_progress).best_checkpoint


def _finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and (run_dir / "best.pt").is_file()


def _scores(samples: Sequence[Sample], probs: np.ndarray, card: ModelCard) -> dict[str, list[Any]]:
    """Per frame: path, case, truth and the positive probability, so that reports of two remedies
    can be compared paired, frame by frame."""
    truth = card.task.encode(s.label for s in samples) == card.positive
    return {"path": [str(s.path) for s in samples], "unit": [s.unit for s in samples],
            "truth": [int(t) for t in truth], "score": [round(float(p), 6) for p in probs[:, card.positive]]}  # fmt: skip


def compare_variants(config: CrossSiteConfig) -> dict[str, Any]:
    """The remedies table: every variant whose arms have all finished, scored (nothing trained),
    each row against the baseline variant on the same frames (paired, patient-clustered)."""
    if config.baseline not in config.variants:
        raise EdgebcError(
            f"the baseline variant {config.baseline!r} is not among {sorted(config.variants)}"
        )
    reports, skipped = {}, []
    for name in config.variants:
        try:
            reports[name] = run_cross_site(
                replace(config, variant=name, arms=()), show_progress=False, train=False
            )
        except EdgebcError as exc:
            skipped.append(f"{name}: {exc}")
    if config.baseline not in reports:
        raise EdgebcError(f"the baseline has no finished report to compare with: {skipped}")
    base = {(r["arm"], r["site"]): r for r in reports[config.baseline]["rows"]}
    rows = []
    for name, report in reports.items():
        for row in report["rows"]:
            reference = base.get((row["arm"], row["site"]))
            entry = {"variant": name, "arm": row["arm"], "trained_on": row["trained_on"], "site": row["site"],
                     "scored_on": row["scored_on"], "frames": row["frames"], "units": row["units"],
                     "auc": row["auc"], "ece": row["ece"], "sensitivity": row["sensitivity"],
                     "specificity": row["specificity"],
                     "delta_auc": None if name == config.baseline or reference is None
                     else _paired_delta(row["scores"], reference["scores"], config)}  # fmt: skip
            rows.append(entry)
    table = {"manifest": config.manifest, "train_config": config.train_config, "baseline": config.baseline,
             "variants": {k: list(v) for k, v in config.variants.items()}, "skipped": skipped, "rows": rows}  # fmt: skip
    out = Path(config.out_dir)
    atomic_write_text(out / "remedies.json", json.dumps(table, indent=2, default=float) + "\n")
    atomic_write_text(out / "remedies.md", render_remedies(table))
    return table


def _paired_delta(scores: dict[str, list[Any]], reference: dict[str, list[Any]],
                  config: CrossSiteConfig) -> dict[str, Any]:  # fmt: skip
    """AUC(variant) - AUC(baseline) on the frames both scored, resampling patients together."""
    where = {path: i for i, path in enumerate(reference["path"])}
    shared = [i for i, path in enumerate(scores["path"]) if path in where]
    back = [where[scores["path"][i]] for i in shared]
    truth = np.asarray(scores["truth"], bool)[shared]
    ours = np.asarray(scores["score"], float)[shared]
    theirs = np.asarray(reference["score"], float)[back]
    units = [scores["unit"][i] for i in shared]

    def delta(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        return metrics.roc_auc(t, a) - metrics.roc_auc(t, b)

    low, high = metrics.cluster_bootstrap_ci(
        delta, units, truth, ours, theirs, n_boot=config.bootstrap, seed=config.seed
    )
    return {"value": delta(truth, ours, theirs), "ci95": [low, high], "frames": len(shared)}


def render_remedies(table: dict[str, Any]) -> str:
    def ci(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return "—"
        low, high = entry["ci95"]
        return f"{entry['value']:.3f} ({low:.3f} to {high:.3f})"

    lines = [
        f"# Remedies: {table['train_config']} on {table['manifest']}", "",
        f"Each variant's arms against `{table['baseline']}` on the same frames; intervals are 95 % "
        "patient-clustered bootstraps (training randomness is not in them: one seed each).", "",
        "| variant | trained on | scored on | frames / patients | AUC | Δ AUC vs baseline | ECE | sensitivity | specificity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    order = {name: i for i, name in enumerate(table["variants"])}
    for row in sorted(
        table["rows"], key=lambda r: (r["site"], r["scored_on"], order[r["variant"]])
    ):
        lines.append(
            f"| {row['variant']} | {'+'.join(row['trained_on'])} | {row['site']} ({row['scored_on']}) | "
            f"{row['frames']} / {row['units']} | {ci(row['auc'])} | {ci(row['delta_auc'])} | {ci(row['ece'])} | "
            f"{ci(row['sensitivity'])} | {ci(row['specificity'])} |"
        )  # fmt: skip
    lines += ["", "Variants (each a list of `--set`s on top of the shared overrides):", ""]
    lines += [
        f"- `{name}`: {', '.join(f'`{s}`' for s in sets) or 'nothing added'}"
        for name, sets in table["variants"].items()
    ]
    lines += [f"- not compared: {s}" for s in table["skipped"]]
    return "\n".join(lines) + "\n"


def _probabilities(
    run: Callable[[np.ndarray], np.ndarray],
    samples: Sequence[Sample],
    card: ModelCard,
    crop: LesionCrop | None = None,
) -> np.ndarray:
    """Calibrated probabilities for `samples` through the shared preprocessing, in batches (the
    localiser's `crop` for a model trained on them)."""
    out = []
    for start in range(0, len(samples), 32):
        batch = np.stack(
            [sample_input(s, card.preprocess, crop) for s in samples[start : start + 32]]
        )
        out.append(run(batch))
    return metrics.softmax(np.concatenate(out), card.temperature)


def site_statistics(
    samples: Sequence[Sample], probs: np.ndarray, card: ModelCard, config: CrossSiteConfig
) -> dict[str, Any]:
    """Everything the report says about one model on one site's frames."""
    y = card.task.encode(s.label for s in samples)
    units = [s.unit for s in samples]
    positive = card.positive
    truth = y == positive
    score = probs[:, positive]
    rule = DecisionRule.of(card)
    called = rule.indices(probs) == positive
    boot = config.bootstrap, config.seed

    def interval(metric: Callable[..., float], *arrays: np.ndarray) -> dict[str, Any]:
        low, high = metrics.cluster_bootstrap_ci(
            metric, units, *arrays, n_boot=boot[0], seed=boot[1]
        )
        return {"value": metric(*arrays), "ci95": [low, high]}

    names, unit_y, unit_p = metrics.unit_scores(units, y, probs, positive)
    row: dict[str, Any] = {
        "frames": len(samples), "units": len(names), "positive_units": int((unit_y == positive).sum()),
        "auc": interval(metrics.roc_auc, truth, score),
        "unit_auc": {"value": metrics.roc_auc(unit_y == positive, unit_p[:, positive])},
        "sensitivity": interval(_rate, called, truth), "specificity": interval(_rate, ~called, ~truth),
        "ece": interval(_ece, probs, y),
        "ece_without_temperature": interval(_ece, _untempered(probs, card.temperature), y),
    }  # fmt: skip
    point = card.operating_point
    if point is not None and point.sensitivity_bound is not None:
        unit_called = unit_p[:, positive] >= point.threshold
        realised = (
            float(unit_called[unit_y == positive].mean()) if (unit_y == positive).any() else None
        )
        row["bound"] = {"threshold": point.threshold, "sensitivity_bound": point.sensitivity_bound,
                        "confidence": point.confidence, "unit_sensitivity": realised,
                        "held": None if realised is None else realised >= point.sensitivity_bound}  # fmt: skip
    row["by_device"] = _by(samples, config.device_column, truth, score, called)
    row["by_reference"] = _by(samples, config.reference_column, truth, score, called)
    row["reference_reader"] = _reference_reader(
        samples, config.reference_column, truth, score, units, boot
    )
    return row


def _ece(probs: np.ndarray, y: np.ndarray) -> float:
    return metrics.expected_calibration_error(probs, y)[0]


def _rate(hit: np.ndarray, among: np.ndarray) -> float:
    """The share of `among` that is `hit` (NaN when there is none)."""
    return float(hit[among].mean()) if among.any() else float("nan")


def _untempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(z) from softmax(z / T): the probabilities before temperature scaling."""
    log_p = np.log(np.clip(probs, 1e-300, 1.0)) * temperature
    return metrics.softmax(log_p - log_p.max(axis=1, keepdims=True))


def _by(samples: Sequence[Sample], column: str, truth: np.ndarray, score: np.ndarray,
        called: np.ndarray) -> list[dict[str, Any]]:  # fmt: skip
    values = [s.site(column) for s in samples]
    rows = []
    for value in sorted({v for v in values if v is not None}):
        index = np.array([v == value for v in values])
        rows.append({
            "value": value, "frames": int(index.sum()), "positives": int(truth[index].sum()),
            "auc": metrics.roc_auc(truth[index], score[index]),
            "sensitivity": _rate(called[index], truth[index]), "specificity": _rate(~called[index], ~truth[index]),
        })  # fmt: skip
    return rows


def _reference_reader(samples: Sequence[Sample], column: str, truth: np.ndarray, score: np.ndarray,
                      units: Sequence[str], boot: tuple[int, int]) -> dict[str, Any] | None:  # fmt: skip
    """The radiologists' BI-RADS (2-5) scored as a reader on the frames that carry it, beside the
    model on the same frames, and their paired difference over resampled patients."""
    grades = [s.site(column) for s in samples]
    index = np.array([g is not None and g.lower() in BIRADS_SCORES for g in grades])
    if index.sum() < 2 or len(set(truth[index])) < 2:
        return None
    reader = np.array(
        [BIRADS_SCORES.index(g.lower()) for g in np.array(grades, object)[index]], float
    )
    t, s = truth[index], score[index]
    chosen_units = [u for u, kept in zip(units, index, strict=True) if kept]

    def difference(tt: np.ndarray, ss: np.ndarray, rr: np.ndarray) -> float:
        return metrics.roc_auc(tt, ss) - metrics.roc_auc(tt, rr)

    result = {}
    for name, metric, arrays in (
        ("reader_auc", metrics.roc_auc, (t, reader)),
        ("model_auc", metrics.roc_auc, (t, s)),
        ("model_minus_reader", difference, (t, s, reader)),
    ):
        low, high = metrics.cluster_bootstrap_ci(
            metric, chosen_units, *arrays, n_boot=boot[0], seed=boot[1]
        )
        result[name] = {"value": metric(*arrays), "ci95": [low, high]}
    result["frames"] = int(index.sum())
    return result


def render_markdown(report: dict[str, Any]) -> str:
    def ci(entry: dict[str, Any]) -> str:
        low, high = entry["ci95"]
        return f"{entry['value']:.3f} ({low:.3f}–{high:.3f})"

    lines = [
        f"# Cross-site report: {report['train_config']} on {report['manifest']}",
        "",
        f"Intervals: 95 % patient-clustered bootstrap ({report['bootstrap']} resamples). A site the arm "
        f"trained on is scored on its {report.get('own_split', 'test')} split; any other site on all "
        "its shared patients.",
        "",
        "| trained on | scored on | frames / patients | AUC | sensitivity | specificity | ECE | ECE without T | bound held |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        bound = row.get("bound")
        held = "—" if not bound else (
            f"{'yes' if bound['held'] else 'NO'} ({bound['unit_sensitivity']:.3f} vs ≥ {bound['sensitivity_bound']:.3f})"
            if bound["unit_sensitivity"] is not None else "n/a")  # fmt: skip
        lines.append(
            f"| {'+'.join(row['trained_on'])} | {row['site']} ({row['scored_on']}) | {row['frames']} / {row['units']} | "
            f"{ci(row['auc'])} | {ci(row['sensitivity'])} | {ci(row['specificity'])} | {ci(row['ece'])} | "
            f"{ci(row['ece_without_temperature'])} | {held} |"
        )
    for key, title in (("by_device", "scanner"), ("by_reference", "BI-RADS")):
        lines += ["", f"## By {title}", "", f"| trained on | site | {title} | frames | malignant | AUC | sensitivity | specificity |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in report["rows"]:
            for sub in row[key]:
                lines.append(
                    f"| {'+'.join(row['trained_on'])} | {row['site']} | {sub['value']} | {sub['frames']} | {sub['positives']} | "
                    f"{sub['auc']:.3f} | {sub['sensitivity']:.3f} | {sub['specificity']:.3f} |"
                )
    readers = [row for row in report["rows"] if row["reference_reader"]]
    if readers:
        lines += ["", "## The radiologists' BI-RADS as a reference reader (same frames, paired)", "",
                  "| trained on | site | frames | BI-RADS AUC | model AUC | model − BI-RADS |", "|---|---|---|---|---|---|"]  # fmt: skip
        for row in readers:
            r = row["reference_reader"]
            lines.append(
                f"| {'+'.join(row['trained_on'])} | {row['site']} | {r['frames']} | {ci(r['reader_auc'])} | "
                f"{ci(r['model_auc'])} | {ci(r['model_minus_reader'])} |"
            )
    return "\n".join(lines) + "\n"
