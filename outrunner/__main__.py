"""``python -m outrunner``: the ``outrunner`` command (see :mod:`outrunner.cli`)."""

import sys

from outrunner.cli import main

if __name__ == "__main__":
    sys.exit(main())
