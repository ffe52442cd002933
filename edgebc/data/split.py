"""`edgebc data split`: stratified train/val/test splits and k folds that never leak.

A unit is everything that must stay on one side: a near-duplicate group from the audit and,
where the manifest has one, a patient, merged transitively (a patient with two near-duplicate
frames drags both groups along). Units are assigned greedily, largest first within each class,
to whichever side is furthest below its target, so class proportions hold while no unit
straddles two sides. Deterministic for a given seed and sample list.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgebc.data.records import Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitPlan:
    """Fractions of the data for validation and test; with folds > 1, non-test data gets k folds."""

    val: float = 0.15
    test: float = 0.15
    folds: int = 0
    seed: int = 0
    # A side that neither training nor early stopping sees, on which the temperature and the
    # operating point are fitted: a bound stated on the split that also chose the epoch is optimistic.
    calibration: float = 0.0

    def __post_init__(self) -> None:
        total = self.val + self.test + self.calibration
        if not (
            0.0 <= self.val < 1.0
            and 0.0 <= self.test < 1.0
            and 0.0 <= self.calibration < 1.0
            and total < 1.0
        ):
            raise ValueError(
                f"val, test and calibration must be fractions in [0, 1) summing below 1, got "
                f"{self.val}, {self.test}, {self.calibration}"
            )
        if self.folds < 0 or self.folds == 1:
            raise ValueError(f"folds must be 0 (no folds) or at least 2, got {self.folds}")
        if self.folds and self.val:
            raise ValueError("with folds, validation comes from the folds: set val to 0")


def split_units(samples: Sequence[Sample]) -> list[list[int]]:
    """Indices of samples that must stay together: linked by near-duplicate group or patient id."""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[tuple[str, str], int] = {}
    for index, sample in enumerate(samples):
        for key in (("group", sample.group), ("patient", sample.patient_id)):
            if key[1] is None:
                continue
            typed_key = (key[0], key[1])
            if typed_key in first_seen:
                a, b = find(first_seen[typed_key]), find(index)
                parent[max(a, b)] = min(a, b)
            else:
                first_seen[typed_key] = index
    units: dict[int, list[int]] = defaultdict(list)
    for index in range(len(samples)):
        units[find(index)].append(index)
    return sorted(units.values())


def split_dataset(path: str | Path, plan: SplitPlan) -> list[Sample]:
    """The dataset at `path` split by `plan` (`edgebc data split`). Without a `group` column the
    near-duplicates are found first, so that none straddles two sides."""
    from edgebc.data import read_dataset
    from edgebc.data.curation import audit_samples

    samples = read_dataset(path)
    if not any(s.group for s in samples):
        log.info(
            "no `group` column: finding near-duplicates first (run `edgebc data audit` to review them)"
        )
        samples = audit_samples(samples, str(path), conflicts="keep").cleaned
    return assign_splits(samples, plan)


def assign_splits(samples: Sequence[Sample], plan: SplitPlan) -> list[Sample]:
    """Copies of `samples` with `split` (and `fold`) set according to `plan`."""
    if not samples:
        raise ValueError("cannot split an empty dataset")
    rng = np.random.default_rng(plan.seed)
    units = split_units(samples)
    if plan.folds:
        sides = ["test", "calibration", *(f"fold{k}" for k in range(plan.folds))]
        share = (1.0 - plan.test - plan.calibration) / plan.folds
        fractions = [plan.test, plan.calibration, *([share] * plan.folds)]
    else:
        sides = ["train", "val", "test", "calibration"]
        fractions = [
            1.0 - plan.val - plan.test - plan.calibration,
            plan.val,
            plan.test,
            plan.calibration,
        ]
    by_stratum: dict[str, list[list[int]]] = defaultdict(list)
    for unit in units:
        by_stratum[_unit_label(samples, unit)].append(unit)
    side_of: dict[int, str] = {}
    for stratum in sorted(by_stratum):
        stratum_units = by_stratum[stratum]
        order = rng.permutation(len(stratum_units))
        # Largest units first so that big groups do not overshoot a small side at the end.
        ordered = sorted((stratum_units[i] for i in order), key=len, reverse=True)
        total = sum(len(u) for u in ordered)
        targets = np.array(fractions) * total
        filled = np.zeros(len(sides))
        for unit in ordered:
            deficit = (targets - filled) / np.maximum(targets, 1e-9)
            deficit[targets == 0] = -np.inf
            choice = int(np.argmax(deficit))
            filled[choice] += len(unit)
            for index in unit:
                side_of[index] = sides[choice]
    result = []
    for index, sample in enumerate(samples):
        side = side_of[index]
        if side.startswith("fold"):
            result.append(sample.with_(split="train", fold=int(side[4:])))
        else:
            result.append(sample.with_(split=side, fold=None))
    return result


def split_summary(samples: Sequence[Sample]) -> dict[str, dict[str, int]]:
    """Counts per side (split, or fold k) and class, for the report printed after a split."""
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for sample in samples:
        side = f"fold{sample.fold}" if sample.fold is not None else (sample.split or "unassigned")
        table[side][sample.label] += 1
    return {side: dict(sorted(counts.items())) for side, counts in sorted(table.items())}


def _unit_label(samples: Sequence[Sample], unit: list[int]) -> str:
    counts = Counter(samples[i].label for i in unit)
    return min(counts, key=lambda label: (-counts[label], label))
