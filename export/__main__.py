"""`python -m edgebc.export ...` is `edgebc export ...`."""

import sys

from edgebc.cli import main

sys.exit(main(["export", *sys.argv[1:]]))
