"""The subcommands of `edgebc`, one module per group; each adds its parser with `register_*`.

Handlers import what they need when they run, so `edgebc --help` and the torch-free commands
never load torch, onnx or TensorRT.
"""

import argparse
import difflib
import re
from typing import NoReturn

_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<given>[^']*)' \(choose from (?P<choices>.*)\)")


class Parser(argparse.ArgumentParser):
    """argparse, with a "did you mean" for a mistyped command or choice (Python 3.14 has its own)."""

    def error(self, message: str) -> NoReturn:
        wrong = _INVALID_CHOICE.search(message)
        if wrong:
            choices = re.findall(r"'([^']*)'", wrong["choices"])
            close = difflib.get_close_matches(wrong["given"], choices, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            message = f"{message}; {hint}see {self.prog} --help"
        super().error(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in --help and keep the description's line breaks.

    One default per option, the true one: an option whose help already names its default (taken
    from a settings file, so argparse's own is None) and one without a default say nothing more."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == "" or default == []
        if nothing or "default" in text.lower():
            return text
        return super()._get_help_string(action)
