"""Readers, the manifest round trip, and the real BUSI / mini-MIAS layouts."""

from collections import Counter

import cv2
import numpy as np
import pytest

from edgebc.data import (
    Finding,
    Sample,
    load_mask,
    read_busi,
    read_class_folders,
    read_dataset,
    read_manifest,
    read_mias,
    write_manifest,
)
from edgebc.decode import read_header
from edgebc.errors import DataLayoutError


def _write(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)


@pytest.fixture
def busi_like(tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    for label in ("benign", "malignant", "normal"):
        for n in (1, 2, 10):
            _write(root / label / f"{label} ({n}).png", np.full((20, 30), n * 10, np.uint8))
            mask = np.zeros((20, 30), np.uint8)
            mask[2:6, 2:6] = 255
            _write(root / label / f"{label} ({n})_mask.png", mask)
    second = np.zeros((20, 30), np.uint8)
    second[10:12, 20:25] = 255
    _write(root / "benign" / "benign (2)_mask_1.png", second)
    return tmp_path


def test_busi_reader_lists_images_not_masks_and_merges_masks(busi_like):
    samples = read_busi(busi_like)
    assert len(samples) == 9
    assert all("_mask" not in s.path.name for s in samples)
    assert [s.path.name for s in samples if s.label == "benign"] == [
        "benign (1).png",
        "benign (2).png",
        "benign (10).png",
    ]
    two = next(s for s in samples if s.path.name == "benign (2).png")
    assert [m.name for m in two.masks] == ["benign (2)_mask.png", "benign (2)_mask_1.png"]
    merged = load_mask(two)
    assert merged.sum() == 16 + 10 and set(np.unique(merged)) == {0, 1}


def test_class_folders_and_unknown_layouts(tmp_path):
    _write(tmp_path / "cats" / "a.jpg", np.zeros((8, 8), np.uint8))
    _write(tmp_path / "dogs" / "sub" / "b.png", np.zeros((8, 8), np.uint8))
    samples = read_class_folders(tmp_path)
    assert Counter(s.label for s in samples) == {"cats": 1, "dogs": 1}
    with pytest.raises(DataLayoutError, match="no such file"):
        read_dataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataLayoutError, match="one sub-folder per class"):
        read_class_folders(tmp_path / "empty")


def test_manifest_round_trip_keeps_every_field(tmp_path):
    sample = Sample(
        path=tmp_path / "img" / "x.png",
        label="malignant",
        patient_id="p7",
        modality="mammo",
        view="left",
        source="site-a",
        split="test",
        fold=3,
        group="g0002",
        masks=(tmp_path / "img" / "x_mask.png",),
        findings=(Finding("SPIC", "M", 10.0, 20.0, 5.0), Finding("CALC", "M")),
        extra=(("scanner", "logiq"),),
    )
    path = write_manifest([sample], tmp_path / "m.csv")
    assert "img/x.png" in path.read_text()  # stored relative to the manifest
    assert read_manifest(path) == [sample]


def test_manifest_errors_name_the_line(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("path,label\na.png,benign\nb.png,\n")
    with pytest.raises(DataLayoutError, match=r"m.csv:3: empty label"):
        read_manifest(bad)
    bad.write_text("file,class\n")
    with pytest.raises(DataLayoutError, match="needs the columns path and label"):
        read_manifest(bad)


def test_mias_labels_findings_and_bottom_left_origin(tmp_path):
    (tmp_path / "Info.txt").write_text(
        "header text\nmdb001 G CIRC B 535 425 197\nmdb002 G NORM \nmdb003 D CALC M *NOTE 3*\n"
        "mdb003 D SPIC B 100 900 20\nmdb004 F CIRC B\n"
    )
    for n in (1, 2, 3, 4):
        _write(tmp_path / f"mdb00{n}.png", np.zeros((1024, 1024), np.uint8))
    samples = {s.path.stem: s for s in read_mias(tmp_path)}
    assert [samples[k].label for k in sorted(samples)] == [
        "benign",
        "normal",
        "malignant",
        "benign",
    ]
    assert samples["mdb001"].findings == (Finding("CIRC", "B", 535.0, 1024 - 425.0, 197.0),)
    assert samples["mdb003"].findings[0] == Finding("CALC", "M")  # no site given
    assert (
        samples["mdb001"].patient_id == samples["mdb002"].patient_id != samples["mdb003"].patient_id
    )
    assert (samples["mdb001"].view, samples["mdb002"].view) == ("R-MLO", "L-MLO")


@pytest.mark.data
def test_real_busi_and_mias_are_read_in_full(data_dir):
    busi = read_dataset(data_dir / "busi")
    assert Counter(s.label for s in busi) == {"benign": 348, "malignant": 169, "normal": 106}
    assert sum(len(s.masks) > 1 for s in busi) >= 10
    mias = read_dataset(data_dir / "mias")
    assert len(mias) == 258
    counts = Counter(s.label for s in mias)
    assert (
        counts["malignant"] > 0 and counts["benign"] > 0 and counts["normal"] > counts["malignant"]
    )
    assert all(s.modality == "mammo" and s.patient_id for s in mias)


def test_a_lesion_box_is_read_or_refused(tmp_path):
    sample = Sample(tmp_path / "x.png", "benign", extra=(("bbox", "[91,24,103,79]"),))
    assert sample.lesion_box == (91, 24, 103, 79)
    assert Sample(tmp_path / "x.png", "benign").lesion_box is None
    for bad in ("[1,2,3]", "[1,2,0,4]", "[a,b,c,d]"):
        with pytest.raises(ValueError, match="bbox"):
            _ = Sample(tmp_path / "x.png", "benign", extra=(("bbox", bad),)).lesion_box


@pytest.mark.data
def test_bus_bra_reads_with_patients_scanners_bi_rads_and_boxes(data_dir):
    samples = read_dataset(data_dir / "busbra" / "manifest.csv")
    assert len(samples) == 1132 and Counter(s.label for s in samples) == {
        "benign": 766,
        "malignant": 366,
    }
    assert len({s.patient_id for s in samples}) == 638 and {s.source for s in samples} == {"busbra"}
    devices = Counter(dict(s.extra)["device"] for s in samples)
    assert len(devices) == 4 and sum(devices.values()) == 1132
    assert {dict(s.extra)["birads"] for s in samples} <= {"2", "3", "4", "5"}
    for sample in samples[:50]:  # every box lies inside its image
        x, y, w, h = sample.lesion_box
        header = read_header(sample.path.read_bytes(), str(sample.path))
        assert x + w <= header.width and y + h <= header.height
