"""The on-device path so far: backends, frame decisions and `edgebc classify` (the quality gate's
own tests are in test_quality_gate.py)."""

import json

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting the test model needs the [train] extra")
pytest.importorskip("onnx", reason="exporting the test model needs the [export] extra")

from edgebc.backends import open_backend
from edgebc.classifier import FrameClassifier
from edgebc.errors import EdgebcError
from edgebc.export.onnx_export import export_onnx
from edgebc.integrity import write_manifest
from edgebc.preprocess import preprocess
from edgebc.region import Region
from edgebc.synth import make_ultrasound_phantom, render_scanner_screen
from edgebc.synth.cine import write_video
from edgebc.synth.ultrasound import phantom_rng
from tests.helpers import make_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    path, _, _ = export_onnx(make_checkpoint(folder / "c.pt"), folder / "model.onnx")
    write_manifest(folder, [path])
    return path


def _phantom(k=0, size=96):
    return make_ultrasound_phantom(
        ("normal", "benign", "malignant")[k % 3], phantom_rng(21, k), size, size
    ).image


def test_backend_reads_the_card_and_matches_direct_inference(model):
    import onnxruntime

    backend = open_backend(model, threads=1)
    assert (
        backend.card.input_shape == (1, 48, 48)
        and backend.name == "onnxruntime:CPUExecutionProvider"
    )
    batch = np.concatenate([preprocess(_phantom(k), backend.card.preprocess) for k in range(3)])
    direct = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {"input": batch}
    )[0]
    np.testing.assert_allclose(backend.run(batch), direct, atol=1e-6)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (np.zeros((1, 3, 48, 48), np.float32), r"expected input of shape \(N, 1, 48, 48\)"),
        (np.zeros((1, 1, 48, 48), np.float64), "expected input as float32"),
        (np.full((1, 1, 48, 48), np.nan, np.float32), "NaN"),
        (np.zeros((65, 1, 48, 48), np.float32), "batch size must be 1..64"),
        ([[1.0]], "expected input as a numpy array"),
    ],
)
def test_backend_validates_input_before_inference(model, batch, message):
    with pytest.raises(ValueError, match=message):
        open_backend(model, warmup=0).run(batch)


def test_backend_refuses_missing_providers_tampered_and_unknown_files(model, tmp_path):
    with pytest.raises(EdgebcError, match=r"no CUDAExecutionProvider.*onnxruntime-gpu"):
        open_backend(model, providers=["CUDAExecutionProvider"])
    copy = tmp_path / "model.onnx"
    copy.write_bytes(model.read_bytes())
    write_manifest(tmp_path, [copy])
    data = bytearray(copy.read_bytes())
    data[-20] ^= 0x55
    copy.write_bytes(bytes(data))
    with pytest.raises(EdgebcError, match="does not match MANIFEST"):
        open_backend(copy)
    with pytest.raises(EdgebcError, match=r"expected an exported \.onnx model"):
        open_backend(tmp_path / "model.pt")


def test_torch_backend_matches_the_export_for_any_batch_size_and_checks_inputs(model):
    """The training side's backend (the benchmark's torch rows, evaluation of checkpoints): the
    card the export wrote, the exported model's logits, in chunks past max_batch."""
    from edgebc.integrity import sha256_file
    from edgebc.train.torch_backend import TorchBackend

    checkpoint = model.parent / "c.pt"
    backend, exported = TorchBackend(checkpoint), open_backend(model, warmup=0)
    assert backend.name == "torch:cpu" and backend.model_sha256 == sha256_file(checkpoint)
    for fact in ("class_names", "positive_class", "preprocess", "temperature", "threshold",
                 "weights_sha256", "input_name", "output_name", "max_batch"):  # fmt: skip
        assert getattr(backend.card, fact) == getattr(exported.card, fact), fact
    batch = np.concatenate([preprocess(_phantom(k), backend.card.preprocess) for k in range(70)])
    logits = backend.run(batch)  # 70 frames: chunks of 64 and 6
    reference = np.concatenate([exported.run(batch[:64]), exported.run(batch[64:])])
    assert logits.shape == (70, 3) and np.abs(reference).max() > 1e-3
    np.testing.assert_allclose(logits, reference, atol=1e-4)
    with pytest.raises(ValueError, match="expected input as float32"):
        backend.run(batch.astype(np.float64))
    with pytest.raises(ValueError, match=r"batch size must be 1\.\.64, got 0"):
        backend.run(batch[:0])
    assert isinstance(backend.module, torch.nn.Module) and not backend.module.training
    backend.close()
    with pytest.raises(EdgebcError, match="closed"):
        backend.run(batch[:1])


