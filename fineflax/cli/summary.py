"""Prints the Keras-style summary of a config's model: its layers, output shapes and
parameter counts, trainable or not under a phase's freeze spec (`fineflax.train.summary`).

  python -m fineflax.summary --config CONFIG [--phase N] [--config.KEY=VALUE ...]
  fineflax-summary --config CONFIG [--phase N] [--config.KEY=VALUE ...]

  --config CONFIG[:smoke]   the experiment, a config file (configs/*.py); ':smoke' runs the
                            same workflow for a few steps a phase
  --config.KEY=VALUE        overrides one key: --config.batch_size=32,
                            --config.phases[1].learning_rate=1e-4, --config.data.test_split=None
                            (every key: docs/config_reference.md)
  --phase N                 the phase whose freeze spec marks the layers trainable or not
"""

from __future__ import annotations

import ml_collections
from absl import flags

from fineflax.cli import common
from fineflax.train.summary import format_summary, summarize_config


def summary(config: ml_collections.ConfigDict, phase: int) -> None:
  """Prints the summary of `config` with the freeze spec of phase `phase`."""
  table, title = summarize_config(config, phase)
  print(format_summary(table, title))


def main() -> None:
  """The program (also the `fineflax-summary` command)."""
  phase = flags.DEFINE_integer('phase', 0, 'Index of the phase whose freeze spec to show.')
  common.run_program(lambda config: summary(config, phase.value), __doc__, uses_devices=False)


if __name__ == '__main__':
  main()
