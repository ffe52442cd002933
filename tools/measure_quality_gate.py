"""Measure both quality gates' refusal rates per scanner, per site and per reason, against their goals.

    python tools/measure_quality_gate.py [--data ../shared/data] [--non-us FOLDER ...] [--verdicts F.tsv]

Sets, each of one kind:
- ultrasound, which the gate must let through: synthetic phantoms (still; cine through an MJPG
  video as a capture card delivers it; framed by wide black margins; fading into a dim, smoothed,
  JPEG-captured depth), and, when the real data is there, every scanner (`device`) of every site:
  BUSI (one scanner, GE LOGIQ E9) and BUS-BRA (four, from its manifest's `device` column), and
  each site's frames once more through JPEG at quality 75, as an MJPG capture card delivers them;
- not ultrasound, which it must refuse: synthetic desktops and documents, mini-MIAS mammograms when
  present, and any folders of other pictures given with --non-us (photos, screenshots);
- blank frames (one grey level with capture noise, half through JPEG), which it must refuse;
- mammogram phantoms at 8 and 12 (in 16) bits, and whole scanner screens around ultrasound
  phantoms, held to the mammography gate's goals only (the ultrasound gate judges a screen's
  imaging-region crop, and passes the whole screen).

Every frame also goes through the mammography gate (edgebc.quality.MammographyGate, the gate of
models whose card declares an `mg` input), whose goals (issue 20) are the mirror image: at most
2 % of every mammogram set (mini-MIAS, phantoms) refused, at least 95 % of every other set
(ultrasound, scanner screens, decoys, blank).

Goals (issue 16): at most 2 % of the frames of every ultrasound set refused, every scanner on its
own; at least 95 % of every non-ultrasound set and 99 % of blank frames refused (folders given with
--non-us are reported, not held to a goal: grainy photos are known to pass). Prints one
Markdown table (kind, site, scanner or set, frames, refused, refusals by the gate's check, and
the range of the two speckle statistics the gate judges; the same for the mammography gate with
its breast region's largest one-level share and speckle contrast), the site totals and, per
goal of both gates, whether it is met. Nothing is written unless --verdicts names a file for
every frame's two verdicts (to compare two versions of the gates frame by frame). Exit status 1
when a goal is not met.
The real data is read from --data (default: ../shared/data beside the repository).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from edgebc.atomic import atomic_write_text
from edgebc.breast import NoBreastFoundError
from edgebc.data.manifest import read_manifest
from edgebc.data.readers import read_busi, read_mias
from edgebc.data.records import CLASS_NAMES, Sample
from edgebc.decode import read_image, to_grey_uint8
from edgebc.quality import (
    GATE_SIZE,
    MammographyGate,
    QualityGate,
    breast_texture,
    gate_at_size,
    speckle_statistics,
    thumbnail,
)
from edgebc.sources import IMAGE_SUFFIXES, open_source
from edgebc.synth import make_cine
from edgebc.synth.cine import write_video
from edgebc.synth.decoys import (
    jpeg,
    make_blank_frame,
    make_desktop_screen,
    make_document,
    with_black_margins,
    with_dim_depth,
)
from edgebc.synth.mammogram import VIEWS, draw_breast, make_mammogram
from edgebc.synth.screen import render_scanner_screen
from edgebc.synth.ultrasound import phantom_rng, phantom_stills

ULTRASOUND, NOT_ULTRASOUND, BLANK = "ultrasound", "not ultrasound", "blank"
MAX_ULTRASOUND_REFUSED = 0.02  # per scanner
MIN_NOT_ULTRASOUND_REFUSED = 0.95
MIN_BLANK_REFUSED = 0.99
MAX_MAMMOGRAMS_REFUSED = 0.02  # by the mammography gate, per set
MIN_OTHERS_REFUSED_BY_MG = 0.95  # ultrasound, decoys and blank frames, by the mammography gate
BUSI_SITE, BUSI_DEVICE = "BUSI (Cairo)", "GE LOGIQ E9"
BUSBRA_SITE = "BUS-BRA (Rio de Janeiro)"
CAPTURE_JPEG_QUALITY = 75
SYNTHETIC = "synthetic"


@dataclass
class FrameSet:
    """A named set of (name, frame) pairs of one kind, read lazily; `tally` adds the verdicts."""

    kind: str
    site: str
    name: str
    frames: Callable[[], Iterable[tuple[str, np.ndarray]]]
    recaptured: bool = False  # another set's frames re-encoded: left out of the site totals
    judged: bool = True  # False: reported, not held to the ultrasound gate's goals
    mammograms: bool = False  # the mammography gate must pass it (else refuse it)
    mg_judged: bool = True  # False: not held to the mammography gate's goals (--non-us folders)
    total: int = 0
    verdicts: list[tuple[str, str, str]] = field(default_factory=list)  # (frame, gate, mg gate)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    passed: list[str] = field(default_factory=list)
    flat: list[float] = field(default_factory=list)  # the gate's speckle statistics per frame
    contrast: list[float] = field(default_factory=list)
    mg_refused: collections.Counter[str] = field(default_factory=collections.Counter)
    mg_passed: list[str] = field(default_factory=list)
    mg_refused_names: list[str] = field(default_factory=list)
    mg_level_share: list[float] = field(default_factory=list)  # the mammography gate's texture
    mg_contrast: list[float] = field(default_factory=list)

    @property
    def refused_share(self) -> float:
        return sum(self.refused.values()) / self.total if self.total else float("nan")

    @property
    def mg_refused_share(self) -> float:
        return sum(self.mg_refused.values()) / self.total if self.total else float("nan")


def tally(
    frame_set: FrameSet, gate: QualityGate, mg_gate: MammographyGate | None = None
) -> FrameSet:
    """Run every frame of the set through the gate (and the mammography gate, when given); counts
    refusals by the check that refused and keeps the speckle statistics the ultrasound gate judges
    (so limits can be set with the margins in view)."""
    for name, frame in frame_set.frames():
        frame_set.total += 1
        flat, contrast = speckle_statistics(
            to_grey_uint8(thumbnail(to_grey_uint8(frame), gate.size)), gate.flat_contrast, gate.size
        )
        frame_set.flat.append(flat)
        frame_set.contrast.append(contrast)
        verdict = gate.check(frame)
        us_verdict = "ok" if verdict.ok else str(verdict.check)
        if verdict.ok:
            frame_set.passed.append(name)
        else:
            frame_set.refused[verdict.check or "other"] += 1
        if mg_gate is not None:
            try:
                texture = breast_texture(frame)
                frame_set.mg_level_share.append(texture.level_share)
                frame_set.mg_contrast.append(texture.speckle_contrast)
            except NoBreastFoundError:
                pass
            mg_verdict = mg_gate.check(frame)
            if mg_verdict.ok:
                frame_set.mg_passed.append(name)
            else:
                frame_set.mg_refused[mg_verdict.check or "other"] += 1
                frame_set.mg_refused_names.append(f"{name} ({mg_verdict.check})")
        mg = "-" if mg_gate is None else "ok" if mg_verdict.ok else str(mg_verdict.check)
        frame_set.verdicts.append((name, us_verdict, mg))
    return frame_set


def synthetic_sets() -> list[FrameSet]:
    """The sets that need no data: phantoms, decoys and blank frames, fixed by their seeds."""

    def stills(change: Callable[[np.ndarray, int], np.ndarray] = lambda f, k: f) -> Iterator:
        for k, frame in enumerate(phantom_stills(300, seed=5)[0]):
            yield f"phantom {k}", change(frame, k)

    def blank() -> Iterator[tuple[str, np.ndarray]]:
        for k in range(300):
            yield f"blank {k}", make_blank_frame(phantom_rng(8, k))

    framed = lambda: stills(lambda f, k: with_black_margins(f, phantom_rng(6, k)))  # noqa: E731
    dim = lambda: stills(lambda f, k: with_dim_depth(f, phantom_rng(7, k)))  # noqa: E731
    return [
        FrameSet(ULTRASOUND, SYNTHETIC, "phantom stills, 256 px", stills),
        FrameSet(
            ULTRASOUND, SYNTHETIC, "phantom cine through an MJPG video", phantom_cine_via_video
        ),
        FrameSet(ULTRASOUND, SYNTHETIC, "phantoms framed by wide black margins", framed),
        FrameSet(ULTRASOUND, SYNTHETIC, "phantoms fading into a dim, smoothed, JPEG depth", dim),
        FrameSet(NOT_ULTRASOUND, SYNTHETIC, "desktops and documents", lambda: decoys(100)),
        # B-mode on a scanner's screen: the ultrasound gate judges the imaging region's crop (and
        # passes the whole screen), so it is held to the mammography gate's goal only
        FrameSet(
            ULTRASOUND, SYNTHETIC, "scanner screens around phantoms", scanner_screens, judged=False
        ),
        FrameSet(
            NOT_ULTRASOUND,
            SYNTHETIC,
            "mammogram phantoms, 8-bit",
            partial(mammogram_phantoms, 8),
            judged=False,
            mammograms=True,
        ),
        FrameSet(
            NOT_ULTRASOUND,
            SYNTHETIC,
            "mammogram phantoms, 12-bit in 16",
            partial(mammogram_phantoms, 12),
            judged=False,
            mammograms=True,
        ),
        FrameSet(BLANK, SYNTHETIC, "blank frames (one grey level, noise, half JPEG)", blank),
    ]


def real_sets(data: Path) -> list[FrameSet]:
    """BUSI, every BUS-BRA scanner and mini-MIAS, for those of them present under `data`."""
    sets = []
    captured = f"all scanners through JPEG at quality {CAPTURE_JPEG_QUALITY}"
    if (data / "busi").is_dir():
        busi = read_busi(data / "busi")
        sets.append(FrameSet(ULTRASOUND, BUSI_SITE, BUSI_DEVICE, partial(read_samples, busi)))
        sets.append(FrameSet(ULTRASOUND, BUSI_SITE, captured, partial(read_captured, busi), True))
    if (data / "busbra" / "manifest.csv").is_file():
        busbra = read_manifest(data / "busbra" / "manifest.csv")
        by_device: dict[str, list[Sample]] = collections.defaultdict(list)
        for sample in busbra:
            by_device[dict(sample.extra).get("device") or "unknown"].append(sample)
        for device, samples in sorted(by_device.items()):
            sets.append(FrameSet(ULTRASOUND, BUSBRA_SITE, device, partial(read_samples, samples)))
        sets.append(
            FrameSet(ULTRASOUND, BUSBRA_SITE, captured, partial(read_captured, busbra), True)
        )
    if (data / "mias").is_dir():
        mias = read_mias(data / "mias")
        sets.append(
            FrameSet(
                NOT_ULTRASOUND,
                "mini-MIAS",
                "mammograms",
                lambda: read_samples(mias),
                mammograms=True,
            )
        )
    return sets


def folder_set(folder: Path) -> FrameSet:
    """A folder of pictures that are not ultrasound (--non-us)."""
    paths = [
        p
        for p in sorted(folder.rglob("*"))
        if p.suffix.lower() in (*IMAGE_SUFFIXES, ".pgm") and "_mask" not in p.stem
    ]
    return FrameSet(
        NOT_ULTRASOUND,
        str(folder),
        "given with --non-us",
        lambda: read_paths(paths),
        judged=False,
        mg_judged=False,
    )


def read_samples(samples: Iterable[Sample]) -> Iterator[tuple[str, np.ndarray]]:
    return read_paths(sample.path for sample in samples)


def read_captured(samples: Iterable[Sample]) -> Iterator[tuple[str, np.ndarray]]:
    for name, image in read_samples(samples):
        yield name, jpeg(image, CAPTURE_JPEG_QUALITY)


def read_paths(paths: Iterable[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, image) per readable file, named by its folder and file name."""
    for path in paths:
        image = read_image(path) if path.suffix.lower() != ".pgm" else cv2.imread(str(path), 0)
        if image is not None:
            yield f"{path.parent.name}/{path.name}", image


