"""Prints each image's top-k classes, by a trained run or zero-shot ImageNet
(`fineflax.inference`).

  python -m fineflax.predict --workdir DIR [--checkpoint best|latest|wise_ft|soup|STEP]
                            [--weights raw|ema] [--tta none|flip|5crop|10crop]
                            [--nocalibrated] IMAGE_OR_FOLDER...
  python -m fineflax.predict --config configs/imagenet.py IMAGE_OR_FOLDER...  (zero-shot)
  fineflax-predict ...      the same program

  --workdir DIR             a trained run (python -m fineflax.train)
  --weights raw|ema         its checkpoint's parameters (default) or their moving average
  --tta flip|5crop|10crop   with --workdir: logits averaged over views of each image, as
                            evaluate --tta averages them
  --nocalibrated            with --workdir: the raw probabilities, not those of the
                            temperature evaluate --calibrate saved for the checkpoint
  --config CONFIG[:smoke]   instead, a config's model with its pretrained weights
  --config.KEY=VALUE        overrides one key of --config (every key:
                            docs/config_reference.md)
  --top_k K                 how many classes to print per image
  --output F.csv|F.json     also writes one row per file, in the order given, with its error

The first line on stdout names what predicted: `runs/demo: checkpoint best (step 12)`
(with `, temperature 1.2345 (evaluate --calibrate)` when the logits were divided by the
temperature saved for that checkpoint and step, and `, tta flip`), or
`zero-shot: resnet50 with weights imagenet`; then one line per image, `PATH: class p, ...`.
A folder stands for the image files directly in it (.jpg, .jpeg, .png, .bmp, .gif, as
the folder data source reads; sorted; not its sub-folders). A file that cannot be read
gets one line on stderr, `PATH: not a readable image (...)`, and the other images are
still predicted; the program then ends with `error: N of M images could not be read: ...`
and exit status 1 (0 when every file was read). The errors go to stderr so that stdout
holds predictions only. When no file could be read, nothing is predicted (no checkpoint
or weights are loaded) and `--output` holds every file with its error.
"""

from __future__ import annotations

import sys
from typing import Sequence

import ml_collections
from absl import flags

from fineflax.cli import common
from fineflax.errors import ConfigError, DataError
from fineflax.inference import (
    image_files,
    predict as run_files,
    predictions,
    tta as tta_lib,
    zero_shot,
)


def predict(
    config: ml_collections.ConfigDict | None,
    paths: Sequence[str],
    k: int,
    workdir: str | None = None,
    checkpoint: str = 'best',
    output: str | None = None,
    weights: str = 'raw',
    tta: str = 'none',
    calibrated: bool = True,
) -> None:
  """Prints the top-k classes of each image (a folder: its images), of a run (`workdir`)
  or a `config` (`weights`: the run's 'raw' parameters or their 'ema'; `tta`: logits
  averaged over views; `calibrated`: divided by the run's saved temperature), and writes
  every file, with its classes or its error, to `output` (.csv or .json) if given.

  Raises:
    ConfigError: neither or both of `config` and `workdir`; `output` of another suffix;
      an unknown `tta`, or one with `config`.
    DataError: a file could not be read (after the others were printed and every file
      written).
  """
  if (config is None) == (workdir is None):
    raise ConfigError(
        'give exactly one of --config (a model with pretrained weights) and '
        '--workdir (a trained run)'
    )
  tta_lib.check_mode(tta)
  if tta != 'none' and workdir is None:
    raise ConfigError(f'--tta {tta}: test-time augmentation needs --workdir (a trained run)')
  if output is not None:
    try:  # before any work: a typo in the name should not cost a model load
      predictions.check_output_path(output)
    except ConfigError as e:
      raise ConfigError(f'--output {e}') from None
  paths = image_files.image_paths(paths)
  if workdir is not None:
    results = run_files.predict_run_paths(
        workdir, paths, k, checkpoint, weights=weights, tta=tta, calibrated=calibrated
    )
  else:
    results = zero_shot.predict_config_paths(config, paths, k)
  failed = results.failed
  if len(failed) < len(paths):
    print(results.source())
    for path, best in zip(results.paths, results.top):
      if best is not None:
        print(f'{path}: ' + ', '.join(f'{name} {p:.4f}' for name, p in best))
    sys.stdout.flush()  # the predictions before the errors, on a terminal too
  if output is not None:  # every file, those that could not be read too
    predictions.write_predictions(results, output)
  for error in results.errors:
    if error is not None:
      print(error, file=sys.stderr)
  if len(failed) == len(paths):
    raise DataError(f'none of the {len(paths)} images could be read')
  if failed:
    shown = ', '.join(failed[:5]) + (f', ... ({len(failed) - 5} more)' if len(failed) > 5 else '')
    raise DataError(f'{len(failed)} of {len(paths)} images could not be read: {shown}')


def main() -> None:
  """The program (also the `fineflax-predict` command)."""
  top = flags.DEFINE_integer('top_k', 5, 'How many classes to print per image.')
  workdir = flags.DEFINE_string('workdir', None, 'A trained run (instead of --config).')
  checkpoint = flags.DEFINE_string(
      'checkpoint', 'best', "With --workdir: 'best', 'latest', 'wise_ft', 'soup' or a step."
  )
  weights = common.define_weights_flag()
  output = flags.DEFINE_string(
      'output',
      None,
      'Also write every image (its path, the checkpoint used, the '
      'top-k classes and probabilities, or its error) to this .csv '
      'or .json file.',
  )
  tta = flags.DEFINE_string(
      'tta', 'none', f"With --workdir: {', '.join(tta_lib.MODES)} (logits averaged over views)."
  )
  calibrated = flags.DEFINE_bool(
      'calibrated',
      True,
      'With --workdir: divide the logits by the temperature evaluate --calibrate saved for '
      'the checkpoint, if any (--nocalibrated: do not).',
  )
  common.run_program(
      lambda config, argv: predict(
          config,
          argv,
          top.value,
          workdir.value,
          checkpoint.value,
          output.value,
          weights.value,
          tta.value,
          calibrated.value,
      ),
      __doc__,
      required=(),
      positional='images',
  )


if __name__ == '__main__':
  main()
