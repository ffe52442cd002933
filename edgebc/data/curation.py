"""`edgebc data audit`: what is wrong with a dataset before anyone trains on it.

Finds unreadable files, exact duplicates (same bytes), near-duplicates (pHash candidates
confirmed by thumbnail correlation), label conflicts (one image under two classes), colour
frames, frames with burned-in calipers or text, and size/mode statistics. Writes a JSON and a
Markdown report and a cleaned manifest whose `group` column keeps near-duplicates together in
every later split. On BUSI this finds, among others, `benign (433)` == `malignant (145)`.
Mammograms (modality mammo/mg) get a Mammography part as well: bit depth, views, laterality
stated vs found in the image, frames with no breast (edgebc.data.mammo_audit).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgebc.atomic import atomic_write_text
from edgebc.data.fingerprint import Fingerprint, fingerprint_image
from edgebc.data.mammo_audit import (
    MIN_DETAIL_CORRELATION,
    MammogramFacts,
    breast_detail,
    examine_mammogram,
    is_mammogram,
    render_mammography,
    summarise_mammograms,
    to_full_scale,
)
from edgebc.data.manifest import write_manifest
from edgebc.data.records import Sample
from edgebc.decode import decode_image
from edgebc.errors import EdgebcError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditThresholds:
    """When two images count as near-duplicates, and when a frame counts as annotated or colour.

    A pair is a near-duplicate when its pHash distance is at most `strong_hamming` and the
    thumbnails correlate at least `strong_correlation`, or the distance is at most `max_hamming`
    and they correlate at least `min_correlation`. Chosen on BUSI by eye: every pair above
    these lines was the same frame or the same lesion; pairs at distance 12-14 with correlation
    near 0 are unrelated frames with similar dark backgrounds.
    """

    max_hamming: int = 14
    min_correlation: float = 0.85
    strong_hamming: int = 6
    strong_correlation: float = 0.70
    colour_fraction: float = 0.0002
    annotation_marks: int = 20


@dataclass
class AuditReport:
    dataset: str
    n_samples: int
    thresholds: AuditThresholds
    per_class: dict[str, int]
    unreadable: list[dict[str, str]] = field(default_factory=list)
    exact_duplicates: list[dict[str, Any]] = field(default_factory=list)
    near_duplicate_groups: list[dict[str, Any]] = field(default_factory=list)
    label_conflicts: list[dict[str, Any]] = field(default_factory=list)
    colour_frames: list[dict[str, Any]] = field(default_factory=list)
    grey_stored_as_colour: list[str] = field(default_factory=list)
    suspected_annotations: list[dict[str, Any]] = field(default_factory=list)
    sizes: dict[str, Any] = field(default_factory=dict)
    cleaning: dict[str, Any] = field(default_factory=dict)
    mammography: dict[str, Any] = field(default_factory=dict)  # empty without mammograms

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.mammography:  # an ultrasound data set's report keeps its keys
            del out["mammography"]
        return out


@dataclass
class AuditResult:
    report: AuditReport
    cleaned: list[Sample]


def audit_samples(
    samples: Sequence[Sample],
    dataset: str = "",
    thresholds: AuditThresholds | None = None,
    conflicts: Literal["drop", "keep"] = "drop",
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> AuditResult:
    """Audit `samples` and return the report and the cleaned sample list (with `group` set)."""
    thresholds = thresholds or AuditThresholds()
    if conflicts not in ("drop", "keep"):
        raise ValueError(f"conflicts must be 'drop' or 'keep', got {conflicts!r}")
    report = AuditReport(
        dataset=dataset,
        n_samples=len(samples),
        thresholds=thresholds,
        per_class=dict(sorted(Counter(s.label for s in samples).items())),
    )
    prints: dict[int, Fingerprint] = {}
    mammograms: dict[int, MammogramFacts] = {}
    details: dict[int, np.ndarray] = {}

    def work(index: int) -> tuple[int, _Examined | Exception]:
        try:
            return index, _examine(samples[index])
        except (EdgebcError, OSError, ValueError) as exc:
            return index, exc

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for index, outcome in pool.map(work, range(len(samples))):
            if isinstance(outcome, Exception):
                report.unreadable.append({"path": str(samples[index].path), "error": str(outcome)})
            else:
                prints[index] = outcome[0]
                if outcome[1] is not None:
                    mammograms[index], details[index] = outcome[1]
            if progress:
                progress(1)
    readable = sorted(prints)
    _describe_images(report, samples, prints, thresholds)
    exact_sets = _exact_duplicate_sets(readable, prints)
    near_pairs = _near_duplicate_pairs(readable, prints, thresholds)
    if details:  # two mammograms must share tissue detail, not only a silhouette
        looked_alike = len(near_pairs)
        near_pairs = [
            (a, b, distance, correlation)
            for a, b, distance, correlation in near_pairs
            if a not in details
            or b not in details
            or float(details[a] @ details[b]) >= MIN_DETAIL_CORRELATION
        ]
        report.mammography = summarise_mammograms(
            samples, mammograms, pairs_rejected=looked_alike - len(near_pairs)
        )
    groups = _union_groups(
        readable,
        [(a, b) for members in exact_sets for a, b in itertools.pairwise(members)]
        + [(a, b) for a, b, _, _ in near_pairs],
    )
    group_names = {
        root: f"g{n:04d}" for n, root in enumerate(sorted({min(m) for m in groups.values()}))
    }
    group_of = {
        i: group_names[min(members)]
        for members in groups.values()
        for i in members
        if len(members) > 1
    }

    drop: dict[int, str] = {}
    exact_conflicts: set[int] = set()
    for members in exact_sets:
        report.exact_duplicates.append(
            {"sha256": prints[members[0]].sha256, "members": [_member(samples[i]) for i in members]}
        )
        if len({samples[i].label for i in members}) > 1:
            exact_conflicts.update(members)
        else:
            drop.update(
                {i: f"exact duplicate of {samples[members[0]].path.name}" for i in members[1:]}
            )
    pair_lookup = defaultdict(list)
    for a, b, distance, correlation in near_pairs:
        pair_lookup[group_of[a]].append(
            {
                "a": str(samples[a].path),
                "b": str(samples[b].path),
                "hamming": distance,
                "correlation": round(correlation, 4),
            }
        )
    for members in sorted(groups.values(), key=min):
        if len(members) < 2:
            continue
        name = group_of[members[0]]
        listed = [_member(samples[i]) for i in sorted(members)]
        report.near_duplicate_groups.append(
            {"group": name, "members": listed, "pairs": pair_lookup.get(name, [])}
        )
        labels = sorted({samples[i].label for i in members})
        if len(labels) == 1:
            continue
        # The same frame or lesion under two classes: at least one label is wrong and nothing
        # says which, so with conflicts="drop" the whole group leaves the cleaned manifest.
        same_bytes = bool(exact_conflicts.intersection(members))
        report.label_conflicts.append(
            {
                "kind": "exact" if same_bytes else "near",
                "group": name,
                "labels": labels,
                "members": listed,
            }
        )
        if conflicts == "drop":
            drop.update({i: f"label conflict in {name}: " + "/".join(labels) for i in members})

    # The annotation flag travels with each kept sample (extra column `annotations`), so
    # evaluation can compare frames with and without burned-in calipers (--subgroup annotations).
    cleaned = [
        samples[i].with_(
            group=group_of.get(i),
            extra=_with_extra(
                samples[i].extra,
                "annotations",
                "yes" if prints[i].annotation_marks >= thresholds.annotation_marks else "no",
            ),
        )
        for i in readable
        if i not in drop
    ]
    report.cleaning = {
        "kept": len(cleaned),
        "dropped_unreadable": len(report.unreadable),
        "dropped": [{"path": str(samples[i].path), "why": why} for i, why in sorted(drop.items())],
        "conflicts": conflicts,
        "note": "near-duplicates are kept and share a `group` id so that splits keep them together",
    }
    return AuditResult(report=report, cleaned=cleaned)


_Examined = tuple[Fingerprint, tuple[MammogramFacts, np.ndarray] | None]


def _examine(sample: Sample) -> _Examined:
    """Decode once; fingerprint the frame and, for a mammogram, examine it and keep its breast
    detail (see edgebc.data.mammo_audit).

    A mammogram is fingerprinted at its stored bits' full scale: the fingerprint's 8-bit view
    keeps a uint16 frame's top byte, which for a 12-bit mammogram is levels 0..15, and
    duplicates would be judged on a nearly flat picture.
    """
    data = sample.path.read_bytes()
    image = decode_image(data, str(sample.path))
    sha256 = hashlib.sha256(data).hexdigest()
    if not is_mammogram(sample):
        return fingerprint_image(image, sha256), None
    facts = examine_mammogram(image), breast_detail(image)
    return fingerprint_image(to_full_scale(image), sha256), facts


def write_audit(result: AuditResult, out_dir: str | Path) -> dict[str, Path]:
    """Write audit.json, audit.md and manifest.clean.csv into `out_dir` (each atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "audit.json",
        "markdown": out / "audit.md",
        "manifest": out / "manifest.clean.csv",
    }
    atomic_write_text(paths["json"], json.dumps(result.report.to_dict(), indent=2) + "\n")
    atomic_write_text(paths["markdown"], render_markdown(result.report))
    write_manifest(result.cleaned, paths["manifest"])
    return paths


