"""A torch Dataset over edgebc samples that uses the runtime's own preprocessing, unchanged.

Training must see exactly the tensor the cart computes for the same frame, so this module does
no resizing or normalising of its own: it decodes with `edgebc.decode`, applies
`edgebc.preprocess.preprocess_chw` with the model's card, and only wraps the result in a tensor.
Augmentation (a later addition) acts on the decoded frame before that call, never after.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from edgebc.data.records import Sample
from edgebc.decode import read_image
from edgebc.optional import require
from edgebc.preprocess import PreprocessCard, preprocess_chw

torch = require("torch", "training")


class SampleDataset(torch.utils.data.Dataset):
    """(tensor C x H x W float32, class index) for each sample, via the shared preprocessing."""

    def __init__(
        self,
        samples: Sequence[Sample],
        card: PreprocessCard,
        class_names: Sequence[str],
        augment: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        unknown = sorted({s.label for s in samples} - set(class_names))
        if unknown:
            raise ValueError(
                f"samples carry labels {unknown} that are not among the classes {list(class_names)}"
            )
        self.samples = list(samples)
        self.card = card
        self.class_names = tuple(class_names)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        frame = read_image(sample.path)
        if self.augment is not None:
            frame = self.augment(frame)
        tensor = torch.from_numpy(preprocess_chw(frame, self.card))
        return tensor, self.class_names.index(sample.label)
