"""`edgebc info`: what this machine offers edgebc."""

from __future__ import annotations

import argparse
import json

from edgebc import __version__
from edgebc.commands import HelpFormatter


def register_info(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser(
        "info",
        help="versions, inference providers, GPU, CPU features and cameras on this machine",
        description="Report what this machine offers edgebc. Imports no torch, TensorRT or camera library.",
        formatter_class=HelpFormatter,
    )
    info.add_argument(
        "--json", action="store_true", help="print machine-readable JSON instead of text"
    )
    info.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    from edgebc import sysinfo

    facts = sysinfo.collect()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    cpu = facts["cpu"]
    print(
        f"edgebc {facts['packages']['edgebc'] or __version__} on Python {facts['python']} ({facts['platform']})"
    )
    print(
        f"CPU: {cpu['model']}, {cpu['logical_cores']} logical cores, features: {', '.join(cpu['features']) or 'none detected'}"
    )
    print("Packages:")
    for name, version in facts["packages"].items():
        print(f"  {name:24s} {version or '-'}")
    print(f"Area downscales: native kernel {facts['area_kernel']}")
    print(
        f"ONNX Runtime providers: {', '.join(facts['onnxruntime_providers']) or 'onnxruntime not installed'}"
    )
    print(f"GPUs: {'; '.join(facts['gpus']) or 'none found (nvidia-smi absent or no device)'}")
    if facts["jetson"]:
        print(f"Jetson: {facts['jetson']}")
    backends = ", ".join(k for k, v in facts["camera_backends"].items() if v) or "none"
    print(
        f"Video devices: {', '.join(facts['video_devices']) or 'none'}; camera backends: {backends}"
    )
    return 0
