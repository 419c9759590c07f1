"""`python -m fineflax.evaluate`: the program of fineflax/cli/evaluate.py, whose docstring
is its --help."""

from fineflax.cli import evaluate

if __name__ == '__main__':
  evaluate.main()
