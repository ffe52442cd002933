"""Multi-input models: one backbone per modality, embeddings fused by sum, concatenation or
cross-attention, any branch allowed to be absent.

A model whose card has several inputs (an ultrasound frame and mammogram views, say) is built
from the card itself: each branch is a registered architecture (its classifier replaced by the
identity, so it yields pooled features) projected to a shared width. A branch takes one input,
or — the multi-view mammography branch — several view inputs that share one backbone and are
pooled over the present views by train/multiview.py's pooling (`arch_options.branch_inputs`
names a branch's inputs; by default every input is a branch of its own). The head fuses the
branches' embeddings under a presence mask, so an absent branch never counts whatever its input
holds:

- `sum`: the present embeddings added (the two-branch published design's late fusion);
- `concat`: the embeddings side by side (absent ones zero) with the presence mask itself;
- `cross_attention`: each embedding split into a few tokens that query the other present
  branches' tokens (one small attention layer, residual), then summed over present branches.

With `arcface`, each branch's embedding also feeds an ArcFace layer of its own (models/heads.py)
in training only: the loop sets `targets` and adds `aux_loss`, the branches' ArcFace losses over
their present rows, so each embedding is pulled apart by class on its own before fusion (the
published four-view + one-image design). The ArcFace layers never touch the logits.

`embed(name, x)` gives a branch's (N, width) embedding — what the device computes once per case
for a stored mammogram and caches — and `head(embeddings, present)` the logits and fused
features. `forward(*inputs)` takes one tensor per card input (then, optionally, the card's
presence input: one 0/1 per card input; without it all are present) and returns both;
`forward(packed)` is the training loop's form: one row per instance holding every input
flattened side by side, NaN where an input is absent (as train/multiview.py caches views), and
returns the logits alone, so the loop's batching, validation and finalisation run unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from edgebc.config import look_up_option
from edgebc.model_card import ModelCard
from edgebc.optional import require
from edgebc.train.models.heads import ArcFaceHead
from edgebc.train.models.registry import create_model, model_spec, set_submodule

torch = require("torch", "model definitions")
nn = torch.nn

FUSIONS = ("sum", "concat", "cross_attention")


class ViewPooledBranch(nn.Module):
    """A multi-view branch: one backbone over (N, V, C, H, W) views, pooled over the present ones
    by train/multiview.py's MultiViewClassifier with its head taken off (pooled features out)."""

    def __init__(self, backbone: nn.Module, classifier: str, views: Sequence[str],
                 pooling: str) -> None:  # fmt: skip
        super().__init__()
        from edgebc.train.multiview import MultiViewClassifier

        self.pooled = MultiViewClassifier(backbone, classifier, views, pooling)
        self.in_features = int(self.pooled.head.in_features)
        self.pooled.head = nn.Identity()

    def forward(self, views: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        return self.pooled(views, present)


class LateFusion(nn.Module):
    def __init__(self, branches: dict[str, nn.Module], widths: dict[str, int], num_classes: int,
                 width: int, dropout: float, fusion: str = "sum",
                 layout: Sequence[tuple[str, tuple[int, ...]]] = (), tokens: int = 4,
                 arcface: bool = False) -> None:  # fmt: skip
        super().__init__()
        look_up_option(fusion, FUSIONS, what="fusion")
        self.order = list(branches)
        self.fusion = fusion
        self.branches = nn.ModuleDict(branches)
        self.project = nn.ModuleDict({n: nn.Linear(widths[n], width) for n in self.order})
        # the packed training form: each branch's input shape, in `order` ((C, H, W), or
        # (V, C, H, W) for a multi-view branch)
        self.layout = [(name, tuple(shape)) for name, shape in layout]
        fused_width = width
        if fusion == "concat":
            fused_width = len(self.order) * width + len(self.order)
        elif fusion == "cross_attention":
            if width % tokens:
                raise ValueError(f"cross-attention splits width {width} into {tokens} tokens")
            self.tokens = tokens
            self.attention = nn.MultiheadAttention(width // tokens, 1, batch_first=True)
            self.token_norm = nn.LayerNorm(width // tokens)
        self.classifier = nn.Sequential(
            nn.ReLU(), nn.Dropout(dropout), nn.Linear(fused_width, num_classes)
        )
        self.arcface = (
            nn.ModuleDict({n: ArcFaceHead(width, num_classes) for n in self.order})
            if arcface
            else None
        )
        self.targets: torch.Tensor | None = None  # set by the training step with arcface
        self.aux_loss: torch.Tensor | None = None

    def embed(
        self, name: str, x: torch.Tensor, present: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One branch's (N, width) embedding: what the device computes once per input (once per
        case for a stored mammogram) and keeps. A multi-view branch takes (N, V, C, H, W) and
        its views' (N, V) presence (absent views zeros and 0; without it, NaN views are absent)."""
        branch = self.branches[name]
        features = branch(x, present) if isinstance(branch, ViewPooledBranch) else branch(x)
        return self.project[name](features)

    def head(
        self, embeddings: list[torch.Tensor], present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and fused features from the branches' embeddings (in `order`) and `present`,
        (N, branches) 1 where a branch's input was given, 0 where it is absent: an absent
        branch's embedding does not count, whatever it holds (NaN included)."""
        stacked = torch.stack(embeddings, dim=1)
        mask = (present > 0.5)[:, :, None]
        stacked = torch.where(mask, stacked, torch.zeros_like(stacked))
        if self.fusion == "concat":
            fused = torch.cat([stacked.flatten(1), present.to(stacked.dtype)], dim=1)
        elif self.fusion == "cross_attention":
            fused = (self._attend(stacked, mask[:, :, 0]) * mask).sum(dim=1)
        else:
            fused = stacked.sum(dim=1)
        return self.classifier(fused), fused

    def _attend(self, stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, B, width) embeddings after each branch's tokens attended to the other present
        branches' tokens; a branch with no other present keeps its own embedding."""
        n, b, width = stacked.shape
        tokens = self.token_norm(stacked.view(n, b, self.tokens, width // self.tokens))
        out = []
        for i in range(b):
            others = [j for j in range(b) if j != i]
            keys = tokens[:, others].flatten(1, 2)
            absent = (~mask[:, others]).repeat_interleave(self.tokens, dim=1)
            alone = absent.all(dim=1)
            # a row with no key present would softmax over nothing (NaN): let it see its keys,
            # then discard what it read
            absent = absent & ~alone[:, None]
            read, _ = self.attention(tokens[:, i], keys, keys, key_padding_mask=absent,
                                     need_weights=False)  # fmt: skip
            read = torch.where(alone[:, None, None], torch.zeros_like(read), read)
            out.append(stacked[:, i] + read.flatten(1))
        return torch.stack(out, dim=1)

    def forward(self, *inputs: torch.Tensor) -> Any:
        """(logits, fused features) from one tensor per card input, in the card's order, and
        optionally then the (N, inputs) presence (1 given, 0 absent: the card's presence input);
        without it every input is present. A single packed tensor is the training form."""
        expected = sum(_input_count(shape) for _, shape in self.layout) or len(self.order)
        if len(inputs) == 1 and expected > 1:
            return self.forward_packed(inputs[0])
        if len(inputs) not in (expected, expected + 1):
            raise ValueError(
                f"expected {expected} inputs ({', '.join(self.order)}) and optionally their "
                f"presence, got {len(inputs)}"
            )
        given_presence = inputs[expected] if len(inputs) > expected else None
        embeddings, presence, at = [], [], 0
        for name, shape in self.layout or [(n, ()) for n in self.order]:
            count = _input_count(shape)
            given = inputs[at : at + count]
            flags = None if given_presence is None else given_presence[:, at : at + count]
            at += count
            if len(shape) == 4:
                embeddings.append(self.embed(name, torch.stack(given, dim=1), flags))
            else:
                embeddings.append(self.embed(name, given[0]))
            presence.append(
                torch.ones_like(embeddings[-1][:, 0]) if flags is None else flags.amax(dim=1)
            )
        return self.head(embeddings, torch.stack(presence, dim=1).to(embeddings[0].dtype))

    def forward_packed(self, packed: torch.Tensor) -> torch.Tensor:
        """Logits of packed instances (see the module's docstring). In training a branch runs on
        its present rows only, so BatchNorm's batch statistics never see an absent input."""
        parts = self.unpack(packed)
        n = packed.shape[0]
        embeddings, presence = [], []
        self.aux_loss = None
        arcface = self.training and self.arcface is not None and self.targets is not None
        for name, x in parts.items():
            finite = torch.isfinite(x).flatten(2 if x.dim() == 5 else 1)
            views = finite.all(dim=-1) if x.dim() == 5 else None
            present = views.any(dim=1) if views is not None else finite.all(dim=1)
            x = torch.nan_to_num(x, nan=0.0)
            rows = present if self.training else torch.ones_like(present)
            embedded = packed.new_zeros((n, self.project[name].out_features))
            if bool(rows.any()):
                view_mask = None if views is None else views[rows].to(x.dtype)
                embedded[rows] = self.embed(name, x[rows], view_mask).to(embedded.dtype)
                if arcface and self.arcface is not None and self.targets is not None:
                    head = self.arcface[name]
                    head.targets = self.targets[rows]
                    loss = nn.functional.cross_entropy(head(embedded[rows]), self.targets[rows])
                    head.targets = None
                    self.aux_loss = loss if self.aux_loss is None else self.aux_loss + loss
            embeddings.append(embedded)
            presence.append(present)
        logits, _ = self.head(embeddings, torch.stack(presence, dim=1).to(packed.dtype))
        return logits

    def unpack(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each branch's inputs from packed rows, in `order`."""
        return unpack(packed, self.layout)


Layout = Sequence[tuple[str, tuple[int, ...]]]


def unpack(packed: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Each branch's (N, *shape) inputs from packed rows (views where torch can, else copies:
    write through `pack`, never into these)."""
    parts, at = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        parts[name] = packed[:, at : at + size].reshape(-1, *shape)
        at += size
    if at != packed.shape[1]:
        raise ValueError(f"packed rows hold {packed.shape[1]} values, the layout {at}")
    return parts


def pack(parts: Sequence[torch.Tensor | None], layout: Layout, n: int) -> torch.Tensor:
    """Packed rows from each branch's (N, *shape) inputs in layout order; None = absent (NaN)."""
    columns = []
    for part, (_, shape) in zip(parts, layout, strict=True):
        if part is None:
            columns.append(torch.full((n, math.prod(shape)), float("nan")))
        else:
            columns.append(part.reshape(n, -1))
    return torch.cat(columns, dim=1)


def _input_count(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) == 4 else 1


def build_fusion(card: ModelCard) -> LateFusion:
    """The fusion model a several-input card describes (arch_options: `branch_arch` per branch,
    `branch_inputs` naming each branch's inputs (default: one branch per input), `fusion`,
    `width`, `dropout`, `width_mult`, `view_pooling`, `tokens`, `arcface`)."""
    options: dict[str, Any] = dict(card.arch_options)
    fusion = str(look_up_option(str(options.get("fusion", "sum")), FUSIONS, what="fusion"))
    arches = dict(options.get("branch_arch") or {})
    by_name = {i.name: i for i in card.inputs}
    grouping = dict(options.get("branch_inputs") or {i.name: [i.name] for i in card.inputs})
    unknown = sorted({n for names in grouping.values() for n in names} - set(by_name))
    if unknown:
        raise ValueError(f"arch_options.branch_inputs names inputs the card lacks: {unknown}")
    branches: dict[str, nn.Module] = {}
    widths: dict[str, int] = {}
    layout: list[tuple[str, tuple[int, ...]]] = []
    for name, input_names in grouping.items():
        arch = arches.get(name)
        if arch is None:
            raise ValueError(f"arch_options.branch_arch names no architecture for branch {name!r}")
        prep = by_name[input_names[0]].preprocess
        branch = create_model(arch, 2, prep.channels, float(options.get("width_mult", 1.0)))
        path = model_spec(arch).classifier
        shape = tuple(prep.input_shape)
        if len(input_names) > 1:
            views = [str(by_name[n].view or n) for n in input_names]
            pooled = ViewPooledBranch(branch, path, views, str(options.get("view_pooling", "mean")))
            widths[name], branches[name] = pooled.in_features, pooled
            shape = (len(input_names), *shape)
        else:
            widths[name] = branch.get_submodule(path).in_features
            set_submodule(branch, path, nn.Identity())
            branches[name] = branch
        layout.append((name, shape))
    return LateFusion(branches, widths, len(card.class_names), int(options.get("width", 64)),
                      float(options.get("dropout", 0.2)), fusion, layout,
                      int(options.get("tokens", 4)), bool(options.get("arcface", False)))  # fmt: skip
