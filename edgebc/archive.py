"""`edgebc classify`: files, folders, globs, videos and DICOM in; one CSV or JSON Lines row per frame out
(for a fusion model's case: a row per mammogram, per ultrasound frame and for the case).

Archive work, not live work: every frame of a video or DICOM cine is classified (or every Nth
with a stride). The classifier is the one `edgebc serve` builds from the same settings (model,
region, threshold, quality gate), inputs are expanded by the rule its folder sources use, and each
file's frames are read by the source `edgebc serve` would play it with (`sources.open_file`). An
unreadable input gets a row with its error and one line on stderr, and the batch goes on; the
exit status says whether anything failed. The output is written atomically.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgebc.atomic import atomic_write_text
from edgebc.classifier import Decision, FrameClassifier
from edgebc.classifier_settings import ClassifierSettings
from edgebc.decode import DicomStudy, ImageView, read_study
from edgebc.errors import EdgebcError
from edgebc.fusion import (
    FusionClassifier,
    FusionDecision,
    Mammogram,
    another_patient,
    one_ultrasound_study,
    stated_view,
)
from edgebc.region import Region, detect_imaging_region
from edgebc.sources import DicomSource, OpenCVSource, expand_inputs, open_file


@dataclass(frozen=True)
class ClassifySettings(ClassifierSettings):
    """An archive job for `edgebc classify --config` (deploy/configs/archive-batch.yaml); the
    command line's arguments and flags override the file's keys."""

    inputs: tuple[str, ...] = ()
    # a fusion model's case (edgebc.fusion): its ultrasound images, cines and videos, and its
    # stored mammogram views, files or folders; `case` names it in every row
    ultrasound: tuple[str, ...] = ()
    mammogram: tuple[str, ...] = ()
    case: str = "case"
    out: str = "runs/results.csv"
    batch: int = 16
    stride: int = 1
    spin_wait: bool = True  # a batch job keeps its cores busy anyway: ONNX Runtime's default

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("no model: give MODEL on the command line or model: in --config")
        if self.inputs and (self.ultrasound or self.mammogram):
            raise ValueError(
                "give images either as INPUTS (a one-image or multi-view model) or with "
                "--ultrasound/--mammogram (a fusion model's case), not both"
            )
        if not (self.inputs or self.ultrasound or self.mammogram):
            raise ValueError(
                "no inputs: give INPUTS (or --ultrasound/--mammogram for a fusion model) on the "
                "command line, or inputs: in --config"
            )
        if not self.case.strip():
            raise ValueError("case must name the case (a non-empty id)")
        if self.batch < 1 or self.stride < 1:
            raise ValueError(
                f"batch and stride must be at least 1, got {self.batch} and {self.stride}"
            )
        if Path(self.out).suffix.lower() not in (".csv", ".jsonl"):
            raise ValueError(f"out must end in .csv or .jsonl, got {self.out!r}")


@dataclass(frozen=True)
class FrameItem:
    source: str
    frame: int | None
    image: np.ndarray | None
    error: str | None = None
    view: ImageView | None = None  # a mammogram's view, where its DICOM header says it
    study: DicomStudy = field(default_factory=DicomStudy)  # its DICOM study and patient, hashed


def iter_frames(
    paths: Sequence[Path], stride: int = 1, full_depth: bool = False
) -> Iterator[FrameItem]:
    """Every frame to classify, with errors as items rather than exceptions; `full_depth` for
    mammography models (sources.open_file)."""
    for path in paths:
        try:
            yield from _file_frames(path, stride, full_depth)
        except (EdgebcError, OSError, ValueError) as exc:
            yield FrameItem(str(path), None, None, str(exc))


def _file_frames(path: Path, stride: int, full_depth: bool = False) -> Iterator[FrameItem]:
    """A file's frames as `edgebc serve` plays it: a single picture (an image, a one-frame DICOM)
    without a frame number, and every `stride`-th frame of a video or cine, numbered."""
    source = open_file(path, full_depth)
    source.open()
    study = source.study if isinstance(source, DicomSource) else DicomStudy()
    try:
        frames = iter(source.read, None)
        first, second = next(frames, None), next(frames, None)
        if first is None:
            raise EdgebcError(f"{path}: holds no readable frame")
        if second is None and not isinstance(source, OpenCVSource):  # a video is numbered always
            yield FrameItem(str(path), None, first.image, view=first.view, study=study)
            return
        for frame in itertools.chain([first], [] if second is None else [second], frames):
            if frame.index % stride == 0:
                yield FrameItem(str(path), frame.index, frame.image, view=frame.view, study=study)
    finally:
        source.close()


def classify_inputs(
    classifier: FrameClassifier,
    inputs: Sequence[str],
    out: str | Path,
    batch_size: int = 16,
    stride: int = 1,
    on_error: Callable[[str], None] = lambda _m: None,
    progress: Callable[[int], None] = lambda _n: None,
    auto_region: bool = False,
) -> tuple[int, int]:
    """Classify everything in `inputs` into `out` (.csv or .jsonl); returns (frames written, errors).

    With `auto_region` and a classifier without a region (the settings allow one or the other)
    the imaging region is detected on the first frame of each input and used for all its frames
    (the live service does the same per stream); an input where none is found is reported as an
    error rather than classified whole."""
    out = Path(out)
    if out.suffix.lower() not in (".csv", ".jsonl"):
        raise EdgebcError(f"{out}: output must end in .csv or .jsonl")
    classes = list(classifier.card.class_names)
    rows: list[dict[str, object]] = []
    pending: list[tuple[FrameItem, np.ndarray]] = []
    errors = 0

    def flush() -> None:
        if not pending:
            return
        decisions = classifier.classify_batch(
            [image for _, image in pending], [item.view for item, _ in pending]
        )
        for (item, _), decision in zip(pending, decisions, strict=True):
            rows.append(_row(item, decision, classes))
        progress(len(pending))
        pending.clear()

    # a mammography model reads a grey DICOM at its full depth, as it was trained
    full_depth = classifier.card.inputs[0].modality == "mg"
    frames = iter_frames(expand_inputs(inputs), stride, full_depth)
    detect = auto_region and classifier.region is None
    for item in _regions_detected(frames) if detect else frames:
        if item.error is not None or item.image is None:
            errors += 1
            message = item.error or "no image"
            on_error(message if message.startswith(item.source) else f"{item.source}: {message}")
            rows.append({"source": item.source, "frame": "", "decision": "", "error": message})
            continue
        pending.append((item, item.image))
        if len(pending) >= batch_size:
            flush()
    flush()
    atomic_write_text(out, render_table(rows, out.suffix.lower(), frame_columns(classes)))
    return sum(1 for r in rows if not r.get("error")), errors


def classify_fusion_case(
    classifier: FusionClassifier,
    case: str,
    ultrasound: Sequence[str],
    mammograms: Sequence[str],
    out: str | Path,
    batch_size: int = 16,
    stride: int = 1,
    on_error: Callable[[str], None] = lambda _m: None,
    progress: Callable[[int], None] = lambda _n: None,
) -> tuple[int, int]:
    """One case of a fusion model into `out` (.csv or .jsonl): a row per mammogram (the input it
    fed, or why none), a row per ultrasound frame (every frame of a cine or video, every
    `stride`-th), then the case's row (the mean of its frames, or its mammograms alone where the
    model answers without ultrasound); every decided row names the inputs and modalities it
    used. A DICOM frame of another patient (PatientID, compared as hashes, never written) than
    the mammograms' is an error row, never fused; the mammograms' study is not the ultrasound's
    (an archive keeps them apart). Returns (frames decided, errors). Mammograms of several
    studies or patients, or the rest of the ultrasound of several DICOM studies (a case is one
    ultrasound study): ValueError naming them, and nothing is run or written."""
    out = Path(out)
    if out.suffix.lower() not in (".csv", ".jsonl"):
        raise EdgebcError(f"{out}: output must end in .csv or .jsonl")
    rows: list[dict[str, object]] = []
    errors = 0

    def failed(item: FrameItem, level: str) -> None:
        nonlocal errors
        errors += 1
        message = item.error or "no image"
        on_error(message if message.startswith(item.source) else f"{item.source}: {message}")
        rows.append({"source": item.source, "case": case, "level": level, "error": message})

    films = []
    for stated, paths in mammogram_views(mammograms):
        for item in iter_frames(paths, 1, full_depth=True):
            if item.image is None:
                failed(item, "mammogram")
                continue
            source = item.source if item.frame is None else f"{item.source}#{item.frame}"
            header = item.view or ImageView()
            try:
                view = header if stated is None else stated_view(stated, header, source)
            except ValueError as exc:  # the stated view and the file disagree: that film is out
                failed(replace(item, error=str(exc)), "mammogram")
                continue
            films.append(Mammogram(item.image, view, source, header, item.study))
    context = classifier.attach(case, films)
    scans = expand_inputs(ultrasound) if ultrasound else []
    patient = context.patient_sha256
    one_ultrasound_study([(name, study) for name, study in _dicom_studies(scans)
                          if not another_patient(patient, study)])  # fmt: skip
    for use in context.mammograms:
        rows.append({"source": use.source, "case": case, "level": "mammogram",
                     "inputs": use.input or "", "modalities": "mg" if use.input else "",
                     "quality": str(use.quality), "pixels_sha256": use.pixels_sha256, "error": ""})  # fmt: skip
    decisions: list[FusionDecision] = []
    pending: list[FrameItem] = []

    def flush() -> None:
        if not pending:
            return
        decided = classifier.classify_batch([item.image for item in pending])  # type: ignore[misc]
        for item, decision in zip(pending, decided, strict=True):
            rows.append(_fusion_row(item.source, case, "frame", item.frame, decision, classifier))
        decisions.extend(decided)
        progress(len(pending))
        pending.clear()

    for item in iter_frames(scans, stride):
        if item.image is None:
            failed(item, "frame")
            continue
        if another_patient(patient, item.study):
            failed(replace(item, error=f"{item.source}: DICOM of another patient (PatientID) than "
                                       "the case's mammograms; never fused"), "frame")  # fmt: skip
            continue
        pending.append(item)
        if len(pending) >= batch_size:
            flush()
    flush()
    whole = classifier.case_decision(decisions) if ultrasound else classifier.classify_mammograms()
    rows.append(_fusion_row(case, case, "case", None, whole, classifier))
    classes = classifier.card.class_names
    atomic_write_text(out, render_table(rows, out.suffix.lower(), fusion_columns(classes)))
    return sum(1 for d in decisions if d.decision.label is not None), errors


def _dicom_studies(paths: Sequence[Path]) -> list[tuple[str, DicomStudy]]:
    """The study and patient (hashed) of each DICOM file among `paths`, from its header alone; a
    file whose header cannot be read is left to its frames' error row."""
    named = []
    for path in paths:
        if isinstance(open_file(path), DicomSource):
            try:
                named.append((str(path), read_study(path.read_bytes(), str(path))))
            except (EdgebcError, OSError):
                continue
    return named


