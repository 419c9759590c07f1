"""`python -m fineflax.predict (--config CONFIG | --workdir DIR) IMAGE...`: prints each
image's top-k classes (`fineflax.inference.predict`)."""

from __future__ import annotations

from typing import Sequence

import ml_collections
from absl import flags

from fineflax.cli import common
from fineflax.errors import ConfigError
from fineflax.inference import predict as prediction


def predict(config: ml_collections.ConfigDict | None, paths: Sequence[str], k: int,
         workdir: str | None = None, checkpoint: str = 'best') -> None:
  """Prints the top-k classes of each image, of a run (`workdir`) or a `config`.

  Raises:
    ConfigError: neither or both of `config` and `workdir`.
  """
  if (config is None) == (workdir is None):
    raise ConfigError('give exactly one of --config (a model with pretrained weights) and '
                      '--workdir (a trained run)')
  if workdir is not None:
    results = prediction.predict_run_files(workdir, paths, k, checkpoint)
  else:
    results = prediction.predict_files(config, paths, k)
  for path, best in zip(paths, results):
    print(f'{path}: ' + ', '.join(f'{name} {p:.4f}' for name, p in best))


def main() -> None:
  """The program (also the `fineflax-predict` command)."""
  top = flags.DEFINE_integer('top_k', 5, 'How many classes to print per image.')
  workdir = flags.DEFINE_string('workdir', None, 'A trained run (instead of --config).')
  checkpoint = flags.DEFINE_string('checkpoint', 'best',
                                   "With --workdir: 'best', 'latest' or a step.")
  common.run(lambda config, argv: predict(config, argv, top.value, workdir.value,
                                          checkpoint.value), required=(), positional='images')


if __name__ == '__main__':
  main()
