"""`edgebc calibrate`: a clinic refits a model's temperature and operating point on its own cases.

A model trained elsewhere loses calibration and sensitivity on another hospital's scanner (issue 16:
0.90 at home, 0.66 and 0.40 at two other sites at the stored threshold). A clinic with a small
labelled set from its own scanner runs the model over it, through the same runtime backend the
cart uses, and refits both with the function training used (edgebc.calibration), over its patients:
the card then states the sensitivity bound that set supports and how many malignant patients it
rests on. The result is a new release folder (edgebc.release): the model file unchanged, the site's
`card.json`, and a manifest over both; its lineage names the local data's fingerprint. Torch-free.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgebc import __version__, metrics
from edgebc.backends import Backend, open_backend
from edgebc.calibration import Calibration, best_possible_bound, fit_calibration
from edgebc.data import read_dataset
from edgebc.data.fingerprint import data_fingerprint
from edgebc.data.records import Sample
from edgebc.data.sample_image import sample_input
from edgebc.errors import EdgebcError
from edgebc.integrity import MANIFEST_NAME, verify_artifact
from edgebc.localiser import lesion_crop_of
from edgebc.model_card import ModelCard, OperatingPoint, read_card, without_machine_paths
from edgebc.release import SITE_ENTRY, write_release
from edgebc.task import Task

log = logging.getLogger(__name__)

# Below this many positive patients a site gets no release: even if the model found every one, the
# bound at 95 % confidence would be under 0.74 (0.05 ** (1 / 10)), too weak to state on a screen.
MIN_POSITIVES = 10
Progress = Callable[[int], object]  # called with the number of frames just run


@dataclass(frozen=True)
class SiteData:
    """The site's labelled frames the model's task scores, and what it leaves out."""

    samples: list[Sample]
    y: np.ndarray  # class indices of the card's task
    excluded: dict[str, int]  # labels the task leaves out (normal, for benign_vs_malignant)
    fingerprint: str

    @property
    def units(self) -> list[str]:
        return [s.unit for s in self.samples]


@dataclass(frozen=True)
class SiteCalibration:
    """What a site calibration found and the release it wrote."""

    card: ModelCard  # the site's card, as written to card.json
    source: ModelCard  # the card the model ran by before
    fit: Calibration
    frames: int
    shipped: dict[str, float]  # the source card's threshold on this site's cases
    release: Path


def read_site_data(data: str | Path, task: Task, split: str | None = None) -> SiteData:
    """The labelled frames of `data` (a manifest or class folders), in `split` when given, mapped
    through the model's task; labels that are not the task's are refused."""
    samples = read_dataset(data)
    if split is not None:
        if not any(s.split for s in samples):
            raise EdgebcError(f"{data}: has no split column; leave out --split to use every sample")
        samples = [s for s in samples if s.split == split]
    keep, excluded = task.partition([s.label for s in samples], str(data))
    samples = [s for s, kept in zip(samples, keep, strict=True) if kept]
    if not samples:
        where = f" in split {split!r}" if split is not None else ""
        raise EdgebcError(
            f"{data}: no samples{where} for task {task.name} (it takes {', '.join(task.labels)})"
        )
    y = task.encode((s.label for s in samples), str(data))
    return SiteData(samples, y, excluded, data_fingerprint(samples))


def check_enough_cases(data: SiteData, task: Task, confidence: float, min_positives: int,
                       where: str) -> None:  # fmt: skip
    """Refuse a set whose positive cases cannot support a bound worth stating, or that has no
    negative case to measure specificity on; say how many there are."""
    positive_units = {
        s.unit for s, k in zip(data.samples, data.y, strict=True) if k == task.positive
    }
    negative_units = {s.unit for s in data.samples} - positive_units
    kind = "patients" if any(not u.startswith("frame:") for u in data.units) else "images"
    count = len(positive_units)
    if count == 0:
        raise EdgebcError(
            f"{where}: no {task.positive_class} {kind} among {len(negative_units)}: a sensitivity "
            "bound would rest on none and be 0; include the site's confirmed "
            f"{task.positive_class} cases"
        )
    if count < min_positives:
        raise EdgebcError(
            f"{where}: only {count} {task.positive_class} {kind}; even if the model found every "
            f"one the sensitivity bound at {100 * confidence:.0f} % confidence would be "
            f"{best_possible_bound(count, confidence):.2f} (and 0 with none found); a site "
            f"calibration needs at least {min_positives} (--min-positives)"
        )
    if not negative_units:
        raise EdgebcError(
            f"{where}: every one of the {count} {kind} is {task.positive_class}: the specificity "
            "of a threshold cannot be measured; include the site's other cases"
        )


def model_logits(backend: Backend, samples: Sequence[Sample], progress: Progress | None = None,
                 batch: int = 32, model_path: str | Path | None = None) -> np.ndarray:  # fmt: skip
    """Logits of every sample, preprocessed by the card and run through the cart's backend, in
    batches (a few hundred frames at once would not fit a cart's memory)."""
    card, step = backend.card, min(batch, backend.card.max_batch)
    # a classifier trained on localiser crops is calibrated on crops (its localiser ships beside it)
    crop = lesion_crop_of(card, model_path)
    out = []
    for start in range(0, len(samples), step):
        chunk = samples[start : start + step]
        images = np.stack([sample_input(s, card.preprocess, crop) for s in chunk])
        out.append(backend.run(images))
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(out).astype(np.float64)


def calibrate_site(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    split: str | None = None,
    target: float | None = None,
    confidence: float | None = None,
    min_positives: int = MIN_POSITIVES,
    name: str | None = None,
    progress: Progress | None = None,
) -> SiteCalibration:
    """Refit `model`'s temperature and operating point on the site's labelled `data` and write
    the release folder `out` (which must not exist). `target` and `confidence` default to the
    card's own (else 0.95)."""
    model, out = Path(model), Path(out)
    if model.suffix.lower() != ".onnx":
        raise EdgebcError(
            f"{model}: calibrate an exported .onnx model (a TensorRT engine is rebuilt on the "
            "device from the calibrated release: `edgebc model install` then `edgebc model engine`)"
        )
    source_sha = verify_artifact(model)  # a file that fails its manifest is refused here
    if source_sha is None:
        raise EdgebcError(
            f"{model}: no {MANIFEST_NAME} beside it lists this file, so its bytes cannot be "
            "checked; calibrate the folder `edgebc export` (or `edgebc calibrate`) wrote"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EdgebcError(f"{out}: already exists; give a new folder for the release")
    backend = open_backend(model, warmup=0)
    try:
        card = backend.card  # a release's site card when `model` is one: recalibrating it
        card.require_one_image("edgebc calibrate")
        point = card.operating_point or OperatingPoint(0.5)  # no point: the defaults below
        target = target if target is not None else point.target_sensitivity or 0.95
        confidence = confidence if confidence is not None else point.confidence or 0.95
        if not 0 < target <= 1 or not 0 < confidence < 1:
            raise EdgebcError(
                f"target sensitivity must be in (0, 1] and confidence in (0, 1), got {target} and {confidence}"
            )
        site = read_site_data(data, card.task, split)
        check_enough_cases(site, card.task, confidence, min_positives, str(data))
        if all(u.startswith("frame:") for u in site.units):
            log.warning("%s: no patient ids: each image counts as its own case, so the bound "
                        "overstates what it knows if a patient has several images", data)  # fmt: skip
        logits = model_logits(backend, site.samples, progress, model_path=model)
    finally:
        backend.close()
    fit = fit_calibration(logits, site.y, site.units, card.positive, target, confidence,
                          prior_temperature=card.temperature)  # fmt: skip
    shipped = _at_threshold(metrics.softmax(logits, card.temperature), site, card)
    embedded = read_card(model)
    entry: dict[str, Any] = {
        "data_fingerprint": site.fingerprint, "data": str(data), "split": split or "all",
        "frames": len(site.samples), "cases": len(set(site.units)), "unit": fit.operating_point.unit,
        "positive_cases": fit.operating_point.positives, "negative_cases": fit.operating_point.negatives,
        "excluded_labels": site.excluded, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source_model_sha256": source_sha, "source_card": card.name, "edgebc_version": __version__,
    }  # fmt: skip
    if SITE_ENTRY in card.lineage:  # recalibrating a release: keep what it replaced
        entry["previous"] = card.lineage[SITE_ENTRY]
    calibration = {
        "fitted_on": "site", "ece_before": fit.ece_before, "ece_after": fit.ece_after,
        "temperature_before": card.temperature, "frames": len(site.samples),
        "shipped_threshold": card.threshold, **{f"shipped_{k}": v for k, v in shipped.items()},
    }  # fmt: skip
    site_card = without_machine_paths(replace(
        card, name=name or f"{embedded.name}-site", temperature=fit.temperature,
        operating_point=fit.operating_point, calibration=calibration,
        lineage={**card.lineage, SITE_ENTRY: entry},
    ))  # fmt: skip
    release = write_release(out, model, site_card)
    return SiteCalibration(site_card, card, fit, len(site.samples), shipped, release)


def _at_threshold(probs: np.ndarray, site: SiteData, card: ModelCard) -> dict[str, float]:
    """How the card the model came with does on this site's cases (per case, as the bound is)."""
    if card.threshold is None:
        return {}
    _, unit_y, unit_p = metrics.unit_scores(site.units, site.y, probs, card.positive)
    positive, scores = unit_y == card.positive, unit_p[:, card.positive]
    return {
        "sensitivity": metrics.sensitivity_at(positive, scores, card.threshold),
        "specificity": metrics.specificity_at(positive, scores, card.threshold),
    }