def render_markdown(report: AuditReport) -> str:
    """A one-page summary a person reads before training."""
    conflicts_exact = [c for c in report.label_conflicts if c["kind"] == "exact"]
    conflicts_near = [c for c in report.label_conflicts if c["kind"] == "near"]
    lines = [
        f"# Data audit: {report.dataset}",
        "",
        "| what | count |",
        "|---|---|",
        f"| images | {report.n_samples} |",
        *(f"| class `{k}` | {v} |" for k, v in report.per_class.items()),
        f"| unreadable | {len(report.unreadable)} |",
        f"| exact-duplicate sets | {len(report.exact_duplicates)} |",
        f"| near-duplicate groups | {len(report.near_duplicate_groups)} |",
        f"| label conflicts, same bytes | {len(conflicts_exact)} |",
        f"| label conflicts, near-duplicates | {len(conflicts_near)} |",
        f"| colour frames | {len(report.colour_frames)} |",
        f"| grey stored as colour | {len(report.grey_stored_as_colour)} |",
        f"| suspected burned-in annotations | {len(report.suspected_annotations)} |",
        f"| kept in cleaned manifest | {report.cleaning.get('kept', 0)} |",
        "",
    ]
    if report.label_conflicts:
        lines += ["## Label conflicts", ""]
        for conflict in report.label_conflicts:
            names = ", ".join(
                f"`{Path(m['path']).name}` ({m['label']})" for m in conflict["members"]
            )
            lines.append(f"- {conflict['kind']}: {names}")
        lines.append("")
    if report.unreadable:
        lines += ["## Unreadable files", ""]
        lines += [f"- `{u['path']}`: {u['error']}" for u in report.unreadable]
        lines.append("")
    if report.mammography:
        lines += render_mammography(report.mammography)
    sizes = report.sizes
    if sizes:
        lines += [
            "## Sizes and modes",
            "",
            f"- width: min {sizes['width']['min']}, median {sizes['width']['median']}, max {sizes['width']['max']}",
            f"- height: min {sizes['height']['min']}, median {sizes['height']['median']}, max {sizes['height']['max']}",
            *(f"- {mode}: {n}" for mode, n in sizes["modes"].items()),
            "",
        ]
    t = report.thresholds
    lines += [
        "## How duplicates were found",
        "",
        f"pHash distance <= {t.strong_hamming} with thumbnail correlation >= {t.strong_correlation}, "
        f"or distance <= {t.max_hamming} with correlation >= {t.min_correlation}. "
        "Near-duplicate groups are kept in the cleaned manifest with a shared `group` id; "
        f"images that appear under two classes are {'dropped' if report.cleaning.get('conflicts') == 'drop' else 'kept'}.",
        "",
    ]
    return "\n".join(lines)


