"""Checkpoint -> ONNX with the model card embedded, checked, and proven to agree with PyTorch.

One self-contained file (no external data), a recent opset, a dynamic batch dimension. The
exported graph is run by ONNX Runtime on fixed random inputs, synthetic phantom frames and (when
given) real frames through the shared preprocessing, and compared with PyTorch; the export fails
when the largest logit difference exceeds the tolerance. FP16 copies keep float32 inputs and
outputs so callers need not change.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import tempfile
from collections.abc import Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgebc import __version__
from edgebc.atomic import atomic_write_bytes
from edgebc.errors import EdgebcError
from edgebc.model_card import CARD_KEY, ModelCard
from edgebc.optional import require
from edgebc.preprocess import PreprocessCard, preprocess_batch
from edgebc.synth.ultrasound import make_ultrasound_phantom, phantom_rng

log = logging.getLogger(__name__)
INPUT_NAME, OUTPUT_NAME = "input", "logits"
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ParityResult:
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    max_abs_prob_diff: float
    top1_agreement: float
    n: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance


def card_from_checkpoint(
    record: dict[str, Any], name: str, max_batch: int, source: str
) -> ModelCard:
    point = record.get("operating_point") or {}
    return ModelCard(
        name=name, arch=record["arch"], class_names=tuple(record["class_names"]), positive_class=record["positive_class"],
        preprocess=PreprocessCard.from_dict(record["preprocess"]), input_name=INPUT_NAME, output_name=OUTPUT_NAME,
        temperature=float(record.get("temperature") or 1.0), threshold=point.get("threshold"),
        target_sensitivity=point.get("target_sensitivity"), precision="fp32", max_batch=max_batch,
        metrics={k: v for k, v in (record.get("metrics") or {}).items() if isinstance(v, (int, float))},
        weights_sha256=record.get("weights_sha256", ""), data_fingerprint=record.get("data_fingerprint", ""),
        edgebc_version=__version__, exported=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        source_checkpoint=source, lineage=lineage_of(record),
    )  # fmt: skip


def lineage_of(record: dict[str, Any]) -> dict[str, Any]:
    """Where the weights came from, so an audit can trace a deployed model back to every model
    whose knowledge it carries: the torchvision file it started from, the teachers it learned from."""
    pretrained = record.get("pretrained") or {}
    return {
        "pretrained": pretrained.get("source"),
        "distilled_from": [dict(teacher) for teacher in record.get("distilled_from") or []],
    }


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    max_batch: int = 64,
    exporter: str = "dynamo",
    verify_frames: Sequence[np.ndarray] = (),
    tolerance: float = 1e-3,
) -> tuple[Path, ModelCard, ParityResult]:
    """Export `checkpoint` to the ONNX file `out`; returns its path, card and PyTorch parity."""
    torch = require("torch", "ONNX export")
    onnx = require("onnx", "ONNX export")
    from edgebc.train.checkpoint import load_checkpoint
    from edgebc.train.loop import model_from_checkpoint

    record = load_checkpoint(checkpoint)
    model = model_from_checkpoint(record)
    out = Path(out)
    card = card_from_checkpoint(record, out.stem, max_batch, str(checkpoint))
    example = torch.zeros(2, *card.input_shape)
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "raw.onnx"
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=max_batch)
            with redirect_stdout(io.StringIO()):  # the exporter narrates every pass on stdout
                program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                            output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), external_data=False, verbose=False)  # fmt: skip
                program.save(str(raw))
        elif exporter == "torchscript":
            torch.onnx.export(model, (example,), str(raw), dynamo=False, opset_version=min(opset, 17), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})  # fmt: skip
        else:
            raise EdgebcError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
        graph = onnx.load(str(raw))
    _rename_io(graph)
    embed_card(graph, card)
    onnx.checker.check_model(graph, full_check=True)
    atomic_write_bytes(out, graph.SerializeToString())
    parity = compare_with_torch(model, out, card, verify_frames, tolerance)
    if not parity.ok:
        out.unlink()
        raise EdgebcError(
            f"{out}: ONNX Runtime and PyTorch disagree by up to {parity.max_abs_logit_diff:.3g} in the logits "
            f"(tolerance {tolerance:g}); export refused"
        )
    return out, card, parity


def export_fp16(
    fp32_path: str | Path,
    out: str | Path,
    reference_frames: Sequence[np.ndarray] = (),
    tolerance: float = 0.05,
) -> tuple[Path, ModelCard, ParityResult]:
    """An FP16 copy for GPU targets, float32 in and out, checked against the FP32 model."""
    onnx = require("onnx", "FP16 export")
    float16 = require("onnxconverter_common.float16", "FP16 export")
    from edgebc.model_card import read_card

    card = replace(read_card(fp32_path), precision="fp16", name=Path(out).stem)
    graph = float16.convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    embed_card(graph, card)
    onnx.checker.check_model(graph)
    atomic_write_bytes(out, graph.SerializeToString())
    inputs = verification_inputs(card.preprocess, reference_frames)
    parity = compare_sessions(fp32_path, out, inputs, tolerance)
    if not parity.ok:
        Path(out).unlink()
        raise EdgebcError(
            f"{out}: FP16 differs from FP32 by up to {parity.max_abs_logit_diff:.3g} in the logits (tolerance {tolerance:g})"
        )
    return Path(out), card, parity


def embed_card(graph: Any, card: ModelCard) -> None:
    """Put the card into the graph's metadata (replacing an older one) and describe the graph."""
    for index in reversed(range(len(graph.metadata_props))):
        if graph.metadata_props[index].key == CARD_KEY:
            del graph.metadata_props[index]
    entry = graph.metadata_props.add()
    entry.key, entry.value = CARD_KEY, card.to_json()
    graph.producer_name, graph.producer_version = "edgebc", __version__
    graph.doc_string = (
        f"{card.arch} breast-lesion classifier ({', '.join(card.class_names)}); research use only"
    )


