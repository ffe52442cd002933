"""The on-device runtime is torch-free: at import time, on the paths a device runs (`edgebc bench`,
`edgebc model install|engine`, `edgebc calibrate`) with torch blocked, and in its source, lazily
or not."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgebc.demo import DEMO_MODEL

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / "edgebc"

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


# -- runtime paths, run with torch blocked ----------------------------------------------------------

# Runs `edgebc ARGS` in a fresh interpreter where importing torch, edgebc.train or edgebc.export
# raises, and records every attempt, so a path that tries one and catches the error still fails
# the test. `absent` names modules made missing as well (tensorrt, for the no-TensorRT message on
# any machine). The last stderr line is the JSON list of attempts.
BLOCKED_CLI = r"""
import importlib.abc, json, sys
BLOCKED = ("torch", "edgebc.train", "edgebc.export")
attempts = []

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            attempts.append(name)
            raise ImportError(f"{name} is blocked: the runtime must not import it")
        return None

sys.meta_path.insert(0, Blocker())
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None
from edgebc.cli import main
code = main(sys.argv[2:])
sys.stdout.flush()
print(json.dumps(attempts), file=sys.stderr)
sys.exit(code)
"""


def run_blocked(*args, absent=(), pythonpath=None, timeout=300):
    """(exit code, stdout, stderr, blocked import attempts) of `edgebc ARGS` with torch blocked."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_CLI, json.dumps(list(absent)), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    lines = result.stderr.strip().splitlines()
    assert lines, f"no output (exit {result.returncode}): {result.stdout}"
    return result.returncode, result.stdout, "\n".join(lines[:-1]), json.loads(lines[-1])


def test_edgebc_bench_times_a_given_model_with_torch_blocked():
    code, out, err, attempts = run_blocked("bench", "--quick", "--model", DEMO_MODEL)
    assert code == 0, err
    assert attempts == []
    timed = {  # (section, what) -> p50 ms of every row with numbers
        (cells[0], cells[2]): float(cells[4])
        for cells in (line.strip("| ").split(" | ") for line in out.splitlines())
        if len(cells) >= 10 and cells[1] in ("", "demo-phantom") and cells[4][:1].isdigit()
    }
    assert (
        timed[("model", "ort-cpu-fp32-t1")] > 0
        and timed[("stage", "crop_preprocess_1920x1080")] > 0
    )
    assert timed[("pipeline", "fp32_1920x1080")] > 0 and "of one core" in out
    assert not any(what.startswith(("torch", "naive")) for _, what in timed)  # the device's rows


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A model store with the demo model installed through the CLI, torch blocked."""
    root = tmp_path_factory.mktemp("store")
    code, out, err, attempts = run_blocked("model", "--store", root, "install", DEMO_MODEL)
    assert code == 0, err
    assert attempts == [] and "current: demo-phantom-" in out
    return root


def test_model_engine_without_tensorrt_names_its_install_command(store, tmp_path):
    code, _, err, attempts = run_blocked(
        "model", "--store", store, "engine", "--cache", tmp_path / "engines", absent=["tensorrt"]
    )
    assert code == 1 and attempts == []
    assert "tensorrt is needed for building TensorRT engines" in err
    assert "pip install 'edgebc[tensorrt]'" in err and "torch" not in err


def test_model_engine_reaches_the_tensorrt_build_without_torch(store, tmp_path):
    """With TensorRT present (here a stand-in whose API fails when first used), the command goes
    all the way to the engine build without touching torch or the export package."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "tensorrt.py").write_text(
        '__version__ = "10.0.0-stand-in"\n\n\n'
        "def __getattr__(name):\n"
        '    raise RuntimeError(f"stand-in TensorRT: the build used trt.{name}")\n'
    )
    code, _, err, attempts = run_blocked(
        "model", "--store", store, "engine", "--cache", tmp_path / "engines", pythonpath=fake
    )
    assert code == 1 and attempts == []
    assert "stand-in TensorRT: the build used trt.Logger" in err


