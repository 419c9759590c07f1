"""Prints the Keras-style summary of a config's model; the program is fineflax/cli/summary.py.

  python -m fineflax.summary --config CONFIG [--phase N] [--config.KEY=VALUE ...]

  --config CONFIG[:smoke]   the experiment, a config file (configs/*.py); ':smoke' runs the
                            same workflow for a few steps a phase
  --config.KEY=VALUE        overrides one key: --config.batch_size=32,
                            --config.phases[1].learning_rate=1e-4, --config.data.test_split=None
                            (every key: docs/config_reference.md)
  --phase N                 the phase whose freeze spec marks the layers trainable or not
"""

from fineflax.cli import summary

if __name__ == '__main__':
  summary.main()
