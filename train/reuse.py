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

import logging
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from edgebc.errors import EdgebcError
from edgebc.train.config import TrainConfig, load_train_config

log = logging.getLogger(__name__)

#: The config sections that are the recipe (not where or how fast it ran).
RECIPE_SECTIONS = ("preprocess", "model", "optim", "augment", "patches")
#: data's fields that are the recipe; `task`, `classes` and `positive_class` are compared as the
#: task they resolve to, `sources` as a set of sites.
RECIPE_DATA_FIELDS = ("modality", "train_split", "val_split", "calibration_split", "fold",
                      "localiser", "localiser_margin")  # fmt: skip
#: Fields that name files: compared as the files they resolve to.
PATH_FIELDS = frozenset({"pretrained", "localiser", "distill_from"})


def refuse_other_recipe(
    run_dir: Path, recipe: TrainConfig, every_site: Sequence[str], resuming: bool = False
) -> None:
    """Raise EdgebcError, saying what differs, unless the run in `run_dir` is what `recipe` would
    train; `every_site`: the manifest's sites, which a run trained on no named sites trained on.
    `resuming`: the run is interrupted and would continue; it continues with its own config.yaml,
    so a field it does not record, where the recipe sets other than the code's default, counts
    against it (a finished run is only warned about such fields: it predates them)."""
    unrecorded: list[str] = []
    differences = recipe_differences(run_dir, recipe, every_site, unrecorded)
    if resuming:
        differences += unrecorded
    if not differences:
        differences = data_differences(run_dir, recipe)
    if differences:
        raise EdgebcError(
            f"{run_dir} holds a run of another recipe ({'; '.join(differences)}): its numbers "
            "would be reported as this recipe's. Move the folder away, or give the report "
            "another out_dir"
        )
    if unrecorded:
        log.warning("reusing %s, whose config.yaml predates what the recipe sets: %s",
                    run_dir, "; ".join(unrecorded))  # fmt: skip


def recipe_differences(
    run_dir: Path,
    recipe: TrainConfig,
    every_site: Sequence[str] = (),
    unrecorded: list[str] | None = None,
) -> list[str]:
    """What the run's config.yaml records other than `recipe`, one "key: run's, recipe's" each;
    empty when it is the recipe's run (see the module for what is compared). Fields the run does
    not record but the recipe sets other than the code's default go into `unrecorded`."""
    unrecorded = [] if unrecorded is None else unrecorded
    path = run_dir / "config.yaml"
    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        trained = load_train_config(path)
    except (OSError, ValueError, yaml.YAMLError) as exc:  # ConfigError is a ValueError
        return [f"its {path.name} cannot be read, so what it trained is unknown: {exc}"]
    found = _differences("", trained, recipe, recorded, unrecorded, (*RECIPE_SECTIONS, "seed"))
    data = recorded.get("data") or {}
    found += _differences("data.", trained.data, recipe.data, data, unrecorded, RECIPE_DATA_FIELDS)
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


def _differences(prefix: str, ran: Any, wanted: Any, recorded: Any, unrecorded: list[str],
                 names: Sequence[str] | None = None) -> list[str]:  # fmt: skip
    """The fields of two configs (or sections; `names`, else all) that differ, as "key: run's,
    recipe's", nested sections field by field; a field the run did not record (`recorded`, its
    YAML) is not compared, only noted in `unrecorded` where the recipe sets another value."""
    found: list[str] = []
    for name in names if names is not None else [f.name for f in fields(wanted)]:
        theirs, ours, key = getattr(ran, name), getattr(wanted, name), f"{prefix}{name}"
        if not isinstance(recorded, Mapping) or name not in recorded:
            if not _same(name, theirs, ours):
                unrecorded.append(f"{key}: not recorded by the run (the code's default now: "
                                  f"{theirs!r}), {ours!r} in the recipe")  # fmt: skip
        elif is_dataclass(theirs) and is_dataclass(ours) and isinstance(recorded[name], Mapping):
            found += _differences(f"{key}.", theirs, ours, recorded[name], unrecorded)
        elif not _same(name, theirs, ours):
            found.append(f"{key}: {theirs!r} in the run, {ours!r} in the recipe")
    return found


def _same(key: str, ran: Any, wanted: Any) -> bool:
    empty = lambda v: v is None or v == () or v == []  # noqa: E731  # "none" however spelled
    if ran == wanted or (empty(ran) and empty(wanted)):
        return True
    if key in PATH_FIELDS and ran and wanted:
        as_files = lambda v: [Path(p).resolve() for p in ([v] if isinstance(v, str) else v)]  # noqa: E731
        return bool(as_files(ran) == as_files(wanted))
    return isinstance(ran, Sequence) and isinstance(wanted, Sequence) and list(ran) == list(wanted)