def mammogram_views(items: Sequence[str]) -> list[tuple[ImageView | None, list[Path]]]:
    """`--mammogram` arguments as (stated view, files): `L-CC=cc.png` states the view of the
    files a path names (a PNG carries none; as a manifest's view column, it wins over a DICOM
    header's side, whose chest-wall edge is kept); a plain path (or one whose text before `=`
    is no view) leaves each file's header to say."""
    out: list[tuple[ImageView | None, list[Path]]] = []
    for item in items:
        code, sep, rest = item.partition("=")
        stated = None
        if sep:
            try:
                stated, item = ImageView.from_code(code.upper()), rest
            except ValueError:  # no view before "=": a file name holding one
                stated = None
        out.append((stated, expand_inputs([item])))
    return out


def _fusion_row(source: str, case: str, level: str, frame: int | None, decision: FusionDecision,
                classifier: FusionClassifier) -> dict[str, object]:  # fmt: skip
    fields = decision.decision.to_json()
    row: dict[str, object] = {
        "source": source, "case": case, "level": level, "frame": "" if frame is None else frame,
        "inputs": "+".join(decision.inputs), "modalities": "+".join(decision.modalities),
        "decision": fields["label"] or "", "quality": str(decision.decision.quality),
        "positive_probability": rounded(fields["positive_probability"]),
        "threshold": "" if fields["threshold"] is None else fields["threshold"],
        "model_sha256": fields["model_sha256"], "error": "",
    }  # fmt: skip
    for name in classifier.card.class_names:
        row[f"p_{name}"] = rounded((fields["probabilities"] or {}).get(name))
    return row


