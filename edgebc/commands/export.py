"""`edgebc export`: checkpoint to the artifacts a device runs (the [export] extra)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgebc.commands import HelpFormatter


def register_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="checkpoint to ONNX with its model card; optional FP16, INT8 with evidence, TensorRT, Triton",
        description="Export a checkpoint to ONNX (card embedded, checked against PyTorch) and optionally "
        "FP16, INT8 (calibrated on real frames, parity report, accuracy budget, latency) , a TensorRT "
        "engine and a Triton repository. Writes export.json, export.md and MANIFEST.sha256.",
        formatter_class=HelpFormatter,
    )
    export.add_argument("checkpoint", type=Path, help="best.pt from a training run")
    export.add_argument("--out", type=Path, default=Path("export"), help="output folder")
    export.add_argument("--name", default="model", help="artifact base name")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset")
    export.add_argument(
        "--max-batch", type=int, default=64, help="largest batch the dynamic batch axis allows"
    )
    export.add_argument(
        "--exporter",
        choices=("dynamo", "torchscript"),
        default="dynamo",
        help="torch.onnx exporter",
    )
    export.add_argument(
        "--verify",
        dest="verify_data",
        default=None,
        help="frames (manifest/folder) added to the parity inputs",
    )
    export.add_argument(
        "--fp16", action="store_true", help="also write an FP16 model (float32 in/out) for GPUs"
    )
    export.add_argument(
        "--int8",
        action="store_true",
        help="also write a static INT8 model (needs --calibration and --check)",
    )
    export.add_argument(
        "--calibration", default=None, help="calibration frames: manifest, dataset folder or video"
    )
    export.add_argument(
        "--calibration-split",
        default="train",
        help="split of a manifest to calibrate on ('all' for every sample)",
    )
    export.add_argument(
        "--calibration-size", type=int, default=200, help="calibration frames to use"
    )
    export.add_argument(
        "--calibration-method",
        choices=("minmax", "entropy", "percentile"),
        default="minmax",
        help="calibration method",
    )
    export.add_argument(
        "--check",
        dest="check_data",
        default=None,
        help="labelled frames for the FP32 vs INT8 parity report and accuracy budget "
        "(the calibration frames are left out of it)",
    )
    export.add_argument(
        "--check-split",
        default="all",
        help="split of --check to use (default 'all': every labelled frame not used for calibration)",
    )
    export.add_argument(
        "--check-count",
        type=int,
        default=0,
        help="labelled frames to check with (0: every one; fewer frames, looser bounds)",
    )
    export.add_argument(
        "--no-int8-search",
        dest="int8_search",
        action="store_false",
        help="quantize QDQ per-channel only instead of timing every format and keeping the fastest within budget",
    )
    export.add_argument(
        "--tensorrt",
        choices=("fp16", "int8"),
        default=None,
        help="also build TensorRT engines (one per graph for a fusion model) on the target device",
    )
    export.add_argument(
        "--triton", action="store_true", help="also write a Triton model repository"
    )
    export.add_argument(
        "--plan",
        action="store_true",
        help="then measure every runtime x precision of the export on THIS machine with the "
        "--check set and write the fastest within the accuracy budget as its deployment plan "
        "(edgebc model plan does the same on the device)",
    )
    from edgebc.commands.model import add_plan_arguments

    add_plan_arguments(export, None)
    export.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from edgebc.export.bundle import ExportOptions, run_export

    def split(value):
        return None if value == "all" else value

    from edgebc.errors import EdgebcError

    # what --plan needs, checked before anything is exported
    if args.plan and not args.check_data:
        raise EdgebcError("--plan needs --check (a labelled set to judge each precision on)")
    if args.plan_pace is not None:
        if not args.plan:
            raise EdgebcError("--plan-pace times the deployment plan: give --plan too")
        from edgebc.deployment_plan import checked_pace

        checked_pace(args.plan_pace)
    options = ExportOptions(
        out_dir=args.out, name=args.name, opset=args.opset, max_batch=args.max_batch, exporter=args.exporter,
        verify_data=args.verify_data, fp16=args.fp16, int8=args.int8, calibration=args.calibration,
        calibration_size=args.calibration_size, calibration_split=split(args.calibration_split),
        calibration_method=args.calibration_method, check_data=args.check_data, check_split=split(args.check_split),
        check_count=args.check_count, int8_search=args.int8_search, tensorrt=args.tensorrt, triton=args.triton,
    )  # fmt: skip
    report = run_export(args.checkpoint, options)
    print((args.out / "export.md").read_text().rstrip())
    print(
        f"wrote {args.out} ({', '.join(k for k in ('onnx', 'fp16', 'int8', 'tensorrt', 'triton') if k in report)} + MANIFEST.sha256)"
    )
    if args.plan:
        from edgebc.commands.model import make_and_write_plan

        return make_and_write_plan(args.out / report["onnx"]["path"], args.check_data,
                                   split(args.check_split), args.check_count, args.plan_runs,
                                   args.plan_pace)  # fmt: skip
    return 0
