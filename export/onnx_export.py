"""Checkpoint -> ONNX with the model card embedded, checked, and proven to agree with PyTorch.

One self-contained file (no external data), a recent opset, a dynamic batch dimension. The graph's
inputs and outputs are the card's, by name and in order: one image for most models, one per
modality or view for fusion models; the logits, then the penultimate features (which shift
detection on the device compares with the training distribution). The exported graph is run by ONNX
Runtime on fixed random inputs, synthetic phantom frames and (when given) real frames through the
shared preprocessing, and compared with PyTorch; the export fails when the largest logit
difference exceeds the tolerance. FP16 copies keep float32 inputs and outputs so callers need not
change.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgebc import __version__
from edgebc.atomic import atomic_write_bytes
from edgebc.errors import EdgebcError
from edgebc.model_card import CARD_KEY, ModelCard, ModelInput, without_machine_paths
from edgebc.optional import require
from edgebc.preprocess import preprocess_batch
from edgebc.synth.mammo import make_mammo_phantom
from edgebc.synth.ultrasound import make_ultrasound_phantom, phantom_rng

log = logging.getLogger(__name__)
DEFAULT_OPSET = 18
Feeds = dict[str, np.ndarray]  # input name -> (N, C, H, W) float32


@dataclass(frozen=True)
class ParityResult:
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    max_abs_prob_diff: float
    decision_agreement: float  # the share of inputs the card's rule decides the same
    n: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance


def card_for_export(card: ModelCard, name: str, max_batch: int, source: str) -> ModelCard:
    """The training card as the exported file carries it: named after the file, FP32, dated.

    The checkpoint is named by its run folder and file (`busi-mnv3/best.pt`), never by an absolute
    path, and so is every path in the lineage (teachers, pretrained file): a shipped model must not
    carry the build machine's folders, and the weights' sha256 identify the files anyway."""
    exported = replace(
        card, name=name, precision="fp32", max_batch=max_batch, edgebc_version=__version__,
        exported=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        source_checkpoint=str(source),
    )  # fmt: skip
    return without_machine_paths(exported)


@contextlib.contextmanager
def _without_torchs_own_noise() -> Iterator[None]:
    """Silence what torch's exporters say about torch itself, which no user can act on and which
    reads as alarming in a normal run: the LeafSpec deprecation raised inside torch.export's own
    tree specs, the legacy exporter's deprecation (it runs only when asked for, and says so in our
    log), and "torchvision is not installed. Skipping torchvision::nms" (this project has no
    torchvision and exports none of its operators). Everything else still reaches the user."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning
        )
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning
        )
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        # several inputs sharing the one batch dimension (fusion, multi-view): torch names it once
        warnings.filterwarnings("ignore", "# The axis name: batch will not be used", UserWarning)
        registration.setLevel(logging.ERROR)
        try:
            yield
        finally:
            registration.setLevel(level)


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
    from edgebc.train.checkpoint import load_checkpoint, model_from_checkpoint
    from edgebc.train.models.features import card_with_features, model_for_card

    loaded = load_checkpoint(checkpoint)
    classifier = model_from_checkpoint(loaded)
    out = Path(out)
    # every one-input model exports its penultimate features too (shift detection on the cart)
    card = card_for_export(
        card_with_features(loaded.card, classifier), out.stem, max_batch, str(checkpoint)
    )
    model = model_for_card(classifier, card)
    examples = tuple(torch.zeros(2, *i.shape) for i in card.inputs)
    inputs, outputs = [i.name for i in card.inputs], [o.name for o in card.outputs]
    if card.presence_input is not None:  # multi-view: the views, then which of them are there
        from edgebc.train.multiview import ViewInputs

        model = ViewInputs(model).eval()
        examples = (*examples, torch.ones(2, len(card.inputs)))
        inputs.append(card.presence_input)
    write_graph(model, examples, inputs, outputs, out, opset, max_batch, exporter,
                lambda graph: embed_card(graph, card))  # fmt: skip
    parity = compare_with_torch(model, out, card, verify_frames, tolerance)
    if not parity.ok:
        out.unlink()
        raise EdgebcError(
            f"{out}: ONNX Runtime and PyTorch disagree by up to {parity.max_abs_logit_diff:.3g} in the logits "
            f"(tolerance {tolerance:g}); export refused"
        )
    return out, card, parity


