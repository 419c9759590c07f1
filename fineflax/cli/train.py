"""Trains a run, or resumes it, and prints its test accuracy
(`fineflax.train.train_and_evaluate` does the work).

  python -m fineflax.train --config CONFIG[:smoke] --workdir DIR [--config.KEY=VALUE ...]
  fineflax-train --config CONFIG[:smoke] --workdir DIR [--config.KEY=VALUE ...]

  --config CONFIG[:smoke]   the experiment, a config file (configs/*.py); ':smoke' runs the
                            same workflow for a few steps a phase
  --config.KEY=VALUE        overrides one key: --config.batch_size=32,
                            --config.phases[1].learning_rate=1e-4, --config.data.test_split=None
                            (every key: docs/config_reference.md)
  --workdir DIR             the run folder; the same command again resumes the run there
  --coordinator HOST:PORT --num_processes N --process_id I
                            one process of a multi-host job (docs/multihost.md)
"""

from __future__ import annotations

import logging
import sys

import jax
import ml_collections
from absl import flags

from fineflax.cli import common
from fineflax.distributed.preemption import Preempted
from fineflax.run import reporting
from fineflax.train import training

logger = logging.getLogger('fineflax.train')


def train(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains `config` in `workdir` and prints the test accuracy; exit status 143 after a
  SIGTERM (saved: the same command resumes)."""
  try:
    results = training.train_and_evaluate(config, workdir)
  except Preempted as e:
    logger.warning('%s', e)
    sys.exit(143)  # 128 + SIGTERM: stopped, not finished
  if jax.process_index() != 0:  # one set of lines per job
    return
  for _, record in reporting.measured_parameters(results):
    if 'test_accuracy' in record:
      print(
          f"test_accuracy: {record['test_accuracy']:.4f} ({record['checkpoint']}, step "
          f"{record['step']}; {record['test_examples']} examples, test_loss "
          f"{record['test_loss']:.4f})"
      )


def main() -> None:
  """The program (also the `fineflax-train` command)."""
  workdir = flags.DEFINE_string('workdir', None, 'Directory of the run (checkpoints, metrics).')
  common.run_program(
      lambda config: train(config, workdir.value), __doc__, required=('config', 'workdir')
  )


if __name__ == '__main__':
  main()
