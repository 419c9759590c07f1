"""`python -m fineflax.interpolate`: the program of fineflax/cli/interpolate.py, whose
docstring is its --help."""

from fineflax.cli import interpolate

if __name__ == '__main__':
  interpolate.main()
