"""``python -m stem``: the ``stem`` command line (see stem/cli.py)."""

import sys

from stem.cli import main

if __name__ == "__main__":
    sys.exit(main())
