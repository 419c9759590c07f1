"""Prints the top classes of images; the program is fineflax/cli/predict.py.

  python -m fineflax.predict --workdir DIR [--checkpoint best|latest|STEP] IMAGE...
  python -m fineflax.predict --config configs/imagenet.py IMAGE...     (zero-shot ImageNet)

  --config CONFIG[:smoke]   the experiment, a config file (configs/*.py); ':smoke' runs the
                            same workflow for a few steps a phase
  --config.KEY=VALUE        overrides one key: --config.batch_size=32,
                            --config.phases[1].learning_rate=1e-4, --config.data.test_split=None
                            (every key: docs/config_reference.md)
  --top_k K                 how many classes to print per image
"""

from fineflax.cli import predict

if __name__ == '__main__':
  predict.main()
