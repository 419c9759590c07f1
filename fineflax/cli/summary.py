"""`python -m fineflax.summary --config CONFIG [--phase N]`: the Keras-style table of a
config's model with a phase's freeze spec (`fineflax.train.summary`)."""

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
  common.run(lambda config: summary(config, phase.value), uses_devices=False)


if __name__ == '__main__':
  main()
