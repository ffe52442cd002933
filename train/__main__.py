"""`python -m edgebc.train ...` is `edgebc train ...` (torchrun launches it this way too)."""

import sys

from edgebc.cli import main

if __name__ == "__main__":  # importing this module runs nothing
    sys.exit(main(["train", *sys.argv[1:]]))
