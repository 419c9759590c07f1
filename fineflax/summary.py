"""`python -m fineflax.summary`: the program of fineflax/cli/summary.py, whose docstring is
its --help."""

from fineflax.cli import summary

if __name__ == '__main__':
  summary.main()
