"""Model updates on a device: install, list, rollback, and what a refusal or a kill leaves behind."""

import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from edgebc.backends import open_backend
from edgebc.cli import main
from edgebc.demo import DEMO_MODEL
from edgebc.errors import EdgebcError
from edgebc.integrity import verify_artifact, write_manifest
from edgebc.model_store import ModelStore

STAGES = ("verified", "copying", "copied", "smoke-tested", "released", "previous kept", "switched")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two different exported models, each in its own folder with its manifest (as exported)."""
    pytest.importorskip("torch", reason="exporting the second model needs the [train] extra")
    pytest.importorskip("onnx", reason="exporting needs the [export] extra")
    from edgebc.export.onnx_export import export_onnx
    from tests.helpers import make_checkpoint

    root = tmp_path_factory.mktemp("exports")
    a = root / "a"
    a.mkdir()
    shutil.copy(DEMO_MODEL, a / "demo.onnx")
    write_manifest(a, ["demo.onnx"])
    b = root / "b"
    b.mkdir()
    model_b, _, _ = export_onnx(make_checkpoint(b / "c.pt", seed=3), b / "second.onnx")
    write_manifest(b, [model_b])
    c = root / "c"
    c.mkdir()
    model_c, _, _ = export_onnx(make_checkpoint(c / "c.pt", seed=4), c / "third.onnx")
    write_manifest(c, [model_c])
    Exports = namedtuple("Exports", "a b c")
    return Exports(a / "demo.onnx", model_b, model_c)


def _ids(store):
    return store.target("current"), store.target("previous")


def test_install_switch_list_rollback_and_prune(exports, tmp_path, capsys, monkeypatch):
    store = ModelStore(tmp_path / "store")
    first = store.install(exports.a)
    assert _ids(store) == (first.id, None) and first.id.startswith("demo-phantom-")
    assert first.info["smoke_test"]["probabilities"]["malignant"] > 0
    # what `edgebc serve` loads: the stable path, verified against the release's own manifest
    served = store.root / "current" / "model.onnx"
    assert verify_artifact(served) == first.info["sha256"] and open_backend(served).card.name
    assert first.path.stat().st_mode & 0o777 == 0o755  # the unprivileged service user reads it
    second = store.install(exports.b)
    assert _ids(store) == (second.id, first.id)
    assert store.install(exports.b).id == second.id and _ids(store) == (second.id, first.id)

    assert main(["model", "--store", str(store.root), "list"]) == 0
    listing = capsys.readouterr().out
    assert f"*  {second.id}" in listing and f"<  {first.id}" in listing

    assert store.rollback().id == first.id and _ids(store) == (first.id, second.id)
    assert store.rollback(to=second.id).id == second.id
    with pytest.raises(EdgebcError, match="already the current model"):
        store.rollback(to=second.id)
    with pytest.raises(EdgebcError, match="no installed release 'nope'"):
        store.rollback(to="nope")

    import edgebc.model_store

    monkeypatch.setattr(edgebc.model_store, "KEEP_RELEASES", 2)
    third = store.install(exports.c)  # the oldest that is neither current nor previous goes
    assert _ids(store) == (third.id, second.id)
    assert [r.id for r in store.list()] == [second.id, third.id]
    assert store.install(exports.a).id != third.id  # reinstalled: a release again


def test_refusals_change_nothing(exports, tmp_path, monkeypatch):
    store = ModelStore(tmp_path / "store")
    installed = store.install(exports.a)
    before = sorted(p.name for p in (store.root / "releases").iterdir())

    bare = tmp_path / "bare" / "m.onnx"
    bare.parent.mkdir()
    shutil.copy(exports.b, bare)
    with pytest.raises(EdgebcError, match=r"no MANIFEST.sha256 beside it lists this file"):
        store.install(bare)
    tampered = tmp_path / "tampered"
    shutil.copytree(exports.b.parent, tampered)
    with open(tampered / exports.b.name, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(EdgebcError, match=r"does not match MANIFEST.sha256"):
        store.install(tampered / exports.b.name)
    with pytest.raises(EdgebcError, match=r"install an exported .onnx"):
        store.install(exports.b.with_suffix(".pt"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "m.onnx").write_bytes(b"not a model")
    write_manifest(broken, ["m.onnx"])  # bytes match their manifest, but it is no model
    with pytest.raises(EdgebcError):
        store.install(broken / "m.onnx")
    full = namedtuple("usage", "total used free")(10 << 30, 10 << 30, 1 << 20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    with pytest.raises(EdgebcError, match=r"not enough space .* nothing was changed"):
        store.install(exports.b)

    assert _ids(store) == (installed.id, None)
    assert sorted(p.name for p in (store.root / "releases").iterdir()) == before
    assert not list(store.root.glob(".incoming-*")) and not list(store.root.glob(".link-*"))


def test_a_damaged_current_release_is_reported_and_never_rolled_back_to(exports, tmp_path, capsys):
    store = ModelStore(tmp_path / "store")
    first = store.install(exports.a)
    second = store.install(exports.b)
    with open(first.model, "r+b") as handle:  # bit rot on the SD card
        handle.seek(100)
        handle.write(b"\xff\xff")
    assert main(["model", "--store", str(store.root), "list"]) == 1
    assert "UNUSABLE" in capsys.readouterr().out
    with pytest.raises(EdgebcError, match=r"cannot be used: .*sha256"):
        store.rollback()
    assert _ids(store) == (second.id, first.id)


@pytest.mark.parametrize("stage", STAGES)
def test_a_kill_at_any_stage_leaves_a_complete_current_model(exports, tmp_path, stage):
    """SIGKILL the installer at each stage: `current` is the old or the new release, complete
    and verified; the next install finishes and clears what the killed one left."""
    store = ModelStore(tmp_path / "store")
    old = store.install(exports.a)
    script = (
        "import os, signal, sys\n"
        "from edgebc.model_store import ModelStore\n"
        "def hook(stage):\n"
        "    if stage == sys.argv[3]:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "ModelStore(sys.argv[1]).install(sys.argv[2], progress=hook)\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", script, str(store.root), str(exports.b), stage],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    current = store.target("current")
    expected_new = stage == "switched"
    assert (current != old.id) is expected_new
    served = store.root / "current" / "model.onnx"
    assert verify_artifact(served) is not None and open_backend(served).card.name
    assert all(r.problem is None for r in store.list())  # nothing half-made looks like a release

    new = store.install(exports.b)
    assert store.target("current") == new.id != old.id
    assert not list(store.root.glob(".incoming-*")) and not list(store.root.glob(".link-*"))


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_is_built_once_then_reused(exports, tmp_path):
    from edgebc.backends.tensorrt import cached_engine

    store = ModelStore(tmp_path / "store")
    release = store.install(exports.a)
    engine, built = cached_engine(release.model, tmp_path / "engines")
    assert built and engine.is_file()
    again, built_again = cached_engine(release.model, tmp_path / "engines")
    assert again == engine and not built_again
    assert open_backend(engine).card.name == release.info["name"]
