"""The training options published designs need: optimisers and schedules (resumed exactly), flips,
min-max grey normalisation, frozen stages, a multi-layer head and the normal-vs-malignant task."""

import math
from pathlib import Path

import numpy as np
import pytest

from edgebc.data.split import SplitPlan
from edgebc.errors import ConfigError
from edgebc.preprocess import PreprocessCard, min_max_levels, normalise_appearance, preprocess
from edgebc.task import TASKS, task_for

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

from edgebc.train import loop
from edgebc.train.augment import BatchAugmenter
from edgebc.train.checkpoint import load_checkpoint, model_from_checkpoint
from edgebc.train.config import AugmentConfig, OptimConfig, load_train_config
from edgebc.train.freeze import freeze, frozen_prefixes, keep_frozen_in_eval
from edgebc.train.models import create_model, list_models, model_spec
from edgebc.train.models.heads import ArcFaceHead, HiddenLayersHead, arcface_of
from edgebc.train.optim import lr_factor, make_optimizer
from tests.test_training import _config, _crash_after_the_first_epoch, _split_phantoms

OFF = {"hflip": 0.0, "rotate_degrees": 0.0, "scale": (1.0, 1.0), "translate": 0.0, "elastic": 0.0,
       "brightness": 0.0, "contrast": 0.0, "gamma": (1.0, 1.0), "speckle": 0.0}  # fmt: skip
CARD = PreprocessCard(input_height=32, input_width=32)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    return _split_phantoms(
        tmp_path_factory.mktemp("phantoms"), 10, 48, SplitPlan(val=0.2, test=0.2, seed=0)
    )


# --- optimisers and schedules -------------------------------------------------------------


def test_each_optimizer_is_built_with_its_settings_and_skips_frozen_parameters():
    model = create_model("simple_cnn", 3, 1)
    freeze(model, frozen_prefixes("simple_cnn", 2))
    sgd = make_optimizer(model, OptimConfig(optimizer="sgd", momentum=0.8, nesterov=True,
                                            weight_decay=1e-4, lr=0.01))  # fmt: skip
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"] is True
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    held = {id(p) for g in sgd.param_groups for p in g["params"]}
    assert held == trainable and len(trainable) < len(list(model.parameters()))
    assert type(make_optimizer(model, OptimConfig(optimizer="adam"))) is torch.optim.Adam
    assert type(make_optimizer(model, OptimConfig())) is torch.optim.AdamW


def _old_cosine(warmup_steps, total_steps, floor=0.01):
    """The schedule every run used before optim.schedule existed (loop._lr_lambda)."""

    def factor(step):
        if step < warmup_steps:
            return floor + (1 - floor) * step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@pytest.mark.parametrize("warmup", [0, 3])
def test_the_default_schedule_is_the_warm_up_and_cosine_every_run_had(warmup):
    new = lr_factor(OptimConfig(epochs=10, warmup_epochs=warmup), 7)
    old = _old_cosine(warmup * 7, 70)
    assert [new(s) for s in range(75)] == [old(s) for s in range(75)]


