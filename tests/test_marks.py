"""Burned-in marks are found by shape and painted out; echogenic foci and microcalcifications stay."""

import cv2
import numpy as np
import pytest

from edgebc.config import ConfigError
from edgebc.marks import find_marks, remove_marks
from edgebc.preprocess import PreprocessCard, preprocess
from edgebc.synth import make_ultrasound_phantom
from edgebc.synth.ultrasound import phantom_rng

HEIGHT, WIDTH = 360, 480
# Echogenic foci (round, graded, 2-6 px across) and an irregular microcalcification cluster.
FOCI = [(250, 80, 1.0), (290, 400, 1.6), (80, 420, 0.8)]
CLUSTER = [(200, 300), (204, 309), (196, 312), (209, 303), (201, 318), (211, 314)]


def _tissue(seed: int) -> np.ndarray:
    """A speckle phantom with foci drawn in: the frame as the scanner imaged it."""
    image = make_ultrasound_phantom("benign", phantom_rng(seed, 17), HEIGHT, WIDTH).image
    frame = image.astype(np.float32)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    for y, x, sigma in FOCI + [(y, x, 0.8) for y, x in CLUSTER]:
        frame += 110.0 * np.exp(-((ys - y) ** 2 + (xs - x) ** 2) / (2 * sigma**2))
    return np.clip(np.round(frame), 0, 255).astype(np.uint8)


def _draw_marks(frame: np.ndarray, colour: int | tuple[int, int, int] = 255) -> np.ndarray:
    """Two caliper crosses ('+' and 'x'), the dotted line between them and a text read-out."""
    marked = frame.copy()
    for y, x in [(120, 100)]:
        cv2.line(marked, (x - 8, y), (x + 8, y), colour, 1)
        cv2.line(marked, (x, y - 8), (x, y + 8), colour, 1)
    cv2.line(marked, (292, 112), (308, 128), colour, 1)
    cv2.line(marked, (292, 128), (308, 112), colour, 1)
    for x in range(112, 290, 6):
        cv2.rectangle(marked, (x, 119), (x + 1, 120), colour, -1)
    cv2.putText(
        marked, "D1 12.3mm", (40, 330), cv2.FONT_HERSHEY_SIMPLEX, 0.6, colour, 1, cv2.LINE_AA
    )
    cv2.putText(marked, "L", (440, 40), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA)
    return marked


def _drawn_pixels() -> np.ndarray:
    return _draw_marks(np.zeros((HEIGHT, WIDTH), np.uint8)) > 0


