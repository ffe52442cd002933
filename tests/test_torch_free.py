"""The on-device runtime imports without torch: every runtime module, in a fresh interpreter."""

import json
import subprocess
import sys

SCRIPT = r"""
import importlib, json, pkgutil, sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import edgebc
names = [m.name for m in pkgutil.walk_packages(edgebc.__path__, "edgebc.")
         if not m.name.startswith(("edgebc.train", "edgebc.export"))]
for name in names:
    importlib.import_module(name)
from edgebc.cli import main
main(["info", "--json"])
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(json.dumps({"modules": names, "torch_loaded": [m for m in loaded if sys.modules[m] is not None]}))
"""


def test_every_runtime_module_imports_without_torch():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["torch_loaded"] == []
    # The walk really covered the runtime, not an empty list.
    for expected in (
        "edgebc.preprocess",
        "edgebc.decode",
        "edgebc.region",
        "edgebc.data.curation",
        "edgebc.synth.ultrasound",
        "edgebc.cli",
    ):
        assert expected in report["modules"]


def test_training_module_fails_with_install_command_when_torch_missing():
    script = 'import sys; sys.modules["torch"] = None\ntry:\n    import edgebc.train.dataset\nexcept ImportError as e:\n    print(e)'
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert "pip install 'edgebc[train]'" in result.stdout
