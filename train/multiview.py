"""Multi-view mammography: one shared backbone over a breast's views, pooled, one classifier head.

A case (edgebc.cases: a woman's breast) carries up to one image per view the model takes
(`model.views`, e.g. L-CC, L-MLO, R-CC, R-MLO); any may be missing. Every present view goes
through the same registered architecture (its final layer taken off), the per-view features
are pooled over the present views — by learned attention (a small scoring network plus a
learned bias per view, softmax over the present views only) or by their mean — and the
backbone's own final layer classifies the pooled features.

The training loop handles a case as it handles an image: a case is cached as one
(views, C, H, W) tensor whose absent views are NaN, so indexing, batching, validation and
finalisation (temperature, operating point) run unchanged, and the model reads presence from
the tensor itself. The exported graph takes one input per view plus the explicit presence
input the card names (`ViewInputs`), since the device feeds absent views as zeros. Training
augments the present views and drops views at random (`model.view_dropout`, one always
stays), so the model answers for a case with fewer views too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from edgebc.cases import Case, group_cases
from edgebc.config import look_up_option
from edgebc.data.records import Sample
from edgebc.errors import EdgebcError
from edgebc.model_card import ModelCard, ModelInput
from edgebc.optional import require
from edgebc.preprocess import PreprocessCard
from edgebc.task import Task
from edgebc.train.dataset import SampleDataset, cache_tensors
from edgebc.train.models.registry import create_model, model_spec, set_submodule

torch = require("torch", "training")
nn = torch.nn
log = logging.getLogger(__name__)

POOLINGS = ("attention", "mean")
PRESENCE_INPUT = "views_present"
_ABSENT_SCORE = -1e9  # an absent view's attention score: exp() of it is exactly 0 in float32


def input_name(view: str) -> str:
    """The graph input of a view: `L-CC` -> `mg_L_CC`."""
    return "mg_" + view.replace("-", "_")


class MultiViewClassifier(nn.Module):
    """Logits for (N, V, C, H, W) cases; `present` (N, V) is 1 where a view is there, and when it
    is not given, absent views are those holding NaN (the training cache's form)."""

    def __init__(self, model: nn.Module, classifier: str, views: Sequence[str], pooling: str,
                 attention_width: int = 64) -> None:  # fmt: skip
        super().__init__()
        look_up_option(pooling, POOLINGS, what="view pooling")
        self.views = tuple(views)
        self.pooling = pooling
        self.head = model.get_submodule(classifier)
        set_submodule(model, classifier, nn.Identity())
        self.backbone = model
        width = int(self.head.in_features)
        self.score = nn.Sequential(
            nn.Linear(width, attention_width), nn.Tanh(), nn.Linear(attention_width, 1)
        )
        self.view_bias = nn.Parameter(torch.zeros(len(self.views)))

    def forward(self, cases: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        n, v = cases.shape[:2]
        if present is None:
            present = torch.isfinite(cases).flatten(2).all(dim=2)
            cases = torch.nan_to_num(cases, nan=0.0)
        mask = present > 0.5
        flat = cases.flatten(0, 1)
        if self.training:
            # BatchNorm's batch statistics must not see the zeros of absent views
            chosen = mask.flatten()
            seen = self.backbone(flat[chosen])
            features = seen.new_zeros((n * v, seen.shape[1]))
            features[chosen] = seen
        else:  # per-image running statistics: every view computed, a graph without data shapes
            features = self.backbone(flat)
        features = features.view(n, v, -1)
        if self.pooling == "mean":
            weights = mask.to(features.dtype)
            weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
        else:
            scores = self.score(features).squeeze(-1) + self.view_bias
            weights = torch.softmax(scores.masked_fill(~mask, _ABSENT_SCORE), dim=1)
        pooled = (weights.unsqueeze(-1) * features).sum(dim=1)
        return self.head(pooled)


class ViewInputs(nn.Module):
    """The exported form: one (N, C, H, W) input per view, then the (N, V) presence input."""

    def __init__(self, model: MultiViewClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *views, present = inputs
        return self.model(torch.stack(views, dim=1), present)


def wrap_views(
    model: nn.Module, arch: str, views: Sequence[str], pooling: str
) -> MultiViewClassifier:
    """A registered architecture's model (pretrained weights already loaded, if any) as the shared
    backbone of a multi-view model; its final layer becomes the model's head."""
    return MultiViewClassifier(model, model_spec(arch).classifier, views, pooling)


def build_multiview(card: ModelCard) -> MultiViewClassifier:
    """The multi-view network a card describes, with fresh weights (for loading a state_dict)."""
    options: dict[str, Any] = dict(card.arch_options)
    prep = card.inputs[0].preprocess
    model = create_model(card.arch, len(card.class_names), prep.channels,
                         float(options.get("width_mult", 1.0)), str(options.get("head", "linear")),
                         float(options.get("dropout", 0.2)))  # fmt: skip
    return wrap_views(model, card.arch, [str(i.view) for i in card.inputs],
                      str(options.get("view_pooling", "attention")))  # fmt: skip


def with_views(card: ModelCard, views: Sequence[str], pooling: str) -> ModelCard:
    """A trained one-image card made a multi-view card: one optional mammography input per view,
    all sharing the preprocessing, a case's views changing together, and the presence input."""
    prep = card.inputs[0].preprocess
    inputs = tuple(
        ModelInput(input_name(v), prep, "mg", v, optional=True, changes="case") for v in views
    )
    options = {**card.arch_options, "views": list(views), "view_pooling": pooling}
    return replace(card, inputs=inputs, presence_input=PRESENCE_INPUT, arch_options=options)


def cache_cases(samples: Sequence[Sample], prep: PreprocessCard, task: Task, views: Sequence[str],
                workers: int = 2, desc: str = "decode") -> tuple[Any, Any, list[Sample]]:  # fmt: skip
    """The breasts among `samples` as (cases, V, C, H, W) with absent views NaN, their targets, and
    one sample per case (its unit and site: a woman's two breasts count as one patient)."""
    cases = group_cases(samples, views)
    if not cases:
        raise EdgebcError(f"none of the samples has one of the views {', '.join(views)}")
    images = [s for case in cases for s in case.samples.values()]
    tensors, _ = cache_tensors(SampleDataset(images, prep, task), workers, desc)
    stacked = torch.full((len(cases), len(views), *prep.input_shape), float("nan"))
    index = 0
    for row, case in enumerate(cases):
        for view in case.samples:
            stacked[row, views.index(view)] = tensors[index]
            index += 1
    targets = torch.from_numpy(task.encode(case.label for case in cases))
    log.info("%s: %d cases from %d images (%s)", desc, len(cases), len(images), _counts(cases))
    return stacked, targets, [case.first for case in cases]


def augment_cases(augmenter: Any, cases: torch.Tensor, generator: torch.Generator,
                  view_dropout: float) -> torch.Tensor:  # fmt: skip
    """The present views augmented (each on its own, as the loop augments images), then each view
    dropped (made NaN) with probability `view_dropout`, at least one staying per case."""
    n, v = cases.shape[:2]
    present = torch.isfinite(cases).flatten(2).all(dim=2)
    flat, chosen = cases.flatten(0, 1).clone(), present.flatten()
    flat[chosen] = augmenter(flat[chosen], generator)
    out = flat.view_as(cases)
    if view_dropout > 0:
        draws = torch.rand((n, v), generator=generator).to(cases.device)
        keep = present & (draws >= view_dropout)
        # a case whose draw dropped all its views keeps its one with the highest draw
        empty = ~keep.any(dim=1)
        best = torch.where(present, draws, torch.full_like(draws, -1.0)).argmax(dim=1)
        keep[empty, best[empty]] = True
        out = out.masked_fill(~keep.view(n, v, 1, 1, 1), float("nan"))
    return out


def _counts(cases: Sequence[Case]) -> str:
    sizes: dict[int, int] = {}
    for case in cases:
        sizes[len(case.samples)] = sizes.get(len(case.samples), 0) + 1
    return ", ".join(f"{count} with {k} view{'s' * (k > 1)}" for k, count in sorted(sizes.items()))
