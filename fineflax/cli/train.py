"""`python -m fineflax.train --config CONFIG --workdir DIR`: trains (or resumes) a run and
prints its test accuracy; `fineflax.train.train_and_evaluate` does the work."""

from __future__ import annotations

import logging
import sys

import jax
import ml_collections
from absl import flags

from fineflax.cli import common
from fineflax.distributed.preemption import Preempted
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
  for record in (results['final'], results.get('best')):
    if record and 'test_accuracy' in record:
      print(f"test_accuracy: {record['test_accuracy']:.4f} ({record['checkpoint']}, step "
            f"{record['step']}; {record['test_examples']} examples, test_loss "
            f"{record['test_loss']:.4f})")


def main() -> None:
  """The program (also the `fineflax-train` command)."""
  workdir = flags.DEFINE_string('workdir', None, 'Directory of the run (checkpoints, metrics).')
  common.run(lambda config: train(config, workdir.value), required=('config', 'workdir'))


if __name__ == '__main__':
  main()
