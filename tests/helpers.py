"""What several test files build the same way: the environment of the programs they start,
free ports, small configs and models, a phase's optimizer and train state."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any, Iterator, Sequence

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
  """The environment of a program a test starts: this process's (conftest's compiler
  switch included), with the repository on PYTHONPATH and without conftest's eight
  virtual devices, or on `devices` CPU devices (JAX_PLATFORMS=cpu: the device count
  applies to the host platform only); `cache` as $FINEFLAX_CACHE (else conftest's); the
  variables named in `unset` left out, then `extra` set."""
  env = {k: v for k, v in os.environ.items() if k not in unset}
  env.update(PYTHONPATH=str(ROOT), XLA_FLAGS='')
  if devices is not None:
    env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  if cache is not None:
    env['FINEFLAX_CACHE'] = str(cache)
  env.update(extra)
  return env


@contextlib.contextmanager
def optimized_compilation() -> Iterator[None]:
  """XLA's default optimisation for what this process compiles inside: for the tests
  bound by execution rather than compilation (conftest.py turns it off for the rest)."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)


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
  no history plot (matplotlib redraws it in about 0.3 s an epoch, as long as such an
  epoch; the tests of the plot turn it on), global batch `batch_size`, the config.data
  keys in `data_keys` (the digits unless a source is given) and `phases` (one default
  phase unless given)."""
  cfg = config_lib.default_config()
  cfg.batch_size = batch_size
  cfg.model.backbone = 'resnet_tiny'
  cfg.model.image_size = 16
  cfg.model.preprocessing = 'tf'
  cfg.report.plot = False
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
    line naming the cache path of `filename` and its `checksum` ('sha256 ...', 'md5 ...',
  'sha256 prefix ...');
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
  with pytest.raises(weights.ChecksumError, match=f'{checksum.split()[-1][:16]}.*is refused'):
    weights.resolve('imagenet', backbone, include_top=False)


def relative_difference(got: Any, expected: Any) -> float:
  """max |got - expected| / max |expected|: the parity figure of the reference tests."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  got, expected = np.asarray(got), np.asarray(expected)
  assert got.shape == expected.shape
  return float(np.abs(got - expected).max() / np.abs(expected).max())


def load_weights(
    model: models.Classifier,
    backbone: str,
    weights_spec: Any,
    include_top: bool,
    variables: dict[str, Any],
) -> tuple[dict[str, Any], Any]:
  """`variables` of `model` (`backbone`, with or without Keras' top) with `weights_spec`
  (a path or a name) loaded, and the load's report."""
  from fineflax import weights  # pylint: disable=g-import-not-at-top

  cfg = config_lib.default_config()
  cfg.model.update(backbone=backbone, weights=str(weights_spec), include_top=include_top)
  return weights.load_pretrained(cfg.model, model, variables)


def assert_same_backbone(
    expected: dict[str, Any], got: dict[str, Any], collections: Sequence[str] = ('params',)
) -> None:
  """The backbone's leaves of `collections` ('params', 'batch_stats') are equal, bit for
  bit, in two variable trees."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  for collection in collections:
    for a, b in zip(
        jax.tree.leaves(expected[collection]['backbone']),
        jax.tree.leaves(got[collection]['backbone']),
        strict=True,
    ):
      np.testing.assert_array_equal(a, b)


def assert_converted_and_init_from_load_the_same(
    model: models.Classifier,
    backbone: str,
    path: Path,
    folder: Path,
    side: int,
    collections: Sequence[str] = ('params',),
) -> tuple[dict[str, Any], Any]:
  """`scripts/convert_weights.py`'s checkpoint of the weight file `path`, loaded as
  `config.model.weights` and through `init_from`, gives `model`'s backbone (top-less, a
  new head) what `path` itself gives; returns the variables `path` gives and the report
  of the checkpoint's load."""
  from fineflax import weights  # pylint: disable=g-import-not-at-top
  from fineflax.run import restore  # pylint: disable=g-import-not-at-top
  from tests import scripts_loader  # pylint: disable=g-import-not-at-top

  scripts_loader.load('convert_weights').convert(backbone, str(path), str(folder / 'ckpt'))
  fresh = state_lib.init_variables(model, (side, side, 3), seed=0)
  direct, _ = load_weights(model, backbone, path, False, fresh)
  converted, report = load_weights(model, backbone, folder / 'ckpt', False, fresh)
  assert report.initialised == ['head/dense']
  source = restore.init_from_folder(folder / 'ckpt')
  fresh = state_lib.init_variables(model, (side, side, 3), seed=1)
  started, _ = weights.load_variables(weights.read_variable_tree(source), model, fresh, 'init')
  for other in (converted, started):
    assert_same_backbone(direct, other, collections)
  return direct, report


