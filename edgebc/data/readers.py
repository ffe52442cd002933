"""Readers that turn the dataset layouts users actually have into lists of `Sample`.

- `read_class_folders`: any `<class>/<image>` tree; `<stem>_mask.png` / `<stem>_mask_N.png`
  beside an image are its lesion masks, never images to classify;
- `read_busi`: the BUSI / Kaggle release (`Dataset_BUSI_with_GT/<class>/<class> (N).png`);
- `read_mias`: mini-MIAS, labels and findings from `Info.txt`;
- `read_manifest` (in manifest.py): the CSV form every reader can be written out to;
- `read_dataset`: picks one of these from what the path looks like.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path

from edgebc.data.manifest import read_manifest
from edgebc.data.records import Finding, Sample
from edgebc.decode import read_header
from edgebc.errors import DataLayoutError, ImageDecodeError
from edgebc.sources import DICOM_SUFFIXES, IMAGE_SUFFIXES

log = logging.getLogger(__name__)

SAMPLE_SUFFIXES = (*IMAGE_SUFFIXES, *DICOM_SUFFIXES)  # a data set's image files: pictures, DICOM
_MASK_NAME = re.compile(r"^(?P<stem>.+?)_mask(?:_(?P<index>\d+))?$", re.IGNORECASE)
_BUSI_NAME = re.compile(r"^(?P<cls>benign|malignant|normal) \((?P<n>\d+)\)$", re.IGNORECASE)
_BUSI_CLASSES = ("benign", "malignant", "normal")


def read_class_folders(
    root: str | Path, source: str | None = None, modality: str = "us"
) -> list[Sample]:
    """Every image under `root/<class>/` labelled with its folder's name; masks attached, not listed."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"{root}: not a folder")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataLayoutError(f"{root}: expected one sub-folder per class, found none")
    samples: list[Sample] = []
    for class_dir in class_dirs:
        images: dict[str, Path] = {}
        masks: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        for path in sorted(class_dir.rglob("*")):
            if (
                not path.is_file()
                or path.suffix.lower() not in SAMPLE_SUFFIXES
                or path.name.startswith(".")
            ):
                continue
            stem_key = str(path.with_suffix("").relative_to(class_dir))
            match = _MASK_NAME.match(path.stem)
            if match:
                owner = str(path.with_name(match["stem"]).relative_to(class_dir))
                masks[owner].append((int(match["index"] or 0), path))
            else:
                images[stem_key] = path
        orphans = sorted(set(masks) - set(images))
        for orphan in orphans:
            log.warning("%s: mask without an image (%s)", class_dir, masks[orphan][0][1].name)
        for key, path in sorted(images.items(), key=lambda kv: _natural_key(kv[0])):
            samples.append(
                Sample(
                    path=path,
                    label=class_dir.name.lower(),
                    modality=modality,
                    source=source,
                    masks=tuple(p for _, p in sorted(masks.get(key, []))),
                )
            )
    if not samples:
        raise DataLayoutError(f"{root}: no PNG, JPEG, PGM or DICOM images in its class folders")
    return samples


def find_busi_root(root: str | Path) -> Path | None:
    """The folder holding benign/ malignant/ normal/ for a BUSI download, or None."""
    root = Path(root)
    for candidate in (root, root / "Dataset_BUSI_with_GT", root / "busi" / "Dataset_BUSI_with_GT"):
        if all((candidate / c).is_dir() for c in _BUSI_CLASSES):
            return candidate
    return None


def read_busi(root: str | Path) -> list[Sample]:
    """The BUSI release: `<class>/<class> (N).png` with `_mask`, `_mask_1`, ... beside each image."""
    found = find_busi_root(root)
    if found is None:
        raise DataLayoutError(
            f"{root}: not a BUSI folder (expected benign/, malignant/ and normal/, "
            "or Dataset_BUSI_with_GT/ holding them)"
        )
    samples = read_class_folders(found, source="busi")
    unexpected = [s.path.name for s in samples if not _BUSI_NAME.match(s.path.stem)]
    if unexpected:
        log.warning(
            "%s: %d files do not follow '<class> (N).png', e.g. %s",
            found,
            len(unexpected),
            unexpected[0],
        )
    return [s for s in samples if s.label in _BUSI_CLASSES]


