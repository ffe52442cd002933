"""The lesion localiser's runtime (torch-free): box geometry, detection metrics, its card, and
localise -> crop -> classify on hand-built ONNX graphs whose outputs are known."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edgebc.classifier import FrameClassifier
from edgebc.errors import EdgebcError
from edgebc.integrity import sha256_file
from edgebc.localiser import (
    CROP_TRAINED,
    Box,
    average_precision,
    box_to_frame,
    box_to_input,
    crop_box,
    detection_metrics,
    iou,
    mask_box,
    open_localiser,
    threshold_for_recall,
)
from edgebc.model_card import (
    CARD_KEY,
    LocaliserLink,
    ModelCard,
    ModelOutput,
    OperatingPoint,
    single_input,
)
from edgebc.preprocess import PreprocessCard
from edgebc.quality import QualityGate
from edgebc.task import Task

SIZE = 32
LOCALISER_TASK = Task("lesion_localiser", ("no_lesion", "lesion"), "lesion")


def localiser_card(threshold: float = 0.5) -> ModelCard:
    return ModelCard(
        name="loc", arch="lesion_localiser", task=LOCALISER_TASK,
        inputs=single_input(PreprocessCard(input_height=SIZE, input_width=SIZE)),
        outputs=(ModelOutput("logits", "logits", 2), ModelOutput("box", "box", 4)),
        operating_point=OperatingPoint(threshold),
    )  # fmt: skip


def classifier_card(link: LocaliserLink | None = None, crops: bool = True) -> ModelCard:
    """A classifier's card; `crops`: its lineage says it was trained on localiser crops."""
    return ModelCard(
        name="cls", arch="hand_built", task=Task("benign_vs_malignant", ("benign", "malignant"), "malignant"),
        inputs=single_input(PreprocessCard(input_height=SIZE, input_width=SIZE)),
        outputs=(ModelOutput("logits", "logits", 2),), operating_point=OperatingPoint(0.5), localiser=link,
        lineage={"input_crop": CROP_TRAINED} if crops else {},
    )  # fmt: skip