def _describe_images(
    report: AuditReport,
    samples: Sequence[Sample],
    prints: dict[int, Fingerprint],
    thresholds: AuditThresholds,
) -> None:
    if not prints:
        return
    widths = np.array([p.width for p in prints.values()])
    heights = np.array([p.height for p in prints.values()])
    report.sizes = {
        "width": _stats(widths),
        "height": _stats(heights),
        "modes": dict(sorted(Counter(p.mode for p in prints.values()).items())),
    }
    for index, fp in sorted(prints.items()):
        path = str(samples[index].path)
        if fp.colour_fraction >= thresholds.colour_fraction:
            report.colour_frames.append(
                {"path": path, "colour_fraction": round(fp.colour_fraction, 5)}
            )
        elif fp.channels == 3:
            report.grey_stored_as_colour.append(path)
        if fp.annotation_marks >= thresholds.annotation_marks:
            report.suspected_annotations.append({"path": path, "marks": fp.annotation_marks})


def _with_extra(
    extra: tuple[tuple[str, str], ...], key: str, value: str
) -> tuple[tuple[str, str], ...]:
    return (*((k, v) for k, v in extra if k != key), (key, value))


def _stats(values: np.ndarray) -> dict[str, int]:
    return {"min": int(values.min()), "median": int(np.median(values)), "max": int(values.max())}


