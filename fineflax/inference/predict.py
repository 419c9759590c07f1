"""Class probabilities for image files: of a trained run, or zero-shot ImageNet-1k.

    python -m fineflax.predict --workdir runs/demo [--checkpoint best] 3.png 7.png photos/
    python -m fineflax.predict --config configs/imagenet.py --top_k 3 elephant.jpg

print, per image, the top-k classes with their probabilities. `--workdir` uses a run's
checkpoint and class names, the images prepared as the run's evaluation prepares them.
`--config` uses the config's model and pretrained weights: with Keras' ImageNet top
(`config.model.include_top`) the 1,000 ImageNet classes by WordNet id and name, as Keras'
`decode_predictions` does.

A folder argument stands for its image files (`image_paths`). A file that cannot be read
does not stop the others: `predict_run_paths` and `predict_config_paths` return a row for
every file, with its error where it had one (`Predictions`), which `write_predictions`
writes as .csv or .json. `predict_run_files` and `predict_files` are the strict forms:
the first bad file raises.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.resources
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fineflax import config as config_lib, data, models, weights
from fineflax.data import augment as augmentation, pipeline, stream
from fineflax.data.folder import IMAGE_SUFFIXES
from fineflax.data.images import open_rgb, read_image
from fineflax.distributed import parallel
from fineflax.errors import ConfigError, DataError
from fineflax.inference import evaluate
from fineflax.inference.evaluate import probabilities
from fineflax.run import restore
from fineflax.train import state as state_lib

logger = logging.getLogger('fineflax.predict')


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
  """The 1,000 ImageNet-1k classes in classifier order: (WordNet id, Keras-style name)."""
  text = importlib.resources.files('fineflax').joinpath('imagenet_classes.txt').read_text()
  rows = [line.split('\t') for line in text.splitlines() if line and not line.startswith('#')]
  # Keras' class index names a class by its first WordNet lemma, spaces as underscores.
  return tuple((wnid, lemmas.split(',')[0].strip().replace(' ', '_')) for wnid, lemmas in rows)


def resize_uint8(images: jax.Array, height: int, width: int) -> jax.Array:
  """(n, h, w, 3) uint8 resized to (n, height, width, 3) uint8: bilinear, antialiased when
  shrinking (as PIL resizes the files a run stores), rounded to the nearest level."""
  if images.shape[1:3] == (height, width):
    return images
  resized = jax.image.resize(images.astype(jnp.float32),
                             (images.shape[0], height, width, images.shape[3]),
                             method='linear', antialias=True)
  return jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)


# What predict_fn takes, said in its errors.
_EXPECTED = ('expected uint8 RGB images: an (n, H, W, 3) array, one (H, W, 3) image, or a '
             'list of (H, W, 3) images of any sizes')


def _image_array(value: Any, name: str, ndims: tuple[int, ...]) -> np.ndarray:
  """`value` as a uint8 RGB array of one of `ndims` dimensions, or a one-line ValueError
  naming what it is (`name`: 'images', 'images[3]')."""
  try:
    array = np.asarray(value)
  except ValueError:  # numpy's "inhomogeneous shape": a ragged sequence
    array = None
  # What numpy cannot read as numbers (a path, a dict, ragged lists) is named by its type:
  # its "shape () and dtype <U5" would only puzzle.
  if array is None or array.dtype.kind not in 'biuf':
    shown = f' ({value!r:.60})' if isinstance(value, (str, bytes, os.PathLike)) else ''
    what = 'None' if value is None else f'a {type(value).__name__}{shown}'
    raise ValueError(f'{name} is {what}: {_EXPECTED}')
  if array.ndim not in ndims or array.shape[-1] != 3 or array.dtype != np.uint8:
    raise ValueError(f'{name} of shape {array.shape} and dtype {array.dtype}: {_EXPECTED}')
  return array


def predict_fn(run: restore.RestoredRun) -> Callable[[Any], jax.Array]:
  """A function, compiled with jax.jit, from uint8 images to the run's class probabilities.

  The function takes an (n, H, W, 3) uint8 array, one (H, W, 3) image, or a list (or
  tuple) of (H, W, 3) uint8 images of any sizes, and returns (n, classes) (or (classes,))
  float32 probabilities, on this process's first device; anything else is a ValueError
  naming what was given. Each image is first resized to the shape the run's dataset
  stores (`run.image_shape`; `resize_uint8`, the same for an array and a list), then
  prepared as the run's evaluation prepares them (centre crop, resize to the model's
  input, the model's normalisation), so images of the stored shape get what
  `fineflax.evaluate` computes for them (to float32 rounding: its batches differ). For a
  run trained on random-resized crops, images of another shape are originals: they get
  evaluation's centre crop (`fineflax.data.stream.centre_box`) on the host first. Each
  new image size compiles a resize once; each new batch size compiles the model once.

      run = fineflax.load_run('runs/demo')
      probs = fineflax.predict_fn(run)(images)
  """
  height, width = run.image_shape[:2]
  augment = data.augment_from_config(run.config.data)
  model = run.model

  @jax.jit
  def predict(variables: dict[str, Any], images: jax.Array) -> jax.Array:
    images = augmentation.prepare(images, None, augment, model.image_size, train=False)
    return probabilities(model.apply(variables, images, train=False).astype(jnp.float32))

  # The resize is compiled apart from the model: a list of photos of as many sizes then
  # compiles one small resize per size, and the model once, not the model per size.
  resize = jax.jit(resize_uint8, static_argnums=(1, 2))
  device = jax.local_devices()[0]
  variables = jax.device_put(run.variables, device)
  # A run whose host cropped the originals (augment.crop 'random_resized') stores centre
  # crops: images of another shape are originals, and get the crop evaluation gave them.
  cropped = run.config.data.augment.crop == pipeline.RANDOM_RESIZED

  def _cropped(array: np.ndarray) -> np.ndarray:
    if not cropped or array.shape[:2] == (height, width):
      return array
    from PIL import Image  # pylint: disable=g-import-not-at-top
    return stream.host_image(Image.fromarray(np.asarray(array)), height, pipeline.RANDOM_RESIZED,
                             train=False)

  def call(images: Any) -> jax.Array:
    if isinstance(images, (list, tuple)):
      if not images:
        raise ValueError(f'images is an empty {type(images).__name__}: {_EXPECTED}')
      arrays = [_cropped(_image_array(image, f'images[{i}]', (3,)))
                for i, image in enumerate(images)]
      return predict(variables, jnp.concatenate(
          [resize(jax.device_put(a[None], device), height, width) for a in arrays]))
    array = _image_array(images, 'images', (3, 4))
    single = array.ndim == 3
    if cropped:
      array = np.stack([_cropped(a) for a in (array[None] if single else array)])
      array = array[0] if single else array
    batch = resize(jax.device_put(array[None] if single else array, device), height, width)
    probs = predict(variables, batch)
    return probs[0] if single else probs

  return call


def top_k(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
  """Per row, the k most probable (class name, probability), most probable first."""
  order = np.argsort(-probs, axis=-1)[:, :k]
  return [[(class_names[i], float(row[i])) for i in idx] for row, idx in zip(probs, order)]


Ranked = list[tuple[str, float]]


@dataclasses.dataclass(frozen=True)
class Predictions:
  """Every image file's top-k classes, or why it could not be read, and what predicted them.

  Attributes:
    paths: the files, in the order given.
    top: per file, its (class name, probability), most probable first; None where the
      file could not be read.
    errors: per file, the one-line reason it could not be read; None where it was read.
    workdir, checkpoint, step: the run, and the checkpoint used ('best', 'latest' or
      'step<N>', as `load_run` labels it) and its train step; checkpoint and step are
      None when no file could be read (no checkpoint was opened then).
    weights, backbone: zero-shot: `config.model.weights` (None: random weights) and the
      model.
  """

  paths: tuple[str, ...]
  top: tuple[Ranked | None, ...]
  errors: tuple[str | None, ...]
  workdir: str | None = None
  checkpoint: str | None = None
  step: int | None = None
  weights: str | None = None
  backbone: str | None = None

  @property
  def failed(self) -> list[str]:
    """The files that could not be read."""
    return [path for path, error in zip(self.paths, self.errors) if error is not None]

  def source(self) -> str:
    """One line naming the checkpoint (or zero-shot weights) that predicted."""
    if self.workdir is not None:
      if self.checkpoint == f'step{self.step}':
        return f'{self.workdir}: checkpoint step {self.step}'
      return f'{self.workdir}: checkpoint {self.checkpoint} (step {self.step})'
    if self.weights is None:
      return f'zero-shot: {self.backbone} with random weights (config.model.weights is None)'
    return f'zero-shot: {self.backbone} with weights {self.weights}'

  def records(self) -> list[dict[str, Any]]:
    """One dict per file (path, workdir, checkpoint, step, weights, top_k, error)."""
    return [{'path': path, 'workdir': self.workdir, 'checkpoint': self.checkpoint,
             'step': self.step, 'weights': self.weights,
             'top_k': None if top is None else [{'class': name, 'probability': p}
                                                for name, p in top],
             'error': error} for path, top, error in zip(self.paths, self.top, self.errors)]


OUTPUT_SUFFIXES = ('.csv', '.json')


def check_output_path(path: str | os.PathLike) -> Path:
  """`path` if `write_predictions` can write it (a .csv or .json file), else ConfigError."""
  suffix = Path(path).suffix
  if suffix.lower() not in OUTPUT_SUFFIXES:
    raise ConfigError(f'{path}: expected a .csv or .json file, not '
                      + (repr(suffix) if suffix else 'a name without suffix'))
  return Path(path)


def write_predictions(predictions: Predictions, path: str | os.PathLike) -> None:
  """Writes one row (.csv) or object (.json, a list) per file: path, workdir, checkpoint,
  step, weights, the top-k classes and probabilities, error (empty / null where n/a)."""
  path = check_output_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  records = predictions.records()
  if path.suffix.lower() == '.json':
    path.write_text(json.dumps(records, indent=1) + '\n')
    return
  k = max((len(top) for top in predictions.top if top is not None), default=0)
  ranks = [f'{column}_{i}' for i in range(1, k + 1) for column in ('class', 'probability')]
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, ['path', 'workdir', 'checkpoint', 'step', 'weights', *ranks,
                                'error'])
    writer.writeheader()
    for record in records:
      row = {key: '' if value is None else value for key, value in record.items()
             if key != 'top_k'}
      for i, entry in enumerate(record['top_k'] or (), 1):
        row[f'class_{i}'], row[f'probability_{i}'] = entry['class'], entry['probability']
      writer.writerow(row)


def image_paths(args: Sequence[str | os.PathLike]) -> list[str]:
  """The files `args` name: a file as given; a folder as its image files, sorted.

  A folder's image files are those directly in it with a suffix the folder data source
  reads (IMAGE_SUFFIXES, any case); other files, hidden ones (macOS' `._x.jpg`) and
  sub-folders are left out. Sub-folders are not recursed into: a dataset's folder given by
  mistake would otherwise predict every image of every class, and `DIR` then means the
  images `ls DIR` shows (`DIR/*/` names the sub-folders when they are meant). A folder
  without image files stays in the list: reading it reports that.
  """
  paths = []
  for arg in args:
    folder, found = Path(arg), []
    if folder.is_dir() and os.access(folder, os.R_OK | os.X_OK):
      found = sorted(str(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith(
          '.') and p.suffix.lower() in IMAGE_SUFFIXES)
    paths += found or [str(arg)]
  return paths


def _read_all(paths: Sequence[str], read: Callable[[str], np.ndarray]
              ) -> tuple[list[np.ndarray | None], list[str | None]]:
  """Each file read, or None and the one-line reason it could not be."""
  images, errors = [], []
  for path in paths:
    image, error = None, None
    if Path(path).is_dir():
      error = (f'{path}: a folder without image files ({", ".join(IMAGE_SUFFIXES)})'
               if os.access(path, os.R_OK | os.X_OK) else f'{path}: a folder it may not read')
    else:
      try:
        image = read(path)
      except (ValueError, SyntaxError) as e:  # DataError; PIL's own errors on odd files
        error = str(e) if isinstance(e, DataError) else f'{path}: not a readable image ({e})'
    images.append(image)
    errors.append(error)
  return images, errors


def _fill(paths: Sequence[str], images: list[np.ndarray | None], errors: list[str | None],
          predict_readable: Callable[[np.ndarray], tuple[list[Ranked], dict[str, Any]]],
          **source: Any) -> Predictions:
  """Predictions for the readable `images` by `predict_readable` (which also says what
  predicted them), None for the others; nothing runs when no file was readable."""
  readable = [i for i, image in enumerate(images) if image is not None]
  top: list[Ranked | None] = [None] * len(paths)
  if readable:
    ranked, more = predict_readable(np.stack([images[i] for i in readable]))
    source.update(more)
    for i, best in zip(readable, ranked):
      top[i] = best
  return Predictions(tuple(paths), tuple(top), tuple(errors), **source)


def _zero_shot_setup(config: ml_collections.ConfigDict) -> tuple[Any, list[str], int]:
  """The validated config, its class names and its model's input size."""
  config = config_lib.validate(config)
  if config.model.include_top and (config.model.num_classes or 1000) == 1000:
    names = [f'{name} ({wnid})' for wnid, name in imagenet_classes()]
  else:
    names = list(data.dataset_info(config.data).class_names)
  return config, names, config.model.image_size or models.BACKBONES[
      config.model.backbone].input_size


def _zero_shot(config: ml_collections.ConfigDict, names: list[str], size: int,
               images: np.ndarray, k: int) -> list[Ranked]:
  """The top-k classes of `images` (size x size) under `config`'s model and weights."""
  model = models.from_config(config, tuple(names))
  variables = state_lib.init_variables(model, (size, size, 3), config.seed)
  if config.model.weights is None:
    logger.warning('config.model.weights is None: predicting with random weights')
  else:
    variables, report = weights.load_pretrained(config.model, model, variables)
    logger.info(report.text())
    initialised = [name for name in report.initialised if name.startswith('head/')]
    if config.model.include_top and initialised:
      raise ConfigError(f'{config.model.weights} holds no classifier for the ImageNet top '
                        f'({", ".join(initialised)} would be random); use the file with the '
                        'top, not the _notop one')
  predict = jax.jit(lambda variables, images: probabilities(model.apply(variables, images)))
  probs = np.asarray(predict(variables, images))
  return top_k(probs, names, k)


def predict_files(config: ml_collections.ConfigDict, paths: Sequence[str],
                  k: int = 5) -> list[Ranked]:
  """The top-k classes of each image file under `config`'s model and weights.

  Raises:
    DataError: a file that cannot be read (before any weights are loaded).
  """
  config, names, size = _zero_shot_setup(config)
  images = np.stack([read_image(p, size) for p in paths])
  return _zero_shot(config, names, size, images, k)


def predict_config_paths(config: ml_collections.ConfigDict, paths: Sequence[str],
                         k: int = 5) -> Predictions:
  """As `predict_files`, but a file that cannot be read gets its error in the result
  and the others are still predicted (no weights are loaded when none is readable)."""
  config, names, size = _zero_shot_setup(config)
  paths = [str(p) for p in paths]
  images, errors = _read_all(paths, functools.partial(read_image, size=size))
  return _fill(paths, images, errors,
               lambda batch: (_zero_shot(config, names, size, batch, k), {}),
               weights=config.model.weights, backbone=config.model.backbone)


def _read_resized(path: str, image_shape: Sequence[int], crop: Any = None) -> np.ndarray:
  """(H, W, 3) uint8: the image file resized (bilinear) to `image_shape`; for a run whose
  host cropped the originals (`crop` 'random_resized'), as its evaluation read them."""
  height, width = image_shape[:2]
  if crop == pipeline.RANDOM_RESIZED:
    return stream.host_image(open_rgb(path), height, crop, train=False)
  if height == width:
    return read_image(path, height)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.fromarray(read_image(path)).resize((width, height),
                                                             Image.Resampling.BILINEAR))


