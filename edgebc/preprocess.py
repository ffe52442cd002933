"""The one preprocessing shared by training, evaluation, INT8 calibration and the device.

A frame goes: imaging-region crop -> breast crop, laterality and pectoral-muscle suppression
(optional, mammograms; the chest wall's side from the file's header where the caller passes its
`ImageView`, else from the image) -> CLAHE contrast enhancement at the frame's own bit depth
(optional) -> burned-in marks painted out (optional) -> the model's
channels -> appearance normalisation (optional: a per-frame intensity transfer curve that undoes
scanner gain and dynamic range) -> resize (stretch or letterbox) -> scale to [0, 1] ->
(x - mean) / std -> NCHW float32. Every number that defines this lives in
`PreprocessCard`, which is saved in checkpoints and embedded in exported models, so the device
reads it from the model instead of re-declaring it (the way torchvision binds `transforms` to
each weights entry). Any change here changes every model's input: keep it in this one module.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from edgebc.area import area_resize
from edgebc.breast import LATERALITY_MODES, prepare_breast
from edgebc.config import from_mapping, to_mapping
from edgebc.decode import ImageView
from edgebc.marks import remove_marks
from edgebc.pectoral import PECTORAL_MODES
from edgebc.region import Region

CARD_VERSION = 1
_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}
_MAX_VALUE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
APPEARANCES = ("none", "stretch", "equalise", "minmax")
# Levels at or below this share of full scale are the black surround, not tissue: left out of the
# statistics and kept black, so the letterbox bars and the sector's outside stay what they were.
SURROUND_LEVEL = 0.02
STRETCH_PERCENTILES = (0.01, 0.99)


@dataclass(frozen=True)
class PreprocessCard:
    """Everything that defines a model's input tensor; serialises to JSON for the model card.

    pad_value is the intensity in [0, 1] of the letterbox bars, before normalisation (0 = black,
    what the scanner shows outside the image).

    marks: "inpaint" paints burned-in calipers, dotted lines, text and coloured overlays out of
    the cropped frame at its native resolution (edgebc.marks) before anything else; "keep" (the
    default, and what every model before it was trained with) leaves them.

    appearance normalises each frame's intensities over its imaging pixels (those above the
    black surround): "stretch" maps the 1st..99th percentile to the full range (undoes overall
    gain and contrast), "equalise" maps each level to its rank (undoes any monotone transfer
    curve: gain, gamma, log compression, dynamic range). "none" is the old behaviour.

    breast_crop (mammograms) crops the frame to the breast, the largest bright connected region,
    with a margin, and blacks out what lies off it: the film's background, labels and markers
    (edgebc.breast). laterality "left" mirrors a breast whose chest wall is on the right, judged
    from the image itself, so every breast faces the same way; "keep" leaves it. Both defaults
    (False, "keep") are the old behaviour; a frame with no breast on it is refused
    (NoBreastFoundError) when either is on. Where the caller passes the file's `ImageView` (from
    its DICOM header), the header's chest-wall side is used and the image only checks it
    (edgebc.breast).

    pectoral "suppress" blacks out the pectoral muscle (the bright triangle in the upper
    chest-wall corner of an MLO view, edgebc.pectoral) unless the view is known to be another
    one; "keep" (the default) leaves it.

    clahe_clip > 0 enhances contrast with CLAHE (OpenCV's clip limit, on a clahe_tiles x
    clahe_tiles grid) after the breast steps, at the frame's own bit depth (uint16 stays 16-bit);
    pixels that were black (background, suppressed muscle) stay black. 0 (the default) is off.
    """

    input_height: int = 224
    input_width: int = 224
    channels: Literal[1, 3] = 1
    resize: Literal["stretch", "letterbox"] = "letterbox"
    # "area": each output pixel the mean of its cell (edgebc.area; OpenCV's INTER_AREA where it
    # enlarges or the factor is whole); "linear": cv2.resize's bilinear
    interpolation: Literal["area", "linear"] = "area"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    pad_value: float = 0.0
    marks: Literal["keep", "inpaint"] = "keep"
    appearance: Literal["none", "stretch", "equalise", "minmax"] = "none"
    breast_crop: bool = False
    laterality: Literal["keep", "left"] = "keep"
    pectoral: Literal["keep", "suppress"] = "keep"
    clahe_clip: float = 0.0
    clahe_tiles: int = 8
    version: int = CARD_VERSION

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels!r}")
        if not (8 <= self.input_height <= 4096 and 8 <= self.input_width <= 4096):
            raise ValueError(
                f"input size must be 8..4096 pixels a side, got {self.input_height}x{self.input_width}"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean and std need one value per channel ({self.channels}), "
                f"got mean={list(self.mean)} std={list(self.std)}"
            )
        if any(not np.isfinite(s) or s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {list(self.std)}")
        if any(not np.isfinite(m) for m in self.mean):
            raise ValueError(f"mean values must be finite, got {list(self.mean)}")
        if not 0.0 <= self.pad_value <= 1.0:
            raise ValueError(f"pad_value is an intensity in [0, 1], got {self.pad_value}")
        if self.resize not in ("stretch", "letterbox"):
            raise ValueError(f"resize must be 'stretch' or 'letterbox', got {self.resize!r}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(
                f"interpolation must be 'area' or 'linear', got {self.interpolation!r}"
            )
        if self.marks not in ("keep", "inpaint"):
            raise ValueError(f"marks must be 'keep' or 'inpaint', got {self.marks!r}")

        if self.appearance not in APPEARANCES:
            raise ValueError(
                f"appearance must be one of {list(APPEARANCES)}, got {self.appearance!r}"
            )
        if not isinstance(self.breast_crop, bool):
            raise ValueError(f"breast_crop must be true or false, got {self.breast_crop!r}")
        if self.laterality not in LATERALITY_MODES:
            raise ValueError(
                f"laterality must be one of {list(LATERALITY_MODES)}, got {self.laterality!r}"
            )
        if self.pectoral not in PECTORAL_MODES:
            raise ValueError(
                f"pectoral must be one of {list(PECTORAL_MODES)}, got {self.pectoral!r}"
            )
        if (
            isinstance(self.clahe_clip, bool)
            or not isinstance(self.clahe_clip, (int, float))
            or not 0.0 <= self.clahe_clip <= 1000.0
        ):
            raise ValueError(
                f"clahe_clip is CLAHE's clip limit, 0 (off) to 1000 (2-4 is usual), got "
                f"{self.clahe_clip!r}"
            )
        if (
            isinstance(self.clahe_tiles, bool)
            or not isinstance(self.clahe_tiles, int)
            or not 1 <= self.clahe_tiles <= 64
        ):
            raise ValueError(
                f"clahe_tiles is the CLAHE grid's tiles per side, a whole number 1..64, got "
                f"{self.clahe_tiles!r}"
            )
        if self.version != CARD_VERSION:
            raise ValueError(
                f"preprocessing card version {self.version} is not supported by this edgebc "
                f"(supports {CARD_VERSION}); upgrade edgebc or re-export the model"
            )

    @classmethod
    def imagenet_rgb(cls, height: int = 224, width: int = 224, **kwargs: object) -> PreprocessCard:
        """Three channels with ImageNet statistics, for backbones initialised from ImageNet weights."""
        return cls(
            input_height=height,
            input_width=width,
            channels=3,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed frame."""
        return (self.channels, self.input_height, self.input_width)

    def to_dict(self) -> dict[str, object]:
        return to_mapping(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(
        cls, data: dict[str, object], source: str = "preprocessing card"
    ) -> PreprocessCard:
        return from_mapping(cls, data, source=source)

    @classmethod
    def from_json(cls, text: str, source: str = "preprocessing card") -> PreprocessCard:
        return cls.from_dict(json.loads(text), source=source)


@dataclass(frozen=True)
class LetterboxGeometry:
    """Where the resized image sits inside the model input (for mapping heat maps back)."""

    scale_y: float
    scale_x: float
    top: int
    left: int
    height: int
    width: int


def preprocess(
    image: np.ndarray,
    prep: PreprocessCard,
    region: Region | None = None,
    view: ImageView | None = None,
) -> np.ndarray:
    """One frame (grey HxW or BGR HxWx3, uint8/uint16/float in [0, 1]) to a (1, C, H, W) float32
    tensor. `view`: what the file's header says about a mammogram's view (read_image_view)."""
    return preprocess_chw(image, prep, region, view)[np.newaxis]


def preprocess_batch(
    images: Sequence[np.ndarray],
    prep: PreprocessCard,
    region: Region | None = None,
    views: Sequence[ImageView | None] | None = None,
) -> np.ndarray:
    """Several frames to one (N, C, H, W) float32 tensor (`views`: one per frame, or None)."""
    if len(images) == 0:
        raise ValueError("preprocess_batch needs at least one image")
    if views is not None and len(views) != len(images):
        raise ValueError(f"preprocess_batch got {len(images)} images but {len(views)} views")
    chosen = views if views is not None else [None] * len(images)
    return np.stack(
        [
            preprocess_chw(image, prep, region, view)
            for image, view in zip(images, chosen, strict=True)
        ]
    )


def preprocess_chw(
    image: np.ndarray,
    prep: PreprocessCard,
    region: Region | None = None,
    view: ImageView | None = None,
) -> np.ndarray:
    """One frame to a (C, H, W) float32 tensor: the single implementation behind every caller."""
    image = to_channels(prepared_frame(image, prep, region, view), prep.channels)
    image = normalise_appearance(image, prep.appearance)
    return input_tensor(resize_to_input(image, prep), prep)


def input_tensor(image: np.ndarray, prep: PreprocessCard) -> np.ndarray:
    """A frame already at the model's input size (`resize_to_input`) to the (C, H, W) float32
    tensor: scaled to [0, 1], then (x - mean) / std."""
    scaled = image.astype(np.float32) * np.float32(1.0 / _max_value(image.dtype))
    if scaled.ndim == 2:
        scaled = scaled[:, :, np.newaxis]
    mean = np.asarray(prep.mean, np.float32)
    inv_std = np.float32(1.0) / np.asarray(prep.std, np.float32)
    normalised = (scaled - mean) * inv_std
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def prepared_frame(
    image: np.ndarray,
    prep: PreprocessCard,
    region: Region | None = None,
    view: ImageView | None = None,
) -> np.ndarray:
    """The frame at its own resolution and depth as the model's input is made from it: the
    imaging region, the breast (cropped, turned, pectoral muscle out), contrast enhanced and
    marks removed, before channels, appearance and resize. Grad-CAM draws a mammogram's heat
    map back onto it."""
    image = validated_image(image)
    if region is not None:
        image = region.crop(image)
    view = view or ImageView()
    image = prepare_breast(
        image,
        prep.breast_crop,
        prep.laterality,
        header_chest_wall=view.chest_wall,
        pectoral=prep.pectoral,
        is_mlo=view.is_mlo,
    )
    image = enhance_contrast(image, prep.clahe_clip, prep.clahe_tiles)
    if prep.marks == "inpaint":
        image = remove_marks(image)
    return image


def enhance_contrast(image: np.ndarray, clip: float, tiles: int) -> np.ndarray:
    """CLAHE with clip limit `clip` (0: off, the frame itself) on a tiles x tiles grid, at the
    frame's own depth (uint8 or uint16; float in [0, 1] is worked at 16 bits), each channel alike.
    Pixels that were 0 stay 0: CLAHE would lift a tile's black background to grey."""
    if clip <= 0:
        return image
    clahe = cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(tiles, tiles))
    is_float = image.dtype == np.float32
    levels = image if not is_float else np.round(image * 65535.0).astype(np.uint16)
    planes = [levels] if levels.ndim == 2 else [levels[:, :, c] for c in range(levels.shape[2])]
    out = [clahe.apply(np.ascontiguousarray(p)) for p in planes]
    mapped = out[0] if levels.ndim == 2 else np.dstack(out)
    mapped[levels == 0] = 0
    return mapped.astype(np.float32) / np.float32(65535.0) if is_float else mapped


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Grey HxW for channels=1; RGB HxWx3 (not BGR: models are trained in RGB order) for 3."""
    if channels == 1:
        return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if channels == 3:
        if image.ndim == 2:
            return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def normalise_appearance(image: np.ndarray, mode: str) -> np.ndarray:
    """One intensity transfer curve per frame, from the grey levels of its imaging pixels, applied
    to every channel; same dtype out. See PreprocessCard.appearance."""
    if mode == "none":
        return image
    if mode not in APPEARANCES:
        raise ValueError(f"appearance must be one of {list(APPEARANCES)}, got {mode!r}")
    if mode == "minmax":
        return min_max_levels(image)
    is_float = image.dtype == np.float32
    levels = image if not is_float else np.round(image * 65535.0).astype(np.uint16)
    grey = levels if levels.ndim == 2 else cv2.cvtColor(levels, cv2.COLOR_BGR2GRAY)
    top = int(_max_value(levels.dtype))
    histogram = np.bincount(grey.ravel(), minlength=top + 1).astype(np.float64)
    surround = int(SURROUND_LEVEL * top)
    histogram[: surround + 1] = 0
    tissue = histogram.sum()
    if tissue == 0:  # an all-black frame: nothing to normalise (the quality gate refuses it)
        return image
    cdf = np.cumsum(histogram) / tissue
    if mode == "equalise":
        curve = cdf
    else:
        low, high = (int(np.searchsorted(cdf, q)) for q in STRETCH_PERCENTILES)
        span = max(high - low, 1)
        curve = np.clip((np.arange(top + 1, dtype=np.float64) - low) / span, 0.0, 1.0)
    curve[: surround + 1] = 0.0
    lut = np.round(curve * top).astype(levels.dtype)
    mapped = lut[levels]
    return mapped.astype(np.float32) / np.float32(65535.0) if is_float else mapped


def min_max_levels(image: np.ndarray) -> np.ndarray:
    """The frame's darkest level to 0 and its brightest to full scale, linearly, same dtype out
    (integer levels rounded). A flat frame has no range to map and becomes all 0: black, the
    same answer on every device, where (x - min) / (max - min) would divide by zero."""
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros_like(image)
    top = _max_value(image.dtype)
    scaled = (image.astype(np.float64) - low) * (top / (high - low))
    if image.dtype == np.float32:
        return scaled.astype(np.float32)
    return np.round(scaled).astype(image.dtype)


def letterbox_geometry(height: int, width: int, prep: PreprocessCard) -> LetterboxGeometry:
    """Placement of a height x width image inside the model's input, for either resize mode."""
    out_h, out_w = prep.input_height, prep.input_width
    if prep.resize == "stretch":
        return LetterboxGeometry(out_h / height, out_w / width, 0, 0, out_h, out_w)
    scale = min(out_h / height, out_w / width)
    new_h = min(out_h, max(1, round(height * scale)))
    new_w = min(out_w, max(1, round(width * scale)))
    top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
    return LetterboxGeometry(new_h / height, new_w / width, top, left, new_h, new_w)


