"""B-mode breast ultrasound phantoms: layered tissue, speckle, and BI-RADS-shaped lesions.

Image formation follows the physics coarsely: an echogenicity map (skin, subcutaneous fat with
Cooper's ligaments, fibroglandular tissue, pectoral muscle, lesion) scales complex Gaussian
scatterers, a point-spread function (Gaussian envelope, cosine carrier axially) blurs them, the
envelope is log-compressed into a 35-45 dB display range. Speckle is therefore Rayleigh-like
and spatially correlated like the real thing.

Lesions follow BI-RADS descriptors. Benign: oval, circumscribed, parallel (wider than tall),
anechoic or hypoechoic, posterior enhancement. Malignant: irregular with spiculated or angular
margins, often taller than wide, heterogeneous, posterior shadowing. Each descriptor is drawn
with overlap between classes (a benign mass without enhancement, a malignant one without
shadowing, normal tissue with a fat lobule that looks like a small oval mass) so the classes are
learnable but not trivially separable.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgebc.data.records import CLASS_NAMES


@dataclass(frozen=True)
class LesionDescriptors:
    """The BI-RADS ultrasound lexicon terms a phantom lesion was drawn with."""

    shape: str  # oval | round | irregular
    margin: str  # circumscribed | indistinct | angular | microlobulated | spiculated
    orientation: str  # parallel | not parallel
    echo_pattern: str  # anechoic | hypoechoic | heterogeneous
    posterior: str  # enhancement | shadowing | none
    centre_x: float
    centre_y: float
    width: float
    height: float


@dataclass(frozen=True)
class UltrasoundPhantom:
    image: np.ndarray  # uint8 HxW
    mask: np.ndarray  # uint8 HxW, 1 inside the lesion
    label: str
    lesion: LesionDescriptors | None


def phantom_rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator per (seed, stream...) so item k does not depend on how many came before."""
    return np.random.default_rng([seed, *stream])


def phantom_stills(count: int, seed: int, size: int = 256) -> tuple[list[np.ndarray], list[str]]:
    """`count` labelled phantom frames cycling normal, benign, malignant, item k from its own
    generator (seed, k): the fixed sets benchmarks, calibration and tools draw on."""
    labels = [CLASS_NAMES[k % len(CLASS_NAMES)] for k in range(count)]
    frames = [
        make_ultrasound_phantom(label, phantom_rng(k, seed), size, size).image
        for k, label in enumerate(labels)
    ]
    return frames, labels


def make_ultrasound_phantom(
    label: str, rng: np.random.Generator, height: int = 256, width: int = 256
) -> UltrasoundPhantom:
    """One labelled phantom frame of `height` x `width` pixels."""
    if label not in CLASS_NAMES:
        raise ValueError(f"label must be one of {', '.join(CLASS_NAMES)}, got {label!r}")
    if height < 32 or width < 32:
        raise ValueError(f"phantoms need at least 32x32 pixels, got {height}x{width}")
    echo = tissue_echogenicity(rng, height, width)
    mask = np.zeros((height, width), np.uint8)
    lesion = None
    if label == "normal":
        if rng.random() < 0.5:
            _add_fat_lobule(echo, rng)
    else:
        lesion = _draw_lesion(label, rng, height, width)
        mask = _lesion_mask(lesion, rng, height, width, label)
        _paint_lesion(echo, mask, lesion, rng)
    image = form_image(echo, rng)
    return UltrasoundPhantom(image=image, mask=mask, label=label, lesion=lesion)