def assert_torchvision_sources(backbone: str, published: dict[str, Any]) -> dict[str, Any]:
  """`backbone`'s `torchvision:` sources are the members of its weight enum as
  `published` (tests/torchvision_reference.py's `enum_entries`) gives them: the default,
  each one's URL and the sha256 prefix torch hub checks (torchvision publishes no other
  checksum: none in the metadata), top-1; returns {member: its published entry}."""
  from fineflax import weights  # pylint: disable=g-import-not-at-top

  assert weights.sources.DEFAULTS[backbone] == f"torchvision:{published['default']}"
  ours = {s.name: s for s in weights.SOURCES if s.backbone == backbone}
  assert sorted(ours) == sorted(f'torchvision:{name}' for name in published['weights'])
  for name, tv in published['weights'].items():
    source = ours[f'torchvision:{name}']
    assert (source.full.url, source.full.sha256_prefix) == (tv['url'], tv['prefix'])
    assert source.notop is None and source.full.md5 is None and source.full.sha256 is None
    assert source.top1 == f"{tv['acc1']:.2f}%"
    assert not [k for k in tv['meta'] if 'sha' in k.lower() or 'hash' in k.lower()]
  return published['weights']


def torch_reference(tmp_path_factory: Any, module: str) -> Path:
  """The folder that `python -m tests.<module> FOLDER` (a torchvision reference: in a
  process of its own, as torchvision after TensorFlow crashes) fills, run once."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  folder = tmp_path_factory.mktemp(module)
  subprocess.run(
      [sys.executable, '-m', f'tests.{module}', str(folder)], cwd=ROOT, check=True, timeout=300
  )
  return folder


def decay_multipliers(model: models.Classifier, image_shape: tuple[int, int, int]) -> Any:
  """name -> the set of learning-rate multipliers of backbone layer `name`'s parameters
  with `layer_decay` 0.5 (a stage k from the output: 0.5 ** k)."""
  params = models.abstract_variables(model, image_shape)['params']
  groups = phase_optimizer(model, params, layer_decay=0.5).groups
  return lambda name: {
      groups.multipliers[g] for g in jax.tree.leaves(groups.groups['backbone'][name])
  }


def labelled_batch(side: int, n: int = 16, classes: int = 4) -> dict[str, Any]:
  """`n` random uint8 images of `side` x `side`, random labels of `classes`, weights 1."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  return {
      'image': rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),
      'label': rng.integers(0, classes, n).astype(np.int32),
      'weight': np.ones(n, np.float32),
  }


def step_on_one_and_all_devices(
    model: models.Classifier,
    optimizer: optimizers.Optimizer,
    variables: dict[str, Any],
    batch: dict[str, Any],
) -> tuple[state_lib.TrainState, float]:
  """One train step from `variables` on one device and on all (eight): the same loss and
  parameters, up to the order of reductions; the one-device state (on the host) and
  loss."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from fineflax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    train_step = step_lib.make_train_step(model, optimizer, mesh, seed=0)
    state = replicated_state(variables, optimizer, devices)
    state, metrics = train_step(state, parallel.shard_batch(batch, mesh), {})
    results.append((jax.device_get(state), float(metrics['loss'])))
  (one, loss1), (all_, loss_all) = results
  np.testing.assert_allclose(loss1, loss_all, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(all_.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  return one, loss1


def inference_loss(model: models.Classifier, variables: dict[str, Any], batch: Any) -> float:
  """The batch's summed loss in inference mode (nothing dropped)."""
  from fineflax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  logits = model.apply(variables, batch['image'])
  return float(step_lib.per_example_loss(logits, batch['label'])[0].sum())


def frozen_layers(model: models.Classifier, spec: str, params: Any = None) -> set[str]:
  """The backbone layers that freeze spec `spec` freezes (a parameter of theirs); `params`:
  the model's (shapes will do), else those of 32 x 32 images."""
  from fineflax.train import freeze  # pylint: disable=g-import-not-at-top

  if params is None:
    params = models.abstract_variables(model, (32, 32, 3))['params']
  labels = freeze.freeze_labels(params, spec, model.backbone.layers, model.layer_stages())
  return {
      name
      for name, leaves in labels['backbone'].items()
      if freeze.FROZEN in jax.tree.leaves(leaves)
  }


_REFERENCE_MODELS: dict[tuple[str, bool], tuple[models.Classifier, Any]] = {}


def reference_model(backbone: str, include_top: bool) -> tuple[models.Classifier, Any]:
  """`backbone` with Keras' top (1000 classes) or a new head of 3, and its jitted apply:
  the logits, or (top-less) every backbone layer's output, in order. Built once a session
  (one compile per input side)."""
  if (backbone, include_top) not in _REFERENCE_MODELS:
    cfg = config_lib.default_config()
    cfg.model.update(backbone=backbone, include_top=include_top)
    model = models.build_model(cfg.model, 1000 if include_top else 3)
    if include_top:
      fn = jax.jit(model.apply)
    else:
      intermediates = lambda v, x: model.apply(v, x, mutable=['intermediates'])[1]
      fn = jax.jit(lambda v, x: intermediates(v, x)['intermediates']['backbone']['layer_outputs'])
    _REFERENCE_MODELS[backbone, include_top] = (model, fn)
  return _REFERENCE_MODELS[backbone, include_top]