def verification_inputs(
    card: PreprocessCard, frames: Sequence[np.ndarray] = (), n_random: int = 4
) -> np.ndarray:
    """Fixed random tensors, phantom frames of every class, and any given frames, preprocessed."""
    rng = np.random.default_rng(1234)
    random = rng.normal(0.0, 1.0, (n_random, *card.input_shape)).astype(np.float32)
    phantoms = [
        make_ultrasound_phantom(label, phantom_rng(99, k), 192, 224).image
        for k, label in enumerate(("normal", "benign", "malignant"))
    ]
    return np.concatenate([random, preprocess_batch([*phantoms, *frames], card)])


def compare_with_torch(
    model: Any, onnx_path: Path, card: ModelCard, frames: Sequence[np.ndarray], tolerance: float
) -> ParityResult:
    torch = require("torch", "ONNX export")
    inputs = verification_inputs(card.preprocess, frames)
    with torch.inference_mode():
        expected = model(torch.from_numpy(inputs)).numpy()
    return parity_of(expected, run_onnx(onnx_path, inputs), tolerance)


def compare_sessions(
    reference: str | Path, candidate: str | Path, inputs: np.ndarray, tolerance: float
) -> ParityResult:
    return parity_of(run_onnx(reference, inputs), run_onnx(candidate, inputs), tolerance)


def run_onnx(path: str | Path, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    """Logits of an ONNX model for NCHW `inputs`, on ONNX Runtime's CPU provider, in batches."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)]
    )


def parity_of(expected: np.ndarray, actual: np.ndarray, tolerance: float) -> ParityResult:
    from edgebc.metrics import softmax

    diff = np.abs(expected.astype(np.float64) - actual)
    return ParityResult(
        max_abs_logit_diff=float(diff.max()), mean_abs_logit_diff=float(diff.mean()),
        max_abs_prob_diff=float(np.abs(softmax(expected) - softmax(actual)).max()),
        top1_agreement=float(np.mean(expected.argmax(1) == actual.argmax(1))), n=len(expected), tolerance=tolerance,
    )  # fmt: skip


def _rename_io(graph: Any) -> None:
    """Both exporters honour input_names, but make sure the public names are the card's."""
    old_in, old_out = graph.graph.input[0].name, graph.graph.output[0].name
    for old, new in ((old_in, INPUT_NAME), (old_out, OUTPUT_NAME)):
        if old == new:
            continue
        for node in graph.graph.node:
            node.input[:] = [new if n == old else n for n in node.input]
            node.output[:] = [new if n == old else n for n in node.output]
    graph.graph.input[0].name, graph.graph.output[0].name = INPUT_NAME, OUTPUT_NAME
