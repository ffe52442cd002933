"""The localiser's training side (torch): augmentation moves boxes with the pixels, the network
learns phantom lesions' boxes, and the export answers as PyTorch does with a localiser's card."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgebc.localiser import box_to_input, iou, mask_box, open_localiser
from edgebc.model_card import ModelCard, ModelOutput, OperatingPoint, single_input
from edgebc.preprocess import PreprocessCard, preprocess_chw
from edgebc.synth.ultrasound import make_ultrasound_phantom, phantom_rng
from edgebc.train.localiser import (
    LOCALISER_ARCH,
    LOCALISER_TASK,
    LocaliserNet,
    augment,
    localiser_loss,
    predict,
)

SIZE = 64
PREP = PreprocessCard(input_height=SIZE, input_width=SIZE)


def phantoms(n: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n ultrasound phantoms (benign and malignant, a normal every fourth) as model inputs, with
    their lesion boxes from the phantoms' masks and whether there is a lesion."""
    images, boxes, present = [], [], []
    for k in range(n):
        label = "normal" if k % 4 == 3 else ("benign", "malignant")[k % 2]
        phantom = make_ultrasound_phantom(label, phantom_rng(seed, k), 96, 128)
        box = mask_box(phantom.mask)
        images.append(torch.from_numpy(preprocess_chw(phantom.image, PREP)))
        boxes.append(np.zeros(4, np.float32) if box is None else box_to_input(box, (96, 128), PREP))
        present.append(box is not None)
    return torch.stack(images), torch.from_numpy(np.stack(boxes)), torch.tensor(present)


def test_augmentation_moves_each_box_with_its_pixels():
    torch.manual_seed(0)
    images = torch.full((8, 1, SIZE, SIZE), -1.0)
    images[:, :, 20:36, 10:30] = 2.0  # a bright block at x 10..30, y 20..36
    boxes = torch.tensor([[10 / SIZE, 20 / SIZE, 30 / SIZE, 36 / SIZE]]).repeat(8, 1)
    moved, moved_boxes = augment(images, boxes, PREP, torch.Generator().manual_seed(3))
    for image, box in zip(moved, moved_boxes, strict=True):
        # the block is the brightest part of the frame whatever the gain and offset drew
        bright = (image[0] > image[0].amin() + 0.6 * (image[0].amax() - image[0].amin())).numpy()
        x, y, w, h = mask_box(bright)
        seen = np.array([x, y, x + w, y + h]) / SIZE
        assert iou(seen, box.numpy())[0] > 0.8


def test_the_localiser_learns_where_phantom_lesions_are():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    images, boxes, present = phantoms(12)
    model = LocaliserNet("mobilenet_v3_small", 1, hidden=32)
    model.set_bn_momentum(0.3)  # eval-mode statistics that follow a 60-step run
    before = iou(predict(model, images)[1][present.numpy()], boxes[present].numpy()).mean()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(70):
        model.train()
        loss = localiser_loss(*model.raw(images), boxes, present)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    scores, found = predict(model, images)
    after = iou(found[present.numpy()], boxes[present].numpy()).mean()
    assert after > 0.5 and after > before + 0.2
    assert scores[present.numpy()].min() > scores[~present.numpy()].max()


def test_the_export_answers_as_pytorch_and_carries_a_localisers_card(tmp_path):
    from edgebc.export.localiser_export import export_localiser
    from edgebc.train.checkpoint import Checkpoint, save_checkpoint

    torch.manual_seed(1)
    model = LocaliserNet("mobilenet_v3_small", 1, hidden=16).eval()
    card = ModelCard(
        name="loc", arch=LOCALISER_ARCH, task=LOCALISER_TASK, inputs=single_input(PREP),
        outputs=(ModelOutput("logits", "logits", 2), ModelOutput("box", "box", 4)),
        arch_options={"backbone": "mobilenet_v3_small", "hidden": 16},
        operating_point=OperatingPoint(0.4),
    )  # fmt: skip
    checkpoint = save_checkpoint(tmp_path / "best.pt", Checkpoint(card, model.state_dict()))
    path, _exported, parity, box_diff = export_localiser(checkpoint, tmp_path / "loc.onnx")
    assert parity.ok and box_diff <= 1e-3 and parity.decision_agreement == 1.0
    localiser = open_localiser(path)
    assert localiser.card.is_localiser and localiser.threshold == 0.4
    frame = make_ultrasound_phantom("benign", phantom_rng(7, 0), 96, 128).image
    [where] = localiser.locate([frame])
    with torch.inference_mode():
        logits, _box = model(torch.from_numpy(preprocess_chw(frame, PREP))[None])
    assert where.box.score == pytest.approx(float(torch.softmax(logits, 1)[0, 1]), abs=1e-4)
    assert where.box.x1 <= 128 and where.box.y1 <= 96  # mapped back onto the 128 x 96 frame
