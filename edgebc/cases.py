"""Cases for multi-view mammography models: a breast's views grouped, fed and decided together.

A case is one breast of one woman: the images of a manifest's `patient_id` whose `view` (`L-CC`,
`L-MLO`, `R-CC`, ...) names the same laterality. A label belongs to a breast — a finding is seen
in that breast's CC and MLO views and the other breast is judged on its own (the phantoms' truth
draws one breast with the finding and the other normal; mini-MIAS labels each film) — so a
case's views must agree on it; a woman's answer is her breasts' answers. A multi-view model's
card has one optional input per view it knows and a presence input (`ModelCard.presence_input`,
one 0/1 per view input): an absent view is fed as zeros and marked 0, and the model pools only
the present views. Training (edgebc.train.multiview) groups cases with the same function as
`edgebc classify`, so the device and the training loop agree on what a case is.

`CaseClassifier` decides a case from the views it has: every view through the quality gate and
the shared preprocessing, then the model once on each view alone (that view's row) and once on
all views that passed (the case's row), each decided by the one decision rule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgebc.archive import render_table, rounded
from edgebc.atomic import atomic_write_text
from edgebc.breast import BreastRefusal
from edgebc.data.records import Sample
from edgebc.decision import DecisionRule
from edgebc.decode import ImageView
from edgebc.errors import EdgebcError
from edgebc.metrics import softmax
from edgebc.model_card import ModelCard
from edgebc.preprocess import preprocess_chw, to_channels, validated_image
from edgebc.quality import Gate, QualityResult

if TYPE_CHECKING:
    from edgebc.backends import Backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One breast's views: `samples` maps each view code to its image's sample."""

    patient_id: str
    laterality: str  # "L" | "R"
    samples: Mapping[str, Sample] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.patient_id}/{self.laterality}"

    @property
    def label(self) -> str:
        return next(iter(self.samples.values())).label

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(self.samples)

    @property
    def first(self) -> Sample:
        """The sample that stands for the case where one per case is asked for (its unit, site)."""
        return next(iter(self.samples.values()))


def laterality_of(view: str) -> str:
    """`L` or `R` from a view code such as `L-CC` or `R-MLO`."""
    side = view.split("-", 1)[0].upper()
    if side not in ("L", "R") or "-" not in view:
        raise EdgebcError(f"view {view!r} names no laterality: expected e.g. L-CC or R-MLO")
    return side


def group_cases(samples: Sequence[Sample], views: Sequence[str]) -> list[Case]:
    """The breasts among `samples`, in order of first appearance, keeping the views in `views`
    (a view the model does not take is left out); a case's views must share one label."""
    wanted = set(views)
    grouped: dict[tuple[str, str], dict[str, Sample]] = {}
    other = 0
    for sample in samples:
        if sample.view not in wanted:
            other += 1
            continue
        if not sample.patient_id:
            raise EdgebcError(
                f"{sample.path}: has a view ({sample.view}) but no patient_id: a multi-view case "
                "is a patient's breast, so the manifest needs a patient_id column"
            )
        key = (sample.patient_id, laterality_of(sample.view))
        case = grouped.setdefault(key, {})
        if sample.view in case:
            raise EdgebcError(
                f"patient {key[0]} has two {sample.view} images ({case[sample.view].path} and "
                f"{sample.path}); a case takes one image per view"
            )
        case[sample.view] = sample
    cases = []
    for (patient, side), by_view in grouped.items():
        labels = {s.label for s in by_view.values()}
        if len(labels) != 1:
            raise EdgebcError(
                f"the views of patient {patient}'s {side} breast carry different labels "
                f"{sorted(labels)}: a label belongs to a breast"
            )
        ordered = {v: by_view[v] for v in views if v in by_view}
        cases.append(Case(patient, side, ordered))
    if other:
        log.info("%d images left out: their view is none of %s", other, ", ".join(views))
    return cases


def view_inputs(card: ModelCard) -> dict[str, str]:
    """View code -> input name for a multi-view card; an error for any other card."""
    if card.presence_input is None:
        raise EdgebcError(
            f"model {card.name} is not a multi-view model (its card has no presence input)"
        )
    return {str(i.view): i.name for i in card.inputs}