def _exact_duplicate_sets(readable: list[int], prints: dict[int, Fingerprint]) -> list[list[int]]:
    by_hash: dict[str, list[int]] = defaultdict(list)
    for index in readable:
        by_hash[prints[index].sha256].append(index)
    return [members for members in by_hash.values() if len(members) > 1]


def _near_duplicate_pairs(
    readable: list[int], prints: dict[int, Fingerprint], t: AuditThresholds, chunk: int = 512
) -> list[tuple[int, int, int, float]]:
    """All (a, b, hamming, correlation) pairs with a < b that pass the thresholds, in chunks."""
    if len(readable) < 2:
        return []
    hashes = np.array([prints[i].phash for i in readable], dtype=np.uint64)
    thumbs = np.stack([prints[i].thumbnail.ravel() for i in readable])
    pairs = []
    for start in range(0, len(readable), chunk):
        block = slice(start, start + chunk)
        distance = np.bitwise_count(hashes[block, None] ^ hashes[None, :])
        rows, cols = np.nonzero(distance <= t.max_hamming)
        keep = cols > rows + start
        rows, cols = rows[keep], cols[keep]
        correlation = np.einsum("ij,ij->i", thumbs[rows + start], thumbs[cols])
        d = distance[rows, cols]
        accepted = ((d <= t.strong_hamming) & (correlation >= t.strong_correlation)) | (
            correlation >= t.min_correlation
        )
        for r, c, dist, corr in zip(
            rows[accepted], cols[accepted], d[accepted], correlation[accepted], strict=True
        ):
            pairs.append((readable[r + start], readable[c], int(dist), float(corr)))
    return pairs


def _union_groups(items: list[int], edges: list[tuple[int, int]]) -> dict[int, list[int]]:
    parent = {i: i for i in items}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in items:
        groups[find(i)].append(i)
    return groups


def _member(sample: Sample) -> dict[str, str]:
    return {"path": str(sample.path), "label": sample.label}
