"""The smoke run's data on a fresh clone: phantoms and their split, made when the manifest is missing.

Only where the config asks for it (`data.phantoms`): a real dataset's missing manifest stays an
error, since data are never made up in its place. The same steps as the commands a user would
run (`edgebc synth`, then `edgebc data split --calibration 0.15`), so the result is the one they
would get.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgebc.data import write_manifest
from edgebc.data.split import SplitPlan, split_dataset
from edgebc.synth.dataset import write_phantom_dataset
from edgebc.train.config import DataConfig

log = logging.getLogger(__name__)


def ensure_phantom_manifest(data: DataConfig) -> bool:
    """Make `data.manifest` from `data.phantoms` when it is missing; True when it was made."""
    recipe = data.phantoms
    manifest = Path(data.manifest)
    if recipe is None or not data.manifest or manifest.exists():
        return False
    log.info("%s is missing: making %d phantoms per class (%d px) in %s and splitting them",
             manifest, recipe.n_per_class, recipe.size, recipe.folder)  # fmt: skip
    images = write_phantom_dataset(recipe.folder, recipe.plan())
    plan = SplitPlan(seed=recipe.seed, calibration=0.15)  # the operating point on its own side
    write_manifest(split_dataset(images, plan), manifest)
    return True
