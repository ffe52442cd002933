"""`python -m edgebc.export ...` is `edgebc export ...`."""

import sys

from edgebc.cli import main

if __name__ == "__main__":  # importing this module runs nothing
    sys.exit(main(["export", *sys.argv[1:]]))
