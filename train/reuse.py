"""Is a run folder this recipe's run? Asked before a report reuses a finished run, or resumes an
interrupted one, as one of its arms.

Why: cross-site reports (and the remedies screen) reuse finished arms so they can be rerun
without retraining. A folder left by another recipe (the recommended architecture changed since;
another manifest, so other patients in each split) would otherwise be scored and reported as this
recipe's: numbers that look right and are not. What a run recorded is compared with what the
recipe would train now:

- its config.yaml, the recipe's parts (preprocessing, model, optimiser, augmentation, patches,
  seed; task, modality, splits, sites, localiser), not where it ran (threads, device, loader
  workers, name, folder). A field the run's config.yaml does not record (added to the code after
  the run) is not held against it: the run cannot say, and the code's new default is not what it
  ran with. Files are compared as the files they name, not as spellings of a path;
- its data: the data fingerprint in the checkpoint's card (file names, labels, splits, sizes of
  every training, validation and calibration frame) against the frames the recipe selects, which
  also covers a manifest given under another name or rewritten since.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from edgebc.errors import EdgebcError
from edgebc.train.config import TrainConfig, load_train_config

#: The config sections that are the recipe (not where or how fast it ran).
RECIPE_SECTIONS = ("preprocess", "model", "optim", "augment", "patches")
#: data's fields that are the recipe; `task`, `classes` and `positive_class` are compared as the
#: task they resolve to, `sources` as a set of sites.
RECIPE_DATA_FIELDS = ("modality", "train_split", "val_split", "calibration_split", "fold",
                      "localiser", "localiser_margin")  # fmt: skip
#: Fields that name files: compared as the files they resolve to.
PATH_FIELDS = frozenset({"pretrained", "localiser", "distill_from"})


def refuse_other_recipe(run_dir: Path, recipe: TrainConfig, every_site: Sequence[str]) -> None:
    """Raise EdgebcError, saying what differs, unless the run in `run_dir` (finished or
    interrupted) is what `recipe` would train; `every_site`: the manifest's sites, which a run
    trained on no named sites trained on."""
    differences = recipe_differences(run_dir, recipe, every_site)
    if not differences:
        differences = data_differences(run_dir, recipe)
    if differences:
        raise EdgebcError(
            f"{run_dir} holds a run of another recipe ({'; '.join(differences)}): its numbers "
            "would be reported as this recipe's. Move the folder away, or give the report "
            "another out_dir"
        )


def recipe_differences(
    run_dir: Path, recipe: TrainConfig, every_site: Sequence[str] = ()
) -> list[str]:
    """What the run's config.yaml records other than `recipe`, one "key: run's, recipe's" each;
    empty when it is the recipe's run (see the module for what is compared)."""
    path = run_dir / "config.yaml"
    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        trained = load_train_config(path)
    except (OSError, ValueError, yaml.YAMLError) as exc:  # ConfigError is a ValueError
        return [f"its {path.name} cannot be read, so what it trained is unknown: {exc}"]
    found: list[str] = []
    for section in RECIPE_SECTIONS:
        if section in recorded:
            found += _section_differences(
                section, getattr(trained, section), getattr(recipe, section), recorded[section],
                run_dir,
            )  # fmt: skip
    if "seed" in recorded and trained.seed != recipe.seed:
        found.append(f"seed: {trained.seed} in the run, {recipe.seed} in the recipe")
    data = recorded.get("data") or {}
    found += _section_differences("data", trained.data, recipe.data,
                                  {k: v for k, v in data.items() if k in RECIPE_DATA_FIELDS}, run_dir)  # fmt: skip
    ran_task, wanted_task = trained.data.resolved_task(), recipe.data.resolved_task()
    if ran_task != wanted_task:
        found.append(f"data.task: {ran_task.name} in the run, {wanted_task.name} in the recipe")
    ran_on, wanted_on = (sorted(set(c.data.sources or every_site)) for c in (trained, recipe))
    if ran_on != wanted_on:
        found.append(f"data.sources: {ran_on} in the run, {wanted_on} in the recipe")
    return found


def data_differences(run_dir: Path, recipe: TrainConfig) -> list[str]:
    """["data: ..."] when the run's checkpoint was trained on other frames than the recipe selects
    (its card's data fingerprint), else []."""
    from edgebc.train.checkpoint import data_fingerprint, load_checkpoint
    from edgebc.train.loop import select_samples

    saved = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    recorded = load_checkpoint(saved).card.data_fingerprint
    if not recorded:
        return []  # a checkpoint that records no fingerprint cannot be held to one
    frames = [s for role in ("train", "val", "calibration") for s in select_samples(recipe, role)]
    if data_fingerprint(frames) == recorded:
        return []
    return [f"data: trained on other frames than {recipe.data.manifest} gives this recipe "
            f"(data fingerprint {recorded[:12]} in {saved.name}, {data_fingerprint(frames)[:12]} "
            "now: another manifest, split or site)"]  # fmt: skip


def _section_differences(
    name: str, ran: Any, wanted: Any, recorded: Any, run_dir: Path
) -> list[str]:
    """A section's fields that differ, only those the run recorded (`recorded`, its YAML)."""
    if not (is_dataclass(ran) and is_dataclass(wanted)):
        same = ran == wanted or (not ran and not wanted)
        return [] if same else [f"{name}: {ran!r} in the run, {wanted!r} in the recipe"]
    theirs, ours = asdict(ran), asdict(wanted)  # type: ignore[arg-type]
    keys = [k for k in ours if isinstance(recorded, Mapping) and k in recorded]
    return [f"{name}: {key} {theirs[key]!r} in the run, {ours[key]!r} in the recipe"
            for key in keys if not _same(key, theirs[key], ours[key], run_dir)]  # fmt: skip


def _same(key: str, ran: Any, wanted: Any, run_dir: Path) -> bool:
    if ran == wanted:
        return True
    if key in PATH_FIELDS and ran and wanted:
        as_files = lambda v: [Path(p).resolve() for p in ([v] if isinstance(v, str) else v)]  # noqa: E731
        return bool(as_files(ran) == as_files(wanted))
    return isinstance(ran, Sequence) and isinstance(wanted, Sequence) and list(ran) == list(wanted)
