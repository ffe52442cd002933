"""Export a trained lesion localiser to ONNX with its own card, checked against PyTorch.

The graph answers (logits: no_lesion / lesion, box: x0 y0 x1 y1 as fractions of its input); the
card says it is a localiser (a `box` output, edgebc.model_card) and carries the operating
threshold chosen on validation. Parity is checked on both outputs: the presence logits and the
box, on random tensors and ultrasound phantoms of every class, as the classifier's export does.

    python -m edgebc.export.localiser_export runs/localiser/best.pt runs/localiser/localiser.onnx
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgebc.errors import EdgebcError
from edgebc.export.onnx_export import (
    DEFAULT_OPSET,
    ParityResult,
    card_for_export,
    embed_card,
    parity_of,
    run_onnx,
    verification_feeds,
    write_graph,
)
from edgebc.model_card import ModelCard
from edgebc.optional import require


def export_localiser(
    checkpoint: str | Path,
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    max_batch: int = 16,
    tolerance: float = 1e-3,
    frames: Sequence[np.ndarray] = (),
) -> tuple[Path, ModelCard, ParityResult, float]:
    """`checkpoint` to the ONNX file `out`: its path, card, logits parity and the largest box
    difference from PyTorch (input fractions); refused and removed when either is off."""
    torch = require("torch", "ONNX export")
    from edgebc.train.localiser import localiser_from_checkpoint

    model, trained = localiser_from_checkpoint(checkpoint)
    out = Path(out)
    card = card_for_export(trained, out.stem, max_batch, str(checkpoint))
    examples = (torch.zeros(2, *card.input_shape),)
    outputs = [o.name for o in card.outputs]
    write_graph(model, examples, [card.input_name], outputs, out, opset, max_batch, "dynamo",
                lambda graph: embed_card(graph, card))  # fmt: skip
    feeds = verification_feeds(card, frames)
    with torch.inference_mode():
        logits, boxes = model(torch.from_numpy(feeds[card.input_name]))
    parity = parity_of(logits.numpy(), run_onnx(out, feeds, card.output_name), tolerance, card)
    onnx_boxes = run_onnx(out, feeds, card.box_output)
    # a box may differ where two cells tie for the centre; the scores then differ too, so the
    # box check stands on the logits' tolerance scaled to input fractions
    box_diff = float(np.abs(onnx_boxes - boxes.numpy()).max())
    if not parity.ok or box_diff > tolerance:
        out.unlink()
        raise EdgebcError(
            f"{out}: ONNX Runtime and PyTorch disagree (logits by {parity.max_abs_logit_diff:.3g}, "
            f"boxes by {box_diff:.3g}; tolerance {tolerance:g}); export refused"
        )
    return out, card, parity, box_diff


def link_classifier(
    classifier: str | Path, localiser: str | Path, out: str | Path, margin: float = 0.15
) -> ModelCard:
    """A copy of the exported `classifier` at `out` whose card names `localiser` (by its path
    relative to `out`'s folder, so the two ship side by side), so every runtime that opens it
    localises and crops first. The graph is unchanged; the localiser must be one."""
    import os
    from dataclasses import replace

    from edgebc.atomic import atomic_write_bytes
    from edgebc.integrity import sha256_file
    from edgebc.localiser import check_crop_trained, check_localiser_card
    from edgebc.model_card import LocaliserLink, read_card

    onnx = require("onnx", "ONNX export")
    check_localiser_card(read_card(localiser))
    check_crop_trained(read_card(classifier), localiser)
    out = Path(out)
    named = os.path.relpath(Path(localiser).resolve(), out.parent.resolve())
    link = LocaliserLink(named, margin, sha256_file(localiser))
    card = replace(read_card(classifier), localiser=link)
    graph = onnx.load(str(classifier))
    embed_card(graph, card)
    atomic_write_bytes(out, graph.SerializeToString())
    return card


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgebc.export.localiser_export",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--link-classifier", nargs=2, metavar=("CLASSIFIER", "OUT"),
                        help="also write a copy of an exported classifier whose card names this localiser")  # fmt: skip
    parser.add_argument("--margin", type=float, default=0.15, help="crop margin in the link")
    args = parser.parse_args(argv)
    require("torch", "ONNX export").set_num_threads(1)
    try:
        path, card, parity, box_diff = export_localiser(
            args.checkpoint, args.out, max_batch=args.max_batch
        )
    except EdgebcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.link_classifier:
        link_classifier(args.link_classifier[0], path, args.link_classifier[1], args.margin)
    print(json.dumps({"model": str(path), "threshold": card.threshold,
                      "max_abs_logit_diff": parity.max_abs_logit_diff, "max_abs_box_diff": box_diff,
                      "decision_agreement": parity.decision_agreement, "n": parity.n}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
