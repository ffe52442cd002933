"""`edgebc classify`: files, folders, globs, videos and DICOM in; one CSV or JSON Lines row per frame out.

Archive work, not live work: every frame of a video or DICOM cine is classified (or every Nth
with a stride). An unreadable input gets a row with its error and one line on stderr, and the
batch goes on; the exit status says whether anything failed. The output is written atomically.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgebc.atomic import atomic_write_text
from edgebc.classifier import Decision, FrameClassifier
from edgebc.data.readers import IMAGE_SUFFIXES
from edgebc.decode import decode_dicom_frames, read_header, read_image, sniff_format
from edgebc.errors import EdgebcError
from edgebc.sources import VIDEO_SUFFIXES, open_source


@dataclass(frozen=True)
class ClassifySettings:
    """An archive job for `edgebc classify --config` (deploy/configs/archive-batch.yaml); the
    command line's arguments and flags override the file's keys."""

    model: str = ""
    inputs: tuple[str, ...] = ()
    out: str = "results.csv"
    region: tuple[int, int, int, int] | None = None
    auto_region: bool = False
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0
    batch: int = 16
    stride: int = 1

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("no model: give MODEL on the command line or model: in --config")
        if not self.inputs:
            raise ValueError("no inputs: give INPUTS on the command line or inputs: in --config")
        if self.region is not None and self.auto_region:
            raise ValueError("give either a region or auto_region, not both")
        if self.batch < 1 or self.stride < 1:
            raise ValueError(
                f"batch and stride must be at least 1, got {self.batch} and {self.stride}"
            )
        if Path(self.out).suffix.lower() not in (".csv", ".jsonl"):
            raise ValueError(f"out must end in .csv or .jsonl, got {self.out!r}")
        if self.threads < 0:
            raise ValueError(
                f"threads must be 0 (ONNX Runtime's choice) or more, got {self.threads}"
            )


@dataclass(frozen=True)
class FrameItem:
    source: str
    frame: int | None
    image: np.ndarray | None
    error: str | None = None


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files as given, folders recursively (images and videos, masks excluded), glob patterns expanded."""
    paths: list[Path] = []
    for item in inputs:
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise EdgebcError(f"{item}: the pattern matches no file")
            paths += [Path(m) for m in matches]
        elif Path(item).is_dir():
            paths += sorted(
                p
                for p in Path(item).rglob("*")
                if p.is_file()
                and p.suffix.lower() in (*IMAGE_SUFFIXES, *VIDEO_SUFFIXES)
                and "_mask" not in p.stem
            )
        else:
            paths.append(Path(item))
    return paths


def iter_frames(paths: Sequence[Path], stride: int = 1) -> Iterator[FrameItem]:
    """Every frame to classify, with errors as items rather than exceptions."""
    for path in paths:
        try:
            if path.suffix.lower() in VIDEO_SUFFIXES:
                yield from _video_frames(path, stride)
                continue
            data = path.read_bytes()
            if sniff_format(data) == "dicom" and read_header(data, str(path)).frames > 1:
                for index, frame in enumerate(decode_dicom_frames(data, str(path))):
                    if index % stride == 0:
                        yield FrameItem(str(path), index, frame)
                continue
            yield FrameItem(str(path), None, read_image(path))
        except (EdgebcError, OSError, ValueError) as exc:
            yield FrameItem(str(path), None, None, str(exc))


def classify_inputs(
    classifier: FrameClassifier,
    inputs: Sequence[str],
    out: str | Path,
    batch_size: int = 16,
    stride: int = 1,
    on_error: Callable[[str], None] = lambda _m: None,
    progress: Callable[[int], None] = lambda _n: None,
) -> tuple[int, int]:
    """Classify everything in `inputs` into `out` (.csv or .jsonl); returns (frames written, errors)."""
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
        decisions = classifier.classify_batch([image for _, image in pending])
        for (item, _), decision in zip(pending, decisions, strict=True):
            rows.append(_row(item, decision, classes))
        progress(len(pending))
        pending.clear()

    for item in iter_frames(expand_inputs(inputs), stride):
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
    atomic_write_text(out, _render(rows, out.suffix.lower(), classes))
    return sum(1 for r in rows if not r.get("error")), errors


def _row(item: FrameItem, decision: Decision, classes: list[str]) -> dict[str, object]:
    row: dict[str, object] = {
        "source": item.source, "frame": "" if item.frame is None else item.frame,
        "decision": decision.label or "", "quality": str(decision.quality),
        "positive_probability": "" if decision.positive_probability is None else round(decision.positive_probability, 6),
        "threshold": "" if decision.threshold is None else decision.threshold,
    }  # fmt: skip
    for name in classes:
        row[f"p_{name}"] = (
            "" if decision.probabilities is None else round(decision.probabilities[name], 6)
        )
    row["model_sha256"] = decision.model_sha256
    row["error"] = ""
    return row


def _render(rows: list[dict[str, object]], suffix: str, classes: list[str]) -> str:
    columns = [
        "source",
        "frame",
        "decision",
        "quality",
        *(f"p_{c}" for c in classes),
        "positive_probability",
        "threshold",
        "model_sha256",
        "error",
    ]
    if suffix == ".jsonl":
        return "".join(json.dumps({k: row.get(k, "") for k in columns}) + "\n" for row in rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row.get(k, "") for k in columns} for row in rows)
    return buffer.getvalue()


def _video_frames(path: Path, stride: int) -> Iterator[FrameItem]:
    """Every `stride`-th frame of a video file, read through the runtime's own video source."""
    video = open_source(str(path))
    video.open()
    count = 0
    try:
        while (frame := video.read()) is not None:
            if frame.index % stride == 0:
                yield FrameItem(str(path), frame.index, frame.image)
            count += 1
    finally:
        video.close()
    if count == 0:
        raise EdgebcError(f"{path}: the video holds no readable frame")
