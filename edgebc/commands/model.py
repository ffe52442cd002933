"""`edgebc model install|list|rollback|engine`: the models a device runs, changed atomically."""

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
    model.set_defaults(handler=run_model)


def run_model(args: argparse.Namespace) -> int:
    from edgebc.model_store import ModelStore, default_store

    store = ModelStore(args.store or default_store())
    if args.action == "install":
        release = store.install(args.source, progress=_say)
        print(f"current: {release.id} ({release.model})")
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