def _peak_contrast(image: np.ndarray, y: int, x: int) -> float:
    """A focus's peak over the median of the ring 6-10 px around it."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    distance = np.hypot(ys - y, xs - x)
    ring = image[(distance >= 6) & (distance <= 10)]
    return float(image[y - 1 : y + 2, x - 1 : x + 2].max()) - float(np.median(ring))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calipers_dotted_lines_and_text_are_found_and_painted_out(seed):
    tissue = _tissue(seed)
    marked = _draw_marks(tissue)
    drawn = _drawn_pixels()
    marks = find_marks(marked)
    assert np.mean(marks.mask[drawn] > 0) >= 0.97
    assert marks.count >= 10  # two crosses, a dotted line's dots, glyphs
    cleaned = remove_marks(marked, marks)
    # Where the marks were, the cleaned frame is tissue again: its brightness there is close to
    # the unmarked tissue's (the marks themselves sat ~150 grey levels above it).
    before = float(np.mean(marked[drawn].astype(np.float32) - tissue[drawn]))
    after = float(np.mean(cleaned[drawn].astype(np.float32) - tissue[drawn]))
    assert before > 80 and abs(after) < 15
    # Removal paints only near the marks: pixels farther than 8 px from any mark are untouched.
    far = cv2.dilate(drawn.astype(np.uint8), np.ones((17, 17), np.uint8)) == 0
    np.testing.assert_array_equal(cleaned[far], marked[far])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_echogenic_foci_and_microcalcifications_survive(seed):
    tissue = _tissue(seed)
    marked = _draw_marks(tissue)
    marks = find_marks(marked)
    cleaned = remove_marks(marked, marks)
    for y, x, _ in FOCI + [(y, x, 0) for y, x in CLUSTER]:
        assert not marks.mask[y - 2 : y + 3, x - 2 : x + 3].any(), (y, x)
        original = _peak_contrast(tissue, y, x)
        assert original > 40
        assert _peak_contrast(cleaned, y, x) >= 0.9 * original


@pytest.mark.parametrize("seed", range(6))
def test_a_clean_frame_is_left_alone(seed):
    label = ("normal", "benign", "malignant")[seed % 3]
    tissue = make_ultrasound_phantom(label, phantom_rng(seed, 5), HEIGHT, WIDTH).image
    marks = find_marks(tissue)
    assert marks.fraction < 0.001
    if seed < 3:  # with foci and a cluster drawn in, still nothing to remove
        with_foci = _tissue(seed)
        assert find_marks(with_foci).count == 0
        assert remove_marks(with_foci) is with_foci


def test_sixteen_bit_frames_are_cleaned_in_their_own_dtype():
    marked8 = _draw_marks(_tissue(0))
    marked16 = marked8.astype(np.uint16) * 257
    cleaned16 = remove_marks(marked16)
    assert cleaned16.dtype == np.uint16 and cleaned16.shape == marked16.shape
    np.testing.assert_array_equal(find_marks(marked16).mask, find_marks(marked8).mask)
    cleaned8 = remove_marks(marked8).astype(np.float32) * 257
    drawn = _drawn_pixels()
    assert np.abs(cleaned16[drawn].astype(np.float32) - cleaned8[drawn]).mean() < 2 * 257


def test_colour_frames_lose_white_marks_and_coloured_boxes():
    tissue = cv2.cvtColor(_tissue(1), cv2.COLOR_GRAY2BGR)
    marked = _draw_marks(tissue, (255, 255, 255))
    cv2.rectangle(marked, (330, 220), (420, 300), (0, 255, 255), 1)  # a yellow box
    box = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.rectangle(box, (330, 220), (420, 300), 1, 1)
    marks = find_marks(marked)
    assert np.all(marks.mask[box > 0]) and np.mean(marks.mask[_drawn_pixels()] > 0) >= 0.97
    cleaned = remove_marks(marked, marks)
    assert cleaned.shape == marked.shape and cleaned.dtype == np.uint8
    spread = cleaned.max(axis=2).astype(np.int16) - cleaned.min(axis=2)
    assert spread[box > 0].max() <= 40  # no yellow left
    assert find_marks(cleaned).count <= 1
    # sixteen-bit colour is painted channel by channel
    cleaned16 = remove_marks(marked.astype(np.uint16) * 257)
    assert cleaned16.dtype == np.uint16 and cleaned16.shape == marked.shape


def test_a_mask_of_another_frame_is_refused():
    marks = find_marks(_tissue(0))
    with pytest.raises(ValueError, match="find the marks on the same frame"):
        remove_marks(np.zeros((10, 10), np.uint8), marks)


def test_card_carries_the_marks_setting_and_refuses_unknown_values():
    card = PreprocessCard(input_height=128, input_width=128, marks="inpaint")
    assert PreprocessCard.from_json(card.to_json()) == card
    assert PreprocessCard.from_dict({"input_height": 128}).marks == "keep"
    with pytest.raises(ConfigError, match=r"marks: expected one of \['keep', 'inpaint'\]"):
        PreprocessCard.from_dict({"marks": "erase"})
    with pytest.raises(ValueError, match="marks must be 'keep' or 'inpaint'"):
        PreprocessCard(marks="erase")  # type: ignore[arg-type]


def test_preprocess_with_inpaint_sees_the_tissue_not_the_marks():
    tissue = _tissue(2)
    marked = _draw_marks(tissue)
    keep, inpaint = PreprocessCard(), PreprocessCard(marks="inpaint")
    reference = preprocess(tissue, keep)
    assert np.abs(preprocess(marked, keep) - reference).max() > 1.0
    assert np.abs(preprocess(marked, inpaint) - reference).mean() < 0.01
    # Without marks, "inpaint" gives exactly the tensor "keep" gives.
    np.testing.assert_array_equal(preprocess(tissue, inpaint), reference)
    # Float frames take the same path.
    as_float = marked.astype(np.float32) / 255.0
    assert np.abs(preprocess(as_float, inpaint) - preprocess(marked, inpaint)).max() < 0.1


def test_training_dataset_and_runtime_remove_marks_alike(tmp_path):
    pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
    from edgebc.data import Sample
    from edgebc.decode import read_image
    from edgebc.task import TASKS
    from edgebc.train.dataset import SampleDataset

    card = PreprocessCard(input_height=128, input_width=128, marks="inpaint")
    path = tmp_path / "marked.png"
    cv2.imwrite(str(path), _draw_marks(_tissue(0)))
    tensor, _ = SampleDataset([Sample(path, "benign")], card, TASKS["three_class"])[0]
    runtime = preprocess(read_image(path), card)[0]
    np.testing.assert_array_equal(tensor.numpy(), runtime)
    assert np.abs(runtime - preprocess(read_image(path), PreprocessCard(128, 128))[0]).max() > 1.0


def _measure_tool():
    """tools/measure_marks.py, imported as a module (it is a script beside the package)."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    try:
        return importlib.import_module("measure_marks")
    finally:
        sys.path.pop(0)


