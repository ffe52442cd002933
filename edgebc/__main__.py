"""`python -m edgebc` is the `edgebc` command."""

import sys

from edgebc.cli import main

sys.exit(main())
