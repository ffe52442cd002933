"""Architectures: torchvision-identical keys, helpful registry errors, heads and pretrained loading."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

from edgebc.errors import ConfigError, EdgebcError
from edgebc.train.models import create_model, list_models, model_spec
from edgebc.train.models.heads import ArcFaceHead
from edgebc.train.models.pretrained import load_torchvision_weights
from edgebc.train.models.registry import ModelSpec, register_model

TORCHVISION = json.loads((Path(__file__).parent / "data" / "torchvision_keys.json").read_text())


@pytest.mark.parametrize("name", sorted(TORCHVISION["models"]))
def test_state_dict_keys_and_shapes_match_torchvision(name):
    model = create_model(name, num_classes=1000, in_channels=3)
    ours = [[key, list(value.shape)] for key, value in model.state_dict().items()]
    assert ours == TORCHVISION["models"][name]


def test_every_edge_and_baseline_architecture_is_registered():
    ours_only = {"simple_cnn", "cnn17", "mobilenet_v3_small_minimal"}  # no torchvision twin
    assert set(TORCHVISION["models"]) | ours_only == set(list_models())
    assert set(list_models("edge")) == {
        n for n in TORCHVISION["models"] if n.startswith(("mobilenet", "shufflenet"))
    } | {"mobilenet_v3_small_minimal"}


def test_minimalistic_mobilenet_v3_small_drops_se_hard_swish_and_5x5_kernels():
    """The paper's minimalistic Small: Small's keys without squeeze-excite (each block's
    projection moves up one index where it drops it), no hard-swish anywhere, 3x3 depthwise."""
    minimal = create_model("mobilenet_v3_small_minimal", num_classes=1000, in_channels=3)
    modules = list(minimal.modules())
    assert not any(isinstance(m, torch.nn.Hardswish | torch.nn.Hardsigmoid) for m in modules)
    depthwise = [m for m in modules if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 11 and {m.kernel_size for m in depthwise} == {(3, 3)}
    small = dict(TORCHVISION["models"]["mobilenet_v3_small"])
    ours = {k: list(v.shape) for k, v in minimal.state_dict().items()}
    assert not any(".fc1." in k or ".fc2." in k for k in ours)
    # the same widths, layer for layer: Small's tensors without squeeze-excite's, in order, have
    # our shapes (depthwise kernels 3x3 where Small's later blocks have 5x5)
    small_layers = [
        shape for key, shape in small.items() if ".fc1." not in key and ".fc2." not in key
    ]
    assert len(small_layers) == len(ours)
    for (key, shape), theirs in zip(ours.items(), small_layers, strict=True):
        if len(shape) == 4 and shape[1] == 1 and shape[2:] == [3, 3]:  # a depthwise kernel
            assert theirs[:2] == shape[:2] and theirs[2:] in ([3, 3], [5, 5]), key
        else:
            assert theirs == shape, key
    minimal.train()(
        torch.randn(2, 3, 64, 64)
    ).sum().backward()  # trains (nothing in place breaks it)
    assert sum(v.numel() for v in minimal.parameters()) < sum(
        v.numel() for v in create_model("mobilenet_v3_small", 1000, 3).parameters()
    )


@pytest.mark.parametrize(
    "name",
    [
        "mobilenet_v3_small",
        "mobilenet_v3_small_minimal",
        "shufflenet_v2_x0_5",
        "simple_cnn",
        "resnet18",
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_gives_one_logit_per_class(name, channels):
    model = create_model(name, num_classes=3, in_channels=channels).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, channels, 64, 64)).shape == (2, 3)


# The architectures the paper comparisons add; narrow (width 0.25) and at 32 pixels, the smallest
# input their five (cnn17: three) halvings leave a grid for, so the heavy ones stay quick. Their
# ONNX export and its parity with torch are proven at full width by the slow
# test_export.py::test_every_architecture_exports_with_parity, which takes every registered name.
COMPARISON = ["resnext50_32x4d", "vgg16", "vgg16_bn", "googlenet", "inception_v3", "cnn17"]
# (smallest input, Grad-CAM input) where 32 and 96 px are too small: Inception-v3's stem and two
# unpadded grid reductions need 75 px, and 160 px to leave a 3x3 grid at its CAM layer
SIZES = {"inception_v3": (75, 160)}


@pytest.mark.parametrize("name", COMPARISON)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("classes", [2, 3])
def test_comparison_architectures_classify_and_show_grad_cam(name, channels, classes):
    from edgebc.train.gradcam import grad_cam

    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, in_channels=channels, width_mult=0.25).eval()
    spec = model_spec(name)
    assert spec.family == "baseline"
    assert model.get_submodule(spec.first_conv).in_channels == channels
    assert model.get_submodule(spec.classifier).out_features == classes
    smallest, seen = SIZES.get(name, (32, 96))
    with torch.no_grad():
        assert model(torch.rand(2, channels, smallest, smallest)).shape == (2, classes)
    image = torch.rand(channels, seen, seen)  # a grid of 3x3 or more at the CAM layer
    # BatchNorm's statistics from one batch (momentum None: their plain average), so an untrained
    # net's activations do not vanish in eval mode (GoogLeNet's 0.01-std init leaves ~1e-15)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(8, channels, seen, seen))
    model.eval()
    layer = model.get_submodule(spec.cam_layer)
    heats = np.stack([grad_cam(model, layer, image, target) for target in range(classes)])
    assert heats.shape == (classes, seen, seen) and heats.min() >= 0 and heats.max() <= 1
    # an untrained net's evidence for one class may be nowhere positive, not for every class
    assert max(heat.max() for heat in heats) == pytest.approx(1.0)


def test_resnext_splits_its_three_by_three_into_32_paths():
    block = create_model("resnext50_32x4d").layer1[0]
    assert block.conv2.groups == 32 and tuple(block.conv2.weight.shape) == (128, 4, 3, 3)
    assert create_model("resnet50").layer1[0].conv2.groups == 1  # plain ResNet unchanged


def test_googlenet_has_no_auxiliary_classifiers_and_runs_its_stages_in_order():
    model = create_model("googlenet", num_classes=2, width_mult=0.25)
    assert not any(key.startswith(("aux1.", "aux2.")) for key in model.state_dict())
    assert model.stages == ["inception3a", "inception3b", "maxpool3", "inception4a",
                            "inception4b", "inception4c", "inception4d", "inception4e",
                            "maxpool4", "inception5a", "inception5b"]  # fmt: skip
    assert model.fc.in_features == 1024 // 4


def test_cnn17_has_the_seventeen_layers_its_docstring_tables():
    model = create_model("cnn17", num_classes=2)
    layers = [*model.features, model.classifier]
    kinds = [type(layer).__name__ for layer in layers]
    assert len(layers) == 17
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 3 + [
        "Conv2d", "BatchNorm2d", "ReLU", "AdaptiveAvgPool2d", "Linear"
    ]  # fmt: skip
    assert [layer.out_channels for layer in layers if isinstance(layer, torch.nn.Conv2d)] == [
        32, 64, 128, 256
    ]  # fmt: skip
    with torch.no_grad():  # any input size: the last pooling is global
        assert model(torch.rand(1, 1, 512, 320)).shape == (1, 2)


def test_width_multiplier_changes_mobilenet_width():
    narrow = create_model("mobilenet_v3_small", width_mult=0.5)
    assert narrow.features[0][0].out_channels == 8
    with pytest.raises(ValueError, match="widths are chosen by name"):
        create_model("shufflenet_v2_x1_0", width_mult=0.5)


def test_unknown_and_duplicate_names_are_errors():
    with pytest.raises(
        ConfigError, match=r"Unknown architecture 'mobilenet_v3'\. Did you mean 'mobilenet_v3_"
    ):
        create_model("mobilenet_v3")
    with pytest.raises(ValueError, match="registered twice"):
        register_model(ModelSpec("resnet18", lambda **_: None, "fc", "conv1", "layer4", "baseline"))


def test_arcface_head_keeps_the_weight_key_and_adds_margin_only_in_training():
    model = create_model("mobilenet_v3_small", head="arcface")
    assert isinstance(model.classifier[3], ArcFaceHead)
    assert (
        "classifier.3.weight" in model.state_dict()
        and "classifier.3.bias" not in model.state_dict()
    )
    head = ArcFaceHead(8, 3, scale=10.0, margin=0.3)
    features, targets = torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1])
    head.eval()
    plain = head(features)
    assert plain.abs().max() <= 10.0 + 1e-5
    head.train()
    head.targets = targets
    margin = head(features)
    target_rows = torch.arange(5), targets
    assert torch.all(margin[target_rows] < plain[target_rows])  # the target logit is penalised
    other = torch.ones_like(plain, dtype=torch.bool)
    other[target_rows] = False
    torch.testing.assert_close(margin[other], plain[other])


def test_torchvision_checkpoint_loads_into_grey_model_with_new_head(tmp_path):
    torchvision_like = create_model("resnet18", num_classes=1000, in_channels=3)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(torchvision_like.state_dict(), path)
    model = create_model("resnet18", num_classes=3, in_channels=1)
    head_before = model.fc.weight.clone()
    report = load_torchvision_weights(model, "resnet18", path)
    torch.testing.assert_close(
        model.conv1.weight, torchvision_like.conv1.weight.sum(dim=1, keepdim=True)
    )
    torch.testing.assert_close(
        model.layer3[1].conv2.weight, torchvision_like.layer3[1].conv2.weight
    )
    torch.testing.assert_close(model.fc.weight, head_before)  # classifier left for our classes
    assert report["reinitialised"] == ["fc.weight", "fc.bias"]


def test_old_densenet_key_names_are_renamed(tmp_path):
    source = create_model("densenet121", num_classes=1000, in_channels=3, width_mult=0.25)
    old = {  # the pre-0.4 layout: `norm.1` names and no num_batches_tracked
        k.replace("denselayer1.norm1.", "denselayer1.norm.1."): v
        for k, v in source.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert any(".norm.1." in k for k in old)
    path = tmp_path / "densenet-old.pth"
    torch.save({"state_dict": old}, path)
    model = create_model("densenet121", num_classes=3, in_channels=3, width_mult=0.25)
    load_torchvision_weights(model, "densenet121", path)
    block = model.features.denseblock1.denselayer1
    torch.testing.assert_close(
        block.norm1.weight, source.features.denseblock1.denselayer1.norm1.weight
    )


def test_a_torchvision_googlenet_file_loads_without_its_auxiliary_classifiers(tmp_path):
    source = create_model("googlenet", num_classes=1000, in_channels=3, width_mult=0.25)
    state = dict(source.state_dict())
    state["aux1.fc2.weight"] = torch.zeros(1000, 1024)  # as torchvision's ImageNet file holds
    state["aux2.conv.conv.weight"] = torch.zeros(128, 528, 1, 1)
    path = tmp_path / "googlenet.pth"
    torch.save(state, path)
    model = create_model("googlenet", num_classes=2, in_channels=3, width_mult=0.25)
    report = load_torchvision_weights(model, "googlenet", path)
    assert report["loaded_tensors"] == len(state) - 2 - len(report["reinitialised"])
    torch.testing.assert_close(model.conv1.conv.weight, source.conv1.conv.weight)


def test_mismatched_or_damaged_weights_are_refused_clearly(tmp_path):
    path = tmp_path / "mnv3.pth"
    torch.save(
        create_model("mobilenet_v3_small", num_classes=1000, in_channels=3).state_dict(), path
    )
    with pytest.raises(EdgebcError, match="do not fit resnet18"):
        load_torchvision_weights(create_model("resnet18"), "resnet18", path)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(EdgebcError, match="not a readable PyTorch checkpoint"):
        load_torchvision_weights(create_model("mobilenet_v3_small"), "mobilenet_v3_small", broken)
    assert model_spec("shufflenet_v2_x1_0").classifier == "fc"


def test_an_edgebc_checkpoint_starts_a_model_of_its_architecture_with_a_fresh_head(tmp_path):
    from edgebc.train.checkpoint import load_checkpoint, save_untrained_checkpoint

    source = save_untrained_checkpoint(tmp_path / "us.pt", "mobilenet_v3_small", 32, seed=1)
    weights = load_checkpoint(source).state_dict
    model = create_model("mobilenet_v3_small", num_classes=2)
    fresh_head = model.classifier[3].weight.detach().clone()
    report = load_torchvision_weights(model, "mobilenet_v3_small", source)
    torch.testing.assert_close(model.features[0][0].weight, weights["features.0.0.weight"])
    torch.testing.assert_close(model.classifier[3].weight, fresh_head)  # 3 classes there, 2 here
    card = load_checkpoint(source).card
    assert report["source"] == str(source) and report["weights_sha256"] == card.weights_sha256
    assert report["reinitialised"] == ["classifier.3.weight", "classifier.3.bias"]
    with pytest.raises(
        EdgebcError, match="edgebc mobilenet_v3_small model; it cannot start a resnet18"
    ):
        load_torchvision_weights(create_model("resnet18"), "resnet18", source)


def test_a_fusion_head_ignores_what_an_absent_branch_holds():
    from edgebc.model_card import ModelCard, ModelInput
    from edgebc.preprocess import PreprocessCard
    from edgebc.task import TASKS
    from edgebc.train.models.fusion import build_fusion

    prep = PreprocessCard(input_height=32, input_width=32)
    card = ModelCard("f", "late_fusion", TASKS["three_class"],
                     (ModelInput("us", prep), ModelInput("mg", prep, "mg", optional=True)),
                     arch_options={"fusion": "sum", "branch_arch": {"us": "simple_cnn", "mg": "simple_cnn"},
                                   "width": 8, "dropout": 0.0})  # fmt: skip
    model = build_fusion(card).eval()
    torch.manual_seed(0)
    us = model.embed("us", torch.rand(2, 1, 32, 32))
    present = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    with torch.no_grad():
        noise, zeros = (
            model.head([us, mg], present)[0] for mg in (torch.randn(2, 8) * 9, torch.zeros(2, 8))
        )
        both = model.head([us, torch.randn(2, 8)], torch.ones(2, 2))[0]
    torch.testing.assert_close(noise, zeros)
    assert not torch.allclose(both, zeros)
