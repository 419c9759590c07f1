"""What several test files build the same way: the environment of the programs they start,
free ports, small configs and models, a phase's optimizer and train state."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections

from fineflax import config as config_lib, models
from fineflax.distributed import parallel
from fineflax.train import optimizers, state as state_lib

ROOT = Path(__file__).resolve().parents[1]  # the repository


def program_env(
    *,
    devices: int | None = None,
    cache: Path | str | None = None,
    unset: Sequence[str] = (),
    **extra: str,
) -> dict[str, str]:
  """The environment of a program a test starts: this process's, with the repository on
  PYTHONPATH and without conftest's eight virtual devices (XLA_FLAGS=''), or on `devices`
  CPU devices (JAX_PLATFORMS=cpu: the device count applies to the host platform only);
  `cache` as $FINEFLAX_CACHE (else conftest's); the variables named in `unset` left out,
  then `extra` set."""
  env = {k: v for k, v in os.environ.items() if k not in unset}
  env.update(PYTHONPATH=str(ROOT), XLA_FLAGS='')
  if devices is not None:
    env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  if cache is not None:
    env['FINEFLAX_CACHE'] = str(cache)
  env.update(extra)
  return env


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on (free when asked: the caller binds it
  soon, or relies on nothing listening there)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def tiny_config(
    *phases: ml_collections.ConfigDict, batch_size: int = 8, **data_keys: Any
) -> ml_collections.ConfigDict:
  """A run of seconds on a CPU: resnet_tiny at 16 px with 'tf' preprocessing, no weights,
  global batch `batch_size`, the config.data keys in `data_keys` (the digits unless a
  source is given) and `phases` (one default phase unless given)."""
  cfg = config_lib.default_config()
  cfg.batch_size = batch_size
  cfg.model.backbone = 'resnet_tiny'
  cfg.model.image_size = 16
  cfg.model.preprocessing = 'tf'
  for key, value in data_keys.items():
    cfg.data[key] = value
  if phases:
    cfg.phases = phases
  return cfg


def two_phase_config() -> ml_collections.ConfigDict:
  """A two-phase run of 40 digits (3 steps of 16 an epoch, the last one padded), head
  dropout: 'scratch' trains everything with BatchNorm in training mode, then 'conv5'
  trains conv5 and the head; 2 epochs each."""
  cfg = tiny_config(
      config_lib.phase(name='scratch', batchnorm='train', learning_rate=3e-3, epochs=2),
      config_lib.phase(
          name='conv5', freeze='regex:^backbone/conv[1-4]_', learning_rate=1e-3, epochs=2
      ),
      batch_size=16,
      max_examples=40,
  )
  cfg.model.head.dropout = 0.3
  return cfg


def tiny_model(num_classes: int = 10, **model_keys: Any) -> models.Classifier:
  """`resnet_tiny` with a new head of `num_classes` (config.model keys in `model_keys`;
  'head' a dict of head keys)."""
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet_tiny'
  for key, value in model_keys.items():
    if key == 'head':
      cfg.model.head.update(value)
    else:
      cfg.model[key] = value
  return models.build_model(cfg.model, num_classes)


def phase_optimizer(
    model: models.Classifier,
    params: Any,
    freeze: str = 'none',
    steps_per_epoch: int = 1,
    **phase_keys: Any,
) -> optimizers.Optimizer:
  """The optimizer a run builds for a phase with `freeze` and `phase_keys`."""
  phase = config_lib.phase(freeze=freeze, **phase_keys)
  return optimizers.make_optimizer(model, params, phase, steps_per_epoch)


def replicated_state(
    variables: dict[str, Any],
    optimizer: optimizers.Optimizer,
    devices: Sequence[jax.Device],
    step: int = 0,
) -> state_lib.TrainState:
  """A new train state of `variables`, replicated over `devices`."""
  mesh = parallel.make_mesh(devices)
  return parallel.replicate(state_lib.create_train_state(variables, optimizer, step), mesh)


def two_train_states() -> tuple[state_lib.TrainState, state_lib.TrainState]:
  """Two train states of resnet_tiny at 16 px, on two devices, that differ in every
  parameter (step 1, nothing frozen, Adam)."""
  model = tiny_model()
  variables = state_lib.init_variables(model, (16, 16, 3), seed=0)
  first = replicated_state(
      variables, phase_optimizer(model, variables['params']), jax.devices()[:2], step=1
  )
  return first, first.replace(params=jax.tree.map(lambda x: x * 2 + 1, first.params))


def assert_zero_shot_matches_keras(
    backbone: str, weights: Path, keras_top: Any, side: int, folder: Path
) -> None:
  """`zero_shot.predict_files` with a Keras-layout backbone's `include_top` weights names
  the top 3 ImageNet classes and probabilities that `keras_top` (the Keras model with its
  top, at `side`, normalising inside) gives the same images, one of another size."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from fineflax.data.images import read_image  # pylint: disable=g-import-not-at-top
  from fineflax.inference import zero_shot  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(5)
  paths = []
  for i, size in enumerate([(80, 50), (side, side)]):
    paths.append(str(folder / f'img{i}.png'))
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(paths[-1])
  cfg = config_lib.default_config()
  cfg.model.update(backbone=backbone, weights=str(weights), include_top=True, image_size=side)
  got = zero_shot.predict_files(cfg, paths, k=3)
  images = np.stack([read_image(p, side) for p in paths]).astype(np.float32)
  logits = np.asarray(keras_top(images))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  classes = zero_shot.imagenet_classes()
  for row, best in zip(probs, got, strict=True):
    top = np.argsort(-row)[:3]
    assert [name for name, _ in best] == [f'{classes[i][1]} ({classes[i][0]})' for i in top]
    np.testing.assert_allclose([p for _, p in best], row[top], rtol=1e-4)


def assert_offline_error_then_impostor_refused(
    backbone: str, filename: str, checksum: str, cache: Path, monkeypatch: Any
) -> None:
  """`weights.resolve('imagenet', backbone)` with nothing cached and no server fails in one
  line naming the cache path of `filename` and its `checksum` ('sha256 ...', 'md5 ...');
  a file of that name in the cache that fails the checksum is refused, not downloaded."""
  import pytest  # pylint: disable=g-import-not-at-top

  from fineflax import weights  # pylint: disable=g-import-not-at-top

  monkeypatch.setenv('FINEFLAX_CACHE', str(cache))
  monkeypatch.setenv('FINEFLAX_WEIGHTS_MIRROR', f'http://127.0.0.1:{free_port()}')
  with pytest.raises(weights.WeightsUnavailableError) as error:
    weights.resolve('imagenet', backbone, include_top=False)
  message = str(error.value)
  path = cache / 'weights' / filename
  assert '\n' not in message and str(path) in message and checksum in message
  path.write_bytes(b'an impostor')
  with pytest.raises(weights.ChecksumError, match=f'{checksum.split()[1][:16]}.*is refused'):
    weights.resolve('imagenet', backbone, include_top=False)
