"""`python -m fineflax.predict`: the program in fineflax/cli/predict.py."""

from fineflax.cli import predict

if __name__ == '__main__':
  predict.main()