def validate_presence(present: object, card: ModelCard, rows: int) -> np.ndarray:
    """The presence input as float32 (rows, views) of 0 and 1 with at least one view per row."""
    if not isinstance(present, np.ndarray):
        raise ValueError(
            f"expected {card.presence_input} as a numpy array, got {type(present).__name__}"
        )
    shape = (rows, len(card.inputs))
    if present.shape != shape or present.dtype != np.float32:
        raise ValueError(
            f"expected {card.presence_input} as float32 of shape {shape}, got "
            f"{present.dtype} {present.shape}"
        )
    if not np.isin(present, (0.0, 1.0)).all():
        raise ValueError(f"{card.presence_input} holds 1 (present) or 0 (absent) only")
    if (present.sum(axis=1) < 1).any():
        raise ValueError(f"every case needs at least one view present in {card.presence_input}")
    return np.ascontiguousarray(present)


def case_feeds(card: ModelCard, cases: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The feeds for a batch of cases, each a mapping view code -> preprocessed (C, H, W) tensor
    of the views it has: zeros and presence 0 for the views it lacks."""
    names = view_inputs(card)
    if not cases:
        raise ValueError("no cases to feed")
    feeds: dict[str, np.ndarray] = {
        i.name: np.zeros((len(cases), *i.shape), np.float32) for i in card.inputs
    }
    present = np.zeros((len(cases), len(card.inputs)), np.float32)
    for row, case in enumerate(cases):
        unknown = sorted(set(case) - set(names))
        if unknown or not case:
            raise ValueError(
                f"model {card.name} takes the views {', '.join(names)}; a case gave "
                f"{', '.join(sorted(case)) or 'none'}"
            )
        for column, (view, name) in enumerate(names.items()):
            if view in case:
                feeds[name][row] = case[view]
                present[row, column] = 1.0
    feeds[str(card.presence_input)] = present
    return feeds


@dataclass(frozen=True)
class ViewDecision:
    """One row of a case's answer: a view alone (`views` is that view) or the case (`views` are
    those that passed the gate); `label` None when there is no decision (see `quality`)."""

    views: tuple[str, ...]
    label: str | None
    probabilities: dict[str, float] | None
    positive_probability: float | None
    quality: QualityResult


@dataclass(frozen=True)
class CaseResult:
    case: str
    by_view: dict[str, ViewDecision]  # in the model's view order, the views the case has
    decision: ViewDecision  # over every view that passed the gate


class CaseClassifier:
    """A multi-view model with a quality gate around it: `classify({view: image})`."""

    def __init__(self, backend: Backend, gate: Gate, threshold: float | None = None) -> None:
        self.backend = backend
        self.card = backend.card
        self.names = view_inputs(self.card)
        self.rule = DecisionRule.of(self.card, threshold)
        self.gate = gate

    def classify(
        self,
        case: str,
        images: Mapping[str, np.ndarray],
        views: Mapping[str, ImageView] | None = None,
    ) -> CaseResult:
        """Each view gated and decided alone, then the case from the views that passed. `views`
        gives what is known of each image's view (manifest and DICOM header: sample_image);
        without it, the view's name as a code (`L-MLO`)."""
        unknown = sorted(set(images) - set(self.names))
        if unknown:
            raise ValueError(
                f"{case}: model {self.card.name} takes the views {', '.join(self.names)}, "
                f"not {', '.join(unknown)}"
            )
        verdicts: dict[str, QualityResult] = {}
        tensors: dict[str, np.ndarray] = {}
        for view in (v for v in self.names if v in images):
            model_input = self.card.inputs[list(self.names).index(view)]
            grey = to_channels(validated_image(images[view]), 1)
            verdicts[view] = self.gate.check(images[view], grey)
            if verdicts[view].ok:
                channels = model_input.preprocess.channels
                try:
                    tensors[view] = preprocess_chw(
                        grey if channels == 1 else images[view],
                        model_input.preprocess,
                        view=(views or {}).get(view) or ImageView.from_code(view),
                    )
                except BreastRefusal as exc:
                    # that view gets no decision and says why; the case goes on with the others
                    verdicts[view] = QualityResult(False, str(exc), exc.check)
        if not verdicts:
            raise ValueError(f"{case}: no view to classify")
        passed = tuple(tensors)
        rows = [{view: tensors[view]} for view in passed] + ([dict(tensors)] if passed else [])
        probs = self._probabilities(rows) if rows else np.empty((0, len(self.card.class_names)))
        by_view = {}
        for view, verdict in verdicts.items():
            row = passed.index(view) if view in passed else None
            by_view[view] = self._decided((view,), None if row is None else probs[row], verdict)
        if passed:
            decision = self._decided(passed, probs[-1], QualityResult(True))
        else:
            refused = QualityResult(False, "no view of the case passed the quality gate", "case")
            decision = self._decided((), None, refused)
        return CaseResult(case, by_view, decision)

    def _probabilities(self, rows: list[dict[str, np.ndarray]]) -> np.ndarray:
        outputs = self.backend.run_named(case_feeds(self.card, rows))
        return softmax(outputs[self.card.output_name], self.card.temperature)

    def _decided(self, views: tuple[str, ...], p: np.ndarray | None,
                 quality: QualityResult) -> ViewDecision:  # fmt: skip
        if p is None:
            return ViewDecision(views, None, None, None, quality)
        named = dict(zip(self.card.class_names, map(float, p), strict=True))
        return ViewDecision(
            views, self.rule.decide(p), named, float(p[self.rule.positive]), quality
        )


