"""`python -m fineflax.train`: the program of fineflax/cli/train.py, whose docstring is its
--help."""

from fineflax.cli import train

train.main()
