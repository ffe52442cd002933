"""sha256 manifests for model artifacts: a device refuses a model whose bytes are not the ones exported.

The manifest is `MANIFEST.sha256` beside the artifacts, in `sha256sum` format
(`<hex>  <name>` per line) so `sha256sum -c MANIFEST.sha256` checks it too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from edgebc.atomic import atomic_write_text
from edgebc.errors import EdgebcError

MANIFEST_NAME = "MANIFEST.sha256"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | Path, files: Iterable[str | Path]) -> Path:
    """(Re)write the manifest in `folder` for `files` (paths inside it), keeping other entries."""
    folder = Path(folder)
    entries = read_manifest(folder) if (folder / MANIFEST_NAME).exists() else {}
    for file in files:
        path = Path(file)
        entries[path.name] = sha256_file(folder / path.name)
    text = "".join(f"{digest}  {name}\n" for name, digest in sorted(entries.items()))
    atomic_write_text(folder / MANIFEST_NAME, text)
    return folder / MANIFEST_NAME


def read_manifest(folder: str | Path) -> dict[str, str]:
    path = Path(folder) / MANIFEST_NAME
    entries = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise EdgebcError(f"{path}:{number}: malformed line {line!r}")
        entries[name.lstrip("*")] = digest
    return entries


def verify_artifact(path: str | Path) -> str | None:
    """Check `path` against the manifest beside it; returns its sha256, or None when no manifest lists it.

    A listed file whose hash differs is refused: it was altered, truncated or half-copied.
    """
    path = Path(path)
    if not path.is_file():
        raise EdgebcError(f"{path}: model file not found")
    manifest = path.parent / MANIFEST_NAME
    if not manifest.exists():
        return None
    expected = read_manifest(path.parent).get(path.name)
    if expected is None:
        return None
    actual = sha256_file(path)
    if actual != expected:
        raise EdgebcError(
            f"{path}: sha256 {actual[:16]}... does not match {manifest.name} ({expected[:16]}...); "
            "the file was altered or copied incompletely; refusing to load it"
        )
    return actual
