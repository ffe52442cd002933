"""The model card: the one typed record of a model, from training's finalisation to the device.

A checkpoint holds a card plus the training state; an exported ONNX file holds the card as JSON
in its metadata under `edgebc.card`; the runtime, `eval`, calibration, the INT8 parity checks and
the benchmarks read it through `ModelCard.from_dict` / `from_json`, never by picking keys out of a
dict. It says what the device needs and nothing is re-declared elsewhere: the task (classes,
positive class, how dataset labels map), every input (name, modality, view, its own
preprocessing, whether it is optional, whether it changes per frame or once per case), every
output (logits, and features for shift detection), the temperature, the operating point with the
validation figures behind it, metrics, hashes, the training data fingerprint, the model's
lineage (the pretrained file it started from and the teachers it was distilled from) and, where
training stored them, the statistics of its training distribution (edgebc.shift).

Cards written before schema 2 (single input, flat `threshold`/`preprocess` fields) are migrated
on reading, so existing exported models and the checkpoints users trained keep working.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgebc.config import from_mapping, to_mapping
from edgebc.errors import EdgebcError
from edgebc.patches import PatchCard
from edgebc.preprocess import PreprocessCard
from edgebc.shift import TrainingStatistics
from edgebc.task import Task, task_for

CARD_KEY = "edgebc.card"
CARD_SCHEMA = 2


@dataclass(frozen=True)
class ModelInput:
    """One input tensor: a modality (`us` ultrasound, `mg` mammography), a view where it has one
    (`L-CC`, `R-MLO`, ...), its own preprocessing, and how often it changes: live ultrasound per
    frame, a stored mammogram once per case (the runtime may cache what it computes from it)."""

    name: str
    preprocess: PreprocessCard
    modality: Literal["us", "mg"] = "us"
    view: str | None = None
    optional: bool = False
    changes: Literal["frame", "case"] = "frame"
    # a patch model (mammograms): the film is classified by sliding these patches over the breast
    # and aggregating (edgebc.patches); None, the default, is a whole-image model
    patches: PatchCard | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.preprocess.input_shape


@dataclass(frozen=True)
class ModelOutput:
    """One output tensor: `logits` (one per class), `features` (an embedding, for shift checks)
    or `box` (a lesion localiser's box: x0, y0, x1, y1 as fractions of its input, edgebc.localiser)."""

    name: str
    kind: Literal["logits", "features", "box"] = "logits"
    size: int = (
        0  # classes for logits, the embedding width for features, 4 for a box; 0 = not recorded
    )


# the crop's margin around a localiser's box, per side, as a fraction of the box (BUSI's masks
# hug the lesion; its margin and the tissue beside it are what a reader looks at)
DEFAULT_LOCALISER_MARGIN = 0.15


@dataclass(frozen=True)
class LocaliserLink:
    """A classifier's lesion localiser: the localiser's ONNX file (relative to the classifier's
    folder, or absolute) and the margin added around its box before cropping, as a fraction of
    the box's width and height on each side (edgebc.localiser)."""

    model: str
    margin: float = DEFAULT_LOCALISER_MARGIN
    # the localiser file's sha256 when it was linked ("" in links written before): the runtime
    # refuses another file under that name, so a swapped localiser never crops unnoticed
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("a localiser link names the localiser's model file")
        if not 0.0 <= self.margin <= 2.0:
            raise ValueError(f"localiser margin is a fraction 0..2 of the box, got {self.margin}")


@dataclass(frozen=True)
class OperatingPoint:
    """The positive-class threshold and the evidence it rests on: a sensitivity measured on
    `positives` cases says more, or less, than the bare number, and `sensitivity_bound` says how
    low the sensitivity on new cases may be with probability `confidence` (a one-sided
    Clopper-Pearson bound over `unit`s: patients where the data names them, else frames)."""

    threshold: float
    target_sensitivity: float | None = None
    sensitivity: float | None = None  # where the threshold was chosen, at the threshold
    specificity: float | None = None
    positives: int | None = None  # positive units behind the figures
    negatives: int | None = None
    sensitivity_bound: float | None = None
    confidence: float | None = None
    unit: Literal["patient", "frame"] = "frame"

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {self.threshold}")
        if self.sensitivity_bound is not None and not 0.0 <= self.sensitivity_bound <= 1.0:
            raise ValueError(f"sensitivity_bound is in [0, 1], got {self.sensitivity_bound}")


@dataclass(frozen=True)
class ModelCard:
    """Everything the device needs to turn pixels into a decision, and where the model came from.

    The logits output comes first among `outputs` (the exporters name graph outputs in the
    model's return order); further outputs are features.
    """

    name: str
    arch: str
    task: Task
    inputs: tuple[ModelInput, ...]
    outputs: tuple[ModelOutput, ...] = (ModelOutput("logits"),)
    arch_options: dict[str, Any] = field(default_factory=dict)  # rebuild args (width, head, ...)
    temperature: float = 1.0
    operating_point: OperatingPoint | None = None
    precision: str = "fp32"  # fp32 | fp16 | int8
    max_batch: int = 64
    metrics: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    data_fingerprint: str = ""
    edgebc_version: str = ""
    exported: str = ""
    source_checkpoint: str = ""
    quantization: dict[str, Any] | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    # what the model saw, for shift detection on the cart (edgebc.shift); None on older cards
    training_statistics: TrainingStatistics | None = None
    # a multi-view model's (N, len(inputs)) float input, 1 where an input is present and 0 where
    # it is absent (fed as zeros): its optional inputs may then be missing (edgebc.cases)
    presence_input: str | None = None
    # a classifier that classifies the lesion's crop: the localiser that finds it (None: the whole
    # frame, as every model before it)
    localiser: LocaliserLink | None = None
    schema: int = CARD_SCHEMA

    def __post_init__(self) -> None:
        if self.schema != CARD_SCHEMA:
            raise ValueError(
                f"model card schema {self.schema} is not supported (expected {CARD_SCHEMA}); upgrade edgebc"
            )
        if not self.inputs:
            raise ValueError("a model card needs at least one input")
        names = [i.name for i in self.inputs] + [o.name for o in self.outputs]
        names += [self.presence_input] if self.presence_input is not None else []
        if len(set(names)) != len(names):
            raise ValueError(f"input and output names must be distinct, got {names}")
        if [o.kind for o in self.outputs].count("logits") != 1 or self.outputs[0].kind != "logits":
            raise ValueError(
                f"a model card needs exactly one logits output, listed first; got {self.outputs}"
            )
        if self.outputs[0].size not in (0, len(self.task.classes)):
            raise ValueError(
                f"the logits output has {self.outputs[0].size} values but the task has "
                f"{len(self.task.classes)} classes"
            )
        # A fusion model's head takes which branches are present (edgebc.fusion_graphs), so
        # every one of its inputs may be optional: US alone, MG alone or both.
        if (
            all(i.optional for i in self.inputs)
            and self.presence_input is None
            and len(self.inputs) == 1
        ):
            raise ValueError(
                "at least one input must be required (optional: false), or the model must take "
                "a presence input saying which are there"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        boxes = [o for o in self.outputs if o.kind == "box"]
        if boxes and (len(boxes) != 1 or len(self.task.classes) != 2 or len(self.inputs) != 1):
            raise ValueError(
                "a lesion localiser's card has one input, a two-class presence output "
                f"(no lesion, lesion) and one box output; got {self.outputs}"
            )
        if boxes and self.localiser is not None:
            raise ValueError("a lesion localiser cannot itself name a localiser")
        stats = self.training_statistics
        if stats is not None and stats.features.output not in {
            o.name for o in self.outputs if o.kind == "features"
        }:
            raise ValueError(
                f"the training statistics describe the output {stats.features.output!r}, "
                f"which is not among the card's features outputs {[o.name for o in self.outputs]}"
            )  # fmt: skip

    # -- the single-input model's view (most models; a fusion model names its inputs) ----------
    def require_one_image(self, what: str) -> None:
        """Refuse plainly when `what`, which feeds one whole image per decision, cannot serve
        this model: one with several inputs (a multi-view model decides cases), or a patch model
        (its threshold is fitted on patches, not films). Resizing a film into either would answer
        wrongly without saying so."""
        if len(self.inputs) != 1 or self.presence_input is not None:
            names = ", ".join(i.name for i in self.inputs)
            if self.arch == "late_fusion":
                cases = " (a fusion model: edgebc classify MODEL --ultrasound ... --mammogram ...)"
            elif self.presence_input:
                cases = " (a multi-view model: edgebc classify MODEL cases.csv)"
            else:
                cases = ""
            raise EdgebcError(
                f"model {self.name} has {len(self.inputs)} inputs ({names}); {what} feeds one "
                f"image{cases}"
            )
        if self.inputs[0].patches is not None:
            raise EdgebcError(
                f"model {self.name} classifies patches of a film; {what} does not decide with patch "
                "models (their operating point is fitted on patches, not films): score films with "
                "python -m edgebc.train.patches"
            )

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.task.classes

    @property
    def positive_class(self) -> str:
        return self.task.positive_class

    @property
    def positive(self) -> int:
        return self.task.positive

    @property
    def threshold(self) -> float | None:
        return None if self.operating_point is None else self.operating_point.threshold

    @property
    def target_sensitivity(self) -> float | None:
        return None if self.operating_point is None else self.operating_point.target_sensitivity

    @property
    def input(self) -> ModelInput:
        """The only input; a model with several names them (`inputs`)."""
        if len(self.inputs) != 1:
            raise EdgebcError(
                f"model {self.name} has {len(self.inputs)} inputs "
                f"({', '.join(i.name for i in self.inputs)}): give each by name"
            )
        return self.inputs[0]

    @property
    def preprocess(self) -> PreprocessCard:
        return self.input.preprocess

    @property
    def input_name(self) -> str:
        return self.input.name

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.input.shape

    @property
    def is_localiser(self) -> bool:
        """A lesion localiser (a box output beside its lesion-present logits), not a classifier."""
        return any(o.kind == "box" for o in self.outputs)

    @property
    def box_output(self) -> str:
        """The name of a localiser's box output."""
        for output in self.outputs:
            if output.kind == "box":
                return output.name
        raise EdgebcError(f"model {self.name} is not a lesion localiser (it has no box output)")

    @property
    def logits_output(self) -> ModelOutput:
        return next(o for o in self.outputs if o.kind == "logits")

    @property
    def output_name(self) -> str:
        return self.logits_output.name

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = to_mapping(self)
        for key in ("training_statistics", "presence_input", "localiser"):
            if data[key] is None:  # absent, as on cards written before it existed
                del data[key]
        for entry in data["inputs"]:  # likewise: a whole-image input's card is unchanged
            if entry.get("patches", 0) is None:
                del entry["patches"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "model card") -> ModelCard:
        """The one constructor from stored form; older schemas are migrated first."""
        if not isinstance(data, Mapping):
            raise EdgebcError(f"{source}: a model card is a mapping, got {type(data).__name__}")
        schema = data.get("schema", 1)
        if schema == 1:
            try:
                data = migrate_schema1(data)
            except (KeyError, TypeError, ValueError) as exc:
                raise EdgebcError(
                    f"{source}: a schema-1 model card without {exc} (damaged, or not an edgebc "
                    "card): re-export the model with `edgebc export`"
                ) from exc
        elif schema != CARD_SCHEMA:
            raise EdgebcError(
                f"{source}: model card schema {schema} is newer than this edgebc understands "
                f"({CARD_SCHEMA}); upgrade edgebc"
            )
        return from_mapping(cls, data, source=source)

    @classmethod
    def from_json(cls, text: str, source: str = "model card") -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EdgebcError(f"{source}: model card is not valid JSON: {exc}") from exc
        return cls.from_dict(data, source)


def single_input(
    preprocess: PreprocessCard, name: str = "input", modality: Literal["us", "mg"] = "us"
) -> tuple[ModelInput, ...]:
    """The inputs of an ordinary one-image model."""
    return (ModelInput(name, preprocess, modality),)


def migrate_schema1(old: Mapping[str, Any]) -> dict[str, Any]:
    """A schema-1 card (one input, flat threshold fields) in schema-2 form, nothing lost."""
    data = dict(old)
    classes = data.pop("class_names")
    positive = data.pop("positive_class")
    threshold = data.pop("threshold", None)
    target = data.pop("target_sensitivity", None)
    preprocess = data.pop("preprocess")
    input_name = data.pop("input_name", "input")
    output_name = data.pop("output_name", "logits")
    task = task_for(None, classes, positive)
    data.update(
        schema=CARD_SCHEMA,
        task=to_mapping(task),
        inputs=[{"name": input_name, "preprocess": preprocess}],
        outputs=[{"name": output_name, "kind": "logits", "size": len(classes)}],
        operating_point=None
        if threshold is None
        else {"threshold": threshold, "target_sensitivity": target},
    )
    return data


def read_card(model_path: str | Path) -> ModelCard:
    """The card embedded in an ONNX file, read through ONNX Runtime's metadata (no onnx package)."""
    import onnxruntime

    path = Path(model_path)
    if not path.is_file():
        raise EdgebcError(f"{path}: model file not found")
    try:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise EdgebcError(
            f"{path}: not a loadable ONNX model (truncated or corrupt?): {exc}"
        ) from exc
    metadata = session.get_modelmeta().custom_metadata_map
    if CARD_KEY not in metadata:
        raise EdgebcError(
            f"{path}: has no edgebc model card; export it with `edgebc export` so the device knows its preprocessing"
        )
    return ModelCard.from_json(metadata[CARD_KEY], source=f"{path}: {CARD_KEY}")


def without_machine_paths(card: ModelCard) -> ModelCard:
    """The card as a shipped file may carry it: every path in it (the source checkpoint, the
    teachers, the pretrained file, a site's data, at any depth of the lineage) cut to its last
    folder and file, since a model leaves the machine it was built on and must not name that
    machine's folders (a user's home, a clinic's share). Hashes identify the files anyway."""
    from dataclasses import replace

    return replace(card, source_checkpoint=_shared_path(card.source_checkpoint),
                   lineage=_without_paths(card.lineage))  # fmt: skip


def machine_paths(value: Any) -> list[str]:
    """Every string in `value` (a card's dict, at any depth) that names a folder of a machine."""
    if isinstance(value, Mapping):
        return [found for item in value.values() for found in machine_paths(item)]
    if isinstance(value, (list, tuple)):
        return [found for item in value for found in machine_paths(item)]
    return [value] if isinstance(value, str) and _is_machine_path(value) else []


def _without_paths(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _without_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_paths(item) for item in value]
    return _shared_path(value) if isinstance(value, str) else value


def _shared_path(text: str) -> str:
    if not _is_machine_path(text):
        return text
    return "/".join(Path(text.replace("\\", "/")).parts[-2:])


def _is_machine_path(text: str) -> bool:
    """Absolute (POSIX or Windows), home-relative, or climbing out of its folder with `..`."""
    if "\n" in text or len(text) > 4096:
        return False
    posix = text.replace("\\", "/")
    return (
        posix.startswith(("/", "~"))
        or (len(posix) > 2 and posix[1] == ":" and posix[2] == "/")
        or ".." in posix.split("/")
    )