def resize_to_input(image: np.ndarray, prep: PreprocessCard) -> np.ndarray:
    """Resize (stretch) or fit inside with bars of pad_value (letterbox), keeping the dtype."""
    return letterbox_bars(resized_for_input(image, prep), prep)


def resized_for_input(image: np.ndarray, prep: PreprocessCard) -> np.ndarray:
    """The resize of `resize_to_input` alone: the image at its size inside the model's input
    (the whole input when stretched), before the letterbox bars; `image` itself at that size."""
    geometry = letterbox_geometry(image.shape[0], image.shape[1], prep)
    if image.shape[0] == geometry.height and image.shape[1] == geometry.width:
        return image
    if prep.interpolation == "area":  # cell means from a summed-area table (edgebc.area)
        return area_resize(image, geometry.width, geometry.height)
    interpolation = _INTERPOLATION[prep.interpolation]
    return cv2.resize(image, (geometry.width, geometry.height), interpolation=interpolation)


def letterbox_bars(image: np.ndarray, prep: PreprocessCard) -> np.ndarray:
    """`resized_for_input`'s image inside the model's input, with bars of pad_value around it
    (letterbox; a stretched image already fills the input)."""
    if prep.resize == "stretch":
        return image
    height, width = image.shape[:2]
    top, left = (prep.input_height - height) // 2, (prep.input_width - width) // 2  # as geometry's
    canvas_shape = (prep.input_height, prep.input_width, *image.shape[2:])
    pad = prep.pad_value * _max_value(image.dtype)
    fill = np.round(pad) if image.dtype != np.float32 else pad
    canvas = np.full(canvas_shape, fill, dtype=image.dtype)
    canvas[top : top + height, left : left + width] = image
    return canvas


