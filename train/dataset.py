"""Samples to tensors for training, through the runtime's own decode and preprocessing, unchanged.

Training must see exactly the tensor the cart computes for the same frame, so nothing here
resizes or normalises: frames are decoded by `edgebc.decode` and turned into tensors by
`edgebc.preprocess.preprocess_chw` with the model's preprocessing. Augmentation then acts on batches of
those tensors on the training device (see augment.py). Small medical datasets fit in memory as
preprocessed tensors (BUSI at 224x224 grey: 120 MB), so they are decoded once, not every epoch.
Lesion masks (for the auxiliary mask loss) take the same letterbox geometry as their image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgebc.data.records import Sample, load_mask
from edgebc.data.sample_image import sample_input
from edgebc.decode import read_header
from edgebc.optional import require
from edgebc.preprocess import PreprocessCard, resize_to_input
from edgebc.task import Task

torch = require("torch", "training")


class SampleDataset(torch.utils.data.Dataset):
    """(tensor C x H x W float32, class index) for each sample, via the shared preprocessing."""

    def __init__(
        self,
        samples: Sequence[Sample],
        prep: PreprocessCard,
        task: Task,
        crop: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """`crop`: each frame cut as the cart cuts it before the preprocessing (the lesion
        localiser's crop, edgebc.localiser.LesionCrop), None for whole frames."""
        unknown = sorted({s.label for s in samples if not task.takes(s.label)})
        if unknown:
            raise ValueError(
                f"samples carry labels {unknown} that task {task.name} does not take "
                f"({', '.join(task.labels)})"
            )
        self.samples = list(samples)
        self.prep = prep
        self.task = task
        self.crop = crop
        self._targets = task.encode(s.label for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        tensor = torch.from_numpy(sample_input(sample, self.prep, self.crop))
        return tensor, int(self._targets[index])

    def mask(self, index: int) -> torch.Tensor | None:
        """The sample's lesion mask on the model input's grid as (1, H, W), or None without one."""
        mask = lesion_mask_on_input(self.samples[index], self.prep)
        return None if mask is None else torch.from_numpy(mask)[None]

    def targets(self) -> np.ndarray:
        return self._targets.copy()


def cache_tensors(
    dataset: SampleDataset, workers: int = 2, desc: str = "decode"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All of `dataset` as one (N, C, H, W) tensor and its (N,) targets, decoded in threads."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    images = torch.empty((len(dataset), *dataset.prep.input_shape), dtype=torch.float32)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        loads = pool.map(lambda i: (i, dataset[i][0]), range(len(dataset)))
        for index, tensor in tqdm(
            loads, total=len(dataset), desc=desc, unit="img", disable=None, leave=False
        ):
            images[index] = tensor
    return images, torch.from_numpy(dataset.targets())


def lesion_mask_on_input(sample: Sample, prep: PreprocessCard) -> np.ndarray | None:
    """The sample's lesion mask as float32 coverage in [0, 1] on the model input's H x W grid
    (letterboxed like its image, bars empty), or None when the sample has no mask file."""
    mask = load_mask(sample)
    if mask is None:
        return None
    header = read_header(Path(sample.path).read_bytes(), str(sample.path))  # size, not pixels
    image_shape = (header.height, header.width)
    if mask.shape != image_shape:
        raise ValueError(
            f"{sample.masks[0]}: mask is {mask.shape[::-1]} but its image {sample.path} is "
            f"{image_shape[::-1]}"
        )
    resized = resize_to_input(mask * np.uint8(255), replace(prep, pad_value=0.0))
    return resized.astype(np.float32) / np.float32(255.0)


def cache_masks(
    dataset: SampleDataset, workers: int = 2, desc: str = "masks"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All lesion masks of `dataset` as (N, 1, H, W) and which samples have one, as (N,) bool.

    Samples without a mask file get an empty mask and False: a loss on masks must skip them, not
    read "no lesion" into a missing annotation.
    """
    height, width = dataset.prep.input_height, dataset.prep.input_width
    masks = torch.zeros((len(dataset), 1, height, width), dtype=torch.float32)
    present = torch.zeros(len(dataset), dtype=torch.bool)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        loads = pool.map(lambda i: (i, dataset.mask(i)), range(len(dataset)))
        for index, mask in tqdm(
            loads, total=len(dataset), desc=desc, unit="img", disable=None, leave=False
        ):
            if mask is not None:
                masks[index], present[index] = mask, True
    return masks, present
