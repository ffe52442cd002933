"""What a frame classifier is made of, the same for `edgebc classify` and `edgebc serve`.

A site validates its model, threshold and quality gate once; an archive run and the cart must then
decide with the same ones. Both commands' settings extend `ClassifierSettings`, so its keys sit at
the top level of either YAML file (`model:`, `threshold:`, `quality: {min_std: ...}`,
`mammography_quality: {...}`) and reach a `FrameClassifier` through `build_classifier` alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from edgebc.classifier import FrameClassifier
from edgebc.demo import DEMO_MODEL
from edgebc.deployment_plan import open_planned_backend
from edgebc.localiser import check_crop_trained, linked_localiser_path, open_localiser
from edgebc.quality import MammographyGate, QualityGate
from edgebc.region import Region
from edgebc.shift import SHIFT_MODES, ShiftMode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierSettings:
    model: str | None = None  # exported .onnx or .engine; None: the embedded demo model
    region: tuple[int, int, int, int] | None = None  # x, y, w, h of the imaging region
    auto_region: bool = False  # detect the region on the first frame of each stream instead
    threshold: float | None = None  # overrides the model card's operating threshold
    quality: QualityGate = field(default_factory=QualityGate)  # for ultrasound models
    # for models whose card declares a mammography (`mg`) input
    mammography_quality: MammographyGate = field(default_factory=MammographyGate)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0  # 0: ONNX Runtime's choice
    spin_wait: bool = False  # ONNX Runtime threads spin between runs: lower latency, a core burnt
    # An out-of-distribution frame or stream (a scanner or preset the model was not trained on):
    # withdraw its decision (the default: the project answers nothing rather than something
    # wrong, and the BUSI-only model fell to chance on the scanner it never saw), mark it
    # unreliable, or do not check. Models whose card has no training statistics are not checked.
    shift: ShiftMode = "withdraw"
    shift_window: int = 30  # frames whose mean score is the stream's verdict
    # a lesion localiser (exported .onnx) run before the classifier: localise -> crop -> classify,
    # and "no lesion found" gives no class (edgebc.localiser). None: the one the model's card
    # links, if any; localiser_margin overrides the card link's margin around the box
    localiser: str | None = None
    localiser_margin: float | None = None
    # run the runtime and precision the deployment plan beside the model chose for this machine
    # (edgebc.deployment_plan); False runs the model file as given
    use_plan: bool = True

    def __post_init__(self) -> None:
        if self.region is not None:
            Region(*self.region)  # raises with a plain message
        if self.region is not None and self.auto_region:
            raise ValueError("give either a region or auto_region, not both")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {self.threshold}")
        if self.shift not in SHIFT_MODES:
            raise ValueError(f"shift must be one of {', '.join(SHIFT_MODES)}, got {self.shift!r}")
        if self.shift_window < 1:
            raise ValueError(
                f"shift_window is a number of frames, at least 1, got {self.shift_window}"
            )
        if self.localiser_margin is not None and not 0.0 <= self.localiser_margin <= 2.0:
            raise ValueError(
                f"localiser_margin is a fraction 0..2 of the box, got {self.localiser_margin}"
            )
        if self.threads < 0:
            raise ValueError(
                f"threads must be 0 (ONNX Runtime's choice) or more, got {self.threads}"
            )

    @property
    def demo(self) -> bool:
        return self.model is None

    @property
    def model_path(self) -> Path:
        return Path(self.model) if self.model else DEMO_MODEL


def build_classifier(settings: ClassifierSettings) -> FrameClassifier:
    """Open the model and put region, quality gate and threshold around it. With `auto_region`
    the region starts empty: whoever reads the stream detects it on its first frame."""
    backend, note = open_planned_backend(settings.model_path, settings.providers, settings.threads,
                                         spin_wait=settings.spin_wait, use_plan=settings.use_plan)  # fmt: skip
    log.info("%s", note)
    region = Region(*settings.region) if settings.region else None
    localiser_path = settings.localiser or linked_localiser_path(backend.card, settings.model_path)
    localiser = None
    if localiser_path is not None:
        localiser = open_localiser(localiser_path, settings.threads)
    classifier = FrameClassifier(backend, region, settings.quality, settings.threshold,
                                 settings.shift, settings.shift_window, settings.mammography_quality,
                                 localiser, settings.localiser_margin)  # fmt: skip
    if localiser_path is not None and localiser is not None:  # only behind the localiser, and
        check_crop_trained(backend.card, localiser_path, classifier.margin)  # margin, it learnt
        log.info("lesion localiser %s (threshold %.3f) crops each frame before the classifier",
                 localiser_path, localiser.threshold)  # fmt: skip
    log.info("shift check: %s", classifier.shift_note)  # once, where the classifier is built
    return classifier