def resizes_frame_only(prep: PreprocessCard) -> bool:
    """True when a grey model's input is its grey frame resized and nothing else (no breast
    steps, CLAHE, mark removal or appearance curve): `resized_for_input` of the grey frame is
    then the very picture the model sees, and the quality gate may judge it too."""
    return (
        prep.channels == 1
        and not prep.breast_crop
        and prep.laterality == "keep"
        and prep.pectoral == "keep"
        and prep.clahe_clip <= 0
        and prep.marks == "keep"
        and prep.appearance == "none"
    )


def _max_value(dtype: np.dtype) -> float:
    return _MAX_VALUE.get(np.dtype(dtype), 1.0)


def validated_image(image: np.ndarray) -> np.ndarray:
    """Accept grey/BGR/BGRA in uint8, uint16 or float in [0, 1]; refuse anything else plainly."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a numpy image array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"expected a grey (HxW) or BGR (HxWx3) image, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if image.dtype in (np.uint8, np.uint16):
        return image
    if image.dtype in (np.float32, np.float64):
        if not np.all(np.isfinite(image)):
            raise ValueError("image contains NaN or infinite values")
        low, high = float(image.min()), float(image.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"float images must hold intensities in [0, 1], got values in [{low:.4g}, {high:.4g}]"
            )
        return image.astype(np.float32, copy=False)
    raise ValueError(
        f"unsupported image dtype {image.dtype}; expected uint8, uint16 or float in [0, 1]"
    )