def classify_case_manifests(
    classifier: CaseClassifier,
    manifests: Sequence[str | Path],
    out: str | Path,
    read: Callable[[Sample], tuple[np.ndarray, ImageView]],
    on_error: Callable[[str], None] = lambda _m: None,
    progress: Callable[[int], None] = lambda _n: None,
) -> tuple[int, int, int]:
    """Every case of the manifests (columns path, patient_id, view) into `out` (.csv or .jsonl):
    a row per view, then a row for the case; returns (cases decided, view rows, errors). An image
    that cannot be read is a row with its error, and its case goes on with its other views."""
    from edgebc.data import read_manifest

    out = Path(out)
    if out.suffix.lower() not in (".csv", ".jsonl"):
        raise EdgebcError(f"{out}: output must end in .csv or .jsonl")
    rows: list[dict[str, object]] = []
    decided = views = errors = 0
    for manifest in manifests:
        try:
            samples = read_manifest(manifest)
            cases = group_cases(samples, list(classifier.names))
        except (EdgebcError, OSError, ValueError) as exc:
            errors += 1
            on_error(f"{manifest}: {exc}")
            rows.append({"source": str(manifest), "level": "case", "error": str(exc)})
            continue
        if not cases:
            errors += 1
            message = (f"{manifest}: no image with one of the views {', '.join(classifier.names)} "
                       "and a patient_id")  # fmt: skip
            on_error(message)
            rows.append({"source": str(manifest), "level": "case", "error": message})
        for sample in (s for s in samples if s.view not in classifier.names):
            # not an error of the file, but never silently gone: a row says why it was left out
            rows.append({"source": str(sample.path), "level": "view", "views": sample.view or "",
                         "error": f"left out: its view ({sample.view or 'none'}) is none of the "
                                  f"model's ({', '.join(classifier.names)})"})  # fmt: skip
        for case in cases:
            images, known = {}, {}
            for view, sample in case.samples.items():
                try:
                    images[view], known[view] = read(sample)
                except (EdgebcError, OSError, ValueError) as exc:
                    errors += 1
                    on_error(f"{sample.path}: {exc}")
                    rows.append({"source": str(sample.path), "case": case.name, "level": "view",
                                 "views": view, "error": str(exc)})  # fmt: skip
            if not images:
                continue
            result = classifier.classify(case.name, images, known)
            for view, decision in result.by_view.items():
                rows.append(
                    _case_row(str(case.samples[view].path), case.name, "view", decision, classifier)
                )
                views += 1
            rows.append(_case_row(str(manifest), case.name, "case", result.decision, classifier))
            decided += result.decision.label is not None
            progress(1)
    atomic_write_text(
        out, render_table(rows, out.suffix.lower(), case_columns(classifier.card.class_names))
    )
    return decided, views, errors


def _case_row(source: str, case: str, level: str, decision: ViewDecision,
              classifier: CaseClassifier) -> dict[str, object]:  # fmt: skip
    row: dict[str, object] = {
        "source": source, "case": case, "level": level, "views": "+".join(decision.views),
        "decision": decision.label or "", "quality": str(decision.quality),
        "positive_probability": rounded(decision.positive_probability),
        "threshold": "" if classifier.rule.threshold is None else classifier.rule.threshold,
        "model_sha256": classifier.backend.model_sha256, "error": "",
    }  # fmt: skip
    for name in classifier.card.class_names:
        row[f"p_{name}"] = rounded((decision.probabilities or {}).get(name))
    return row


def case_columns(classes: Sequence[str]) -> list[str]:
    return ["source", "case", "level", "views", "decision", "quality", *(f"p_{c}" for c in classes),
            "positive_probability", "threshold", "model_sha256", "error"]  # fmt: skip
