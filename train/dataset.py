"""Samples to tensors for training, through the runtime's own decode and preprocessing, unchanged.

Training must see exactly the tensor the cart computes for the same frame, so nothing here
resizes or normalises: frames are decoded by `edgebc.decode` and turned into tensors by
`edgebc.preprocess.preprocess_chw` with the model's card. Augmentation then acts on batches of
those tensors on the training device (see augment.py). Small medical datasets fit in memory as
preprocessed tensors (BUSI at 224x224 grey: 120 MB), so they are decoded once, not every epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from edgebc.data.records import Sample
from edgebc.decode import read_image
from edgebc.optional import require
from edgebc.preprocess import PreprocessCard, preprocess_chw

torch = require("torch", "training")


class SampleDataset(torch.utils.data.Dataset):
    """(tensor C x H x W float32, class index) for each sample, via the shared preprocessing."""

    def __init__(
        self, samples: Sequence[Sample], card: PreprocessCard, class_names: Sequence[str]
    ) -> None:
        unknown = sorted({s.label for s in samples} - set(class_names))
        if unknown:
            raise ValueError(
                f"samples carry labels {unknown} that are not among the classes {list(class_names)}"
            )
        self.samples = list(samples)
        self.card = card
        self.class_names = tuple(class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        tensor = torch.from_numpy(preprocess_chw(read_image(sample.path), self.card))
        return tensor, self.class_names.index(sample.label)

    def targets(self) -> np.ndarray:
        return np.array([self.class_names.index(s.label) for s in self.samples], np.int64)


def cache_tensors(
    dataset: SampleDataset, workers: int = 2, desc: str = "decode"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All of `dataset` as one (N, C, H, W) tensor and its (N,) targets, decoded in threads."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    images = torch.empty((len(dataset), *dataset.card.input_shape), dtype=torch.float32)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        loads = pool.map(lambda i: (i, dataset[i][0]), range(len(dataset)))
        for index, tensor in tqdm(
            loads, total=len(dataset), desc=desc, unit="img", disable=None, leave=False
        ):
            images[index] = tensor
    return images, torch.from_numpy(dataset.targets())
