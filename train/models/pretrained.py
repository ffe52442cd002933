"""Load torchvision ImageNet weights, or an edgebc model's, from a file the user has; nothing is
downloaded.

Our architectures have torchvision's state_dict keys and shapes (a test holds them to a list
generated from torchvision itself), so a torchvision checkpoint loads directly, with three
adaptations: grey input gets the first convolution's RGB filters summed (a grey image is R=G=B,
so the summed filter gives the same response), the classifier is left freshly initialised for our
classes, old DenseNet checkpoints' `norm.1`-style keys are renamed as torchvision does, and
GoogLeNet's auxiliary classifiers (`aux1.`, `aux2.`; training-time only) are left out.

An edgebc checkpoint (best.pt) of the same architecture starts a model the same way: its backbone
is kept and its head made anew. Without ImageNet weights on this machine, that is how a
mammography model starts from what an ultrasound model learnt of breast tissue; the card's lineage
names the checkpoint and its weights' hash.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgebc.errors import EdgebcError
from edgebc.optional import require
from edgebc.train.models.registry import model_spec

torch = require("torch", "loading pretrained weights")

_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def load_torchvision_weights(
    model: torch.nn.Module, arch: str, path: str | Path
) -> dict[str, object]:
    """Copy a torchvision checkpoint's weights into `model` (built by create_model(arch, ...))."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EdgebcError(f"{path}: pretrained weights file not found") from None
    except Exception as exc:  # an edgebc checkpoint holds its card too: not weights_only
        return _load_edgebc_backbone(model, arch, path, exc)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise EdgebcError(f"{path}: expected a state_dict, found {type(state).__name__}")
    return _load_state(model, arch, state, path)


# the auxiliary classifiers' keys in torchvision's files, per architecture that has them
AUXILIARY = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def _load_state(
    model: torch.nn.Module, arch: str, state: dict[str, torch.Tensor], path: Path
) -> dict[str, object]:
    """`state`'s backbone into `model`, its head left fresh; refused whole when it does not fit."""
    state = {_OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    if arch in AUXILIARY:  # torchvision's file keeps the auxiliary classifiers we never build
        state = {k: v for k, v in state.items() if not k.startswith(AUXILIARY[arch])}
    spec = model_spec(arch)
    own = model.state_dict()
    head = tuple(k for k in own if k.startswith(spec.classifier + "."))
    first = spec.first_conv + ".weight"
    if first in state and first in own and state[first].shape[1] == 3 and own[first].shape[1] == 1:
        state[first] = state[first].sum(dim=1, keepdim=True)
    incoming = {k: v for k, v in state.items() if not k.startswith(spec.classifier + ".")}
    # Checkpoints older than PyTorch 0.4 have no num_batches_tracked; BatchNorm starts it at 0.
    missing = sorted(
        k for k in set(own) - set(incoming) - set(head) if not k.endswith("num_batches_tracked")
    )
    unexpected = sorted(set(incoming) - set(own))
    wrong = sorted(
        k for k in set(incoming) & set(own) if tuple(incoming[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong),
            )
            if keys
        )
        raise EdgebcError(
            f"{path}: weights do not fit {arch} ({details}); is it a torchvision {spec.torchvision_name} checkpoint?"
        )
    model.load_state_dict(incoming, strict=False)
    return {"loaded_tensors": len(incoming), "reinitialised": list(head), "source": str(path)}


def _load_edgebc_backbone(
    model: torch.nn.Module, arch: str, path: Path, why_not_weights: Exception
) -> dict[str, object]:
    """`path` read as an edgebc checkpoint of `arch`; its weights loaded as a torchvision file's."""
    from edgebc.train.checkpoint import load_checkpoint

    try:
        checkpoint = load_checkpoint(path)
    except EdgebcError:
        raise EdgebcError(
            f"{path}: not a readable PyTorch checkpoint: neither a torchvision state_dict "
            f"({why_not_weights}) nor an edgebc checkpoint"
        ) from None
    card = checkpoint.card
    if card.arch != arch or card.presence_input is not None:
        raise EdgebcError(
            f"{path}: an edgebc {card.arch} model{' with several views' if card.presence_input else ''}; "
            f"it cannot start a {arch}"
        )
    report = _load_state(model, arch, dict(checkpoint.state_dict), path)
    return {**report, "source": str(path), "model": card.name, "weights_sha256": card.weights_sha256,
            "modality": card.inputs[0].modality, "task": card.task.name}  # fmt: skip