def write_graph(path, card: ModelCard, box: list[float] | None, gain: float, bias: float):
    """An ONNX model: z = gain * mean(input) + bias; logits = (0, z); a localiser's box output is
    the constant `box` for every frame. The card rides in the metadata as the exporter puts it."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "one"], ["mean1"]),
        helper.make_node("Mul", ["mean1", "gain"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["z"]),
        helper.make_node("Mul", ["mean1", "zero"], ["nought"]),
        helper.make_node("Concat", ["nought", "z"], ["logits"], axis=1),
    ]
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [gain]),
        helper.make_tensor("bias", TensorProto.FLOAT, [], [bias]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])]
    if box is not None:
        nodes.append(helper.make_node("Add", ["nought", "box_value"], ["box"]))
        inits.append(helper.make_tensor("box_value", TensorProto.FLOAT, [1, 4], box))
        outputs.append(helper.make_tensor_value_info("box", TensorProto.FLOAT, ["n", 4]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, SIZE, SIZE])],
        outputs, inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    entry = model.metadata_props.add()
    entry.key, entry.value = CARD_KEY, card.to_json()
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def lesion_frame(bright: bool = True) -> np.ndarray:
    """A 200 x 300 speckled frame; a bright square lesion at x 150..210, y 60..120 when `bright`."""
    rng = np.random.default_rng(0)
    frame = rng.integers(40, 80, (200, 300), dtype=np.uint8)
    if bright:
        frame[60:120, 150:210] = 250
    return frame


# --- geometry and metrics -----------------------------------------------------------------------


def test_a_box_goes_through_the_letterbox_and_back_unchanged():
    prep = PreprocessCard(input_height=224, input_width=224)
    on_input = box_to_input((150, 60, 60, 60), (200, 300), prep)
    # 300 wide scales by 224/300; 200 high becomes 149 px with 37 px bars above
    assert on_input[0] == pytest.approx(150 / 300, abs=1e-6)
    assert on_input[1] == pytest.approx((60 * 149 / 200 + 37) / 224, abs=1e-6)
    back = box_to_frame(on_input, (200, 300), prep)
    assert (back.x0, back.y0, back.x1, back.y1) == pytest.approx((150, 60, 210, 120), abs=1e-3)


def test_a_mask_gives_the_union_box_of_its_lesions():
    mask = np.zeros((50, 80), np.uint8)
    mask[5:10, 3:8] = 1
    mask[30:40, 60:70] = 1  # a second lesion: one box covers both
    assert mask_box(mask) == (3, 5, 67, 35)
    assert mask_box(np.zeros((5, 5), np.uint8)) is None


def test_the_crop_widens_the_box_by_the_margin_inside_the_frame():
    assert crop_box(Box(100, 50, 140, 90), (200, 300), 0.25) == (90, 40, 150, 100)
    assert crop_box(Box(0, 0, 40, 40), (200, 300), 0.5) == (0, 0, 60, 60)  # clipped at the edge
    assert crop_box(Box(10, 10, 12, 12), (200, 300), 0.0) == (3, 3, 19, 19)  # at least 16 px


def test_iou_and_ap50_on_known_detections():
    truth = np.array([[0, 0, 0.5, 0.5]] * 3 + [[0, 0, 0, 0]])
    boxes = np.array([[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.25], [0.5, 0.5, 1, 1], [0, 0, 1, 1]])
    assert iou(boxes, truth)[:3] == pytest.approx([1.0, 0.5, 0.0])
    present = np.array([True, True, True, False])
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # ranked: normal frame (FP), hit, hit, miss: precision 1/2 then 2/3 over recall 2/3
    assert average_precision(scores, (iou(boxes, truth) >= 0.5) & present, 3) == pytest.approx(
        (2 / 3) * (2 / 3)
    )
    metrics = detection_metrics(scores, boxes, truth, present, threshold=0.75)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["recall_iou50"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == 0.0
    assert metrics["mean_iou"] == pytest.approx(0.5)
    assert threshold_for_recall(scores, present, 2 / 3) == pytest.approx(0.8)


# --- the card -----------------------------------------------------------------------------------


def test_a_localiser_card_round_trips_and_says_what_it_is():
    card = localiser_card(0.3)
    again = ModelCard.from_json(card.to_json())
    assert again == card and again.is_localiser and again.box_output == "box"
    assert not classifier_card().is_localiser


def test_cards_without_a_localiser_are_written_as_before():
    data = classifier_card().to_dict()
    assert "localiser" not in data
    linked = ModelCard.from_json(classifier_card(LocaliserLink("loc.onnx", 0.2)).to_json())
    assert linked.localiser == LocaliserLink("loc.onnx", 0.2)


def test_a_box_output_on_a_three_class_card_is_refused():
    with pytest.raises(ValueError, match="lesion localiser"):
        dataclasses.replace(
            localiser_card(),
            task=Task("three_class", ("normal", "benign", "malignant"), "malignant"),
            outputs=(ModelOutput("logits", "logits", 3), ModelOutput("box", "box", 4)),
        )


# --- localise -> crop -> classify ---------------------------------------------------------------


@pytest.fixture
def models(tmp_path):
    from edgebc.backends import open_backend

    # the box sits on the bright square of lesion_frame (x 150..210, y 60..120 of 300 x 200)
    prep = localiser_card().preprocess
    box = box_to_input((150, 60, 60, 60), (200, 300), prep).tolist()
    # lesion score from the input mean: -1.27 on the bright frame, -1.39 on the plain one
    loc_path = write_graph(tmp_path / "loc.onnx", localiser_card(0.5), box, gain=50.0, bias=66.4)
    # malignant when the input is bright on average: the crop (all lesion) is, the frame is not
    cls_path = write_graph(tmp_path / "cls.onnx", classifier_card(), None, gain=4.0, bias=0.0)
    # the same graph under a whole-frame card: what the crop-trained model is compared with
    write_graph(tmp_path / "whole.onnx", classifier_card(crops=False), None, gain=4.0, bias=0.0)
    return open_localiser(loc_path), open_backend(cls_path, threads=1)


def test_the_classifier_sees_the_lesions_crop_and_the_decision_carries_the_box(models, tmp_path):
    from edgebc.backends import open_backend

    localiser, backend = models
    whole_frames = open_backend(tmp_path / "whole.onnx", threads=1)
    whole = FrameClassifier(whole_frames, gate=QualityGate()).classify(lesion_frame())
    assert whole.label == "benign"  # the whole frame is mostly dark speckle
    with pytest.raises(EdgebcError, match="trained on lesion-localiser crops"):
        FrameClassifier(backend, gate=QualityGate())  # a crop-trained model never sees whole frames
    cropped = FrameClassifier(backend, gate=QualityGate(), localiser=localiser,
                              margin=0.0).classify(lesion_frame())  # fmt: skip
    assert cropped.label == "malignant"  # the crop is the bright lesion
    assert cropped.box is not None
    assert (cropped.box.x0, cropped.box.y0, cropped.box.x1, cropped.box.y1) == pytest.approx(
        (150, 60, 210, 120), abs=1.0
    )
    answer = json.loads(json.dumps(cropped.to_json()))
    assert answer["box"]["w"] == pytest.approx(60, abs=1.0)
    assert "localise" in answer["timings_ms"]


def test_no_lesion_found_is_a_reported_state_without_a_class(models):
    localiser, backend = models
    classifier = FrameClassifier(backend, gate=QualityGate(), localiser=localiser)
    decision = classifier.classify(lesion_frame(bright=False))
    assert decision.label is None and decision.probabilities is None
    assert decision.quality.check == "no_lesion"
    answer = decision.to_json()
    assert answer["quality"] == "no decision"
    assert answer["reason"].startswith("no lesion found")
    assert answer["box"] is not None  # where it looked best, shown for what it is


def test_a_localiser_is_refused_as_the_classifier(models):
    localiser, _ = models
    with pytest.raises(EdgebcError, match="lesion localiser, not a classifier"):
        FrameClassifier(localiser.backend)


def test_a_classifier_is_refused_as_the_localiser(tmp_path):
    path = write_graph(tmp_path / "cls.onnx", classifier_card(), None, 1.0, 0.0)
    with pytest.raises(EdgebcError, match="not a lesion localiser"):
        open_localiser(path)


def test_the_pipeline_comparison_counts_localiser_misses_against_sensitivity(models, tmp_path):
    """Two malignant frames (one whose lesion the localiser misses), two benign plain frames:
    the whole frame calls every one benign; the crop finds and calls the visible lesion, and the
    missed one counts against the end-to-end sensitivity, not as a guess."""
    import cv2

    from edgebc.data.records import Sample
    from edgebc.train.localiser_eval import compare

    samples = []
    for k, (label, bright) in enumerate(
        [("malignant", True), ("malignant", False), ("benign", False), ("benign", False)]
    ):
        path = tmp_path / f"f{k}.png"
        cv2.imwrite(str(path), np.roll(lesion_frame(bright), k, axis=0))
        samples.append(Sample(path, label, patient_id=f"p{k}", source="site"))
    report = compare(tmp_path / "whole.onnx", tmp_path / "loc.onnx", samples, margin=0.0, n_boot=50,
                     crop_classifier_path=tmp_path / "cls.onnx")  # fmt: skip
    whole, crop = report["whole_frame"]["all"], report["crop"]["all"]
    assert whole["decided"] == 4 and whole["sensitivity_end_to_end"] == 0.0
    assert crop["sensitivity_end_to_end"] == 0.5 and crop["positives_without_decision"] == 1
    assert crop["no_decision"] == {"no_lesion": 3}
    assert crop["specificity_end_to_end"] == 1.0
    assert report["crop"]["site"]["frames"] == 4
    # paired, on the same frames: the crop found one more malignant frame of the two
    paired = report["whole_minus_crop"]["all"]
    assert paired["sensitivity_end_to_end"]["difference"] == -0.5
    assert paired["sensitivity_end_to_end"]["malignant_frames"] == 2
    assert paired["auc_both_decided"] == {"frames": 1, "difference": None, "p": None}
    assert paired["auc_end_to_end"]["frames"] == 4
    # a classifier trained on the crops runs the crop pipeline when named
    other = write_graph(tmp_path / "crops.onnx", classifier_card(), None, gain=-4.0, bias=0.0)
    flipped = compare(tmp_path / "whole.onnx", tmp_path / "loc.onnx", samples, margin=0.0, n_boot=50,
                      crop_classifier_path=other)  # fmt: skip
    assert flipped["crop_classifier"] == str(other)
    assert (
        flipped["crop"]["all"]["sensitivity_end_to_end"] == 0.0
    )  # it calls the bright crop benign


def test_the_local_display_outlines_a_found_lesion_and_not_a_box_below_threshold():
    from edgebc.serve.display import LESION, fit, render_screen, screen_layout

    size = (960, 540)
    image = np.full((200, 300), 128, np.uint8)
    box = {"x": 150.0, "y": 60.0, "w": 60.0, "h": 60.0, "score": 0.9}
    view = {
        "banners": ["Research use only"], "region": None, "fps": 30.0,
        "display": {"label": "benign", "probabilities": {"benign": 0.7, "malignant": 0.3}, "reason": None},
        "per_frame": {"quality": "ok", "box": box},
        "latency_ms": {}, "feed": {"source": "x", "status": "ok"}, "audit": {"healthy": True, "problem": None},
        "model": {"name": "m", "sha256": "ab" * 32, "positive_class": "malignant", "threshold": 0.3},
    }  # fmt: skip
    frame = screen_layout(size, 1, 2).frame
    x, y, scale = fit(image.shape, frame)
    left, middle_y = x + round(150 * scale), y + round(90 * scale)
    assert (render_screen(view, image, size)[middle_y, left] == LESION).all()
    view["per_frame"] = {"quality": "no decision", "box": box}
    view["display"] = {
        "label": None,
        "probabilities": None,
        "reason": "no decision: no lesion found",
    }
    assert not (render_screen(view, image, size)[middle_y, left] == LESION).all()


def test_a_classifier_whose_card_links_a_localiser_crops_wherever_it_is_opened(models, tmp_path):
    from edgebc.classifier_settings import ClassifierSettings, build_classifier
    from edgebc.export.localiser_export import link_classifier

    linked = tmp_path / "shipped" / "cls.onnx"
    linked.parent.mkdir()
    card = link_classifier(tmp_path / "cls.onnx", tmp_path / "loc.onnx", linked, margin=0.0)
    assert card.localiser == LocaliserLink("../loc.onnx", 0.0, sha256_file(tmp_path / "loc.onnx"))
    classifier = build_classifier(ClassifierSettings(model=str(linked), threads=1))
    assert classifier.localiser is not None and classifier.margin == 0.0
    # tools that open the file themselves (edgebc bench) find the same localiser behind it
    from edgebc.localiser import localiser_behind
    from edgebc.model_card import read_card

    behind = localiser_behind(read_card(linked), linked)
    assert behind is not None and behind.model_sha256 == sha256_file(tmp_path / "loc.onnx")
    assert localiser_behind(read_card(tmp_path / "whole.onnx"), tmp_path / "whole.onnx") is None
    assert classifier.classify(lesion_frame()).label == "malignant"  # the crop, as above
    with pytest.raises(EdgebcError, match="trained on lesion-localiser crops"):
        build_classifier(ClassifierSettings(model=str(tmp_path / "cls.onnx"), threads=1))
    plain = build_classifier(ClassifierSettings(model=str(tmp_path / "whole.onnx"), threads=1))
    assert plain.localiser is None and plain.classify(lesion_frame()).label == "benign"
    named = build_classifier(
        ClassifierSettings(model=str(tmp_path / "cls.onnx"), threads=1,
                           localiser=str(tmp_path / "loc.onnx"), localiser_margin=0.0)
    )  # fmt: skip
    assert named.classify(lesion_frame()).label == "malignant"  # the serve config names it
    with pytest.raises(EdgebcError, match="not a lesion localiser"):
        link_classifier(tmp_path / "cls.onnx", tmp_path / "cls.onnx", tmp_path / "x.onnx")
    # another file under the linked name (a swapped or damaged localiser) is refused
    write_graph(tmp_path / "loc.onnx", localiser_card(0.9), [0.0, 0.0, 1.0, 1.0], 1.0, 0.0)
    with pytest.raises(EdgebcError, match="not the localiser model cls was linked with"):
        build_classifier(ClassifierSettings(model=str(linked), threads=1))


def test_a_box_in_the_letterbox_bars_is_no_lesion_not_a_strip_of_the_frame_edge(tmp_path):
    from edgebc.backends import open_backend

    # a confident box entirely in the bottom bar of a wide frame's letterbox (the frame fills
    # the input's middle third): clipped to the frame it has no height
    loc = write_graph(tmp_path / "loc.onnx", localiser_card(0.5), [0.4, 0.9, 0.6, 0.98],
                      gain=0.0, bias=9.0)  # fmt: skip
    cls = write_graph(tmp_path / "cls.onnx", classifier_card(), None, gain=4.0, bias=0.0)
    wide = np.random.default_rng(1).integers(40, 200, (100, 300), dtype=np.uint8)
    classifier = FrameClassifier(open_backend(cls, threads=1), gate=QualityGate(),
                                 localiser=open_localiser(loc))  # fmt: skip
    decision = classifier.classify(wide)
    assert decision.label is None and decision.quality.check == "no_lesion"
    assert "letterbox bars" in decision.quality.reason


def test_an_upload_to_serve_is_localised_as_the_live_frames_are(models, tmp_path):
    from edgebc.serve.runtime import build_runtime
    from tests.test_serve import png_bytes, settings_for

    runtime = build_runtime(settings_for(tmp_path, model=str(tmp_path / "cls.onnx"),
                                         localiser=str(tmp_path / "loc.onnx"),
                                         localiser_margin=0.0))  # fmt: skip
    answer = runtime.classify_upload(png_bytes(lesion_frame()), None)  # not started: no live loop
    assert answer["label"] == "malignant" and answer["box"] is not None  # the crop, as live


def test_a_classifier_trained_on_whole_frames_is_never_put_behind_the_localiser(models, tmp_path):
    from edgebc.classifier_settings import ClassifierSettings, build_classifier
    from edgebc.export.localiser_export import link_classifier

    whole = write_graph(tmp_path / "whole.onnx", classifier_card(crops=False), None, 4.0, 0.0)
    settings = ClassifierSettings(model=str(whole), threads=1, localiser=str(tmp_path / "loc.onnx"))
    with pytest.raises(EdgebcError, match="trained on whole frames"):
        build_classifier(settings)
    with pytest.raises(EdgebcError, match="trained on whole frames"):
        link_classifier(whole, tmp_path / "loc.onnx", tmp_path / "linked.onnx")
    assert not (tmp_path / "linked.onnx").exists()
    assert build_classifier(ClassifierSettings(model=str(whole), threads=1)).localiser is None
