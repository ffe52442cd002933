"""A release folder: the model file, the card it is run by, and one manifest over both.

`edgebc calibrate` writes a release whose `card.json` carries a site's own temperature and
operating point beside the unchanged model file; the exported card stays embedded in the model.
Every runtime path reads a model's card through `card_for_model`: where `card.json` lies beside
the model, the MANIFEST.sha256 there must list and verify both files, and the card may differ
from the embedded one only in its calibration (`SITE_FIELDS`); anything else is refused, naming
the field, because a card that describes another model (its inputs, classes, preprocessing)
would turn pixels into wrong answers. Without `card.json` the embedded card is the card.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgebc.atomic import atomic_write_text, fsync_directory
from edgebc.errors import EdgebcError
from edgebc.integrity import MANIFEST_NAME, read_manifest, sha256_file, write_manifest
from edgebc.model_card import ModelCard, read_card

log = logging.getLogger(__name__)

CARD_FILE = "card.json"
MODEL_FILE = "model.onnx"
SITE_ENTRY = "site_calibration"  # the lineage entry a site calibration adds
# What a site card may change; lineage only by its site_calibration entry.
SITE_FIELDS = ("name", "temperature", "operating_point", "calibration", "lineage")


def site_card_path(model: str | Path) -> Path:
    return Path(model).parent / CARD_FILE


def int8_sibling(model: Path) -> Path:
    """Where `edgebc export --int8` writes `model`'s INT8 variant: `<name>.int8.onnx` beside it."""
    return model.with_name(f"{model.stem}.int8.onnx")


def card_for_model(model: str | Path, embedded: ModelCard | None = None) -> ModelCard:
    """The card `model` runs by: the release's verified `card.json` when there is one, else the
    card embedded in the file (`embedded`, when the caller has read it already)."""
    model = Path(model)
    embedded = embedded if embedded is not None else read_card(model)
    path = site_card_path(model)
    # the release's card is its classifier's: the localiser shipped beside a crop-trained model
    # runs by its own
    if not path.exists() or embedded.is_localiser:
        return embedded
    verify_release_card(model)
    site = read_site_card(path)
    check_site_card(site, embedded, path)
    log.debug("%s: runs by the release's card %s (%s)", model, path, site.name)
    return site


def read_site_card(path: Path) -> ModelCard:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EdgebcError(f"{path}: cannot read the release's card: {exc}") from exc
    return ModelCard.from_json(text, source=str(path))


def verify_release_card(model: Path) -> None:
    """`card.json` and the model beside it are both listed in MANIFEST.sha256 and match it."""
    folder, card = model.parent, site_card_path(model)
    if not (folder / MANIFEST_NAME).exists():
        raise EdgebcError(
            f"{card}: a release card needs a {MANIFEST_NAME} that lists it and {model.name}; there "
            f"is none, so nothing says this card belongs to this model (remove {CARD_FILE} to run "
            "the model by its embedded card)"
        )
    entries = read_manifest(folder)
    for path in (model, card):
        expected = entries.get(path.name)
        if expected is None:
            raise EdgebcError(
                f"{folder / MANIFEST_NAME} does not list {path.name}; a release card is used only "
                f"when the manifest lists both it and the model (remove {CARD_FILE} to run the "
                "model by its embedded card)"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise EdgebcError(
                f"{path}: sha256 {actual[:16]}... does not match {MANIFEST_NAME} "
                f"({expected[:16]}...); the file was altered or copied incompletely; refusing it"
            )


def check_site_card(site: ModelCard, embedded: ModelCard, source: str | Path = CARD_FILE) -> None:
    """Refuse a site card that differs from the model's own in anything but its calibration."""
    ours, theirs = site.to_dict(), embedded.to_dict()
    for key in sorted(set(ours) | set(theirs)):
        if key in SITE_FIELDS and key != "lineage":
            continue
        mine, model = ours.get(key), theirs.get(key)
        if key == "lineage":
            mine = {k: v for k, v in (mine or {}).items() if k != SITE_ENTRY}
            model = {k: v for k, v in (model or {}).items() if k != SITE_ENTRY}
        if _canonical(mine) != _canonical(model):  # as JSON: a NaN metric equals itself
            raise EdgebcError(
                f"{source}: field {key!r} differs from the card embedded in the model "
                f"({_short(mine)} vs {_short(model)}); a site card may change only "
                f"{', '.join(SITE_FIELDS[:-1])} and lineage.{SITE_ENTRY}: refusing it"
            )


def write_release(out: Path, model: Path, card: ModelCard) -> Path:
    """Write `out/` = model.onnx (a byte copy of `model`), card.json and MANIFEST.sha256 over
    both, all or nothing: built in a hidden sibling folder, checked (the runtime reads the card
    back through `card_for_model`), then renamed into place, so a crash leaves no half release.
    `out` must not exist yet (or be an empty folder)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EdgebcError(f"{out}: already exists; give a new folder for the release")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        building.chmod(0o755)  # mkdtemp makes 0700: a service user must read the release
        source_sha = sha256_file(model)
        _copy_synced(model, building / MODEL_FILE)
        atomic_write_text(building / CARD_FILE, json.dumps(card.to_dict(), indent=2) + "\n")
        files = [MODEL_FILE, CARD_FILE]
        from edgebc.localiser import shipped_localiser

        shipped = shipped_localiser(card, model)  # a crop-trained model travels with its localiser
        if shipped is not None:
            _copy_synced(shipped[1], building / shipped[0])
            files.append(shipped[0])
        write_manifest(building, files)
        if read_manifest(building)[MODEL_FILE] != source_sha:
            raise EdgebcError(f"{model}: the copy differs from the original (disk error?)")
        if card_for_model(building / MODEL_FILE).to_json() != card.to_json():  # read back
            raise EdgebcError(f"{building / CARD_FILE}: does not read back as written")
        if out.exists():
            out.rmdir()  # the empty folder the caller may have made
        os.rename(building, out)
        fsync_directory(out.parent)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return out


def _copy_synced(source: Path, target: Path) -> None:
    """`source` copied to `target` and on disk before the release's manifest is written."""
    with open(source, "rb") as reader, open(target, "wb") as writer:
        shutil.copyfileobj(reader, writer, 1 << 20)
        writer.flush()
        os.fsync(writer.fileno())


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value: Any) -> str:
    text = _canonical(value)
    return text if len(text) <= 80 else text[:77] + "..."
