"""Fusion cases from a manifest: a patient's ultrasound images and mammogram views, cross-combined.

A case is a manifest's `patient_id`: its ultrasound images (modality us) and its mammogram views
(a mammography modality, one image per view the model takes, `model.fusion.mg_views`), one
label for all of them. One breast per case: the mammogram views must name one side (a woman's
other breast is a case of its own, with its own patient_id). Either modality may be missing —
most women scanned on a portable device have no mammogram — and a case with only one is valid.

Training instances are the cross-combination the published designs use: every ultrasound image
of a case with the case's mammogram view set (a case without ultrasound gives one instance of its
views; one without mammograms one instance per ultrasound image). Each instance is cached as one
packed row (edgebc.train.models.fusion: every input flattened side by side, NaN where absent), so
the training loop batches, validates and finalises it as it does an image; its sample stands for
the case (its unit is the patient). Evaluation scores per case: `mean_per_case` averages a
case's instances' probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgebc.cases import laterality_of
from edgebc.data.records import MAMMOGRAPHY_MODALITIES, Sample
from edgebc.errors import EdgebcError
from edgebc.model_card import ModelCard, ModelInput, ModelOutput
from edgebc.optional import require
from edgebc.preprocess import PreprocessCard
from edgebc.task import Task
from edgebc.train.dataset import SampleDataset, cache_tensors
from edgebc.train.models.fusion import Layout, unpack
from edgebc.train.multiview import augment_cases, input_name

torch = require("torch", "training")
log = logging.getLogger(__name__)

BRANCHES = ("us", "mg")
PRESENCE_INPUT = "inputs_present"


@dataclass(frozen=True)
class FusionCase:
    """One patient's case: ultrasound images, mammogram views by view code, one label."""

    patient_id: str
    label: str
    ultrasound: tuple[Sample, ...]
    mammograms: dict[str, Sample]

    @property
    def first(self) -> Sample:
        """The sample that stands for the case (its unit, site)."""
        return (self.ultrasound or tuple(self.mammograms.values()))[0]


@dataclass(frozen=True)
class Instance:
    """One training or evaluation input: case `case`'s ultrasound image `us` (an index into its
    images, None without ultrasound) with the case's mammogram views."""

    case: int
    us: int | None


def group_fusion_cases(samples: Sequence[Sample], mg_views: Sequence[str]) -> list[FusionCase]:
    """The cases among `samples` in order of first appearance; mammograms of a view the model
    does not take, and images of other modalities, are left out (and counted in the log)."""
    wanted = set(mg_views)
    grouped: dict[str, tuple[list[Sample], dict[str, Sample]]] = {}
    skipped = 0
    for sample in samples:
        is_mg = sample.modality.strip().lower() in MAMMOGRAPHY_MODALITIES
        if not (sample.modality == "us" or (is_mg and sample.view in wanted)):
            skipped += 1
            continue
        if not sample.patient_id:
            raise EdgebcError(
                f"{sample.path}: no patient_id: a fusion case is a patient's images, so the "
                "manifest needs a patient_id column"
            )
        us, mg = grouped.setdefault(sample.patient_id, ([], {}))
        if not is_mg:
            us.append(sample)
            continue
        if sample.view in mg:
            raise EdgebcError(
                f"patient {sample.patient_id} has two {sample.view} mammograms "
                f"({mg[sample.view].path} and {sample.path}); a case takes one image per view"
            )
        mg[str(sample.view)] = sample
    cases = []
    for patient, (us, mg) in grouped.items():
        labels = {s.label for s in [*us, *mg.values()]}
        if len(labels) != 1:
            raise EdgebcError(
                f"patient {patient}'s images carry different labels {sorted(labels)}: a case "
                "has one label"
            )
        sides = {laterality_of(v) for v in mg}
        if len(sides) > 1:
            raise EdgebcError(
                f"patient {patient} has mammograms of both breasts ({', '.join(sorted(mg))}): a "
                "fusion case is one breast; give each breast its own patient_id"
            )
        cases.append(FusionCase(patient, labels.pop(), tuple(us), mg))
    if skipped:
        log.info("%d images are neither ultrasound nor a mammogram view the model takes", skipped)
    return cases