def tissue_echogenicity(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Mean backscatter per pixel of normal breast tissue, depth running down the rows."""
    x = np.arange(width, dtype=np.float32)
    depth = np.arange(height, dtype=np.float32)[:, None] / height

    def boundary(base: float, amplitude: float) -> np.ndarray:
        phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 2.0)
        wave = amplitude * np.sin(2 * np.pi * freq * x / width + phase)
        return (base + wave + smooth_noise(rng, (1, width), 0.2)[0] * amplitude)[None, :]

    skin = boundary(rng.uniform(0.03, 0.06), 0.005)
    fat = boundary(rng.uniform(0.15, 0.32), 0.04)
    gland = boundary(rng.uniform(0.55, 0.75), 0.05)
    muscle = boundary(rng.uniform(0.78, 0.9), 0.03)
    echo = np.full((height, width), 0.55, np.float32)
    echo = np.where(depth < gland, 0.6 + 0.25 * smooth_noise(rng, (height, width), 0.08), echo)
    echo = np.where(depth < fat, 0.12 + 0.04 * smooth_noise(rng, (height, width), 0.1), echo)
    echo = np.where(depth < skin, 1.0, echo)
    retro = (depth >= gland) & (depth < muscle)
    echo = np.where(retro, 0.15, echo)
    stripes = 0.35 + 0.2 * (np.sin(2 * np.pi * depth * rng.uniform(25, 40)) > 0.6)
    echo = np.where(depth >= muscle, stripes + 0.05 * smooth_noise(rng, (height, width), 0.1), echo)
    _add_ligaments(echo, rng, fat, gland)
    return np.clip(echo, 0.01, 1.0).astype(np.float32)


def form_image(echo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scatterers x sqrt(echogenicity), PSF, envelope, attenuation/TGC, log compression to uint8."""
    height, width = echo.shape
    scatter = rng.standard_normal((2, height, width)).astype(np.float32)
    # Speckle grain scales with the field of view: about 1% of the width laterally, half that axially.
    sigma_axial = max(0.6, height * rng.uniform(0.004, 0.006))
    sigma_lateral = max(1.0, width * rng.uniform(0.008, 0.012))
    psf = _psf(sigma_axial, sigma_lateral, rng.uniform(0.2, 0.35))
    amplitude = np.sqrt(echo)
    real = cv2.filter2D(scatter[0] * amplitude, -1, psf, borderType=cv2.BORDER_REFLECT)
    imag = cv2.filter2D(scatter[1] * amplitude, -1, psf, borderType=cv2.BORDER_REFLECT)
    envelope = np.sqrt(real * real + imag * imag)
    depth = np.arange(height, dtype=np.float32)[:, None] / height
    residual_tgc = np.exp(-rng.uniform(0.0, 0.8) * depth)  # imperfect time-gain compensation
    envelope *= residual_tgc
    # Display mapping as a scanner's gain and dynamic-range knobs set it: the median tissue
    # envelope lands at `gain` grey, and `dynamic_range` dB span the whole grey scale.
    dynamic_range = rng.uniform(35, 45)
    gain = rng.uniform(0.35, 0.5)
    decibels = 20 * np.log10(envelope / float(np.median(envelope)) + 1e-6)
    grey = gain + decibels / dynamic_range
    return np.clip(np.round(grey * 255.0), 0, 255).astype(np.uint8)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-ish noise smoothed over `scale` of the larger side (tissue texture)."""
    noise = rng.standard_normal(shape).astype(np.float32)
    sigma = max(0.5, scale * max(shape))
    smooth = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma, sigmaY=sigma if shape[0] > 1 else 0.01)
    std = float(smooth.std())
    return smooth / std if std > 0 else smooth


def _psf(sigma_axial: float, sigma_lateral: float, carrier: float) -> np.ndarray:
    half = int(np.ceil(3 * max(sigma_axial, sigma_lateral)))
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    kernel = np.exp(-0.5 * ((y / sigma_axial) ** 2 + (x / sigma_lateral) ** 2)) * np.cos(
        2 * np.pi * carrier * y
    )
    return (kernel / np.sqrt(np.sum(kernel**2))).astype(np.float32)


def _add_ligaments(
    echo: np.ndarray, rng: np.random.Generator, top: np.ndarray, bottom: np.ndarray
) -> None:
    """Cooper's ligaments: thin bright curves crossing the fat layer."""
    height, width = echo.shape
    canvas = np.zeros_like(echo)
    for _ in range(int(rng.integers(2, 6))):
        x0 = rng.uniform(0, width)
        points = []
        for t in np.linspace(0, 1, 12):
            y = (
                top[0, int(x0) % width] + t * (bottom[0, int(x0) % width] - top[0, int(x0) % width])
            ) * height
            points.append((x0 + rng.uniform(-0.25, 0.25) * width * t, y))
        cv2.polylines(canvas, [np.array(points, np.int32)], False, 1.0, thickness=1)
    canvas = cv2.GaussianBlur(canvas, (3, 3), 0)
    echo += 0.5 * canvas


def _add_fat_lobule(echo: np.ndarray, rng: np.random.Generator) -> None:
    """A hypoechoic oval fat lobule: normal tissue that mimics a small benign mass."""
    height, width = echo.shape
    mask = np.zeros_like(echo)
    centre = (int(rng.uniform(0.2, 0.8) * width), int(rng.uniform(0.15, 0.45) * height))
    axes = (int(rng.uniform(0.06, 0.14) * width), int(rng.uniform(0.03, 0.06) * height))
    cv2.ellipse(mask, centre, axes, rng.uniform(-10, 10), 0, 360, 1.0, thickness=-1)
    mask = cv2.GaussianBlur(mask, (0, 0), 2.0)
    echo[:] = echo * (1 - mask) + rng.uniform(0.1, 0.2) * mask


def _draw_lesion(
    label: str, rng: np.random.Generator, height: int, width: int
) -> LesionDescriptors:
    size = rng.uniform(0.12, 0.32) * min(height, width)
    if label == "benign":
        shape = "round" if rng.random() < 0.15 else "oval"
        ratio = rng.uniform(0.85, 1.0) if shape == "round" else rng.uniform(0.45, 0.8)
        if rng.random() < 0.1:
            ratio = rng.uniform(0.8, 1.05)
        margin = str(
            rng.choice(["circumscribed", "microlobulated", "indistinct"], p=[0.75, 0.15, 0.1])
        )
        echo_pattern = str(
            rng.choice(["anechoic", "hypoechoic", "heterogeneous"], p=[0.35, 0.55, 0.1])
        )
        posterior = str(rng.choice(["enhancement", "none", "shadowing"], p=[0.65, 0.3, 0.05]))
    else:
        shape = "irregular" if rng.random() < 0.85 else "round"
        ratio = rng.uniform(0.85, 1.5) if rng.random() < 0.6 else rng.uniform(0.55, 0.9)
        margin = str(
            rng.choice(
                ["spiculated", "angular", "indistinct", "microlobulated"], p=[0.4, 0.25, 0.25, 0.1]
            )
        )
        echo_pattern = str(rng.choice(["heterogeneous", "hypoechoic"], p=[0.7, 0.3]))
        posterior = str(rng.choice(["shadowing", "none", "enhancement"], p=[0.6, 0.3, 0.1]))
    lesion_w = size
    lesion_h = size * ratio
    orientation = "parallel" if lesion_w >= lesion_h else "not parallel"
    cx = rng.uniform(0.3, 0.7) * width
    cy = rng.uniform(0.38, 0.6) * height  # in the glandular layer, where most lesions arise
    return LesionDescriptors(
        shape,
        margin,
        orientation,
        echo_pattern,
        posterior,
        float(cx),
        float(cy),
        float(lesion_w),
        float(lesion_h),
    )


def _lesion_mask(
    lesion: LesionDescriptors, rng: np.random.Generator, height: int, width: int, label: str
) -> np.ndarray:
    """Inside of a radius function r(theta): an ellipse plus margin-specific perturbations."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = x - lesion.centre_x, y - lesion.centre_y
    theta = np.arctan2(dy, dx)
    a, b = lesion.width / 2, lesion.height / 2
    radius = (a * b) / np.sqrt((b * np.cos(theta)) ** 2 + (a * np.sin(theta)) ** 2)
    perturbation = np.zeros_like(theta)
    harmonics = {
        "circumscribed": (2, 0.03),
        "indistinct": (5, 0.06),
        "microlobulated": (8, 0.06),
        "angular": (5, 0.18),
        "spiculated": (6, 0.12),
    }
    count, amplitude = harmonics[lesion.margin]
    if lesion.shape == "irregular":
        amplitude += 0.08
    for k in range(2, 2 + count):
        perturbation += (
            rng.uniform(-amplitude, amplitude)
            / np.sqrt(k - 1)
            * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        )
    if lesion.margin == "microlobulated":
        perturbation += 0.05 * np.abs(np.sin(rng.integers(8, 14) * theta / 2))
    if lesion.margin == "angular":
        corners = rng.integers(4, 7)
        perturbation += 0.15 * (np.abs(((theta * corners / (2 * np.pi)) % 1.0) - 0.5) - 0.25)
    if lesion.margin == "spiculated":
        for _ in range(int(rng.integers(6, 14))):
            angle = rng.uniform(-np.pi, np.pi)
            width_rad = rng.uniform(0.03, 0.07)
            gap = np.angle(np.exp(1j * (theta - angle)))
            perturbation += rng.uniform(0.25, 0.6) * np.exp(-0.5 * (gap / width_rad) ** 2)
    inside = np.hypot(dx, dy) <= radius * (1.0 + perturbation)
    return inside.astype(np.uint8)


def _paint_lesion(
    echo: np.ndarray, mask: np.ndarray, lesion: LesionDescriptors, rng: np.random.Generator
) -> None:
    height, width = echo.shape
    level = {
        "anechoic": rng.uniform(0.002, 0.01),
        "hypoechoic": rng.uniform(0.02, 0.06),
        "heterogeneous": rng.uniform(0.02, 0.08),
    }[lesion.echo_pattern]
    interior = np.full_like(echo, level)
    if lesion.echo_pattern == "heterogeneous":
        interior *= np.exp(0.6 * smooth_noise(rng, (height, width), 0.02))
    soft = mask.astype(np.float32)
    blur = {
        "circumscribed": 0.8,
        "microlobulated": 1.0,
        "angular": 1.2,
        "indistinct": 3.5,
        "spiculated": 1.5,
    }[lesion.margin]
    soft = np.asarray(cv2.GaussianBlur(soft, (0, 0), blur), np.float32)
    if lesion.margin in ("indistinct", "spiculated") and rng.random() < 0.5:
        ring = cv2.GaussianBlur(soft, (0, 0), 4.0) - soft  # echogenic halo just outside the margin
        echo += 0.6 * np.clip(ring, 0, None) * 2
    echo[:] = echo * (1 - soft) + interior * soft
    # Posterior acoustic features: everything below the lesion, within its horizontal extent.
    columns = np.asarray(mask.any(axis=0), np.float32).reshape(1, -1)
    if not columns.any():
        return
    bottom = np.where(mask.any(axis=1))[0].max()
    profile = np.asarray(
        cv2.GaussianBlur(columns, (0, 0), sigmaX=max(1.0, lesion.width * 0.06), sigmaY=0.01)
    )[0]
    below = (np.arange(height)[:, None] > bottom).astype(np.float32)
    fade = np.exp(-np.clip(np.arange(height)[:, None] - bottom, 0, None) / (0.6 * height))
    strength = rng.uniform(0.4, 0.9)
    if lesion.posterior == "enhancement":
        echo *= 1 + strength * below * fade * profile
    elif lesion.posterior == "shadowing":
        echo *= 1 - 0.9 * strength * below * profile
    np.clip(echo, 0.005, 1.5, out=echo)
