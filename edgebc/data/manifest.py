"""The CSV manifest: `path,label[,patient_id,modality,view,source,split,fold,group,masks,findings,...]`.

Every reader can be written out to it, and it is what splits, training and evaluation consume.
Paths are stored relative to the manifest's folder when they lie under it (so a dataset and its
manifest move together) and absolute otherwise. Unknown columns are kept, for subgroup tables.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path

from edgebc.atomic import atomic_write_text
from edgebc.data.records import Finding, Sample
from edgebc.errors import DataLayoutError

BASE_COLUMNS = (
    "path",
    "label",
    "patient_id",
    "modality",
    "view",
    "source",
    "split",
    "fold",
    "group",
)
LIST_COLUMNS = ("masks", "findings")


def read_manifest(path: str | Path) -> list[Sample]:
    """Read a manifest; relative paths resolve against the manifest's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DataLayoutError(f"{path}: cannot read manifest: {exc.strerror or exc}") from exc
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise DataLayoutError(
            f"{path}: manifest needs the columns path and label; missing {', '.join(missing)}"
        )
    root = path.parent
    samples = []
    for line, row in enumerate(reader, start=2):
        if not (row.get("path") or "").strip():
            raise DataLayoutError(f"{path}:{line}: empty path")
        if not (row.get("label") or "").strip():
            raise DataLayoutError(f"{path}:{line}: empty label for {row['path']}")
        samples.append(_sample_from_row(row, root, f"{path}:{line}"))
    return samples


def write_manifest(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write samples to a manifest atomically; returns the path written."""
    path = Path(path)
    samples = list(samples)
    root = path.parent.resolve()
    extra_columns = sorted(
        {key for s in samples for key, _ in s.extra} - set(BASE_COLUMNS) - set(LIST_COLUMNS)
    )
    columns = [*BASE_COLUMNS, *LIST_COLUMNS, *extra_columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for sample in samples:
        row = {
            "path": _relative(sample.path, root),
            "label": sample.label,
            "patient_id": sample.patient_id or "",
            "modality": sample.modality,
            "view": sample.view or "",
            "source": sample.source or "",
            "split": sample.split or "",
            "fold": "" if sample.fold is None else str(sample.fold),
            "group": sample.group or "",
            "masks": ";".join(_relative(m, root) for m in sample.masks),
            "findings": json.dumps([f.__dict__ for f in sample.findings])
            if sample.findings
            else "",
        }
        row.update(dict(sample.extra))
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())
    return path


def merge_sites(sites: Iterable[tuple[str, Iterable[Sample]]]) -> list[Sample]:
    """One manifest over several sites: every sample named by its site (the `source` column),
    near-duplicate groups kept apart per site (each audit numbers its groups from g0000), and
    refused when a file is listed twice or a patient id appears at two sites (ids are a site's
    own; two women must not become one case)."""
    merged: list[Sample] = []
    seen_paths: dict[Path, str] = {}
    patients: dict[str, str] = {}
    for site, samples in sites:
        for sample in samples:
            if sample.source and sample.source != site:
                raise DataLayoutError(
                    f"{sample.path}: its source column says {sample.source!r} but it is merged as site {site!r}"
                )
            key = sample.path.resolve()
            if key in seen_paths:
                raise DataLayoutError(
                    f"{sample.path}: listed by site {seen_paths[key]!r} and by {site!r}"
                )
            seen_paths[key] = site
            if sample.patient_id:
                other = patients.setdefault(sample.patient_id, site)
                if other != site:
                    raise DataLayoutError(
                        f"patient id {sample.patient_id!r} appears at site {other!r} and at {site!r}: "
                        "prefix each site's ids so that they cannot collide"
                    )
            group = (
                f"{site}:{sample.group}"
                if sample.group and ":" not in sample.group
                else sample.group
            )
            merged.append(sample.with_(source=site, group=group))
    return merged


def _sample_from_row(row: dict[str, str | None], root: Path, where: str) -> Sample:
    def text(key: str) -> str | None:
        value = (row.get(key) or "").strip()
        return value or None

    fold_text = text("fold")
    try:
        fold = int(fold_text) if fold_text is not None else None
        findings = tuple(Finding(**f) for f in json.loads(text("findings") or "[]"))
    except (ValueError, TypeError) as exc:
        raise DataLayoutError(f"{where}: malformed fold or findings value: {exc}") from exc
    known = set(BASE_COLUMNS) | set(LIST_COLUMNS)
    extra = tuple(
        (k, (v or "").strip()) for k, v in row.items() if k not in known and k is not None
    )
    return Sample(
        path=_resolve(text("path") or "", root),
        label=text("label") or "",
        patient_id=text("patient_id"),
        modality=text("modality") or "us",
        view=text("view"),
        source=text("source"),
        split=text("split"),
        fold=fold,
        group=text("group"),
        masks=tuple(_resolve(m, root) for m in (text("masks") or "").split(";") if m),
        findings=findings,
        extra=extra,
    )


def _resolve(value: str, root: Path) -> Path:
    candidate = Path(value)
    return candidate if candidate.is_absolute() else root / candidate


def _relative(path: Path, root: Path) -> str:
    absolute = path if path.is_absolute() else Path.cwd() / path
    try:
        return absolute.resolve().relative_to(root).as_posix()
    except ValueError:
        return absolute.resolve().as_posix()