def cross_combine(cases: Sequence[FusionCase]) -> list[Instance]:
    """Every ultrasound image of each case with its mammogram view set (one instance of the
    views alone for a case without ultrasound)."""
    instances = []
    for index, case in enumerate(cases):
        if case.ultrasound:
            instances.extend(Instance(index, k) for k in range(len(case.ultrasound)))
        else:
            instances.append(Instance(index, None))
    return instances


def cache_fusion(samples: Sequence[Sample], us_prep: PreprocessCard, mg_prep: PreprocessCard,
                 task: Task, mg_views: Sequence[str], workers: int = 2,
                 desc: str = "decode") -> tuple[torch.Tensor, torch.Tensor, list[Sample]]:  # fmt: skip
    """The cross-combined instances of `samples` as packed rows (us, then mg views), their
    targets and the sample standing for each instance's case."""
    cases = group_fusion_cases(samples, mg_views)
    if not cases:
        raise EdgebcError(
            "no fusion case among the samples (no ultrasound image, no mammogram view)"
        )
    instances = cross_combine(cases)
    us_images = [s for case in cases for s in case.ultrasound]
    mg_images = [s for case in cases for s in case.mammograms.values()]
    us_cached = _cached(us_images, us_prep, task, workers, f"{desc} us")
    mg_cached = _cached(mg_images, mg_prep, task, workers, f"{desc} mg")
    us_size = int(np.prod(us_prep.input_shape))
    mg_size = int(np.prod(mg_prep.input_shape))
    mg_rows = torch.full((len(cases), len(mg_views) * mg_size), float("nan"))
    us_first, us_at, mg_at = [], 0, 0
    for row, case in enumerate(cases):
        us_first.append(us_at)
        us_at += len(case.ultrasound)
        for view in case.mammograms:
            slot = mg_views.index(view)
            mg_rows[row, slot * mg_size : (slot + 1) * mg_size] = mg_cached[mg_at].flatten()
            mg_at += 1
    packed = torch.full((len(instances), us_size + mg_rows.shape[1]), float("nan"))
    for i, instance in enumerate(instances):
        if instance.us is not None:
            packed[i, :us_size] = us_cached[us_first[instance.case] + instance.us].flatten()
        packed[i, us_size:] = mg_rows[instance.case]
    targets = torch.from_numpy(task.encode(cases[i.case].label for i in instances))
    both = sum(1 for c in cases if c.ultrasound and c.mammograms)
    log.info("%s: %d instances from %d cases (%d with both modalities, %d ultrasound only, %d "
             "mammograms only)", desc, len(instances), len(cases), both,
             sum(1 for c in cases if not c.mammograms), sum(1 for c in cases if not c.ultrasound))  # fmt: skip
    return packed, targets, [cases[i.case].first for i in instances]


def instance_sources(
    samples: Sequence[Sample], mg_views: Sequence[str]
) -> list[tuple[str, Sample | None, dict[str, Sample]]]:
    """Each instance `cache_fusion` makes of `samples`, in its row order: the case's patient id,
    the instance's ultrasound sample (None without) and the case's mammograms by view code — the
    images a row's heat maps are drawn back onto."""
    cases = group_fusion_cases(samples, mg_views)
    return [
        (cases[i.case].patient_id,
         None if i.us is None else cases[i.case].ultrasound[i.us],
         cases[i.case].mammograms)
        for i in cross_combine(cases)
    ]  # fmt: skip


