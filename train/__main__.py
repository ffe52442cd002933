"""`python -m edgebc.train ...` is `edgebc train ...` (torchrun launches it this way too)."""

import sys

from edgebc.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
