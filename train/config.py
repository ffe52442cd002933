"""The training configuration: nested frozen dataclasses, filled from YAML, overridden by flags.

`load_train_config(path, ["optim.lr=1e-3", ...])` reads a YAML file, applies dotted overrides
(values parsed as YAML, so numbers and lists work), rejects unknown keys naming the file, and
returns a TrainConfig. The resolved configuration is written into every run folder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgebc.config import load_config, look_up_option, to_mapping
from edgebc.patches import PatchCard
from edgebc.preprocess import PreprocessCard
from edgebc.synth.dataset import SynthPlan
from edgebc.task import Task, task_for


@dataclass(frozen=True)
class PhantomRecipe:
    """Phantoms to make when the manifest is missing (the smoke run's first use on a fresh clone):
    `edgebc synth` with these values into `folder`, then `edgebc data split` into the manifest."""

    folder: str = "runs/phantoms"
    n_per_class: int = 150
    size: int = 128
    seed: int = 0
    # paired US + MG cases instead (edgebc synth --paired-cases; n_per_class 0 for them alone)
    paired_cases: int = 0
    us_signal: float = 1.0
    mg_signal: float = 1.0
    us_per_case: int = 1

    def __post_init__(self) -> None:
        if self.n_per_class < 4 and self.paired_cases < 12:
            raise ValueError(
                f"phantoms.n_per_class must be at least 4 (or paired_cases 12) to split, got "
                f"{self.n_per_class}"
            )

    def plan(self) -> SynthPlan:
        """The `edgebc synth` plan these phantoms are made by."""
        return SynthPlan(n_per_class=self.n_per_class, size=self.size, seed=self.seed,
                         paired_cases=self.paired_cases, us_signal=self.us_signal,
                         mg_signal=self.mg_signal, paired_us_images=self.us_per_case)  # fmt: skip


@dataclass(frozen=True)
class DataConfig:
    """Where the samples come from, what the model is asked (the task) and which split each role uses.

    `task` names a task derived from the labels (three_class, malignant_vs_rest,
    benign_vs_malignant, normal_vs_abnormal; see edgebc.task), so sets with different label sets
    train and score together without rewritten manifests. Without a task, `classes` (default:
    the three BUSI classes) and `positive_class` define a task of exactly those labels.
    """

    manifest: str = ""
    task: str | None = None
    classes: tuple[str, ...] | None = None
    positive_class: str | None = None
    modality: str | None = "us"
    # train on these sites of a multi-site manifest; () = all. A site is the value of
    # site_column: "source" (the site), or "device" (one scanner; BUSI's blank device is its site)
    sources: tuple[str, ...] = ()
    site_column: str = "source"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # where temperature and operating point are fitted when the manifest has it (edgebc data split
    # --calibration); without it, on the validation split, which also chose the epoch (optimistic)
    calibration_split: str = "calibration"
    fold: int | None = None  # with k-fold manifests: this fold validates, the others train
    # only for phantom runs: make the phantoms and the split when the manifest is missing (real
    # data is never made up: without this a missing manifest is an error)
    phantoms: PhantomRecipe | None = None
    # train on the lesion localiser's crops (an exported localiser .onnx, docs/LOCALISER.md): every
    # frame of every split is read as the cart reads it behind that localiser (locate, widen the
    # box by localiser_margin per side, crop), and the card's lineage names the localiser, so the
    # cart runs this classifier only behind it (edgebc.localiser.check_crop_trained)
    localiser: str | None = None
    localiser_margin: float = 0.15

    def __post_init__(self) -> None:
        if not 0.0 <= self.localiser_margin <= 2.0:
            raise ValueError(
                f"data.localiser_margin is a fraction 0..2 of the box, got {self.localiser_margin}"
            )
        self.resolved_task()  # a task name, class list or positive class that cannot be is named now

    def resolved_task(self) -> Task:
        return task_for(self.task, self.classes, self.positive_class)


def _default_branches() -> dict[str, str]:
    return {"us": "mobilenet_v3_small", "mg": "mobilenet_v3_small"}


@dataclass(frozen=True)
class FusionConfig:
    """A mammography + ultrasound fusion model (train/models/fusion.py) trained on a case
    manifest (train/fusion_data.py): a registered architecture per branch, how the branches'
    embeddings are fused, and modality dropout — in training each instance with both modalities
    loses its ultrasound or its mammograms (never both) with probability `modality_dropout`, so
    the one model answers with either alone. The ultrasound branch uses `preprocess`, the
    mammography branch `mg_preprocess` (the same when not given); `mg_views` are the view slots
    of the multi-view mammography branch, pooled over the present views by `view_pooling`."""

    branches: dict[str, str] = field(default_factory=_default_branches)
    fusion: Literal["sum", "concat", "cross_attention"] = "sum"
    modality_dropout: float = 0.3
    width: int = 64
    tokens: int = 4  # cross-attention: each embedding is split into this many tokens
    mg_views: tuple[str, ...] = ("L-CC", "L-MLO", "R-CC", "R-MLO")
    view_pooling: Literal["attention", "mean"] = "mean"
    view_dropout: float = 0.0
    mg_preprocess: PreprocessCard | None = None
    # an ArcFace layer per branch on its embedding, trained beside the fused logits with this
    # weight (training only: the logits never see it); 0 = none
    arcface_weight: float = 0.0

    def __post_init__(self) -> None:
        if set(self.branches) != {"us", "mg"}:
            raise ValueError(
                f"model.fusion.branches needs an architecture for us and for mg, got "
                f"{dict(self.branches)}"
            )
        if not 0 <= self.modality_dropout < 1 or not 0 <= self.view_dropout < 1:
            raise ValueError(
                "model.fusion.modality_dropout and view_dropout must be in [0, 1), got "
                f"{self.modality_dropout} and {self.view_dropout}"
            )
        if self.width < 1 or self.tokens < 1 or self.width % self.tokens:
            raise ValueError(
                f"model.fusion.width ({self.width}) must be a positive multiple of tokens "
                f"({self.tokens})"
            )
        if self.arcface_weight < 0:
            raise ValueError(f"model.fusion.arcface_weight must be >= 0, got {self.arcface_weight}")
        if not self.mg_views or len(set(self.mg_views)) != len(self.mg_views):
            raise ValueError(f"model.fusion.mg_views must name distinct views, got {self.mg_views}")


@dataclass(frozen=True)
class ModelConfig:
    """The network: a registered architecture, its head, and what of it trains.

    head_hidden (e.g. [1024, 512]) puts hidden layers, each Linear -> LeakyReLU -> Dropout
    (head_dropout), between the backbone's features and the final layer (Linear, or ArcFace with
    head: arcface); () is the plain final layer. freeze_stages N freezes the backbone's first N
    stages (the architecture's ModelSpec.stages: the stem, then one per halving of the feature
    map): no gradient, no weight decay, BatchNorm kept in evaluation mode; 0 trains everything.
    """

    arch: str = "mobilenet_v3_small"
    width_mult: float = 1.0
    head: Literal["linear", "arcface"] = "linear"
    dropout: float = 0.2
    head_hidden: tuple[int, ...] = ()
    head_dropout: float = 0.0
    freeze_stages: int = 0
    pretrained: str | None = None  # a torchvision ImageNet checkpoint on disk; never downloaded
    # Multi-view mammography (train/multiview.py): the manifest's view codes the model takes, one
    # shared backbone over a breast's views, pooled by learned attention or the mean; () = one
    # image per sample. Training drops each view with probability view_dropout (one always stays).
    views: tuple[str, ...] = ()
    view_pooling: Literal["attention", "mean"] = "attention"
    view_dropout: float = 0.25
    # MG + US fusion on a case manifest (train/models/fusion.py); None = one modality's model
    fusion: FusionConfig | None = None

    def __post_init__(self) -> None:
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.head_hidden):
            raise ValueError(
                f"model.head_hidden lists hidden layer widths, whole numbers >= 1, got "
                f"{list(self.head_hidden)}"
            )
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"model.head_dropout must be in [0, 1), got {self.head_dropout}")
        if isinstance(self.freeze_stages, bool) or self.freeze_stages < 0:
            raise ValueError(
                f"model.freeze_stages is a number of stages >= 0, got {self.freeze_stages!r}"
            )
        if (self.head_hidden or self.freeze_stages) and (self.fusion is not None or self.views):
            raise ValueError(
                "model.head_hidden and model.freeze_stages are for one-image models: leave them "
                "unset with model.fusion or model.views"
            )
        if self.fusion is not None and (self.views or self.head != "linear" or self.pretrained):
            raise ValueError(
                "model.fusion takes its branches and views from model.fusion: leave model.views "
                "empty, model.head linear (ArcFace per branch: model.fusion.arcface_weight) and "
                "model.pretrained unset"
            )
        if len(set(self.views)) != len(self.views):
            raise ValueError(f"model.views names a view twice: {list(self.views)}")
        if not 0 <= self.view_dropout < 1:
            raise ValueError(f"model.view_dropout must be in [0, 1), got {self.view_dropout}")


@dataclass(frozen=True)
class AugmentConfig:
    """Ultrasound-appropriate augmentation, applied to batches on the training device.

    hflip and vflip are each image's probability of a left-right and of an up-down mirror, drawn
    independently (both at once is the combined flip, a half turn). vflip is 0, off, by default:
    in a B-mode frame depth runs down and shadows fall downward, so an upside-down frame is one
    the cart never shows; designs that flip both ways set it. A mammography model whose
    preprocessing turns every breast the same way (preprocess.laterality: left) must keep both
    at 0: a flip would undo the turn (TrainConfig refuses vflip there; the training loop warns
    about hflip, which configs written before the check used)."""

    enabled: bool = True
    hflip: float = 0.5
    vflip: float = 0.0
    rotate_degrees: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06
    elastic: float = 0.02  # displacement, as a fraction of the image side
    brightness: float = 0.1
    contrast: float = 0.2
    gamma: tuple[float, float] = (0.8, 1.25)
    speckle: float = 0.15  # std of multiplicative noise
    # Scanner and preset appearance (0 = off, the default, so older recipes draw what they drew).
    # What differs between scanners is mostly the transfer curve, the depth gain and the
    # resolution/speckle grain; these span it on top of the knobs above.
    gain: float = 0.0  # overall gain: intensities times exp(U(-gain, gain))
    tgc: float = 0.0  # depth-dependent gain: a smooth curve down the rows, exp(+-tgc) at most
    dynamic_range: float = 0.0  # log-compression curve (e^(a x) - 1) / (e^a - 1), a in +-this
    blur: float = 0.0  # Gaussian blur sigma up to this, in input pixels (resolution, focus)
    resolution: float = 1.0  # downsample by up to this factor and back (lateral/axial resolution)
    speckle_grain: tuple[int, ...] = (3,)  # speckle correlation sizes in pixels, drawn per batch
    noise: float = 0.0  # std of additive electronic noise

    def __post_init__(self) -> None:
        if not (0 <= self.hflip <= 1 and 0 <= self.vflip <= 1):
            raise ValueError(
                f"augment.hflip and augment.vflip are probabilities in [0, 1], got {self.hflip} "
                f"and {self.vflip}"
            )
        if self.resolution < 1 or self.blur < 0 or self.noise < 0 or self.gain < 0 or self.tgc < 0:
            raise ValueError(
                "augment: resolution must be >= 1 and gain, tgc, blur, noise >= 0, got "
                f"resolution={self.resolution} gain={self.gain} tgc={self.tgc} blur={self.blur} "
                f"noise={self.noise}"
            )
        if not self.speckle_grain or any(k < 1 or k % 2 == 0 for k in self.speckle_grain):
            raise ValueError(
                f"augment.speckle_grain needs odd sizes >= 1, got {list(self.speckle_grain)}"
            )


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser, its learning-rate schedule and the rest of the training recipe.

    optimizer: "adamw" (decoupled weight decay; the default), "adam" or "sgd" (with `momentum`,
    and Nesterov's form when `nesterov`). With adam and sgd, weight_decay is the classic L2
    penalty added to the gradient, so a value tuned for AdamW (0.05) is far too strong there:
    1e-4 to 5e-4 is usual. Biases and normalisation parameters are never decayed.

    schedule, stepped per batch and multiplied by the linear warm-up over `warmup_epochs` (0: no
    warm-up; the warm-up starts at 1 % of lr): "cosine" decays to 1 % of lr at the last epoch (the
    default), "constant" keeps lr, "step" multiplies it by `gamma` every `step_size` epochs
    (counted from the first epoch, as torch's StepLR counts).
    """

    epochs: int = 60
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    step_size: int = 30  # epochs between lr drops, schedule "step" only
    gamma: float = 0.1  # lr factor at each drop, schedule "step" only
    warmup_epochs: int = 3
    label_smoothing: float = 0.05
    class_weights: bool = True
    balanced_sampler: bool = False
    # Domain-balanced sampling: each epoch draws a domain's frames in proportion to its size to the
    # power (1 - domain_balance): 0 is off (natural shares), 1 gives every domain an equal share,
    # 0.5 the square root (a 15-frame scanner is not repeated 40 times). A domain is the value of
    # `domain_column` ("source": one site each; "device": one scanner, a blank falling back to
    # the source). Class weights in the loss stay on.
    domain_balance: float = 0.0
    domain_column: str = "source"
    ema_decay: float = 0.998  # 0 disables the weight EMA
    grad_clip: float = 2.0  # 0 disables clipping
    early_stop_patience: int = 12  # epochs without improvement; 0 disables
    # never stop before this many epochs: a model learning from scratch under heavy augmentation
    # can sit at chance for its first epochs, longer than the patience
    early_stop_min_epochs: int = 0
    early_stop_metric: Literal[
        "val_auc_positive", "val_macro_auc", "val_balanced_accuracy", "val_loss"
    ] = "val_auc_positive"
    target_sensitivity: float = 0.95
    # Confidence of the one-sided lower bound on the sensitivity the threshold gives on new cases.
    sensitivity_confidence: float = 0.95
    # BatchNorm running-statistics momentum while training. torchvision's MobileNetV3 uses 0.01,
    # tuned for ImageNet's many thousand steps; on a few hundred images the running statistics
    # then stay near their initial values and evaluation outputs are uniform. 0 keeps the model's.
    bn_momentum: float = 0.1
    # Weight of the auxiliary lesion-mask loss (see lesion_mask.py): a training-only head predicts
    # the lesion mask from the Grad-CAM layer, steering the model off calipers and annotations.
    # Needs a manifest with masks; samples without one are skipped. 0 disables.
    mask_loss_weight: float = 0.0
    # Knowledge distillation (see distill.py): checkpoints of models trained on the same training
    # and validation samples whose averaged soft predictions the model also learns from. The loss
    # is (1 - distill_weight) * hard cross-entropy + distill_weight * T^2 * KL at temperature T.
    distill_from: tuple[str, ...] = ()
    distill_weight: float = 0.7
    distill_temperature: float = 2.0

    def __post_init__(self) -> None:
        look_up_option(self.optimizer, ("adamw", "adam", "sgd"), what="optim.optimizer")
        look_up_option(self.schedule, ("cosine", "constant", "step"), what="optim.schedule")
        # lr 0 is allowed: a run that must not learn (a test of early stopping uses one)
        if not (math.isfinite(self.lr) and self.lr >= 0) or self.weight_decay < 0:
            raise ValueError(
                f"optim.lr and weight_decay must be >= 0, got {self.lr} and {self.weight_decay}"
            )
        if not 0 <= self.momentum < 1:
            raise ValueError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError(
                "optim.nesterov is Nesterov momentum for optim.optimizer sgd with momentum > 0, got "
                f"optimizer {self.optimizer!r} and momentum {self.momentum}"
            )
        if self.step_size < 1 or not 0 < self.gamma <= 1:
            raise ValueError(
                f"optim.step_size must be >= 1 epoch and gamma in (0, 1], got {self.step_size} "
                f"and {self.gamma}"
            )
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 < self.distill_weight <= 1 or self.distill_temperature <= 0:
            raise ValueError(
                f"distill_weight must be in (0, 1] and distill_temperature > 0, got "
                f"{self.distill_weight} and {self.distill_temperature}"
            )
        if self.mask_loss_weight < 0:
            raise ValueError(f"mask_loss_weight must be >= 0, got {self.mask_loss_weight}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be positive, got {self.epochs}, {self.batch_size}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.sensitivity_confidence < 1:
            raise ValueError(
                f"sensitivity_confidence must be in (0, 1), got {self.sensitivity_confidence}"
            )
        if not 0 <= self.domain_balance <= 1:
            raise ValueError(f"domain_balance must be in [0, 1], got {self.domain_balance}")
        if not 0 < self.target_sensitivity <= 1:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {self.target_sensitivity}")


@dataclass(frozen=True)
class PatchConfig:
    """Patch mode (mammograms with located findings; edgebc.patches and train/patches.py): the
    patch card's numbers, which the model card carries to the device, and how many training
    patches each film gives."""

    side: int = 256  # native pixels a side; resized to the preprocessing's input size
    stride: int = 128  # native pixels between grid patches when a whole film is classified
    min_breast: float = 0.5  # share of a patch on the breast for it to be used
    aggregate: Literal["max", "top_k_mean"] = "max"
    top_k: int = 3
    per_finding: int = 8  # jittered patches around each located finding
    normal_per_film: int = 4  # random patches clear of findings, per film
    jitter: float = 0.5  # of the room a finding leaves inside its patch, each way

    def __post_init__(self) -> None:
        self.card()  # a side, stride or aggregation that cannot be is named now
        if self.per_finding < 1 or self.normal_per_film < 0 or not 0 <= self.jitter <= 1:
            raise ValueError(
                "patches: per_finding must be >= 1, normal_per_film >= 0 and jitter in [0, 1], "
                f"got {self.per_finding}, {self.normal_per_film}, {self.jitter}"
            )

    def card(self) -> PatchCard:
        return PatchCard(self.side, self.stride, self.min_breast, self.aggregate, self.top_k)


@dataclass(frozen=True)
class TrainConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = (
        "auto"  # auto: bf16 on CUDA when supported, off on CPU
    )
    channels_last: bool = True  # on CUDA only
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    loader_workers: int = 2  # decoding threads while caching the dataset
    preprocess: PreprocessCard = field(default_factory=PreprocessCard)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    patches: PatchConfig | None = None  # None: the model sees whole images

    @property
    def turned_laterality(self) -> str:
        """The laterality normalisation any input is trained with: the preprocessing's, or a
        fusion model's mammogram branch's (one augmentation serves every branch)."""
        fusion = self.model.fusion
        mg = fusion.mg_preprocess if fusion is not None else None
        if mg is not None and mg.laterality != "keep":
            return mg.laterality
        return self.preprocess.laterality

    def __post_init__(self) -> None:
        if self.preprocess.channels not in (1, 3):
            raise ValueError("preprocess.channels must be 1 or 3")
        # vflip is refused outright; hflip, older than this check, is warned about by the loop
        # (configs written before it flipped such breasts and still train as they did)
        if self.turned_laterality != "keep" and self.augment.enabled and self.augment.vflip:
            raise ValueError(
                f"preprocess.laterality is {self.turned_laterality!r} (the mammograms' "
                "preprocessing, a fusion model's mg_preprocess included): every breast is turned "
                f"the same way, and augment.vflip ({self.augment.vflip}) would turn them upside "
                "down; set it to 0 (and augment.hflip too)"
            )
        if self.model.views and (self.optim.mask_loss_weight > 0 or self.optim.distill_from):
            raise ValueError(
                "model.views (multi-view cases) trains without optim.mask_loss_weight and "
                "optim.distill_from: a case has several images, and neither knows which"
            )
        if self.model.fusion is not None and (
            self.optim.mask_loss_weight > 0 or self.optim.distill_from or self.patches is not None
        ):
            raise ValueError(
                "model.fusion trains on cases without optim.mask_loss_weight, optim.distill_from "
                "and patches"
            )
        if self.model.fusion is not None and self.data.modality is not None:
            raise ValueError(
                "model.fusion reads both modalities from the case manifest: set data.modality "
                f"to null (it is {self.data.modality!r})"
            )
        if self.model.views and self.patches is not None:
            raise ValueError(
                "model.views (whole views of a case) and patches are two input modes: pick one"
            )
        if self.data.localiser and (
            self.model.views or self.model.fusion is not None or self.patches is not None
            or self.optim.mask_loss_weight > 0 or self.data.modality != "us"
        ):  # fmt: skip
            raise ValueError(
                "data.localiser crops ultrasound frames to the lesion for a one-image classifier: "
                "it needs data.modality us and no model.views, model.fusion, patches or "
                "optim.mask_loss_weight (the lesion mask is drawn on the whole frame)"
            )
        if self.patches is not None and (
            self.preprocess.pectoral != "keep" or self.preprocess.clahe_clip > 0
        ):
            raise ValueError(
                "patch mode cuts patches from the cropped, turned film without pectoral "
                "suppression or CLAHE (edgebc.patches.breast_frame): set preprocess.pectoral: keep "
                "and preprocess.clahe_clip: 0"
            )
        if self.patches is not None and self.optim.mask_loss_weight > 0:
            raise ValueError("patch mode has no lesion-mask loss: set optim.mask_loss_weight to 0")
        if self.patches is not None and self.preprocess.input_height != self.preprocess.input_width:
            raise ValueError(
                "patch mode needs a square input (patches are square), got "
                f"{self.preprocess.input_height}x{self.preprocess.input_width}"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (or defaults when path is None) plus dotted overrides."""
    return load_config(TrainConfig, path, overrides)
