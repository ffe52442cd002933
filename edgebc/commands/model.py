"""`edgebc model install|list|rollback|engine|plan`: the models a device runs, changed atomically,
and the runtime and precision each runs with on this machine (its deployment plan)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgebc.commands import HelpFormatter


def register_model(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser(
        "model",
        help="install a model on this device, list installed models, roll back, build its engine",
        description="Models on a device live in a store (default /var/lib/edgebc/models, or "
        "$EDGEBC_MODEL_STORE): releases/<name>-<sha>/ folders and the symlinks `current` (what "
        "`edgebc serve` loads: <store>/current/model.onnx) and `previous`. An install verifies the "
        "model against the MANIFEST.sha256 beside it, copies it, runs a smoke inference, and only "
        "then switches `current` with one atomic rename: a kill or power cut at any moment leaves "
        "the old or the new model current, never a half-installed one. Restart the service to load it.",
        formatter_class=HelpFormatter,
    )
    model.add_argument("--store", type=Path, default=None,
                       help="model store (default $EDGEBC_MODEL_STORE or /var/lib/edgebc/models)")  # fmt: skip
    actions = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    install = actions.add_parser(
        "install",
        help="verify, copy, smoke-test and switch to an exported .onnx",
        formatter_class=HelpFormatter,
    )
    install.add_argument("source", type=Path, help="exported .onnx with MANIFEST.sha256 beside it")
    actions.add_parser(
        "list", help="installed releases, which is current and previous, and whether each verifies"
    )
    rollback = actions.add_parser(
        "rollback", help="make the previous (or a named) release current again"
    )
    rollback.add_argument("--to", default=None, help="release id from `edgebc model list`")
    engine = actions.add_parser(
        "engine",
        help="build (or reuse) the TensorRT engine of the current model on this GPU; prints its path",
        formatter_class=HelpFormatter,
    )
    engine.add_argument("--cache", type=Path, default=Path("/var/cache/edgebc/engines"),
                        help="writable folder for engines (they are specific to this GPU and TensorRT)")  # fmt: skip
    engine.add_argument("--precision", choices=("fp16", "int8"), default="fp16",
                        help="int8 needs the current model to be the QDQ export (edgebc export --int8)")  # fmt: skip
    engine.add_argument("--max-batch", type=int, default=8, help="largest batch the engine accepts")
    plan = actions.add_parser(
        "plan",
        help="measure every runtime x precision of a model on this machine; write the fastest "
        "within the accuracy budget as its deployment plan",
        description="Runs every available candidate (ONNX Runtime FP32, the INT8 file beside the "
        "model, and the other runtimes installed) on a labelled set, judges each reduced "
        "precision with the statistical accuracy budget against FP32, times the allowed ones "
        "interleaved and writes the fastest as deployment-plan.json beside the model (in its "
        "MANIFEST.sha256). `edgebc serve` and `edgebc classify` then run it on this machine.",
        formatter_class=HelpFormatter,
    )
    plan.add_argument("model", type=Path, nargs="?", default=None,
                      help="exported FP32 .onnx (default: the store's current model)")  # fmt: skip
    add_plan_arguments(plan, "--check")
    model.set_defaults(handler=run_model)


def add_plan_arguments(parser: argparse.ArgumentParser, check_flag: str | None) -> None:
    """The labelled set a plan is judged on (`edgebc model plan`; `edgebc export --plan` takes
    its --check set)."""
    if check_flag:
        parser.add_argument(check_flag, dest="check_data", required=True,
                            help="labelled frames (manifest or class folders): every one not "
                            "used for calibration judges each reduced precision")  # fmt: skip
        parser.add_argument("--check-split", default="all",
                            help="split of --check to use (default 'all')")  # fmt: skip
        parser.add_argument("--check-count", type=int, default=0,
                            help="labelled frames to use (0: every one)")  # fmt: skip
    parser.add_argument("--plan-runs", type=int, default=200,
                        help="interleaved batch-1 runs per candidate when timing")  # fmt: skip
    parser.add_argument("--plan-pace", type=float, default=None, metavar="FPS",
                        help="time each candidate's runs at this many a second, as a live "
                        "source's frames come (default 30; 0: back to back)")  # fmt: skip


def make_and_write_plan(model: Path, check: str, split: str | None, count: int, runs: int,
                        pace: float | None = None) -> int:  # fmt: skip
    """Plan `model` on this machine, write the plan beside it and print the table."""
    from functools import partial

    from edgebc.deployment_plan import LIVE_PACE, checked_pace

    pace = checked_pace(LIVE_PACE if pace is None else pace)

    from edgebc.deployment_plan import (
        interleaved_ms,
        labelled_set,
        make_plan,
        render_table,
        write_plan,
    )

    data = labelled_set(model, check, split, count)
    left = ", ".join(f"{n} {k}" for k, n in data.left_out.items() if n)
    print(f"planning {model} on {len(data.labels)} labelled frames"
          + (f" (left out: {left})" if left else ""), flush=True)  # fmt: skip
    timer = partial(interleaved_ms, runs=runs, pace=pace)
    timer.__name__ = f"{runs} runs each, " + (  # type: ignore[attr-defined]
        f"one every {1000.0 / pace:.1f} ms as at {pace:g} fps" if pace else "back to back"
    )
    plan = make_plan(model, data.inputs, data.labels, data.units, timer=timer, pace=pace)
    path = write_plan(model, plan)
    print(render_table(plan))
    print(f"wrote {path}")
    return 0


def run_model(args: argparse.Namespace) -> int:
    from edgebc.model_store import ModelStore, default_store

    store = ModelStore(args.store or default_store())
    if args.action == "install":
        release = store.install(args.source, progress=_say)
        print(f"current: {release.id} ({release.model})")
        if not (release.path / "deployment-plan.json").exists():
            print(f"choose its runtime and precision on this device: edgebc model plan "
                  f"{release.model} --check LABELLED_FRAMES")  # fmt: skip
        print("restart the service to load it: sudo systemctl restart edgebc")
        return 0
    if args.action == "rollback":
        release = store.rollback(args.to)
        print(
            f"current: {release.id}; restart the service to load it: sudo systemctl restart edgebc"
        )
        return 0
    if args.action == "engine":
        from edgebc.backends.tensorrt.cache import cached_engine
        from edgebc.errors import EdgebcError

        current = store.target("current")
        if current is None:
            raise EdgebcError(
                f"{store.root}: no current model; install one with `edgebc model install`"
            )
        path, built = cached_engine(store.releases / current / "model.onnx", args.cache,
                                    args.precision, args.max_batch)  # fmt: skip
        how = "built for this GPU" if built else "reused: sidecar matches this model, GPU, TensorRT"
        print(f"  {how}", file=sys.stderr)
        print(path)  # last on stdout, alone: scripts take it (deploy/jetson/entrypoint.sh)
        return 0
    if args.action == "plan":
        from edgebc.errors import EdgebcError

        model = args.model
        if model is None:
            current = store.target("current")
            if current is None:
                raise EdgebcError(f"{store.root}: no current model; give the model to plan")
            model = store.releases / current / "model.onnx"
        split = None if args.check_split == "all" else args.check_split
        return make_and_write_plan(model, args.check_data, split, args.check_count, args.plan_runs,
                                   args.plan_pace)  # fmt: skip
    releases = store.list()
    if not releases:
        print(f"{store.root}: no models installed")
        return 0
    print(f"{'':2} {'release':40} {'precision':9} {'input':10} {'threshold':9} installed")
    for r in releases:
        mark = "*" if r.current else ("<" if r.previous else "")
        shape = "x".join(map(str, r.info.get("input", [])))
        threshold = r.info.get("threshold")
        line = (f"{mark:2} {r.id:40} {r.info.get('precision', '?'):9} {shape:10} "
                f"{'-' if threshold is None else f'{threshold:.3f}':9} {r.info.get('installed', '?')}")  # fmt: skip
        print(line + (f"  UNUSABLE: {r.problem}" if r.problem else ""))
    print("* current, < previous")
    return 1 if any(r.problem and (r.current or r.previous) for r in releases) else 0


def _say(stage: str) -> None:
    if stage != "copying":
        print(f"  {stage}", flush=True)