def test_constant_and_step_schedules_under_the_warm_up():
    constant = lr_factor(OptimConfig(schedule="constant", warmup_epochs=0), 5)
    assert {constant(s) for s in range(400)} == {1.0}
    step = lr_factor(OptimConfig(schedule="step", step_size=3, gamma=0.5, warmup_epochs=0), 4)
    assert [step(s) for s in (0, 11, 12, 23, 24, 36)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]
    warmed = lr_factor(OptimConfig(schedule="constant", warmup_epochs=2), 5)
    assert warmed(0) == pytest.approx(0.01) and warmed(5) == pytest.approx(0.505)
    assert warmed(10) == 1.0


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("optim.optimizer=sdg", r"expected one of \['adamw', 'adam', 'sgd'\], got 'sdg'"),
        ("optim.schedule=cosin", r"expected one of \['cosine', 'constant', 'step'\]"),
        ("optim.nesterov=true", "nesterov is Nesterov momentum for optim.optimizer sgd"),
        ("optim.momentum=1.0", "momentum must be in"),
        ("optim.gamma=0", "gamma in"),
        ("optim.step_size=0", "step_size must be"),
        ("optim.lr=-0.001", "lr and weight_decay must be >= 0"),
        ("optim.weight_decay=-1", "lr and weight_decay must be >= 0"),
        ("optim.warmup_epochs=-1", "warmup_epochs must be"),
    ],
)
def test_bad_optimiser_settings_are_named(setting, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_train_config(None, [setting])


@pytest.mark.parametrize(
    "settings",
    [
        ("optim.optimizer=sgd", "optim.nesterov=true", "optim.momentum=0.9", "optim.lr=0.01",
         "optim.weight_decay=0.0005", "optim.schedule=step", "optim.step_size=1", "optim.gamma=0.5",
         "optim.warmup_epochs=0"),
        ("optim.optimizer=adam", "optim.lr=0.0001", "optim.weight_decay=0",
         "optim.schedule=constant", "optim.warmup_epochs=0"),
    ],
    ids=["sgd-nesterov-step", "adam-constant"],
)  # fmt: skip
def test_resume_restores_the_optimiser_and_schedule_exactly(tiny_split, tmp_path, monkeypatch,
                                                            settings):  # fmt: skip
    settings = ("optim.epochs=3", "optim.ema_decay=0", *settings)
    straight = loop.train_model(
        _config(tiny_split, tmp_path, "straight", *settings), show_progress=False
    )
    _crash_after_the_first_epoch(_config(tiny_split, tmp_path, "crashed", *settings), monkeypatch)
    resumed = loop.train_model(
        _config(tiny_split, tmp_path, "x"), resume=tmp_path / "crashed", show_progress=False
    )
    a = load_checkpoint(straight.run_dir / "last.pt")
    b = load_checkpoint(resumed.run_dir / "last.pt")
    assert a.card.weights_sha256 == b.card.weights_sha256
    config = load_train_config(straight.run_dir / "config.yaml").optim
    lrs = [h["lr"] for h in a.training["history"]]
    assert lrs == [h["lr"] for h in b.training["history"]]
    if config.schedule == "step":  # one drop per epoch: the rate at each epoch's last step
        assert lrs == pytest.approx([0.005, 0.0025, 0.00125])
        momentum = a.training["optimizer"]["state"][0]["momentum_buffer"]
        assert float(momentum.abs().sum()) > 0
    else:
        assert lrs == [0.0001] * 3 and "exp_avg_sq" in a.training["optimizer"]["state"][0]


# --- flips ----------------------------------------------------------------------------------


def _ramp(n=2):
    return (torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5) / 0.25


@pytest.mark.parametrize(
    ("hflip", "vflip", "dims"), [(0.0, 1.0, (-2,)), (1.0, 0.0, (-1,)), (1.0, 1.0, (-2, -1))]
)
def test_flips_mirror_rows_columns_or_both_and_move_the_masks_alike(hflip, vflip, dims):
    augmenter = BatchAugmenter(AugmentConfig(**{**OFF, "hflip": hflip, "vflip": vflip}), CARD)
    batch = _ramp()
    masks = (batch > 0).float()
    out, moved = augmenter.with_masks(batch, masks, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, batch.flip(dims), atol=1e-5, rtol=0)
    torch.testing.assert_close(moved, masks.flip(dims), atol=1e-5, rtol=0)


def test_vertical_flip_is_off_by_default_and_drawn_per_image():
    assert AugmentConfig().vflip == 0.0
    augmenter = BatchAugmenter(AugmentConfig(**{**OFF, "vflip": 0.5}), CARD)
    batch = _ramp(64)
    out = augmenter(batch, torch.Generator().manual_seed(2))
    flipped = [torch.allclose(o, b.flip(-2), atol=1e-5) for o, b in zip(out, batch, strict=True)]
    kept = [torch.allclose(o, b, atol=1e-5) for o, b in zip(out, batch, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 16 <= sum(flipped) <= 48


def test_vflip_is_refused_where_laterality_is_normalised_and_outside_zero_to_one():
    with pytest.raises(ValueError, match=r"augment\.vflip are probabilities"):
        AugmentConfig(vflip=1.5)
    mg = ["preprocess.breast_crop=true", "preprocess.laterality=left"]
    with pytest.raises(ValueError, match="would turn them upside down; set it to 0"):
        load_train_config(None, [*mg, "augment.hflip=0", "augment.vflip=0.5"])
    assert load_train_config(None, [*mg, "augment.hflip=0", "augment.vflip=0"])
    assert load_train_config(None, [*mg, "augment.enabled=false", "augment.vflip=0.5"])


def test_a_run_warns_when_hflip_undoes_the_laterality_turn(tiny_split, tmp_path, caplog):
    # configs older than the check flip such breasts: they still train, and are told
    config = _config(tiny_split, tmp_path, "mg", "preprocess.laterality=left", "optim.epochs=1")
    with caplog.at_level("WARNING", logger="edgebc.train.loop"):
        loop.train_model(config, show_progress=False)
    assert "augment.hflip is 0.5: the augmentation mirrors breasts" in caplog.text


# --- min-max grey normalisation ----------------------------------------------------------------


def test_min_max_maps_the_frames_own_range_to_the_full_scale():
    frame = np.array([[40, 50], [90, 240]], np.uint8)
    expected = np.round((frame.astype(float) - 40) * 255 / 200).astype(np.uint8)
    np.testing.assert_array_equal(normalise_appearance(frame, "minmax"), expected)
    deep = frame.astype(np.uint16) * 100
    np.testing.assert_array_equal(
        min_max_levels(deep), np.round((deep - 4000.0) * 65535 / 20000).astype(np.uint16)
    )
    floats = frame.astype(np.float32) / 255
    np.testing.assert_allclose(min_max_levels(floats), (frame - 40) / 200.0, atol=1e-6)
    colour = np.dstack([frame, frame // 2, frame])  # one curve over every channel
    np.testing.assert_array_equal(
        min_max_levels(colour)[:, :, 1], np.round((frame // 2 - 20.0) * 255 / 220).astype(np.uint8)
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_a_flat_frame_becomes_black_without_dividing_by_zero(dtype):
    flat = np.full((20, 30), 0.4 if dtype == np.float32 else 77, dtype)
    with np.errstate(all="raise"):
        out = min_max_levels(flat)
    assert out.dtype == dtype and not out.any()
    tensor = preprocess(flat, PreprocessCard(input_height=16, input_width=16, appearance="minmax"))
    np.testing.assert_array_equal(tensor, np.full((1, 1, 16, 16), -2.0, np.float32))


def test_the_card_carries_min_max_and_the_tensor_spans_the_range():
    card = PreprocessCard(input_height=16, input_width=16, resize="stretch", appearance="minmax")
    assert PreprocessCard.from_json(card.to_json()) == card
    dim = np.linspace(60, 120, 16 * 16).reshape(16, 16).astype(np.uint8)
    tensor = preprocess(dim, card) * 0.25 + 0.5
    assert float(tensor.min()) == 0.0 and float(tensor.max()) == 1.0


# --- frozen stages ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", [a for a in list_models() if model_spec(a).stages])
def test_stages_are_in_order_disjoint_and_cover_the_backbone(arch):
    spec = model_spec(arch)
    model = create_model(arch, 3, 1)
    modules = [name for name, _ in model.named_modules()]
    prefixes = [p for stage in spec.stages for p in stage]
    assert len(set(prefixes)) == len(prefixes) and all(p in modules for p in prefixes)
    assert [modules.index(p) for p in prefixes] == sorted(modules.index(p) for p in prefixes)
    head = spec.classifier.split(".")[0]
    outside = [n for n, _ in model.named_parameters()
               if not any(n.startswith(p + ".") for p in prefixes)]  # fmt: skip
    assert outside and all(n.split(".")[0] == head for n in outside), outside


def test_frozen_stages_get_no_gradient_and_keep_their_batchnorm_statistics():
    model = create_model("simple_cnn", 3, 1)
    prefixes = frozen_prefixes("simple_cnn", 2)
    assert prefixes == tuple(f"features.{i}" for i in range(8))
    freeze(model, prefixes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, OptimConfig(optimizer="sgd", lr=0.1))
    model.train()
    keep_frozen_in_eval(model, prefixes)
    assert not model.features[1].training and model.features[9].training
    loss = model(torch.randn(4, 1, 32, 32) * 3 + 1).logsumexp(1).sum()
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    for name, param in model.named_parameters():
        frozen = name.startswith(("features.0.", "features.1.", "features.4.", "features.5."))
        assert (param.grad is None) == frozen, name
        assert torch.equal(before[name], after[name]) == frozen, name
    for name in ("features.1.running_mean", "features.5.running_var"):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["features.9.running_mean"], after["features.9.running_mean"])


def test_a_stage_count_the_architecture_lacks_is_named(monkeypatch):
    with pytest.raises(ConfigError, match=r"freeze_stages must be 0\.\.5 for simple_cnn"):
        frozen_prefixes("simple_cnn", 6)
    from dataclasses import replace

    from edgebc.train import freeze as freeze_module

    monkeypatch.setattr(freeze_module, "model_spec", lambda a: replace(model_spec(a), stages=()))
    with pytest.raises(ConfigError, match="declares no stages to freeze"):
        frozen_prefixes("simple_cnn", 1)
    with pytest.raises(ValueError, match="freeze_stages is a number of stages >= 0"):
        load_train_config(None, ["model.freeze_stages=-1"])


# --- the multi-layer head -----------------------------------------------------------------


@pytest.mark.parametrize("head", ["linear", "arcface"])
def test_a_hidden_layer_head_keeps_the_backbone_keys_torchvision_s(head):
    plain = create_model("resnet18", 3, 3)
    deep = create_model("resnet18", 3, 3, head=head, head_hidden=(64, 32), head_dropout=0.3)
    backbone = [k for k in plain.state_dict() if not k.startswith("fc.")]
    assert [k for k in deep.state_dict() if not k.startswith("fc.")] == backbone
    fc = deep.fc
    assert isinstance(fc, HiddenLayersHead) and fc.in_features == 512
    shapes = {k: tuple(v.shape) for k, v in fc.state_dict().items()}
    assert shapes["hidden.0.weight"] == (64, 512) and shapes["hidden.3.weight"] == (32, 64)
    assert shapes["out.weight"] == (3, 32) and ("out.bias" in shapes) == (head == "linear")
    assert [type(m).__name__ for m in fc.hidden] == ["Linear", "LeakyReLU", "Dropout"] * 2
    assert (arcface_of(fc) is fc.out) == (head == "arcface")
    assert deep.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    with pytest.raises(ValueError, match="head_hidden lists hidden layer widths"):
        load_train_config(None, ["model.head_hidden=[64, 0]"])


def test_a_run_with_frozen_stages_and_a_hidden_arcface_head(tiny_split, tmp_path, monkeypatch):
    start = tmp_path / "start.pt"
    torch.save(create_model("simple_cnn", 3, 1).state_dict(), start)
    margins = []
    real_forward = ArcFaceHead.forward

    def recording(self, x):
        margins.append(self.training and self.targets is not None)
        return real_forward(self, x)

    monkeypatch.setattr(ArcFaceHead, "forward", recording)
    settings = ("model.head=arcface", "model.head_hidden=[16, 8]", "model.head_dropout=0.2",
                "model.freeze_stages=5", f"model.pretrained={start}", "optim.ema_decay=0")  # fmt: skip
    run = loop.train_model(_config(tiny_split, tmp_path, "frozen", *settings), show_progress=False)
    assert any(margins) and not all(margins)  # the margin in training steps, not in validation
    last = load_checkpoint(run.run_dir / "last.pt")
    initial = torch.load(start, weights_only=True)
    for name, value in last.state_dict.items():
        if name.startswith("features."):  # weights and BatchNorm statistics as loaded
            assert torch.equal(value, initial[name]), name
    assert last.card.arch_options["head_hidden"] == [16, 8]
    model = model_from_checkpoint(load_checkpoint(run.run_dir / "best.pt"))  # strict load
    assert isinstance(model.classifier[2], HiddenLayersHead)


# --- binary tasks from three-class data ---------------------------------------------------------


def test_normal_vs_malignant_leaves_benign_out_and_counts_it(tiny_split, tmp_path):
    task = TASKS["normal_vs_malignant"]
    keep, left_out = task.partition(["normal", "benign", "malignant", "benign"])
    assert keep.tolist() == [True, False, True, False] and left_out == {"benign": 2}
    assert task_for(None, ("normal", "malignant"), "malignant") is task
    assert task.positive_class == "malignant"
    config = _config(tiny_split, tmp_path, "nvm", "data.task=normal_vs_malignant")
    labels = {s.label for role in ("train", "val") for s in loop.select_samples(config, role)}
    assert labels == {"normal", "malignant"}


def test_a_fusion_models_turned_mammograms_are_never_flipped_upside_down():
    config = Path(__file__).resolve().parents[1] / "configs" / "fusion_phantoms.yaml"
    with pytest.raises(ValueError, match="mg_preprocess included"):
        load_train_config(config, ["augment.vflip=0.5"])
    assert load_train_config(config, []).turned_laterality == "left"