def fusion_columns(classes: Sequence[str]) -> list[str]:
    return ["source", "case", "level", "frame", "inputs", "modalities", "decision", "quality",
            *(f"p_{c}" for c in classes), "positive_probability", "threshold", "pixels_sha256",
            "model_sha256", "error"]  # fmt: skip


def _regions_detected(items: Iterator[FrameItem]) -> Iterator[FrameItem]:
    """Each input's frames cropped to the region detected on its first frame; an input without
    one gives a single error item and none of its frames."""
    source: str | None = None
    region: Region | None = None
    for item in items:
        if item.image is None:
            yield item
            continue
        if item.source != source:
            source, region = item.source, detect_imaging_region(item.image)
            if region is None:
                yield replace(item, image=None, error=f"{item.source}: no imaging region found on "
                              "its first frame; give --region X,Y,W,H")  # fmt: skip
        if region is None:
            continue
        try:
            yield replace(item, image=region.crop(item.image))
        except ValueError as exc:  # a frame of another size than the input's first
            yield replace(item, image=None, error=f"{item.source}: {exc}")


def _row(item: FrameItem, decision: Decision, classes: list[str]) -> dict[str, object]:
    """One table row of a decision's JSON: flat, blank where there is no value."""
    fields = decision.to_json()
    probabilities = fields["probabilities"] or {}
    row: dict[str, object] = {
        "source": item.source, "frame": "" if item.frame is None else item.frame,
        "decision": fields["label"] or "", "quality": str(decision.quality),
        "positive_probability": rounded(fields["positive_probability"]),
        "threshold": "" if fields["threshold"] is None else fields["threshold"],
    }  # fmt: skip
    for name in classes:
        row[f"p_{name}"] = rounded(probabilities.get(name))
    row["model_sha256"] = fields["model_sha256"]
    row["runtime"] = fields["runtime"] or ""
    row["demo"] = "yes" if fields["demo"] else "no"  # the demo model: phantoms only
    shift = decision.shift
    if shift is not None:  # blank: not checked (check off, or the frame failed the gate)
        row["shift"] = f"out ({decision.shift_action})" if shift.flagged else "in"
        row["shift_score"] = round(shift.score, 3)
    if decision.localiser_sha256 is not None:  # blank: no localiser (or the gate refused first)
        box = fields["box"] or {}
        row.update({f"box_{k}": box.get(k, "") for k in BOX_FIELDS})
        row["localiser_sha256"] = decision.localiser_sha256
    row["error"] = ""
    return row


def rounded(probability: float | None) -> object:
    """A probability for a results table: six decimals, blank where there is none."""
    return "" if probability is None else round(probability, 6)


def render_table(rows: list[dict[str, object]], suffix: str, columns: Sequence[str]) -> str:
    """Rows as CSV (a header, then one line each) or JSON Lines, in `columns`, blank where a
    row has no value: the one format of classify's frame and case results."""
    if suffix == ".jsonl":
        return "".join(json.dumps({k: row.get(k, "") for k in columns}) + "\n" for row in rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row.get(k, "") for k in columns} for row in rows)
    return buffer.getvalue()


# the lesion localiser's box in a frame's row: x, y, w, h in the frame's pixels, and its score
BOX_FIELDS = ("x", "y", "w", "h", "score")


def frame_columns(classes: Sequence[str]) -> list[str]:
    return ["source", "frame", "decision", "quality", *(f"p_{c}" for c in classes),
            "positive_probability", "threshold", "shift", "shift_score", *(f"box_{k}" for k in BOX_FIELDS),
            "model_sha256", "runtime", "localiser_sha256", "demo", "error"]  # fmt: skip