def read_mias(root: str | Path) -> list[Sample]:
    """mini-MIAS: malignant if any finding is M, benign if any is B, else normal.

    Info.txt gives centres with the origin at the BOTTOM-left; findings here use the top-left,
    like every image array. Odd/even numbers are the two breasts of one woman, so they share a
    patient id (right = odd, left = even), and a split keeps them together; every film is an MLO
    view, so `view` is `R-MLO` or `L-MLO`.
    """
    root = Path(root)
    info = root / "Info.txt"
    if not info.is_file():
        raise DataLayoutError(f"{root}: not a mini-MIAS folder (no Info.txt)")
    rows: dict[str, list[list[str]]] = defaultdict(list)
    tissue: dict[str, str] = {}
    for line in info.read_text(encoding="latin-1").splitlines():
        fields = line.split()
        if not fields or not re.fullmatch(r"mdb\d{3}", fields[0]):
            continue
        if len(fields) < 3:
            raise DataLayoutError(f"{info}: malformed row {line.strip()!r}")
        tissue[fields[0]] = fields[1]
        if fields[2] != "NORM":
            rows[fields[0]].append(fields[2:])
    samples = []
    missing = 0
    for ref in sorted(tissue):
        path = root / f"{ref}.png"
        if not path.is_file():
            missing += 1
            continue
        try:
            height = read_header(path.read_bytes()[:4096], str(path)).height
        except ImageDecodeError as exc:
            raise DataLayoutError(str(exc)) from exc
        findings = tuple(_mias_finding(fields, height) for fields in rows.get(ref, []))
        severities = {f.severity for f in findings}
        label = "malignant" if "M" in severities else "benign" if "B" in severities else "normal"
        number = int(ref[3:])
        samples.append(
            Sample(
                path=path,
                label=label,
                patient_id=f"mias-{(number + 1) // 2:03d}",
                modality="mammo",
                view="R-MLO" if number % 2 else "L-MLO",  # every MIAS film is an MLO view
                source="mias",
                findings=findings,
                extra=(("tissue", tissue[ref]),),
            )
        )
    if missing:
        log.info("%s: %d of %d Info.txt entries have no image file", root, missing, len(tissue))
    if not samples:
        raise DataLayoutError(f"{root}: Info.txt lists no image that is present as mdbNNN.png")
    return samples


def read_dataset(path: str | Path) -> list[Sample]:
    """Read a manifest (.csv), a mini-MIAS folder, a BUSI folder or a class-per-folder tree."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_manifest(path)
    if not path.exists():
        raise DataLayoutError(f"{path}: no such file or folder")
    if path.is_dir() and (path / "Info.txt").is_file() and any(path.glob("mdb*.png")):
        return read_mias(path)
    if path.is_dir() and find_busi_root(path) is not None:
        return read_busi(path)
    if path.is_dir():
        return read_class_folders(path)
    raise DataLayoutError(f"{path}: expected a manifest .csv or a dataset folder")


def _mias_finding(fields: list[str], height: int) -> Finding:
    kind, severity = fields[0], fields[1] if len(fields) > 1 else ""
    if severity not in ("B", "M"):
        raise DataLayoutError(f"mini-MIAS finding {fields!r}: severity must be B or M")
    numbers = [f for f in fields[2:5] if re.fullmatch(r"\d+", f)]
    if len(numbers) < 3:  # e.g. '*NOTE 3*': distributed calcifications, no single site
        return Finding(kind=kind, severity=severity)
    x, y, radius = (float(n) for n in numbers)
    return Finding(kind=kind, severity=severity, x=x, y=height - y, radius=radius)


def _natural_key(text: str) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]