def write_graph(
    model: Any,
    examples: tuple[Any, ...],
    inputs: Sequence[str],
    outputs: Sequence[str],
    out: Path,
    opset: int,
    max_batch: int,
    exporter: str,
    describe: Callable[[Any], None],
) -> None:
    """Export `model` on `examples` to the checked ONNX file `out`, its inputs and outputs named
    as given (dynamic batch), `describe` adding the metadata (the card) before the check."""
    torch = require("torch", "ONNX export")
    onnx = require("onnx", "ONNX export")
    inputs, outputs = list(inputs), list(outputs)
    with tempfile.TemporaryDirectory() as scratch, _without_torchs_own_noise():
        raw = Path(scratch) / "raw.onnx"
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=max_batch)
            with redirect_stdout(io.StringIO()):  # the exporter narrates every pass on stdout
                per_input = tuple({0: batch} for _ in inputs)
                varargs = any(
                    p.kind is p.VAR_POSITIONAL
                    for p in inspect.signature(model.forward).parameters.values()
                )
                program = torch.onnx.export(model, examples, dynamo=True, opset_version=opset, input_names=inputs,
                                            output_names=outputs, dynamic_shapes=(per_input,) if varargs else per_input,
                                            external_data=False, verbose=False)  # fmt: skip
                program.save(str(raw))
        elif exporter == "torchscript":
            log.info("exporting with the legacy TorchScript exporter, as asked (torch deprecates it; "
                     "dynamo is the default)")  # fmt: skip
            torch.onnx.export(model, examples, str(raw), dynamo=False, opset_version=min(opset, 17), input_names=inputs,
                              output_names=outputs, dynamic_axes={n: {0: "batch"} for n in inputs + outputs})  # fmt: skip
        else:
            raise EdgebcError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
        graph = onnx.load(str(raw))
    _rename_io(graph, inputs, outputs)
    _separate_outputs(graph)
    _drop_stack_traces(graph)
    describe(graph)
    onnx.checker.check_model(graph, full_check=True)
    atomic_write_bytes(out, graph.SerializeToString())


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
    feeds = verification_feeds(card, reference_frames)
    parity = compare_sessions(fp32_path, out, feeds, tolerance)
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
        f"{card.arch} breast-lesion classifier ({', '.join(card.class_names)}) on "
        f"{', '.join(f'{i.name} ({i.modality})' for i in card.inputs)}; research use only"
    )


def verification_feeds(
    card: ModelCard, frames: Sequence[np.ndarray] = (), n_random: int = 4
) -> Feeds:
    """Per input: fixed random tensors, phantom frames of every class for its modality, and (for
    a one-input model) any given frames, all through the shared preprocessing."""
    rng = np.random.default_rng(1234)
    feeds: Feeds = {}
    for model_input in card.inputs:
        random = rng.normal(0.0, 1.0, (n_random, *model_input.shape)).astype(np.float32)
        given = frames if len(card.inputs) == 1 else ()
        feeds[model_input.name] = np.concatenate(
            [random, preprocess_batch([*_phantoms(model_input), *given], model_input.preprocess)]
        )
    if len({len(v) for v in feeds.values()}) != 1:
        raise EdgebcError("verification inputs of a multi-input model must all be equally many")
    if card.presence_input is not None:
        feeds[card.presence_input] = presence_patterns(
            len(feeds[card.inputs[0].name]), len(card.inputs)
        )
    return feeds


def presence_patterns(rows: int, views: int) -> np.ndarray:
    """(rows, views) 0/1 presence for a multi-view model's verification: every view alone, all
    views, and then every pattern with at least one view in turn, so each absent-view path is
    compared with PyTorch too."""
    patterns = [1 << k for k in range(views)] + [(1 << views) - 1]
    patterns += [p for p in range(1, 1 << views) if p not in patterns]
    chosen = [patterns[r % len(patterns)] for r in range(rows)]
    return np.array([[(p >> k) & 1 for k in range(views)] for p in chosen], np.float32)


