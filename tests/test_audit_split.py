"""Audit finds duplicates and conflicts without merging unrelated dark frames; splits never leak."""

from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgebc.data import Sample, read_dataset
from edgebc.data.curation import audit_samples, write_audit
from edgebc.data.split import SplitPlan, assign_splits, split_units
from edgebc.synth import make_ultrasound_phantom
from edgebc.synth.ultrasound import phantom_rng


def _save(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)
    return path


@pytest.fixture
def messy_dataset(tmp_path):
    samples = []
    for k in range(6):
        image = make_ultrasound_phantom("benign", phantom_rng(5, k), 128, 160).image
        samples.append(Sample(_save(tmp_path / "benign" / f"b{k}.png", image), "benign"))
    first = cv2.imread(str(samples[0].path), cv2.IMREAD_UNCHANGED)
    # Same bytes under another class: a label conflict.
    samples.append(Sample(_save(tmp_path / "malignant" / "m_copy.png", first), "malignant"))
    # A near-duplicate: same frame, brighter, noisier, re-encoded as JPEG.
    noisy = np.clip(
        first.astype(np.int16) + 12 + np.random.default_rng(0).integers(-6, 7, first.shape), 0, 255
    ).astype(np.uint8)
    samples.append(Sample(_save(tmp_path / "benign" / "b0_again.jpg", noisy), "benign"))
    # Two unrelated frames that are mostly black with a small bright detail each.
    for k, (y, x) in enumerate([(20, 20), (90, 120)]):
        dark = np.zeros((128, 160), np.uint8)
        dark[y : y + 15, x : x + 15] = 180
        samples.append(Sample(_save(tmp_path / "normal" / f"dark{k}.png", dark), "normal"))
    # Burned-in calipers on an otherwise clean frame: two crosses and a dotted measurement line.
    marked = make_ultrasound_phantom("malignant", phantom_rng(7, 0), 400, 500).image.copy()
    for y, x in [(120, 100), (120, 400)]:
        marked[y, x - 8 : x + 9], marked[y - 8 : y + 9, x] = 255, 255
    for x in range(110, 400, 10):
        marked[120:122, x : x + 2] = 255
    samples.append(Sample(_save(tmp_path / "malignant" / "calipers.png", marked), "malignant"))
    # Colour overlay and an unreadable file.
    colour = cv2.cvtColor(
        make_ultrasound_phantom("normal", phantom_rng(6, 0), 128, 160).image, cv2.COLOR_GRAY2BGR
    )
    colour[40:60, 40:80] = (0, 0, 255)
    samples.append(Sample(_save(tmp_path / "normal" / "doppler.png", colour), "normal"))
    broken = tmp_path / "normal" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    samples.append(Sample(broken, "normal"))
    return samples


def test_audit_finds_every_planted_defect(messy_dataset, tmp_path):
    result = audit_samples(messy_dataset, "messy")
    report = result.report
    names = lambda members: sorted(Path(m["path"]).name for m in members)
    assert [names(e["members"]) for e in report.exact_duplicates] == [["b0.png", "m_copy.png"]]
    assert [c["kind"] for c in report.label_conflicts] == ["exact"]
    assert names(report.label_conflicts[0]["members"]) == ["b0.png", "b0_again.jpg", "m_copy.png"]
    groups = [names(g["members"]) for g in report.near_duplicate_groups]
    assert groups == [["b0.png", "b0_again.jpg", "m_copy.png"]]  # the dark frames stayed apart
    assert [Path(u["path"]).name for u in report.unreadable] == ["broken.png"]
    assert [Path(c["path"]).name for c in report.colour_frames] == ["doppler.png"]
    kept = {s.path.name for s in result.cleaned}
    assert kept.isdisjoint({"b0.png", "b0_again.jpg", "m_copy.png", "broken.png"})
    assert len(kept) == len(messy_dataset) - 4
    paths = write_audit(result, tmp_path / "report")
    assert "label conflicts, same bytes | 1" in paths["markdown"].read_text()
    written = read_dataset(paths["manifest"])
    assert len(written) == len(kept)
    # The caliper frame's flag travels in the manifest, for evaluation's subgroup table.
    assert [Path(a["path"]).name for a in report.suspected_annotations] == ["calipers.png"]
    flags = {s.path.name: dict(s.extra)["annotations"] for s in written}
    assert flags["calipers.png"] == "yes" and set(flags.values()) == {"yes", "no"}
    assert sum(v == "yes" for v in flags.values()) == 1


def test_keep_conflicts_keeps_them_grouped(messy_dataset):
    cleaned = audit_samples(messy_dataset, conflicts="keep").cleaned
    group = {s.path.name: s.group for s in cleaned}
    assert group["b0.png"] == group["m_copy.png"] == group["b0_again.jpg"] is not None
    assert group["dark0.png"] is None and group["dark1.png"] is None


def _samples_with_groups(n: int = 300) -> list[Sample]:
    rng = np.random.default_rng(3)
    labels = rng.choice(["normal", "benign", "malignant"], n, p=[0.2, 0.55, 0.25])
    return [
        Sample(
            Path(f"/x/{i}.png"),
            str(labels[i]),
            patient_id=f"p{i // 3}" if i % 5 == 0 else None,
            group=f"g{i // 4}" if i % 7 < 3 else None,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_never_straddles_groups_or_patients_and_keeps_proportions(seed):
    samples = _samples_with_groups()
    result = assign_splits(samples, SplitPlan(val=0.15, test=0.15, seed=seed))
    for unit in split_units(samples):
        assert len({result[i].split for i in unit}) == 1
    by_side = defaultdict(Counter)
    for s in result:
        by_side[s.split][s.label] += 1
    totals = Counter(s.label for s in samples)
    for label, total in totals.items():
        assert abs(by_side["test"][label] / total - 0.15) < 0.06
        assert abs(by_side["train"][label] / total - 0.70) < 0.06


def test_split_is_deterministic_by_seed_and_folds_cover_everything():
    samples = _samples_with_groups()
    a = assign_splits(samples, SplitPlan(seed=4))
    assert a == assign_splits(samples, SplitPlan(seed=4))
    assert a != assign_splits(samples, SplitPlan(seed=5))
    folds = assign_splits(samples, SplitPlan(val=0.0, test=0.2, folds=5, seed=0))
    assert {s.fold for s in folds if s.split == "train"} == {0, 1, 2, 3, 4}
    assert all(s.fold is None for s in folds if s.split == "test")
    for unit in split_units(samples):
        assert len({(folds[i].split, folds[i].fold) for i in unit}) == 1
    with pytest.raises(ValueError, match="folds must be 0"):
        SplitPlan(folds=1)


@pytest.mark.data
def test_real_busi_audit_finds_the_cross_class_copies(data_dir):
    result = audit_samples(read_dataset(data_dir / "busi"), "busi")
    conflicts = [
        {Path(m["path"]).stem for m in c["members"]} for c in result.report.label_conflicts
    ]
    assert any({"benign (433)", "malignant (145)"} <= c for c in conflicts)
    assert any({"benign (42)", "malignant (51)"} <= c for c in conflicts)
    assert len(result.report.near_duplicate_groups) > 50
    split = assign_splits(result.cleaned, SplitPlan(seed=0))
    for unit in split_units(split):
        assert len({split[i].split for i in unit}) == 1