def test_decisions_use_temperature_and_the_operating_threshold(model):
    classifier = FrameClassifier(open_backend(model))
    blank = np.zeros((96, 96), np.uint8)
    decisions = classifier.classify_batch([_phantom(0), blank, _phantom(1)])
    refused = decisions[1]
    assert refused.label is None and refused.probabilities is None and not refused.quality.ok
    for decision in (decisions[0], decisions[2]):
        assert abs(sum(decision.probabilities.values()) - 1) < 1e-5
        expected = (
            "malignant"
            if decision.positive_probability >= 0.3
            else max(("normal", "benign"), key=decision.probabilities.get)
        )
        assert decision.label == expected
        assert set(decision.timings_ms) == {
            "crop",
            "quality",
            "preprocess",
            "inference",
            "postprocess",
        }
        assert decision.model_sha256 == classifier.backend.model_sha256
    # The card's temperature (1.5 in the test checkpoint) softens the raw softmax.
    raw = classifier.backend.run(preprocess(_phantom(0), classifier.card.preprocess))[0]
    calibrated = np.exp(raw / 1.5) / np.exp(raw / 1.5).sum()
    np.testing.assert_allclose(list(decisions[0].probabilities.values()), calibrated, atol=1e-5)


def test_a_colour_frame_reaches_the_model_as_preprocess_makes_it(model):
    """The classifier converts a BGR crop to grey once for the gate and the model; the tensor
    must be the one preprocess() makes from the colour crop itself."""
    classifier = FrameClassifier(open_backend(model))
    screen = cv2.cvtColor(_phantom(2, 160), cv2.COLOR_GRAY2BGR)
    screen[:, :, 0] = cv2.add(screen[:, :, 0], 3)  # not exactly grey: the conversion matters
    region = Region(10, 20, 120, 130)
    decision = FrameClassifier(classifier.backend, region).classify(screen)
    raw = classifier.backend.run(preprocess(screen, classifier.card.preprocess, region))[0]
    expected = np.exp(raw / 1.5) / np.exp(raw / 1.5).sum()
    np.testing.assert_allclose(list(decision.probabilities.values()), expected, atol=1e-6)


def test_classify_command_covers_images_videos_dicom_and_bad_files(model, tmp_path, capsys):
    from edgebc.cli import main

    (tmp_path / "imgs").mkdir()
    for k in range(3):
        cv2.imwrite(str(tmp_path / "imgs" / f"f{k}.png"), _phantom(k))
    write_video([_phantom(k) for k in range(4)], tmp_path / "clip.avi")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "results.jsonl"
    code = main(
        [
            "classify",
            str(model),
            str(tmp_path / "imgs"),
            str(tmp_path / "clip.avi"),
            str(tmp_path / "broken.png"),
            "--out",
            str(out),
            "--stride",
            "2",
        ]
    )
    assert code == 1  # one unreadable input, the rest classified
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(1 for r in rows if r["error"]) == 1 and "broken.png" in capsys.readouterr().err
    video_rows = [r for r in rows if r["source"].endswith("clip.avi")]
    assert [r["frame"] for r in video_rows] == [0, 2]
    assert all(
        r["decision"] in ("normal", "benign", "malignant") and r["model_sha256"]
        for r in rows
        if not r["error"]
    )


def test_classify_crops_the_region_of_scanner_screens(model, tmp_path):
    from edgebc.cli import main

    screen, truth = render_scanner_screen(_phantom(2, 200), phantom_rng(3, 3), 480, 640)
    cv2.imwrite(str(tmp_path / "screen.png"), screen)
    out = tmp_path / "r.csv"
    assert (
        main(
            [
                "classify",
                str(model),
                str(tmp_path / "screen.png"),
                "--out",
                str(out),
                "--auto-region",
            ]
        )
        == 0
    )
    backend = open_backend(model)
    fixed = FrameClassifier(backend, Region(truth.x, truth.y, truth.w, truth.h)).classify(screen)
    row = out.read_text().splitlines()[1].split(",")
    assert (
        abs(float(row[6]) - fixed.probabilities["malignant"]) < 0.05
    )  # auto region ~ the true region
