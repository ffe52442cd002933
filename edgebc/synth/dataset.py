"""`edgebc synth`: write a labelled phantom dataset to disk with its manifest.

Layout (every image file written atomically, the manifest last so that a reader never sees a
manifest that names a missing file):

    OUT/us/<class>/<class>_0000.png (+ _mask.png)      ultrasound phantoms
    OUT/mammo/<class>/<class>_0000.png (+ _mask.png)   mammography phantoms (modality both|mammo)
    OUT/mammography/mg-0000/mg-0000_L-CC.png (+ _mask.png, _breast.png), truth.json
                                                       framed mammograms: four views per woman
    OUT/paired/pair-0000/pair-0000_us_00.png, pair-0000_L-CC.png, pair-0000_L-MLO.png (+ masks),
        truth.json                                     paired US + MG cases (edgebc.synth.paired)
    OUT/screens/<class>_0000.png + regions.json        scanner-screen framing and the true regions
    OUT/cine/<class>_00.avi + <class>_00/frame_0000.png  probe sweeps, as video and frame folders
    OUT/manifest.csv

Item k of class c comes from its own seeded stream, so adding items never changes earlier ones.
Framed mammograms come as women (patient_id mg-NNNN), each with L-CC, L-MLO, R-CC and R-MLO
views (the `view` column): woman k has class k mod 3 in one breast, and the other breast is
normal; truth.json holds each image's laterality, view, finding, label block and marker boxes.
Paired cases (patient_id pair-NNNN, one breast each) give one case's ultrasound frames (modality
us) and its breast's CC and MLO views (modality mammo, the `view` column), all with the case's
label; truth.json holds what each modality's lesion looks like and the shared lesion.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from edgebc.atomic import atomic_write_bytes, atomic_write_text
from edgebc.data.manifest import write_manifest
from edgebc.data.records import CLASS_NAMES, Sample
from edgebc.synth.cine import make_cine, write_video
from edgebc.synth.mammo import make_mammo_phantom
from edgebc.synth.mammogram import LATERALITIES, VIEWS, draw_breast, make_mammogram
from edgebc.synth.paired import check_signal, make_paired_case
from edgebc.synth.screen import render_scanner_screen
from edgebc.synth.ultrasound import LesionDescriptors, make_ultrasound_phantom, phantom_rng

_STREAM = {"us": 1, "mammo": 2, "screen": 3, "cine": 4, "mammogram": 5}


@dataclass(frozen=True)
class SynthPlan:
    """What `edgebc synth` writes."""

    n_per_class: int = 20
    size: int = 256
    seed: int = 0
    modality: Literal["us", "mammo", "both"] = "us"
    screens: int = 0
    cine_per_class: int = 0
    cine_frames: int = 30
    fps: float = 30.0
    mammo_women: int = 0  # framed four-view mammogram sets (OUT/mammography)
    mammo_bits: int = 8  # 8, or 12 (16-bit PNGs holding 12-bit values, as from FFDM)
    paired_cases: int = 0  # paired US + MG cases (OUT/paired, edgebc.synth.paired)
    us_signal: float = 1.0  # how much of the class each modality's lesion shows, in [0, 1]
    mg_signal: float = 1.0
    paired_us_images: int = 1  # ultrasound frames per paired case

    def __post_init__(self) -> None:
        if self.n_per_class < (0 if self.paired_cases else 1):
            raise ValueError(
                f"n_per_class must be at least 1 (0 with paired cases), got {self.n_per_class}"
            )
        if not 32 <= self.size <= 2048:
            raise ValueError(f"size must be 32..2048 pixels, got {self.size}")
        if self.modality not in ("us", "mammo", "both"):
            raise ValueError(f"modality must be us, mammo or both, got {self.modality!r}")
        if self.screens < 0 or self.cine_per_class < 0 or self.cine_frames < 1:
            raise ValueError("screens and cine_per_class must be >= 0 and cine_frames >= 1")
        if self.mammo_women < 0:
            raise ValueError(f"mammo_women must be >= 0, got {self.mammo_women}")
        if self.mammo_bits not in (8, 12):
            raise ValueError(f"mammo_bits must be 8 or 12, got {self.mammo_bits}")
        if (self.mammo_women or self.paired_cases) and self.size < 104:
            raise ValueError(f"framed mammograms need size >= 104 pixels, got {self.size}")
        if self.paired_cases < 0 or self.paired_us_images < 1:
            raise ValueError(
                f"paired_cases must be >= 0 and paired_us_images >= 1, got {self.paired_cases} "
                f"and {self.paired_us_images}"
            )
        check_signal("us_signal", self.us_signal)
        check_signal("mg_signal", self.mg_signal)


def write_phantom_dataset(
    out: str | Path, plan: SynthPlan, progress: Callable[[int], None] | None = None
) -> Path:
    """Write the dataset described by `plan` under `out`; returns the manifest path."""
    out = Path(out)
    samples: list[Sample] = []
    tick = progress or (lambda _n: None)
    for class_index, label in enumerate(CLASS_NAMES):
        for k in range(plan.n_per_class):
            if plan.modality in ("us", "both"):
                phantom = make_ultrasound_phantom(
                    label,
                    phantom_rng(plan.seed, _STREAM["us"], class_index, k),
                    plan.size,
                    plan.size,
                )
                samples.append(
                    _write_item(
                        out / "us" / label,
                        f"{label}_{k:04d}",
                        phantom.image,
                        phantom.mask,
                        label,
                        "us",
                        extra=_descriptor_columns(phantom.lesion),
                    )
                )
            if plan.modality in ("mammo", "both"):
                mammo = make_mammo_phantom(
                    label, phantom_rng(plan.seed, _STREAM["mammo"], class_index, k), plan.size
                )
                item = _write_item(
                    out / "mammo" / label,
                    f"{label}_{k:04d}",
                    mammo.image,
                    mammo.mask,
                    label,
                    "mammo",
                )
                samples.append(item.with_(view=mammo.view, findings=mammo.findings))
            tick(1)
    if plan.screens:
        _write_screens(out / "screens", plan)
    if plan.cine_per_class:
        _write_cines(out / "cine", plan, tick)
    if plan.mammo_women:
        samples.extend(_write_mammograms(out / "mammography", plan, tick))
    if plan.paired_cases:
        samples.extend(_write_paired(out / "paired", plan, tick))
    return write_manifest(samples, out / "manifest.csv")


def _write_item(
    folder: Path,
    stem: str,
    image: np.ndarray,
    mask: np.ndarray,
    label: str,
    modality: str,
    extra: tuple[tuple[str, str], ...] = (),
) -> Sample:
    image_path = folder / f"{stem}.png"
    mask_path = folder / f"{stem}_mask.png"
    atomic_write_bytes(image_path, _png(image))
    atomic_write_bytes(mask_path, _png(mask * 255))
    return Sample(
        path=image_path,
        label=label,
        modality=modality,
        source="phantom",
        masks=(mask_path,),
        extra=tuple(extra),
    )


def _descriptor_columns(lesion: LesionDescriptors | None) -> tuple[tuple[str, str], ...]:
    if lesion is None:
        return (("shape", ""), ("margin", ""), ("orientation", ""), ("posterior", ""))
    return (
        ("shape", lesion.shape),
        ("margin", lesion.margin),
        ("orientation", lesion.orientation),
        ("posterior", lesion.posterior),
    )


def _write_screens(folder: Path, plan: SynthPlan) -> None:
    regions = {}
    for k in range(plan.screens):
        label = CLASS_NAMES[k % len(CLASS_NAMES)]
        phantom = make_ultrasound_phantom(
            label, phantom_rng(plan.seed, _STREAM["screen"], k, 0), plan.size, plan.size
        )
        screen, region = render_scanner_screen(
            phantom.image, phantom_rng(plan.seed, _STREAM["screen"], k, 1)
        )
        name = f"{label}_{k:04d}.png"
        atomic_write_bytes(folder / name, _png(screen))
        regions[name] = {"label": label, "region": asdict(region)}
    atomic_write_text(folder / "regions.json", json.dumps(regions, indent=2) + "\n")


def _write_cines(folder: Path, plan: SynthPlan, tick: Callable[[int], None]) -> None:
    for class_index, label in enumerate(CLASS_NAMES):
        for k in range(plan.cine_per_class):
            frames, _ = make_cine(
                label,
                phantom_rng(plan.seed, _STREAM["cine"], class_index, k),
                plan.cine_frames,
                plan.size,
                plan.size,
            )
            name = f"{label}_{k:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            write_video(frames, folder / f"{name}.avi", plan.fps)
            for index, frame in enumerate(frames):
                atomic_write_bytes(folder / name / f"frame_{index:04d}.png", _png(frame))
            tick(1)


def _write_mammograms(folder: Path, plan: SynthPlan, tick: Callable[[int], None]) -> list[Sample]:
    samples = []
    truth: dict[str, dict[str, object]] = {}
    height, width = round(plan.size * 1.25), plan.size  # portrait, like a detector
    for woman in range(plan.mammo_women):
        patient = f"mg-{woman:04d}"
        label = CLASS_NAMES[woman % len(CLASS_NAMES)]
        affected = LATERALITIES[
            int(phantom_rng(plan.seed, _STREAM["mammogram"], woman).integers(2))
        ]
        for side_index, laterality in enumerate(LATERALITIES):
            side_label = label if laterality == affected else "normal"
            breast = draw_breast(
                side_label, phantom_rng(plan.seed, _STREAM["mammogram"], woman, side_index, 9)
            )
            for view_index, view in enumerate(VIEWS):
                rng = phantom_rng(plan.seed, _STREAM["mammogram"], woman, side_index, view_index)
                mg = make_mammogram(breast, rng, laterality, view, height, width, plan.mammo_bits)
                stem = f"{patient}_{mg.view_code}"
                item = _write_item(folder / patient, stem, mg.image, mg.mask, side_label, "mammo")
                breast_path = folder / patient / f"{stem}_breast.png"
                atomic_write_bytes(breast_path, _png(mg.breast * 255))
                samples.append(
                    item.with_(patient_id=patient, view=mg.view_code, findings=mg.findings)
                )
                truth[f"{patient}/{stem}.png"] = {
                    "label": side_label,
                    "laterality": mg.laterality,
                    "view": mg.view,
                    "chest_wall": mg.chest_wall,
                    "breast_mask": breast_path.name,
                    "bits": plan.mammo_bits,
                    "findings": [asdict(f) for f in mg.findings],
                    "label_box": list(mg.label_box),
                    "marker_boxes": [list(b) for b in mg.marker_boxes],
                }
        tick(1)
    atomic_write_text(folder / "truth.json", json.dumps(truth, indent=2) + "\n")
    return samples


def _write_paired(folder: Path, plan: SynthPlan, tick: Callable[[int], None]) -> list[Sample]:
    samples = []
    truth: dict[str, dict[str, object]] = {}
    for k in range(plan.paired_cases):
        case = make_paired_case(k, plan.seed, plan.us_signal, plan.mg_signal, plan.size,
                                plan.paired_us_images, plan.mammo_bits)  # fmt: skip
        where = folder / case.case_id
        for index, frame in enumerate(case.ultrasound):
            item = _write_item(where, f"{case.case_id}_us_{index:02d}", frame.image, frame.mask,
                               case.label, "us", extra=_descriptor_columns(frame.lesion))  # fmt: skip
            samples.append(item.with_(patient_id=case.case_id))
        for film in case.mammograms:
            stem = f"{case.case_id}_{film.view_code}"
            item = _write_item(where, stem, film.image, film.mask, case.label, "mammo")
            samples.append(item.with_(patient_id=case.case_id, view=film.view_code,
                                      findings=film.findings))  # fmt: skip
        truth[case.case_id] = {
            "label": case.label,
            "laterality": case.laterality,
            "us_appearance": case.us_appearance,
            "mg_appearance": case.mg_appearance,
            "lesion": asdict(case.lesion),
        }
        tick(1)
    meta = {"us_signal": plan.us_signal, "mg_signal": plan.mg_signal, "cases": truth}
    atomic_write_text(folder / "truth.json", json.dumps(meta, indent=2) + "\n")
    return samples


def _png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError("OpenCV could not encode a PNG")
    return encoded.tobytes()
