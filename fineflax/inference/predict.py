"""Class probabilities for image files by a checkpoint of a trained run.

    python -m fineflax.predict --workdir runs/demo [--checkpoint best] 3.png 7.png photos/

prints, per image, the top-k classes with their probabilities and the run's class names,
the images prepared as the run's evaluation prepares them, the logits divided by the
temperature `evaluate --calibrate` saved for the checkpoint (if any), and with `tta`
averaged over views of each image (`fineflax.inference.tta`). `predict_run_files` is strict
(the first bad file raises); `predict_run_paths` gives a row for every file, with its
error where it had one (`Predictions`).

The other parts of prediction have a module each: images in memory
(`fineflax.inference.arrays.predict_fn`), folders and reading
(`fineflax.inference.image_files`), the result and its .csv / .json file
(`fineflax.inference.predictions`), and zero-shot ImageNet (`fineflax.inference.zero_shot`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np

from fineflax import data
from fineflax.distributed import parallel
from fineflax.inference import calibration, evaluate, tta as tta_lib
from fineflax.inference.evaluate import probabilities
from fineflax.inference.image_files import read_all, read_resized
from fineflax.inference.predictions import Predictions, Ranked, predictions_of, top_k
from fineflax.run import restore

logger = logging.getLogger('fineflax.predict')


def _run_top_k(
    workdir: str | os.PathLike,
    checkpoint: str | int,
    images: np.ndarray,
    k: int,
    devices: Sequence[jax.Device] | None,
    weights: str = 'raw',
    tta: str = 'none',
    calibrated: bool = True,
) -> tuple[restore.RestoredRun, list[Ranked], float | None]:
  """The checkpoint opened (`weights`: 'raw' or 'ema'), the top-k classes of `images`
  (at the stored shape; `tta`: logits averaged over views), and the temperature their
  logits were divided by (`calibrated`: the one `evaluate --calibrate` saved for the
  checkpoint, if any; None: none)."""
  run = restore.load_run(workdir, checkpoint, weights)
  temperature = None
  if calibrated:
    temperature, note = calibration.saved_temperature(workdir, run)
    if temperature is None and note is not None:
      logger.warning('%s', note)
  mesh = parallel.make_mesh(devices)
  count = mesh.devices.size
  # One batch of the images when they fit in the run's eval batch; padding rows are dropped.
  size = min(evaluate.eval_batch_size(None, run.config, count), -(-len(images) // count) * count)
  logits_step = evaluate.make_logits_step(
      run.model, mesh, augment=data.augment_from_config(run.config.data), tta=tta
  )
  # Host copies: the restored arrays sit on this process's first device (see evaluate_run).
  variables = parallel.replicate(jax.device_get(run.variables), mesh)
  logits, _ = evaluate.split_logits(
      logits_step, variables, data.Split(images, np.zeros(len(images), np.int32)), size, mesh
  )
  if temperature is not None:
    logits = logits / np.float32(temperature)
  probs = np.asarray(probabilities(logits))
  # Outputs beyond the dataset's classes (a config's num_classes may be larger) get a name.
  names = list(run.class_names) + [
      f'output {i}' for i in range(len(run.class_names), probs.shape[-1])
  ]
  return run, top_k(probs, names, k), temperature


def predict_run_files(
    workdir: str | os.PathLike,
    paths: Sequence[str],
    k: int = 5,
    checkpoint: str | int = 'best',
    *,
    devices: Sequence[jax.Device] | None = None,
    weights: str = 'raw',
    tta: str = 'none',
    calibrated: bool = True,
) -> list[Ranked]:
  """The top-k classes of each image file under a checkpoint of the run in `workdir`
  (`weights`: its parameters, 'raw', or their moving average, 'ema').

  The images are resized to the shape the run's dataset stores, then prepared on the
  device as the run's evaluation prepares them (resize, centre crop), on `devices`
  (default: every device). `tta` (`tta.MODES`) averages the logits over views of each
  image; with `calibrated`, the logits are divided by the temperature `evaluate
  --calibrate` saved for the checkpoint, when there is one for its step.

  Raises:
    DataError: a file that cannot be read (before the checkpoint is opened).
  """
  tta_lib.check_mode(tta)
  config = restore.read_config(workdir)
  info = restore.read_dataset_info(workdir)
  images = np.stack([read_resized(p, info.image_shape, config.data.augment.crop) for p in paths])
  return _run_top_k(workdir, checkpoint, images, k, devices, weights, tta, calibrated)[1]


def predict_run_paths(
    workdir: str | os.PathLike,
    paths: Sequence[str],
    k: int = 5,
    checkpoint: str | int = 'best',
    *,
    devices: Sequence[jax.Device] | None = None,
    weights: str = 'raw',
    tta: str = 'none',
    calibrated: bool = True,
) -> Predictions:
  """As `predict_run_files`, but a file that cannot be read gets its error in the result
  and the others are still predicted (the checkpoint is not opened when none is)."""
  tta_lib.check_mode(tta)
  config = restore.read_config(workdir)
  info = restore.read_dataset_info(workdir)
  paths = [str(p) for p in paths]
  images, errors = read_all(
      paths,
      functools.partial(read_resized, image_shape=info.image_shape, crop=config.data.augment.crop),
  )

  def predict_readable(batch: np.ndarray) -> tuple[list[Ranked], dict[str, Any]]:
    run, ranked, temperature = _run_top_k(
        workdir, checkpoint, batch, k, devices, weights, tta, calibrated
    )
    return ranked, {
        'checkpoint': run.label,
        'step': run.step,
        'temperature': temperature,
        'tta': tta,
    }

  return predictions_of(paths, images, errors, predict_readable, workdir=str(workdir))