def _run_top_k(workdir: str | os.PathLike, checkpoint: str | int, images: np.ndarray, k: int,
               devices: Sequence[jax.Device] | None) -> tuple[restore.RestoredRun, list[Ranked]]:
  """The checkpoint opened, and the top-k classes of `images` (at the stored shape)."""
  run = restore.load_run(workdir, checkpoint)
  mesh = parallel.make_mesh(devices)
  count = mesh.devices.size
  # One batch of the images when they fit in the run's eval batch; padding rows are dropped.
  size = min(evaluate.eval_batch_size(None, run.config, count), -(-len(images) // count) * count)
  logits_step = evaluate.make_logits_step(run.model, mesh,
                                          augment=data.augment_from_config(run.config.data))
  # Host copies: the restored arrays sit on this process's first device (see evaluate_run).
  variables = parallel.replicate(jax.device_get(run.variables), mesh)
  logits, _ = evaluate.split_logits(logits_step, variables,
                                    data.Split(images, np.zeros(len(images), np.int32)),
                                    size, mesh)
  probs = np.asarray(probabilities(logits))
  # Outputs beyond the dataset's classes (a config's num_classes may be larger) get a name.
  names = list(run.class_names) + [f'output {i}' for i in range(len(run.class_names),
                                                                probs.shape[-1])]
  return run, top_k(probs, names, k)


def predict_run_files(workdir: str | os.PathLike, paths: Sequence[str], k: int = 5,
                      checkpoint: str | int = 'best', *,
                      devices: Sequence[jax.Device] | None = None) -> list[Ranked]:
  """The top-k classes of each image file under a checkpoint of the run in `workdir`.

  The images are resized to the shape the run's dataset stores, then prepared on the
  device as the run's evaluation prepares them (resize, centre crop), on `devices`
  (default: every device).

  Raises:
    DataError: a file that cannot be read (before the checkpoint is opened).
  """
  config = restore.read_config(workdir)
  info = restore.read_dataset_info(workdir, config)
  images = np.stack([_read_resized(p, info.image_shape, config.data.augment.crop)
                     for p in paths])
  return _run_top_k(workdir, checkpoint, images, k, devices)[1]


def predict_run_paths(workdir: str | os.PathLike, paths: Sequence[str], k: int = 5,
                      checkpoint: str | int = 'best', *,
                      devices: Sequence[jax.Device] | None = None) -> Predictions:
  """As `predict_run_files`, but a file that cannot be read gets its error in the result
  and the others are still predicted (the checkpoint is not opened when none is)."""
  config = restore.read_config(workdir)
  info = restore.read_dataset_info(workdir, config)
  paths = [str(p) for p in paths]
  images, errors = _read_all(paths, functools.partial(
      _read_resized, image_shape=info.image_shape, crop=config.data.augment.crop))

  def predict_readable(batch: np.ndarray) -> tuple[list[Ranked], dict[str, Any]]:
    run, ranked = _run_top_k(workdir, checkpoint, batch, k, devices)
    return ranked, {'checkpoint': run.label, 'step': run.step}

  return _fill(paths, images, errors, predict_readable, workdir=str(workdir))