def _phantoms(model_input: ModelInput) -> list[np.ndarray]:
    labels = ("normal", "benign", "malignant")
    if model_input.modality == "mg":
        return [
            make_mammo_phantom(label, phantom_rng(98, k)).image for k, label in enumerate(labels)
        ]
    return [
        make_ultrasound_phantom(label, phantom_rng(99, k), 192, 224).image
        for k, label in enumerate(labels)
    ]


def compare_with_torch(
    model: Any, onnx_path: Path, card: ModelCard, frames: Sequence[np.ndarray], tolerance: float
) -> ParityResult:
    torch = require("torch", "ONNX export")
    feeds = verification_feeds(card, frames)
    names = [i.name for i in card.inputs]
    if card.presence_input is not None:
        names.append(card.presence_input)
    with torch.inference_mode():
        produced = model(*(torch.from_numpy(feeds[name]) for name in names))
    expected = (produced[0] if isinstance(produced, (tuple, list)) else produced).numpy()
    return parity_of(expected, run_onnx(onnx_path, feeds, card.output_name), tolerance, card)


def compare_sessions(
    reference: str | Path, candidate: str | Path, feeds: Feeds | np.ndarray, tolerance: float
) -> ParityResult:
    from edgebc.model_card import read_card

    card = read_card(reference)
    return parity_of(run_onnx(reference, feeds), run_onnx(candidate, feeds), tolerance, card)


def run_onnx(
    path: str | Path, feeds: Feeds | np.ndarray, output: str | None = None, batch: int = 16
) -> np.ndarray:
    """One output (the first unless named) of an ONNX model on ONNX Runtime's CPU provider, in
    batches; `feeds` maps input names to NCHW arrays, or is the one input's array."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if isinstance(feeds, np.ndarray):
        feeds = {session.get_inputs()[0].name: feeds}
    n = len(next(iter(feeds.values())))
    name = output or session.get_outputs()[0].name
    return np.concatenate([
        session.run([name], {k: v[i : i + batch] for k, v in feeds.items()})[0]
        for i in range(0, n, batch)
    ])  # fmt: skip


def parity_of(
    expected: np.ndarray, actual: np.ndarray, tolerance: float, card: ModelCard
) -> ParityResult:
    """How far two backends' logits are apart, and how often the card's rule decides the same."""
    from edgebc.decision import DecisionRule
    from edgebc.metrics import softmax

    diff = np.abs(expected.astype(np.float64) - actual)
    rule = DecisionRule.of(card)
    probs = [softmax(x, card.temperature) for x in (expected, actual)]
    return ParityResult(
        max_abs_logit_diff=float(diff.max()), mean_abs_logit_diff=float(diff.mean()),
        max_abs_prob_diff=float(np.abs(probs[0] - probs[1]).max()),
        decision_agreement=float(np.mean(rule.indices(probs[0]) == rule.indices(probs[1]))),
        n=len(expected), tolerance=tolerance,
    )  # fmt: skip


def _drop_stack_traces(graph: Any) -> None:
    """torch's exporter stores each node's Python stack trace, with the build machine's file paths;
    a shipped model carries no such paths (the name scopes, which say which layer, stay)."""
    for node in graph.graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def _separate_outputs(graph: Any) -> None:
    """An output that other nodes also read (the features, which feed the final layer) gets its
    own Identity node: the FP16 converter casts graph outputs back to float32 and would otherwise
    feed the cast tensor's type to those nodes too."""
    onnx = require("onnx", "ONNX export")
    read = {name for node in graph.graph.node for name in node.input}
    for output in graph.graph.output:
        if output.name not in read:
            continue
        inner = f"{output.name}_inner"
        for node in graph.graph.node:
            node.input[:] = [inner if n == output.name else n for n in node.input]
            node.output[:] = [inner if n == output.name else n for n in node.output]
        graph.graph.node.append(onnx.helper.make_node("Identity", [inner], [output.name]))


def _rename_io(graph: Any, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Both exporters honour the names they are given, but make sure the public names are the card's."""
    pairs = [
        *zip(graph.graph.input, inputs, strict=True),
        *zip(graph.graph.output, outputs, strict=True),
    ]
    for value, new in pairs:
        old = value.name
        if old == new:
            continue
        for node in graph.graph.node:
            node.input[:] = [new if n == old else n for n in node.input]
            node.output[:] = [new if n == old else n for n in node.output]
        value.name = new