def _phantom_manifest(tmp_path):
    """Two sites of phantom frames, half with marks; site 'a' has the audit flag and lesion
    masks, site 'b' a bbox and no flag (split by the detector)."""
    lines = ["path,label,source,split,annotations,bbox,masks"]
    for site in ("a", "b"):
        for k in range(8):
            label = ("benign", "malignant")[k % 2]
            phantom = make_ultrasound_phantom(label, phantom_rng(k, 3), HEIGHT, WIDTH)
            frame = _draw_marks(phantom.image) if k < 4 else phantom.image
            path = tmp_path / f"{site}{k}.png"
            cv2.imwrite(str(path), frame)
            flag, bbox, mask = ("yes" if k < 4 else "no"), "", ""
            if site == "a":
                cv2.imwrite(str(tmp_path / f"{site}{k}_mask.png"), phantom.mask * 255)
                mask = str(tmp_path / f"{site}{k}_mask.png")
            else:
                flag, bbox = "", '"[150,100,160,120]"'
            lines.append(f"{path},{label},{site},test,{flag},{bbox},{mask}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_measure_tool_counts_marks_and_scores_models_on_annotated_and_clean_frames(tmp_path):
    pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
    import json

    from tests.helpers import make_checkpoint

    tool = _measure_tool()
    manifest = _phantom_manifest(tmp_path)
    out = tmp_path / "prevalence.json"
    assert tool.main(["prevalence", "--data", str(manifest), "--json", str(out)]) == 0
    prevalence = json.loads(out.read_text())
    assert prevalence["a"]["with_marks"] == 4 and prevalence["a"]["audit_yes_found"] == 4
    assert 0.002 < prevalence["a"]["mean_fraction_marked"] < 0.05
    for when in ("before", "after"):
        make_checkpoint(tmp_path / when / "arm" / "best.pt")
    out = tmp_path / "models.json"
    args = ["models", "--data", str(manifest), "--before", str(tmp_path / "before"),
            "--after", str(tmp_path / "after"), "--arms", "arm", "--boot", "50",
            "--detector-sites", "b", "--min-marks", "2",
            "--json", str(out)]  # fmt: skip
    assert tool.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["when"], r["site"]) for r in rows] == [
        ("before", "a"),
        ("before", "b"),
        ("after", "a"),
        ("after", "b"),
    ]
    for row in rows:
        assert row["annotated"]["n"] == 4 and row["clean"]["n"] == 4
        assert 0.0 <= row["annotated"]["auc"] <= 1.0
        assert row["lesion_share"]["frames"] + row["lesion_share"]["blank_maps"] > 0
    with pytest.raises(SystemExit, match="outside"):
        tool.main(["montage", "--data", str(manifest), "--out", "docs/marks"])
