"""`python -m fineflax.train`: the training program (fineflax/cli/train.py)."""

from fineflax.cli import train

train.main()
