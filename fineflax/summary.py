"""`python -m fineflax.summary`: the program in fineflax/cli/summary.py."""

from fineflax.cli import summary

if __name__ == '__main__':
  summary.main()