def test_calibrate_writes_a_site_release_with_torch_blocked(tmp_path):
    from edgebc.data import read_manifest, write_manifest
    from edgebc.synth.dataset import SynthPlan, write_phantom_dataset

    samples = read_manifest(write_phantom_dataset(tmp_path / "ph", SynthPlan(12, 96, seed=5)))
    site = write_manifest([s.with_(patient_id=f"{s.label}-{k // 2}") for k, s in enumerate(samples)],
                          tmp_path / "site.csv")  # fmt: skip
    code, out, err, attempts = run_blocked("calibrate", DEMO_MODEL, "--data", site, "--out",
                                           tmp_path / "release", "--min-positives", "6")  # fmt: skip
    assert code == 0, err
    assert attempts == []
    assert "6 malignant patients" in out and (tmp_path / "release" / "card.json").is_file()


# -- the runtime's source ---------------------------------------------------------------------------

# Modules the runtime package must never import, lazily or not: the training and export sides
# (torch lives there) and PIL (only the notebook baseline of benchmarks/latency.py uses it).
FORBIDDEN = ("torch", "torchvision", "PIL", "edgebc.train", "edgebc.export")

# The CLI command modules whose subcommands are documented as needing an extra: their handlers
# import that side when they run (`edgebc train`/`eval` need [train], `edgebc export` [export]).
# Each may import its own side and nothing else on the list.
ALLOWED = {
    "commands/train.py": ("edgebc.train",),
    "commands/export.py": ("edgebc.export",),
    # `edgebc compare` scores through eval's code (edgebc.train.evaluate); .onnx rows need no torch
    "commands/compare.py": ("edgebc.train",),
}


def forbidden_imports(source: str, module: str, allowed: tuple[str, ...] = ()) -> list[str]:
    """'line: name' for every import of a FORBIDDEN module in `source` (the code of `module`),
    wherever it sits: top level, inside functions, relative, or by name through `require` or
    importlib (`require("torch", ...)`)."""
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Call) and node.args:
            function = node.func
            called = getattr(function, "id", None) or getattr(function, "attr", None)
            first = node.args[0]
            if (
                called in ("require", "import_module", "__import__")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                names = [first.value]
        for name in names:
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN) and not any(
                name == a or name.startswith(a + ".") for a in allowed
            ):
                found.append(f"{node.lineno}: {name}")
                break
    return found


def test_the_source_check_finds_every_kind_of_import():
    source = (
        "import os\n"
        "def a():\n    import torch.nn\n"
        "def b():\n    from edgebc.export.tensorrt import build_engine\n"
        "def c():\n    from ..train import loop\n"
        "def d():\n    torch = require('torch', 'x')\n"
        "def e():\n    return importlib.import_module('PIL.Image')\n"
        "from edgebc.preprocess import preprocess\n"
    )
    assert forbidden_imports(source, "edgebc.bench.run") == [
        "3: torch.nn",
        "5: edgebc.export.tensorrt",
        "7: edgebc.train",
        "9: torch",
        "11: PIL.Image",
    ]
    assert forbidden_imports("from edgebc.train import loop", "edgebc.commands.train", ("edgebc.train",)) == []  # fmt: skip
    assert forbidden_imports("import torch", "edgebc.commands.train", ("edgebc.train",)) == ["1: torch"]  # fmt: skip


def test_no_runtime_module_imports_torch_training_or_export_anywhere_in_its_source():
    for name in ALLOWED:  # the allow-list names files that exist, or it is stale
        assert (RUNTIME / name).is_file(), name
    sources = sorted(RUNTIME.rglob("*.py"))
    assert len(sources) > 50 and RUNTIME / "bench" / "run.py" in sources
    problems = []
    for path in sources:
        relative = path.relative_to(RUNTIME).as_posix()
        module = "edgebc." + relative.removesuffix(".py").replace("/", ".")
        found = forbidden_imports(
            path.read_text(encoding="utf-8"), module, ALLOWED.get(relative, ())
        )
        problems.extend(f"edgebc/{relative}:{line}" for line in found)
    assert problems == [], "the runtime imports the training/export side:\n" + "\n".join(problems)
