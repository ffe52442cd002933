"""Models on a device: install a release atomically, prove it runs, switch, and keep the last one.

A store (default /var/lib/edgebc/models, or $EDGEBC_MODEL_STORE) holds:

    releases/<name>-<sha12>/  one folder per installed model: model.onnx, MANIFEST.sha256, release.json,
                              card.json for a site-calibrated release (<name>-<sha12>-<card sha8>),
                              model.int8.onnx where the export wrote one (listed in its manifest),
                              and deployment-plan.json once `edgebc model plan` measured this device
    current  -> releases/...  what `edgebc serve` loads (config: model: <store>/current/model.onnx)
    previous -> releases/...  what `edgebc model rollback` returns to
    .incoming-*/              an install in progress; never loaded, removed by the next install

Why this shape: `current` is a symlink replaced with rename(2), which is atomic, so whatever moment
the power fails or the installer is killed, `current` names a complete release whose bytes were
checked against the exporter's manifest and which already produced probabilities from a phantom
frame on this device. Nothing half-copied can become current. A running `edgebc serve` keeps the
model it loaded; restart it to use the new one (`systemctl restart edgebc`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.atomic import atomic_write_text, fsync_directory
from edgebc.calibration import bound_statement
from edgebc.errors import EdgebcError
from edgebc.integrity import (
    MANIFEST_NAME,
    read_manifest,
    sha256_file,
    verify_artifact,
    write_manifest,
)
from edgebc.localiser import shipped_localiser
from edgebc.release import (
    CARD_FILE,
    card_for_model,
    int8_sibling,
    site_card_path,
    verify_release_card,
)

DEFAULT_STORE = Path("/var/lib/edgebc/models")
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # the export's INT8 variant, installed beside it when listed
RELEASE_FILE = "release.json"
KEEP_RELEASES = 3
COPY_CHUNK = 1 << 20
Progress = Callable[[str], object]


def default_store() -> Path:
    return Path(os.environ.get("EDGEBC_MODEL_STORE", DEFAULT_STORE))


@dataclass(frozen=True)
class Release:
    id: str
    path: Path
    info: dict[str, Any]
    current: bool
    previous: bool
    problem: str | None  # why it cannot be used (hash mismatch, missing file), or None

    @property
    def model(self) -> Path:
        return self.path / MODEL_FILE


class ModelStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.releases = self.root / "releases"

    # -- reading ---------------------------------------------------------------------------------

    def target(self, link: str) -> str | None:
        """The release id a pointer (`current`, `previous`) names, or None when it is unset."""
        path = self.root / link
        if not path.is_symlink():
            return None
        return Path(os.readlink(path)).name

    def list(self, verify: bool = True) -> list[Release]:
        """Every installed release, oldest first, each checked against its manifest (hashing
        every model file; `verify=False` where only the order and pointers matter)."""
        if not self.releases.is_dir():
            return []
        folders = [folder for folder in self.releases.iterdir() if folder.is_dir()]
        out = [self._describe(folder, verify) for folder in folders]
        return sorted(out, key=lambda r: (str(r.info.get("installed", "")), r.id))

    # -- changing --------------------------------------------------------------------------------

    def install(self, source: str | Path, progress: Progress = lambda stage: None) -> Release:
        """Verify `source` (an exported .onnx listed in the MANIFEST.sha256 beside it, with the
        release's card.json where `edgebc calibrate` wrote one), copy it in, smoke-test it, then
        make it current and the old current previous. Returns the release."""
        source = Path(source)
        if source.suffix.lower() != ".onnx":
            raise EdgebcError(
                f"{source}: install an exported .onnx model (TensorRT engines are built on the "
                "device from it: `edgebc model engine`)"
            )
        sha = verify_artifact(source)
        if sha is None:
            raise EdgebcError(
                f"{source}: no {MANIFEST_NAME} beside it lists this file, so its bytes cannot be "
                "checked; install the folder `edgebc export` wrote, manifest included"
            )
        card = card_for_model(source)  # a site card.json is verified and checked here
        if len(card.inputs) > 1:  # its release would need every graph of the export, not one file
            raise EdgebcError(
                f"{source}: model {card.name} has {len(card.inputs)} inputs (a fusion or "
                "multi-view model); the model store installs one-image models: run it from the "
                "folder `edgebc export` wrote"
            )
        site_card = site_card_path(source) if site_card_path(source).exists() else None
        progress("verified")
        release_id = f"{_safe(card.name)}-{sha[:12]}"
        if site_card is not None:  # the same model file with another site's card is another release
            release_id += f"-{sha256_file(site_card)[:8]}"
        self._prepare()
        final = self.releases / release_id
        if final.is_dir() and _problem(final) is None:
            progress("already installed")
        else:
            if final.exists():  # an earlier copy that no longer verifies: replace it
                shutil.rmtree(final)
            self._check_space(source.stat().st_size)
            incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
            incoming.chmod(0o755)  # mkdtemp makes it 0700: the service user must read the release
            try:
                _copy_synced(source, incoming / MODEL_FILE, progress)
                files = [MODEL_FILE]
                wanted = {MODEL_FILE: sha}
                int8 = int8_sibling(source)
                int8_sha = verify_artifact(int8) if int8.is_file() else None
                if int8_sha is not None:  # a candidate for the device's deployment plan
                    _copy_synced(int8, incoming / INT8_FILE, progress)
                    files.append(INT8_FILE)
                    wanted[INT8_FILE] = int8_sha
                shipped = shipped_localiser(card, source)  # it classifies the localiser's crops
                if shipped is not None:
                    name, localiser = shipped
                    _copy_synced(localiser, incoming / name, progress)
                    files.append(name)
                    wanted[name] = sha256_file(localiser)
                if site_card is not None:
                    _copy_synced(site_card, incoming / CARD_FILE, progress)
                    files.append(CARD_FILE)
                    wanted[CARD_FILE] = read_manifest(source.parent)[CARD_FILE]
                write_manifest(incoming, files)
                if read_manifest(incoming) != wanted:
                    raise EdgebcError(f"{source}: the copy differs from the original (disk error?)")
                progress("copied")
                smoke = smoke_test(incoming / MODEL_FILE)
                progress("smoke-tested")
                info = {"id": release_id, "source": str(source.resolve()), "sha256": sha,
                        "name": card.name, "arch": card.arch, "precision": card.precision,
                        "input": list(card.input_shape), "classes": list(card.class_names),
                        "threshold": card.threshold, "exported": card.exported,
                        "site_calibration": card.lineage.get("site_calibration") is not None,
                        "sensitivity_bound": bound_statement(card),
                        "installed": _now(), "smoke_test": smoke}  # fmt: skip
                atomic_write_text(incoming / RELEASE_FILE, json.dumps(info, indent=2) + "\n")
                os.rename(incoming, final)
                fsync_directory(self.releases)
            except BaseException:
                shutil.rmtree(incoming, ignore_errors=True)
                raise
            progress("released")
        old = self.target("current")
        if old != release_id:
            if old is not None:
                self._point("previous", old)
                progress("previous kept")
            self._point("current", release_id)
        progress("switched")
        self._prune()
        return self._release(release_id)

    def rollback(self, to: str | None = None) -> Release:
        """Make `to` (default: `previous`) current again, after checking its bytes."""
        current = self.target("current")
        wanted = to or self.target("previous")
        if wanted is None:
            raise EdgebcError(
                f"{self.root}: no previous model to roll back to (see `edgebc model list`)"
            )
        if wanted == current:
            raise EdgebcError(
                f"{wanted} is already the current model; name another with --to (see `edgebc model list`)"
            )
        folder = self.releases / wanted
        if not folder.is_dir():
            known = ", ".join(r.id for r in self.list()) or "none"
            raise EdgebcError(
                f"no installed release {wanted!r} in {self.root} (installed: {known})"
            )
        problem = _problem(folder)
        if problem:
            raise EdgebcError(f"{wanted} cannot be used: {problem}; the current model is unchanged")
        # current first: after this rename the rollback has happened, whatever follows
        self._point("current", wanted)
        if current is not None:
            self._point("previous", current)
        return self._release(wanted)

    # -- internals -------------------------------------------------------------------------------

    def _prepare(self) -> None:
        self.releases.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".incoming-*"):  # left by an install that was killed
            shutil.rmtree(stale, ignore_errors=True)
        for stale in self.root.glob(".link-*"):
            stale.unlink(missing_ok=True)

    def _check_space(self, size: int) -> None:
        free = shutil.disk_usage(self.root).free
        needed = size + (16 << 20)  # the model, its manifest and metadata, and a margin
        if free < needed:
            raise EdgebcError(
                f"not enough space in {self.root}: {free / 2**20:.0f} MB free, {needed / 2**20:.0f} MB "
                "needed; nothing was changed (remove old releases or free space)"
            )

    def _point(self, link: str, release_id: str) -> None:
        temporary = self.root / f".link-{link}-{os.getpid()}"
        temporary.unlink(missing_ok=True)
        os.symlink(Path("releases") / release_id, temporary)
        os.replace(temporary, self.root / link)
        fsync_directory(self.root)

    def _prune(self) -> None:
        """Delete the oldest releases beyond KEEP_RELEASES, never current or previous."""
        releases = self.list(verify=False)
        keep = KEEP_RELEASES
        removable = [r for r in releases if not (r.current or r.previous)]
        for release in removable[: max(0, len(releases) - keep)]:
            shutil.rmtree(release.path, ignore_errors=True)

    def _release(self, release_id: str) -> Release:
        return self._describe(self.releases / release_id, verify=True)

    def _describe(self, folder: Path, verify: bool) -> Release:
        return Release(folder.name, folder, _read_info(folder), folder.name == self.target("current"),
                       folder.name == self.target("previous"), _problem(folder) if verify else None)  # fmt: skip


def smoke_test(model: Path) -> dict[str, Any]:
    """Load `model` with the runtime and classify a synthetic phantom: the probabilities must be
    finite and sum to one. Proves the file, the card and the runtime agree on this device."""
    from edgebc.backends import open_backend
    from edgebc.metrics import softmax
    from edgebc.preprocess import preprocess
    from edgebc.synth import make_ultrasound_phantom
    from edgebc.synth.ultrasound import phantom_rng

    try:
        backend = open_backend(model, threads=1, warmup=1)
        card = backend.card
        frame = make_ultrasound_phantom("malignant", phantom_rng(0, 0), 256, 256).image
        try:
            logits = backend.run(preprocess(frame, card.preprocess))
        finally:
            backend.close()
    except Exception as exc:
        raise EdgebcError(f"{model}: the smoke inference failed: {exc}") from exc
    probabilities = softmax(logits, card.temperature)[0]
    if logits.shape != (1, len(card.class_names)) or not np.all(np.isfinite(probabilities)):
        raise EdgebcError(f"{model}: the smoke inference gave no usable probabilities ({logits!r})")
    return {
        "backend": backend.name,
        "probabilities": dict(zip(card.class_names, map(float, probabilities), strict=True)),
    }


def _problem(folder: Path) -> str | None:
    model = folder / MODEL_FILE
    if not model.is_file():
        return f"{MODEL_FILE} is missing"
    try:
        if verify_artifact(model) is None:
            return f"{MANIFEST_NAME} is missing or does not list {MODEL_FILE}"
        if (folder / CARD_FILE).exists():
            verify_release_card(model)
        shipped = shipped_localiser(card_for_model(model), model)  # refuses a missing or other one
        if shipped is not None and verify_artifact(shipped[1]) is None:
            return (
                f"{MANIFEST_NAME} does not list {shipped[0]}, the localiser the model runs behind"
            )
    except EdgebcError as exc:
        return str(exc)
    return None


def _read_info(folder: Path) -> dict[str, Any]:
    try:
        info = json.loads((folder / RELEASE_FILE).read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _copy_synced(source: Path, target: Path, progress: Progress) -> None:
    """Copy in chunks and fsync, so a release on disk is as complete as its manifest says."""
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(COPY_CHUNK):
            writer.write(chunk)
            progress("copying")
        writer.flush()
        os.fsync(writer.fileno())


def _safe(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.")
    return cleaned or "model"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
