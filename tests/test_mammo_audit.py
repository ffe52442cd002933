"""`edgebc data audit` on mammograms: bit depth, stated vs found laterality, views, blank frames,
and near-duplicates that hold for 12-bit films and do not join different women."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgebc.data import read_dataset
from edgebc.data.curation import audit_samples, write_audit
from edgebc.data.mammo_audit import bit_depth_name, stated_view
from edgebc.data.records import Sample
from edgebc.synth.dataset import SynthPlan, write_phantom_dataset

# Breasts that fill the film from edge to edge: no side is taller, the image-based rule fails
# (the same two as in test_breast_crop).
MIAS_LATERALITY_MISSES = {"mdb151", "mdb152"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    out = tmp_path_factory.mktemp("mg")
    manifest = write_phantom_dataset(
        out, SynthPlan(n_per_class=1, size=128, mammo_women=3, mammo_bits=12)
    )
    return read_dataset(manifest)


def _mammograms(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s.modality == "mammo" and s.view and "-" in s.view]


def test_twelve_bit_phantoms_give_their_depth_views_and_no_mismatch(phantoms, tmp_path):
    result = audit_samples(phantoms, "phantoms", workers=1)
    block = result.report.mammography
    assert block["n_images"] == 12  # the three ultrasound phantoms are not counted
    assert block["bit_depths"] == {"12-in-16": 12}
    assert block["views"] == {"L-CC": 3, "L-MLO": 3, "R-CC": 3, "R-MLO": 3}
    assert block["laterality_mismatches"] == []
    assert block["no_breast"] == []
    assert all(255 < i["max_value"] <= 4095 and i["dtype"] == "uint16" for i in block["images"])
    # Twelve films of three women: alike in silhouette, none a duplicate of another.
    assert result.report.near_duplicate_groups == []
    assert len(result.cleaned) == len(phantoms)
    paths = write_audit(result, tmp_path)
    written = json.loads(paths["json"].read_text())
    assert written["mammography"]["views"] == block["views"]
    markdown = paths["markdown"].read_text()
    assert "## Mammography" in markdown and "12-in-16: 12" in markdown


def test_a_right_breast_listed_as_left_is_a_mismatch(phantoms):
    films = _mammograms(phantoms)
    right = next(s for s in films if s.view == "R-MLO")
    relabelled = [s.with_(view="L-MLO") if s is right else s for s in films]
    block = audit_samples(relabelled, workers=1).report.mammography
    assert block["laterality_mismatches"] == [
        {"path": str(right.path), "stated": "L", "found": "R"}
    ]
    assert block["views"]["L-MLO"] == 4 and block["views"]["R-MLO"] == 2


def test_a_blank_film_is_reported_not_dropped(phantoms, tmp_path):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((160, 128), 37, np.uint16))
    samples = [*_mammograms(phantoms)[:2], Sample(blank, "normal", modality="mammo", view="L-CC")]
    result = audit_samples(samples, workers=1)
    block = result.report.mammography
    assert [b["path"] for b in block["no_breast"]] == [str(blank)]
    assert "blank or flat" in block["no_breast"][0]["why"]
    assert block["laterality_mismatches"] == []  # nothing found is not a mismatch
    assert result.report.unreadable == [] and len(result.cleaned) == 3


def test_a_twelve_bit_film_and_its_eight_bit_export_are_near_duplicates(phantoms, tmp_path):
    films = _mammograms(phantoms)
    film = films[0]
    twelve = cv2.imread(str(film.path), cv2.IMREAD_UNCHANGED)
    rng = np.random.default_rng(0)
    noisy = np.clip(twelve.astype(np.int32) + rng.integers(-8, 9, twelve.shape), 0, 4095)
    copies = {
        "eight.png": (twelve >> 4).astype(np.uint8),  # the same film exported at 8 bits
        "noisy.png": noisy.astype(np.uint16),  # re-acquired noise, different bytes
    }
    extra = []
    for name, pixels in copies.items():
        cv2.imwrite(str(tmp_path / name), pixels)
        extra.append(film.with_(path=tmp_path / name))
    result = audit_samples([*films, *extra], workers=1)
    report = result.report
    groups = [sorted(m["path"] for m in g["members"]) for g in report.near_duplicate_groups]
    assert groups == [sorted([str(film.path), *(str(tmp_path / n) for n in copies)])]
    assert report.mammography["bit_depths"] == {"12-in-16": 13, "8": 1}
    # The 12-bit film is seen as its 8-bit export is, not shifted down to levels 0..15: the
    # same perceptual hash and the same flag for its burned-in label and markers.
    eight = str(tmp_path / "eight.png")
    pair = next(p for g in report.near_duplicate_groups for p in g["pairs"] if eight in (p["a"], p["b"]) and str(film.path) in (p["a"], p["b"]))  # fmt: skip
    assert pair["hamming"] == 0
    flags = {str(s.path): dict(s.extra)["annotations"] for s in result.cleaned}
    assert flags[str(film.path)] == flags[eight] == "yes"


def test_an_ultrasound_only_report_has_no_mammography_part(tmp_path):
    samples = read_dataset(write_phantom_dataset(tmp_path / "us", SynthPlan(2, 64)))
    result = audit_samples(samples, workers=1)
    assert "mammography" not in result.report.to_dict()
    assert "Mammography" not in write_audit(result, tmp_path / "out")["markdown"].read_text()


@pytest.mark.parametrize(
    ("view", "source", "expected"),
    [
        ("L-CC", None, ("L", "CC")),
        ("r mlo", None, ("R", "MLO")),
        ("RCC", None, ("R", "CC")),
        ("left", "mias", ("L", "MLO")),
        ("right", None, ("R", None)),
        ("MLO", None, (None, "MLO")),
        (None, None, (None, None)),
    ],
)
def test_stated_view_reads_the_forms_manifests_use(view, source, expected):
    sample = Sample(Path("x.png"), "normal", modality="mammo", view=view, source=source)
    assert stated_view(sample) == expected


def test_bit_depth_names():
    assert bit_depth_name(np.zeros((2, 2), np.uint8)) == "8"
    assert bit_depth_name(np.array([[0, 4095]], np.uint16)) == "12-in-16"
    assert bit_depth_name(np.array([[0, 1000]], np.uint16)) == "10-in-16"
    assert bit_depth_name(np.array([[0, 40000]], np.uint16)) == "16"


@pytest.mark.data
def test_mini_mias_is_eight_bit_mlo_without_duplicates(data_dir):
    mias = data_dir / "mias"
    if not (mias / "Info.txt").is_file():
        pytest.skip(f"mini-MIAS absent at {mias}")
    report = audit_samples(read_dataset(mias), "mias", workers=2).report
    block = report.mammography
    assert block["bit_depths"] == {"8": block["n_images"]}
    assert set(block["views"]) == {"L-MLO", "R-MLO"}
    assert block["views"]["L-MLO"] == block["views"]["R-MLO"]  # both breasts of every woman
    misses = {Path(m["path"]).stem for m in block["laterality_mismatches"]}
    assert misses <= MIAS_LATERALITY_MISSES, sorted(misses)
    assert block["no_breast"] == []
    # mini-MIAS holds no duplicate film; silhouettes alone would join over a hundred women.
    assert report.near_duplicate_groups == [] and report.exact_duplicates == []
    assert block["near_duplicate_pairs_rejected_by_detail"] > 100


def test_the_command_line_summary_names_the_mammograms(phantoms, tmp_path, capsys):
    from edgebc.cli import main
    from edgebc.data import write_manifest

    manifest = write_manifest(_mammograms(phantoms), tmp_path / "mg.csv")
    assert main(["data", "audit", str(manifest), "--out", str(tmp_path / "audit")]) == 0
    out = capsys.readouterr().out
    assert (
        "  mammograms: L-CC 3, L-MLO 3, R-CC 3, R-MLO 3; 0 laterality mismatches, 0 without a breast"
        in out
    )
