"""`python -m edgebc` is the `edgebc` command."""

import sys

from edgebc.cli import main

if __name__ == "__main__":  # importing this module (tools that walk the package do) runs nothing
    sys.exit(main())
