"""Paired phantom cases: ultrasound and mammogram views of the same simulated lesion, for fusion.

No public dataset pairs a woman's mammogram with her ultrasound, so fusion is proven on phantoms
whose pairing is known. A case is one breast with one class. Its lesion is drawn once — a size
and a position shared by both modalities (the ultrasound lesion's width and the mammographic
mass's radius grow together, its left-right place on the probe and its height on the film
follow the same draw, and its depth from the skin and from the chest wall too; the mass is
drawn larger on the film than anatomy would make it, so that a small model input still shows
it) — and each
modality shows it with an *appearance class*: with probability `signal` the case's class, else a
class drawn uniformly at random, independently of the case's class and of the other modality.
At signal 1 a modality's lesion follows the class exactly as the single-modality phantoms do; at
signal 0 it carries no information about the class (an appearance of "normal" shows no lesion).
Each modality's images of one case share its appearance; the noise is in the speckle, tissue and
framing of each image. Deterministic by seed: case k comes from its own generator streams.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from edgebc.data.records import CLASS_NAMES
from edgebc.synth.mammogram import LATERALITIES, VIEWS, BreastParameters, Mammogram, make_mammogram
from edgebc.synth.ultrasound import (
    UltrasoundPhantom,
    _add_fat_lobule,
    _draw_lesion,
    _lesion_mask,
    _paint_lesion,
    form_image,
    phantom_rng,
    tissue_echogenicity,
)

_STREAM = 6  # the paired cases' streams, apart from edgebc.synth.dataset's (1..5)


@dataclass(frozen=True)
class SharedLesion:
    """What both modalities agree on, each in [0, 1]: size, left-right place, depth."""

    size: float
    across: float
    depth: float


@dataclass(frozen=True)
class PairedCase:
    """One breast's paired images: `label` is the truth; each modality's appearance class is what
    its images show (equal to `label` where that modality carries the class)."""

    case_id: str
    label: str
    laterality: str
    lesion: SharedLesion
    us_appearance: str
    mg_appearance: str
    ultrasound: tuple[UltrasoundPhantom, ...]
    mammograms: tuple[Mammogram, ...]


def check_signal(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def appearance(label: str, signal: float, rng: np.random.Generator) -> str:
    """The class a modality's lesion looks like: `label` with probability `signal`, else uniform."""
    keep, other = rng.random(), int(rng.integers(len(CLASS_NAMES)))
    return label if keep < signal else CLASS_NAMES[other]


def make_paired_case(
    case: int, seed: int, us_signal: float, mg_signal: float, size: int = 128,
    us_images: int = 1, mg_bits: int = 8,
) -> PairedCase:  # fmt: skip
    """Case `case` of the paired set drawn with `seed`: class `case mod 3`, `us_images` ultrasound
    frames of its lesion and the CC and MLO views of its breast (portrait, 1.25 x `size` tall)."""
    check_signal("us_signal", us_signal)
    check_signal("mg_signal", mg_signal)
    if us_images < 1:
        raise ValueError(f"us_images must be at least 1, got {us_images}")
    if size < 104:
        raise ValueError(f"paired cases need size >= 104 pixels (the mammograms), got {size}")
    label = CLASS_NAMES[case % len(CLASS_NAMES)]
    draw = phantom_rng(seed, _STREAM, case, 0)
    lesion = SharedLesion(float(draw.random()), float(draw.random()), float(draw.random()))
    laterality = LATERALITIES[int(draw.integers(2))]
    us_look = appearance(label, us_signal, phantom_rng(seed, _STREAM, case, 1))
    mg_look = appearance(label, mg_signal, phantom_rng(seed, _STREAM, case, 2))
    frames = tuple(
        ultrasound_of(us_look, lesion, phantom_rng(seed, _STREAM, case, 3, k), size)
        for k in range(us_images)
    )
    breast = breast_of(mg_look, lesion, phantom_rng(seed, _STREAM, case, 4))
    films = tuple(
        make_mammogram(
            breast,
            phantom_rng(seed, _STREAM, case, 5, v),
            laterality,
            view,
            round(size * 1.25),
            size,
            mg_bits,
        )
        for v, view in enumerate(VIEWS)
    )
    return PairedCase(
        f"pair-{case:04d}", label, laterality, lesion, us_look, mg_look, frames, films
    )


def ultrasound_of(
    look: str, lesion: SharedLesion, rng: np.random.Generator, size: int
) -> UltrasoundPhantom:
    """A B-mode frame as edgebc.synth.ultrasound draws one of class `look`, its lesion (if any)
    resized and placed by the shared lesion (its shape, margin and posterior features stay the
    class's draw)."""
    echo = tissue_echogenicity(rng, size, size)
    mask = np.zeros((size, size), np.uint8)
    drawn = None
    if look == "normal":
        if rng.random() < 0.5:
            _add_fat_lobule(echo, rng)
    else:
        drawn = _draw_lesion(look, rng, size, size)
        width = (0.12 + 0.2 * lesion.size) * size
        drawn = replace(
            drawn,
            centre_x=float((0.3 + 0.4 * lesion.across) * size),
            centre_y=float((0.38 + 0.22 * lesion.depth) * size),
            width=float(width),
            height=float(width * drawn.height / drawn.width),  # the class's aspect ratio
        )
        mask = _lesion_mask(drawn, rng, size, size, look)
        _paint_lesion(echo, mask, drawn, rng)
    return UltrasoundPhantom(image=form_image(echo, rng), mask=mask, label=look, lesion=drawn)


def breast_of(look: str, lesion: SharedLesion, rng: np.random.Generator) -> BreastParameters:
    """The breast both mammogram views show, its finding of class `look` at the shared lesion's
    size and place (calcifications with a malignant look half the time, as draw_breast does)."""
    return BreastParameters(
        label=look,
        density=float(rng.uniform(0.1, 0.9)),
        finding_depth=float(0.3 + 0.35 * lesion.depth),
        finding_height=float(-0.5 + lesion.across),
        finding_radius=float(0.05 + 0.04 * lesion.size),
        calcifications=look == "malignant" and bool(rng.random() < 0.5),
    )
