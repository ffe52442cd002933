"""The subcommands of `edgebc`, one module per group; each adds its parser with `register_*`.

Handlers import what they need when they run, so `edgebc --help` and the torch-free commands
never load torch, onnx or TensorRT.
"""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in --help and keep the description's line breaks."""
