"""The deployment plan: which runtime and precision this machine runs a model with, by measurement.

Every available (runtime, model file, precision) candidate beside a model is run on a labelled
set: its outputs are compared with the FP32 reference, a reduced precision is judged by the one
accuracy budget (edgebc.precision_budget), the allowed ones are timed interleaved (batch 1, one
thread, round-robin so machine noise hits all alike), and the fastest is written beside the model
as `deployment-plan.json` with the whole table it was chosen from, covered by the folder's
MANIFEST.sha256. `edgebc serve` and `edgebc classify` run the planned candidate unless told not
to (`--no-plan`); a plan that is missing, altered, made for another model file or made on another
machine (CPU model or instruction-set features differ: the fastest runtime there is another
question) is reported and not followed: the model file runs as given.

Candidates come from `CANDIDATE_SOURCES`, one function per runtime: another runtime (OpenVINO
FP32/BF16/INT8) appends its own and is judged and timed by the same code.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.atomic import atomic_write_text
from edgebc.errors import EdgebcError
from edgebc.integrity import MANIFEST_NAME, read_manifest, sha256_file, write_manifest
from edgebc.model_card import ModelCard
from edgebc.optional import is_installed
from edgebc.precision_budget import PrecisionBudget, judge
from edgebc.release import int8_sibling

log = logging.getLogger(__name__)

PLAN_FILE = "deployment-plan.json"
MIN_SPEEDUP = 1.05  # what a reduced precision must gain over FP32 to replace it
#: Calls per second candidates are timed at: a cart classifies a live source's frames as they
#: come (30 fps), each after an idle gap, not back to back (interleaved_ms)
LIVE_PACE = 30.0
PLAN_VERSION = 2  # 2: every judged file pinned by sha256


@dataclass(frozen=True)
class Candidate:
    runtime: str  # as open_backend takes it
    precision: str  # fp32, bf16, fp16, int8
    model: str  # file name beside the reference model

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.precision} ({self.model})"


def onnxruntime_candidates(model: Path) -> list[Candidate]:
    """ONNX Runtime runs the FP32 file and, where the export wrote one, its INT8 QDQ sibling."""
    found = [Candidate("onnxruntime", "fp32", model.name)]
    int8 = int8_sibling(model)
    if int8.is_file():
        found.append(Candidate("onnxruntime", "int8", int8.name))
    return found


def openvino_candidates(model: Path) -> list[Candidate]:
    """OpenVINO (where installed) runs the FP32 file at FP32 and at BF16 (its hint set explicitly
    either way) and the INT8 QDQ sibling; one this CPU or file cannot take (no BF16 instructions,
    a QOperator INT8 file) is listed with OpenVINO's reason and never chosen."""
    if not is_installed("openvino"):
        return []
    found = [Candidate("openvino", "fp32", model.name), Candidate("openvino", "bf16", model.name)]
    int8 = int8_sibling(model)
    if int8.is_file():
        found.append(Candidate("openvino", "int8", int8.name))
    return found


# One function per runtime; the first candidate of the first is the FP32 reference.
CANDIDATE_SOURCES: list[Callable[[Path], list[Candidate]]] = [
    onnxruntime_candidates,
    openvino_candidates,
]


def available_candidates(model: Path) -> list[Candidate]:
    return [c for source in CANDIDATE_SOURCES for c in source(Path(model))]


def machine_identity() -> dict[str, Any]:
    """What makes a plan this machine's: the CPU model and the instruction-set features the
    runtimes' kernels pick from (VNNI, BF16, AMX, NEON dot product)."""
    from edgebc.sysinfo import cpu_description

    cpu = cpu_description()
    return {"cpu": cpu["model"], "features": sorted(cpu["features"])}


@dataclass
class DeploymentPlan:
    chosen: Candidate
    reference_sha256: str
    machine: dict[str, Any]
    table: list[dict[str, Any]]
    frames: int
    budget: dict[str, Any]
    timing: str
    made: str = ""
    version: int = PLAN_VERSION
    notes: list[str] = field(default_factory=list)
    pace_fps: float | None = None  # calls per second the candidates were timed at; 0: back to back

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str) + "\n"


Timer = Callable[[Sequence[Any], np.ndarray], list[float]]


def checked_pace(pace: float) -> float:
    """`pace` (frames per second to time candidates at) if it is 0 (back to back) or a live
    source's rate, 1 to 1000 fps; else an error saying so, before any work is done."""
    if not (pace == 0 or 1 <= pace <= 1000):  # NaN and infinity fail both
        raise EdgebcError(f"--plan-pace is a source's frames per second, 1 to 1000, or 0 for back "
                          f"to back; got {pace}")  # fmt: skip
    return float(pace)


