"""`python -m fineflax.evaluate`: the program in fineflax/cli/evaluate.py."""

from fineflax.cli import evaluate

if __name__ == '__main__':
  evaluate.main()