def phantom_cine_via_video(n_per_class: int = 60) -> Iterator[tuple[str, np.ndarray]]:
    with tempfile.TemporaryDirectory() as folder:
        for number, label in enumerate(CLASS_NAMES):
            frames, _ = make_cine(label, phantom_rng(number, 9), n_per_class, 256, 256)
            path = write_video(frames, Path(folder) / f"{label}.avi", fps=30)
            source = open_source(str(path))
            source.open()
            while (frame := source.read()) is not None:
                yield f"{label} cine frame {frame.index}", frame.image
            source.close()


def decoys(n: int) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(2026)
    for k in range(n):
        yield (
            (f"desktop {k}", make_desktop_screen(rng))
            if k % 2 == 0
            else (
                f"document {k}",
                make_document(rng),
            )
        )


def mammogram_phantoms(bits: int, n: int = 120) -> Iterator[tuple[str, np.ndarray]]:
    """Framed mammogram phantoms, both lateralities and views, at `bits` (8, or 12 in 16)."""
    for k in range(n):
        rng = phantom_rng(40 + bits, k)
        breast = draw_breast(CLASS_NAMES[k % len(CLASS_NAMES)], rng)
        side, view = "LR"[k % 2], VIEWS[(k // 2) % 2]
        image = make_mammogram(breast, rng, side, view, 640, 512, bits).image
        yield f"{side}-{view} {k}", image


def scanner_screens(n: int = 60) -> Iterator[tuple[str, np.ndarray]]:
    """Whole scanner screens (menus, text, black background) around ultrasound phantoms."""
    rng = np.random.default_rng(2030)
    for k, frame in enumerate(phantom_stills(n, seed=11)[0]):
        yield f"screen {k}", render_scanner_screen(frame, rng, 720, 1280)[0]


def mg_goals(sets: list[FrameSet]) -> list[tuple[bool, str]]:
    """The mammography gate's goals: (met, statement) each naming the worst set."""
    results = []
    for mammograms, limit in ((True, MAX_MAMMOGRAMS_REFUSED), (False, MIN_OTHERS_REFUSED_BY_MG)):
        judged = [s for s in sets if s.mammograms == mammograms and s.total and s.mg_judged]
        if not judged:
            continue
        worst = (max if mammograms else min)(judged, key=lambda s: s.mg_refused_share)
        what = "mammograms: at most" if mammograms else "everything else: at least"
        results.append(
            (
                all(
                    (s.mg_refused_share <= limit) if mammograms else (s.mg_refused_share >= limit)
                    for s in judged
                ),
                f"mammography gate, {what} {limit:.0%} refused in every set "
                f"(worst: {worst.site} / {worst.name}, {worst.mg_refused_share:.1%})",
            )
        )
    return results


def goals(sets: list[FrameSet]) -> list[tuple[bool, str]]:
    """(met, statement) per goal, each naming the worst set of its kind."""
    results = []
    for kind, limit, ok in (
        (ULTRASOUND, MAX_ULTRASOUND_REFUSED, lambda s: s <= MAX_ULTRASOUND_REFUSED),
        (NOT_ULTRASOUND, MIN_NOT_ULTRASOUND_REFUSED, lambda s: s >= MIN_NOT_ULTRASOUND_REFUSED),
        (BLANK, MIN_BLANK_REFUSED, lambda s: s >= MIN_BLANK_REFUSED),
    ):
        judged = [s for s in sets if s.kind == kind and s.total and s.judged]
        if not judged:
            continue
        worst = (max if kind == ULTRASOUND else min)(judged, key=lambda s: s.refused_share)
        rule = "at most" if kind == ULTRASOUND else "at least"
        scope = "every scanner and phantom set" if kind == ULTRASOUND else "every set"
        results.append(
            (
                all(ok(s.refused_share) for s in judged),
                f"{kind}: {rule} {limit:.0%} refused in {scope} "
                f"(worst: {worst.site} / {worst.name}, {worst.refused_share:.1%})",
            )
        )
    return results


def markdown(sets: list[FrameSet]) -> str:
    lines = [
        "| kind | site | scanner or set | frames | refused | refused by | flat share | contrast "
        "| MG gate refused | MG refused by | MG level share | MG contrast |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sets:
        reasons = ", ".join(f"{check} {n}" for check, n in s.refused.most_common())
        refused = sum(s.refused.values())
        mg_reasons = ", ".join(f"{check} {n}" for check, n in s.mg_refused.most_common())
        mg_refused = sum(s.mg_refused.values())
        kind = "mammogram" if s.mammograms else s.kind
        lines.append(
            f"| {kind} | {s.site} | {s.name} | {s.total} | {refused} ({s.refused_share:.1%}) "
            f"| {reasons} | {span(s.flat, 2)} | {span(s.contrast, 3)} "
            f"| {mg_refused} ({s.mg_refused_share:.1%}) | {mg_reasons} "
            f"| {span(s.mg_level_share, 2)} | {span(s.mg_contrast, 3)} |"
        )
    return "\n".join(lines)


def span(values: list[float], digits: int) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}" if values else ""


def site_totals(sets: list[FrameSet]) -> list[str]:
    by_site: dict[str, list[FrameSet]] = collections.defaultdict(list)
    for s in sets:
        if s.kind == ULTRASOUND and s.site != SYNTHETIC and not s.recaptured:
            by_site[s.site].append(s)
    lines = []
    for site, members in by_site.items():
        total = sum(s.total for s in members)
        refused = sum(sum(s.refused.values()) for s in members)
        lines.append(f"{site}: {total} frames, refused {refused} ({refused / total:.1%})")
    return lines


def write_verdicts(path: Path, sets: list[FrameSet]) -> None:
    """Every frame's two verdicts, one tab-separated line each ("ok" or the refusing check)."""
    lines = ["set\tframe\tgate\tmammography_gate"]
    for s in sets:
        lines += [f"{s.site} / {s.name}\t{n}\t{us}\t{mg}" for n, us, mg in s.verdicts]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument(
        "--non-us", type=Path, nargs="*", default=[], help="folders of non-ultrasound pictures"
    )
    parser.add_argument(
        "--verdicts",
        type=Path,
        default=None,
        help="also write every frame's verdicts (set, frame, ultrasound gate, mammography gate) "
        "as tab-separated lines, to compare two versions of the gates frame by frame",
    )
    parser.add_argument(
        "--gate-size",
        type=int,
        default=GATE_SIZE,
        help="the ultrasound gate's size (the long side of the copy it judges), to measure another",
    )
    args = parser.parse_args(argv)
    gate, mg_gate = gate_at_size(args.gate_size), MammographyGate()
    sets = synthetic_sets()
    if args.data.is_dir():
        sets += real_sets(args.data)
    else:
        print(f"no real data at {args.data}: synthetic sets only")
    sets += [folder_set(folder) for folder in args.non_us]
    sets.sort(
        key=lambda s: ({ULTRASOUND: 0, NOT_ULTRASOUND: 1, BLANK: 2}[s.kind], s.site != SYNTHETIC)
    )
    for frame_set in sets:
        tally(frame_set, gate, mg_gate)
    print(f"Quality gate refusal rates, {gate}\nand {mg_gate}\n")
    print(markdown(sets))
    for s in sets:
        if s.kind != ULTRASOUND and s.passed:
            shown = ", ".join(s.passed[:10]) + (" ..." if len(s.passed) > 10 else "")
            print(f"\n{s.site} / {s.name}: passed the gate: {shown}")
        names = s.mg_refused_names if s.mammograms else s.mg_passed
        if names:
            shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
            verb = "refused by" if s.mammograms else "passed"
            print(f"\n{s.site} / {s.name}: {verb} the mammography gate: {shown}")
    if args.verdicts is not None:
        write_verdicts(args.verdicts, sets)
    print("\nUltrasound refused per site: " + "; ".join(site_totals(sets) or ["no real data"]))
    results = goals(sets) + mg_goals(sets)
    print("\nGoals:")
    for met, statement in results:
        print(f"- {'met' if met else 'NOT MET'}: {statement}")
    return 0 if all(met for met, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
