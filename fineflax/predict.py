"""`python -m fineflax.predict`: the program of fineflax/cli/predict.py, whose docstring is
its --help."""

from fineflax.cli import predict

if __name__ == '__main__':
  predict.main()
