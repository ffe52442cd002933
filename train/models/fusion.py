"""Multi-input models: one backbone per card input, pooled features fused by sum.

A model whose card has several inputs (an ultrasound frame and a mammogram view, say) is built
from the card itself: each input gets a registered architecture as its branch (its classifier
replaced by the identity, so it yields pooled features), each branch's features are projected to
a shared width, and the projections are summed — the late fusion by sum of the two-branch
published design. The model returns the logits and the fused features, the card's two outputs
(the features serve shift detection on the device). Concatenation, cross-attention and per-branch
ArcFace layers are the fusion issue's; `fusion` names the choice so they can join it.
"""

from __future__ import annotations

from typing import Any

from edgebc.config import look_up_option
from edgebc.model_card import ModelCard
from edgebc.optional import require
from edgebc.train.models.registry import create_model, model_spec, set_submodule

torch = require("torch", "model definitions")
nn = torch.nn

FUSIONS = ("sum",)


class LateFusion(nn.Module):
    def __init__(self, branches: dict[str, nn.Module], widths: dict[str, int], num_classes: int,
                 width: int, dropout: float) -> None:  # fmt: skip
        super().__init__()
        self.order = list(branches)
        self.branches = nn.ModuleDict(branches)
        self.project = nn.ModuleDict({n: nn.Linear(widths[n], width) for n in self.order})
        self.classifier = nn.Sequential(
            nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, num_classes)
        )

    def embed(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One branch's (N, width) embedding: what the device computes once per input (once per
        case for a stored mammogram) and keeps."""
        return self.project[name](self.branches[name](x))

    def head(
        self, embeddings: list[torch.Tensor], present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and fused features from the branches' embeddings (in `order`) and `present`,
        (N, branches) 1 where a branch's input was given, 0 where it is absent: an absent
        branch's embedding does not count, whatever it holds."""
        stacked = torch.stack(embeddings, dim=1)
        fused = (stacked * present.to(stacked.dtype)[:, :, None]).sum(dim=1)
        return self.classifier(fused), fused

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(inputs) != len(self.order):
            raise ValueError(
                f"expected {len(self.order)} inputs ({', '.join(self.order)}), got {len(inputs)}"
            )
        embeddings = [self.embed(n, x) for n, x in zip(self.order, inputs, strict=True)]
        present = torch.ones(inputs[0].shape[0], len(self.order), dtype=embeddings[0].dtype,
                             device=embeddings[0].device)  # fmt: skip
        return self.head(embeddings, present)


def build_fusion(card: ModelCard) -> LateFusion:
    """The fusion model a several-input card describes (arch_options: `branch_arch` per input
    name, `fusion`, `width`, `dropout`, `width_mult`)."""
    options: dict[str, Any] = dict(card.arch_options)
    look_up_option(str(options.get("fusion", "sum")), FUSIONS, what="fusion")
    arches = dict(options.get("branch_arch") or {})
    branches, widths = {}, {}
    for model_input in card.inputs:
        arch = arches.get(model_input.name)
        if arch is None:
            raise ValueError(
                f"arch_options.branch_arch names no architecture for input {model_input.name!r}"
            )
        branch = create_model(
            arch, 2, model_input.preprocess.channels, float(options.get("width_mult", 1.0))
        )
        path = model_spec(arch).classifier
        widths[model_input.name] = branch.get_submodule(path).in_features
        set_submodule(branch, path, nn.Identity())
        branches[model_input.name] = branch
    return LateFusion(branches, widths, len(card.class_names), int(options.get("width", 64)),
                      float(options.get("dropout", 0.2)))  # fmt: skip