def interleaved_ms(backends: Sequence[Any], frame: np.ndarray, runs: int = 200,
                   block: int = 10, pace: float = LIVE_PACE) -> list[float]:  # fmt: skip
    """Median batch-1 milliseconds of each backend on `frame`, as the cart runs one model: the
    benchmarks' interleaved timing (edgebc.bench.timing.time_interleaved), in blocks of `block`
    consecutive calls (the first of each untimed, it pays for the caches the other candidates
    used), the blocks round-robin in a rotating order, each call `1 / pace` s after the last as
    frames come from a live source (0: back to back). Alternating single calls timed every model
    with the others' cache (OpenVINO BF16 1.04 vs ONNX Runtime FP32 1.01 ms; back to back in
    blocks 0.70 vs 0.90); at 30 fps each call starts after 33 ms idle, and there the order turns
    (2.15 vs 1.61 ms, measured 2026-11-30, docs/EXPORT.md): the cart's pace is what is timed."""
    from edgebc.bench.timing import Variant, time_interleaved

    variants = {str(k): Variant(partial(b.run, frame)) for k, b in enumerate(backends)}
    timed = time_interleaved(variants, warmup=10, block=block, pace=pace,
                             iterations=max(1, runs // block) * max(1, block - 1))  # fmt: skip
    return [timed[str(k)]["p50_ms"] for k in range(len(backends))]


def make_plan(
    model: str | Path,
    inputs: np.ndarray,
    labels: np.ndarray,
    units: Sequence[str] | None = None,
    budget: PrecisionBudget | None = None,
    candidates: Sequence[Candidate] | None = None,
    timer: Timer = interleaved_ms,
    open_candidate: Callable[[Path, Candidate], Any] | None = None,
    min_speedup: float = MIN_SPEEDUP,
    pace: float | None = None,
) -> DeploymentPlan:
    """Measure every candidate for `model` on preprocessed `inputs` (N, C, H, W) with class
    indices `labels` of the card's task; the fastest within the budget is chosen, FP32 unless
    another is at least `min_speedup` times faster. A candidate that cannot open or run is a
    row saying why, never the end of the plan."""
    model, budget = Path(model), budget or PrecisionBudget()
    listed = list(candidates) if candidates is not None else available_candidates(model)
    if not listed or listed[0].precision != "fp32" or listed[0].model != model.name:
        raise EdgebcError(f"{model}: the first candidate must be the FP32 model itself")
    opener = open_candidate or _open
    backends: list[Any] = []
    table: list[dict[str, Any]] = []
    reference_logits = None
    card: ModelCard | None = None
    try:
        for candidate in listed:
            row: dict[str, Any] = {"runtime": candidate.runtime, "precision": candidate.precision,
                                   "model": candidate.model}  # fmt: skip
            try:
                backend = opener(model.parent / candidate.model, candidate)
            except (EdgebcError, ImportError, OSError, RuntimeError) as exc:
                if reference_logits is None:
                    raise
                table.append({**row, "allowed": False, "status": f"unavailable: {exc}"})
                continue
            try:
                logits = _run_all(backend, inputs)
                verdict = (None if reference_logits is None or card is None
                           else judge(reference_logits, logits, labels, card, units, budget))  # fmt: skip
            except Exception as exc:  # a runtime's own errors are its verdict
                backend.close()
                if reference_logits is None:
                    raise
                table.append({**row, "allowed": False, "status": f"failed: {exc}"})
                continue
            judged = model.parent / candidate.model  # pinned: the plan runs this file or none
            row["sha256"] = sha256_file(judged) if judged.is_file() else None
            if reference_logits is None:
                card, reference_logits = backend.card, logits
                row.update(allowed=True, status="reference", max_prob_diff=0.0)
            elif verdict is not None:
                row.update(allowed=verdict.allowed, binding=verdict.binding,
                           agreement=verdict.agreement, max_prob_diff=verdict.max_prob_diff,
                           status=verdict.summary(),
                           criteria={c.name: {"loss": c.loss, "bound": c.bound, "limit": c.limit,
                                              "passed": c.passed} for c in verdict.criteria})  # fmt: skip
            table.append(row)
            if row["allowed"]:
                backends.append(backend)
                row["_backend"] = len(backends) - 1
            else:
                backend.close()
        timed = [r for r in table if "_backend" in r]
        latencies = timer(backends, np.ascontiguousarray(inputs[:1]))
        for row in timed:
            row["p50_ms"] = latencies[row.pop("_backend")]
        fp32_ms = table[0]["p50_ms"]
        for row in timed:
            row["speedup_vs_fp32"] = fp32_ms / row["p50_ms"]
        # a reduced precision replaces FP32 only when clearly faster: a median a few per cent
        # lower is within a shared machine's noise, and FP32 is the exact answer
        faster = [r for r in timed[1:] if r["speedup_vs_fp32"] >= min_speedup]
        best = min(faster, key=lambda r: r["p50_ms"]) if faster else timed[0]
    finally:
        for backend in backends:
            backend.close()
    chosen = next(c for c in listed if (c.runtime, c.precision, c.model) ==
                  (best["runtime"], best["precision"], best["model"]))  # fmt: skip
    for row in table:
        row["chosen"] = row is best
    return DeploymentPlan(
        chosen=chosen, reference_sha256=sha256_file(model), machine=machine_identity(),
        table=table, frames=len(inputs), budget=asdict(budget), pace_fps=pace,
        timing=f"median of batch-1 runs, candidates interleaved in blocks ({getattr(timer, '__name__', 'timer')})",
        made=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )  # fmt: skip


@dataclass
class LabelledSet:
    inputs: np.ndarray  # preprocessed (N, C, H, W)
    labels: np.ndarray  # class indices of the card's task
    units: list[str]
    left_out: dict[str, int]  # labels outside the task, and "calibration" frames


def labelled_set(model: str | Path, source: str | Path, split: str | None = None,
                 limit: int = 0, seed: int = 0) -> LabelledSet:  # fmt: skip
    """Every labelled frame of `source` (a manifest or dataset folder; `split` of it, `limit` > 0
    a seeded sample) for judging `model`'s candidates, preprocessed by its card, with the frames
    an INT8 variant beside it was calibrated on left out (its card lists their sha256)."""
    from edgebc.data import read_dataset
    from edgebc.data.sample_image import sample_input
    from edgebc.localiser import lesion_crop_of
    from edgebc.release import card_for_model

    model = Path(model)
    card = card_for_model(model)
    if len(card.inputs) > 1:
        raise EdgebcError(f"{model}: a deployment plan covers one-image models; {card.name} "
                          f"has {len(card.inputs)} inputs")  # fmt: skip
    samples = [s for s in read_dataset(source) if split is None or s.split == split]
    calibrated = _calibration_hashes(model)
    left_out: dict[str, int] = {}
    if calibrated:
        kept = [s for s in samples if sha256_file(s.path)[:16] not in calibrated]
        left_out["calibration"] = len(samples) - len(kept)
        samples = kept
    keep, by_label = card.task.partition([s.label for s in samples], f"{source}")
    left_out.update(by_label)
    samples = [s for s, k in zip(samples, keep, strict=True) if k]
    if limit > 0:
        order = np.random.default_rng(seed).permutation(len(samples))[:limit]
        samples = [samples[i] for i in sorted(order)]
    if not samples:
        raise EdgebcError(f"{source}: no labelled frames of {card.task.name} left to plan with")
    crop = lesion_crop_of(card, model)  # a classifier trained on localiser crops: judged on crops
    inputs = np.stack([sample_input(s, card.preprocess, crop) for s in samples])
    labels = card.task.encode([s.label for s in samples])
    return LabelledSet(inputs, labels, [s.unit for s in samples], left_out)


def _calibration_hashes(model: Path) -> set[str]:
    from edgebc.model_card import read_card

    found: set[str] = set()
    for candidate in available_candidates(model):
        path = model.parent / candidate.model
        if candidate.precision == "int8" and path.is_file():
            found |= set((read_card(path).quantization or {}).get("calibration_sha256", []))
    return found


def write_plan(model: str | Path, plan: DeploymentPlan) -> Path:
    """Write the plan beside `model`, atomically, and into the folder's manifest when it has one
    (so an altered plan is refused like an altered model)."""
    folder = Path(model).parent
    path = folder / PLAN_FILE
    atomic_write_text(path, plan.to_json())
    if (folder / MANIFEST_NAME).exists():
        write_manifest(folder, [PLAN_FILE])
    return path


def planned_candidate(model: str | Path) -> tuple[Candidate | None, str]:
    """The candidate the plan beside `model` chose for this machine, or None and why the model
    file runs as given (no plan, an altered one, another model's, another machine's)."""
    model = Path(model)
    path = model.parent / PLAN_FILE
    as_given = f"running {model.name} as given (ONNX Runtime, its own precision)"
    if not path.exists():
        return None, f"no deployment plan beside {model.name}: {as_given}"
    try:
        manifest = model.parent / MANIFEST_NAME
        if manifest.exists():
            expected = read_manifest(model.parent).get(PLAN_FILE)
            if expected is None:
                return None, f"{path}: not listed in {MANIFEST_NAME}; ignoring it, {as_given}"
            if sha256_file(path) != expected:
                return None, (f"{path}: does not match {MANIFEST_NAME} (altered or half-written); "
                              f"ignoring it, {as_given}")  # fmt: skip
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != PLAN_VERSION:
            return None, (f"{path}: written by another edgebc (plan version {data.get('version')}, "
                          f"this one reads {PLAN_VERSION}); ignoring it, {as_given}; plan again "
                          f"with `edgebc model plan {model} --check DATA`")  # fmt: skip
        chosen = Candidate(**data["chosen"])
        reference, machine = data["reference_sha256"], data["machine"]
        pinned = next((row.get("sha256") for row in data["table"] if row.get("chosen")), None)
    except (OSError, ValueError, KeyError, TypeError, EdgebcError) as exc:
        return None, f"{path}: unreadable ({exc}); ignoring it, {as_given}"
    if reference != sha256_file(model):
        return None, f"{path}: made for another {model.name}; ignoring it, {as_given}"
    chosen_file = model.parent / chosen.model
    if pinned is not None and (not chosen_file.is_file() or sha256_file(chosen_file) != pinned):
        return None, (f"{path}: {chosen.model} is not the file the plan judged (its sha256 "
                      f"differs or it is gone); ignoring the plan, {as_given}")  # fmt: skip
    here = machine_identity()
    if machine != here:
        return None, (
            f"{path}: made on another machine ({machine.get('cpu')}, {', '.join(machine.get('features', []))}); "
            f"this one is {here['cpu']} ({', '.join(here['features'])}): not trusted, {as_given}; "
            f"plan here with `edgebc model plan {model} --check DATA`"
        )  # fmt: skip
    if data.get("pace_fps") is None:  # written before plans were timed at the source's pace
        return chosen, (f"deployment plan: {chosen.label} (timed back to back by an older edgebc; "
                        f"plan again to time it at a live source's pace: `edgebc model plan "
                        f"{model} --check DATA`)")  # fmt: skip
    return chosen, f"deployment plan: {chosen.label}"


def open_planned_backend(model: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                         threads: int = 0, warmup: int = 3, spin_wait: bool = True,
                         use_plan: bool = True) -> tuple[Any, str]:  # fmt: skip
    """The backend the plan beside `model` chose, or `model` itself (with the reason) when there
    is no plan to follow, or `use_plan` is False."""
    from edgebc.backends import open_backend

    model = Path(model)
    chosen, note = (None, f"deployment plan not used (told so): running {model.name}")
    if use_plan and model.suffix.lower() == ".onnx":
        chosen, note = planned_candidate(model)
    if chosen is not None:
        try:
            backend = open_backend(model.parent / chosen.model, providers, threads, warmup,
                                   spin_wait, runtime=chosen.runtime, precision=chosen.precision)  # fmt: skip
            return backend, note
        except (EdgebcError, ImportError, OSError) as exc:
            note = f"the planned {chosen.label} cannot be opened ({exc}); running {model.name}"
            log.warning("%s", note)
    elif use_plan and (model.parent / PLAN_FILE).exists():
        log.warning("%s", note)  # a plan that is there and not followed is worth a warning
    return open_backend(model, providers, threads, warmup, spin_wait), note


def render_table(plan: DeploymentPlan) -> str:
    """The table the plan chose from, for the CLI and docs."""
    lines = [
        f"{'':2}{'runtime':12} {'precision':9} {'model':24} {'p50 ms':>8} {'vs FP32':>8}  verdict"
    ]
    for row in plan.table:
        mark = "*" if row.get("chosen") else ""
        ms = f"{row['p50_ms']:.3f}" if "p50_ms" in row else "-"
        speed = f"{row['speedup_vs_fp32']:.2f}x" if "speedup_vs_fp32" in row else "-"
        lines.append(f"{mark:2}{row['runtime']:12} {row['precision']:9} {row['model']:24} "
                     f"{ms:>8} {speed:>8}  {row['status']}")  # fmt: skip
    lines.append(f"* chosen: {plan.chosen.label}; {plan.frames} labelled frames; {plan.timing}")
    return "\n".join(lines)


def _open(path: Path, candidate: Candidate) -> Any:
    from edgebc.backends import open_backend

    return open_backend(path, threads=1, warmup=1, runtime=candidate.runtime,
                        precision=candidate.precision)  # fmt: skip


def _run_all(backend: Any, inputs: np.ndarray, chunk: int = 32) -> np.ndarray:
    size = max(1, min(chunk, backend.card.max_batch))
    return np.concatenate([backend.run(np.ascontiguousarray(inputs[i : i + size]))
                           for i in range(0, len(inputs), size)])  # fmt: skip
