"""`python -m fineflax.export`: the program of fineflax/cli/export.py, whose docstring is
its --help."""

import sys

from fineflax.cli import export

if __name__ == '__main__':
  sys.exit(export.main())