def modalities_present(packed: torch.Tensor, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Per packed row: whether its ultrasound is given, and whether any mammogram view is."""
    parts = unpack(packed, layout)
    has_us = torch.isfinite(parts["us"]).flatten(1).all(dim=1)
    has_mg = torch.isfinite(parts["mg"]).flatten(2).all(dim=2).any(dim=1)
    return has_us.cpu().numpy(), has_mg.cpu().numpy()


def fusion_layout(us_prep: PreprocessCard, mg_prep: PreprocessCard,
                  mg_views: Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:  # fmt: skip
    """The packed rows' layout: the ultrasound image, then the mammogram view slots."""
    return [("us", tuple(us_prep.input_shape)), ("mg", (len(mg_views), *mg_prep.input_shape))]


def fusion_card(card: ModelCard, branches: dict[str, str], fusion: str, width: int, tokens: int,
                mg_prep: PreprocessCard, mg_views: Sequence[str], view_pooling: str,
                modality_dropout: float, arcface: bool = False) -> ModelCard:  # fmt: skip
    """A run's card made a fusion card: an optional ultrasound input (per frame) and one
    optional mammogram input per view (per case), the fusion's options, and the fused features
    as its second output. Any input may be absent, so the card names a presence input: (N, inputs)
    1 where an input is given, 0 where not (edgebc.train.models.fusion's forward)."""
    us_prep = card.inputs[0].preprocess
    inputs = (
        ModelInput("us", us_prep, "us", optional=True),
        *(ModelInput(input_name(v), mg_prep, "mg", v, optional=True, changes="case")
          for v in mg_views),
    )  # fmt: skip
    fused_width = 2 * width + 2 if fusion == "concat" else width
    options = {**card.arch_options, "fusion": fusion, "branch_arch": dict(branches),
               "branch_inputs": {"us": ["us"], "mg": [input_name(v) for v in mg_views]},
               "width": width, "tokens": tokens, "view_pooling": view_pooling,
               "modality_dropout": modality_dropout, "arcface": arcface}  # fmt: skip
    outputs = (*card.outputs, ModelOutput("features", "features", fused_width))
    return replace(
        card,
        arch="late_fusion",
        inputs=inputs,
        outputs=outputs,
        arch_options=options,
        presence_input=PRESENCE_INPUT,
    )


def augment_instances(packed: torch.Tensor, layout: Layout,
                      augmenters: dict[str, Callable[[Any, Any], Any]], generator: torch.Generator,
                      modality_dropout: float, view_dropout: float = 0.0) -> torch.Tensor:  # fmt: skip
    """Packed instances with each present input augmented (ultrasound images each on their own,
    mammogram views as train/multiview.py augments a case's views), then modality dropout: an
    instance holding both modalities loses one of them — ultrasound or mammograms, even odds —
    with probability `modality_dropout`; never both, and never the only one it has."""
    parts = unpack(packed, layout)
    us, mg = parts["us"].clone(), parts["mg"].clone()
    us_present = torch.isfinite(us).flatten(1).all(dim=1)
    mg_present = torch.isfinite(mg).flatten(2).all(dim=2).any(dim=1)
    if bool(us_present.any()):
        us[us_present] = augmenters["us"](us[us_present], generator)
    if bool(mg_present.any()):
        mg[mg_present] = augment_cases(augmenters["mg"], mg[mg_present], generator, view_dropout)
    if modality_dropout > 0:
        n = len(packed)
        drop = torch.rand(n, generator=generator) < modality_dropout
        which_us = torch.rand(n, generator=generator) < 0.5
        both = (us_present & mg_present).cpu()
        us[(drop & both & which_us).to(us.device)] = float("nan")
        mg[(drop & both & ~which_us).to(mg.device)] = float("nan")
    return torch.cat([us.flatten(1), mg.flatten(1)], dim=1)


def _cached(images: list[Sample], prep: PreprocessCard, task: Task, workers: int,
            desc: str) -> torch.Tensor:  # fmt: skip
    if not images:
        return torch.empty((0, *prep.input_shape))
    return cache_tensors(SampleDataset(images, prep, task), workers, desc)[0]


def mean_per_case(probabilities: np.ndarray, units: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Each case's mean probability over its instances, in order of first appearance."""
    order: dict[str, list[int]] = {}
    for index, unit in enumerate(units):
        order.setdefault(unit, []).append(index)
    means = np.stack([probabilities[rows].mean(axis=0) for rows in order.values()])
    return means, list(order)
