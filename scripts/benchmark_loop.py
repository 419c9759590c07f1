"""The training loop of `python scripts/benchmark.py --loop` and `--host`, and the freeze
spec of each benchmark mode.

`--loop` runs `fineflax.train.train_and_evaluate` and reports the last epoch's images/s.
`--host` runs the same loop with its train step replaced by one that does no work (it
only counts the step), so that what is left is the host's work per step: the batches or
the epoch's plan, the step's dispatch, the progress display, per-step records and the
epoch's bookkeeping. It reports the last epoch's time in `loop.train_epoch` per step:
the Python thread's CPU time (what a fast accelerator would wait for, unless it overlaps)
and the wall time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import tempfile
import time
from typing import Any, Iterator
from unittest import mock

import jax
import numpy as np

from fineflax import config as config_lib, models
from fineflax.run.reporting import MetricsLog
from fineflax.train import loop, step as step_lib

MODES = ('forward', 'head', 'conv5', 'full')
# The parameter-efficient modes, run when named in --modes: BatchNorm's scale and offset
# and the head ('norm+head'); LoRA adapters of rank --lora-rank on every convolution and
# dense layer of the backbone, and the head.
PEFT_MODES = ('norm', 'lora')
# The first layer that trains in 'conv5' mode, per backbone family (Keras names): ResNet's
# conv5, VGG16's block5, ConvNeXt's last stage (its last downsampling block on),
# EfficientNet's and V2's block6a on (their last resolution, 1/32, as ResNet's conv5).
_CONV5_FIRST = re.compile(r'^(conv5_|block5_|convnext_\w+_downsampling_block_2$|block6a_)')


def freeze_spec(mode: str, backbone_layers: tuple[Any, ...]) -> str:
  """The freeze spec of a benchmark mode ('forward' trains nothing: 'backbone' for shape)."""
  if mode in ('forward', 'head'):
    return 'backbone'
  if mode in ('full', 'lora'):  # lora: 'none' on the adapted model trains adapters + head
    return 'none'
  if mode == 'norm':
    return 'norm+head'
  names = [layer.name for layer in backbone_layers]
  # A ViT has no stages of resolution: its last quarter of encoder blocks trains.
  blocks = sum(name.endswith('_ln_1') and name.startswith('encoder_layer_') for name in names)
  if blocks:
    return f"layers[:{names.index(f'encoder_layer_{blocks - blocks // 4}_ln_1')}]"
  for i, name in enumerate(names):
    if _CONV5_FIRST.match(name):
      return f'layers[:{i}]'
  raise ValueError(
      'mode conv5: the backbone has no conv5/block5 layer, last ConvNeXt stage, EfficientNet '
      'block6a or ViT encoder blocks'
  )


def _loop_config(
    backbone: str,
    mode: str,
    batch: int,
    image: int,
    dtype: str,
    source: str,
    epochs: int,
    every_steps: int | None = None,
) -> Any:
  """The config of a one-phase run in `mode`, with on-device augmentation."""
  cfg = config_lib.default_config()
  cfg.batch_size = batch
  cfg.dtype = dtype
  cfg.model.backbone = backbone
  cfg.model.image_size = image
  cfg.data.source = source
  cfg.data.val_split = cfg.data.test_split = None
  cfg.data.augment.flip = 'horizontal'  # the loop includes on-device augmentation
  cfg.features.cache = 'off'
  cfg.report.update(
      progress='off', tensorboard=bool(every_steps), plot=False, every_steps=every_steps
  )
  layers = models.BACKBONES[backbone].build().layers
  if mode == 'forward':
    raise ValueError('--loop and --host measure training: modes head, conv5, full')
  cfg.phases = (config_lib.phase(name=mode, freeze=freeze_spec(mode, layers), epochs=epochs),)
  return cfg


def _header(
    what: str,
    backbone: str,
    mode: str,
    batch: int,
    image: int,
    dtype: str,
    source: str,
    epochs: int,
) -> dict[str, Any]:
  return {
      'what': what,
      'backbone': backbone,
      'mode': mode,
      'batch': batch,
      'image': image,
      'data': source,
      'dtype': str(np.dtype(models.compute_dtype(dtype))),
      'devices': jax.device_count(),
      'platform': jax.devices()[0].platform,
      'device_kind': jax.devices()[0].device_kind,
      'epochs': epochs,
  }


def bench_loop(
    backbone: str,
    mode: str,
    batch: int,
    image: int,
    dtype: str,
    source: str,
    epochs: int,
    every_steps: int | None = None,
) -> dict[str, Any]:
  """Runs `train_and_evaluate` on `source` for `epochs` and reports its last epoch
  (`every_steps`: with per-step records, to TensorBoard too)."""
  from fineflax import train  # pylint: disable=g-import-not-at-top

  cfg = _loop_config(backbone, mode, batch, image, dtype, source, epochs, every_steps)
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(cfg, workdir)
    last = MetricsLog(workdir).read()[-1]
  return {
      **_header('loop', backbone, mode, batch, image, dtype, source, epochs),
      'img_per_s': round(last['images_per_sec'], 1),
      'every_steps': every_steps,
  }


def _idle_step(make_train_step: Any) -> Any:
  """`make_train_step` whose step does no work: it only counts the step."""

  def make(*args, **kwargs):
    real = make_train_step(*args, **kwargs)

    def run(carry, fixed, batch, data, metrics, structure):
      del fixed, batch, data
      tree = structure[0].unflatten(carry)
      return jax.tree.leaves(dict(tree, step=tree['step'] + 1)), metrics

    return dataclasses.replace(real, jitted=jax.jit(run, donate_argnums=0, static_argnums=5))

  return make


@contextlib.contextmanager
def _epoch_times() -> Iterator[list[tuple[int, int, int]]]:
  """Records (thread CPU ns, wall ns, steps) of every `loop.train_epoch` call."""
  times: list[tuple[int, int, int]] = []
  train_epoch = loop.train_epoch

  def timed(run, on, train_step, state, *args, **kwargs):
    first = int(state.step)
    cpu, wall = time.thread_time_ns(), time.perf_counter_ns()
    out = train_epoch(run, on, train_step, state, *args, **kwargs)
    cpu, wall = time.thread_time_ns() - cpu, time.perf_counter_ns() - wall
    times.append((cpu, wall, int(out[0].step) - first))
    return out

  with mock.patch.object(loop, 'train_epoch', timed):
    yield times


def bench_host(
    backbone: str,
    mode: str,
    batch: int,
    image: int,
    source: str,
    epochs: int,
    every_steps: int | None = None,
) -> dict[str, Any]:
  """The host's time per step in the training loop of `mode`, its step doing no work:
  the last of `epochs` epochs' time in `loop.train_epoch` per step (`every_steps`: with
  per-step records)."""
  from fineflax import train  # pylint: disable=g-import-not-at-top

  cfg = _loop_config(backbone, mode, batch, image, 'float32', source, epochs, every_steps)
  with (
      tempfile.TemporaryDirectory() as workdir,
      _epoch_times() as times,
      mock.patch.object(step_lib, 'make_train_step', _idle_step(step_lib.make_train_step)),
  ):
    train.train_and_evaluate(cfg, workdir)
  cpu, wall, steps = times[-1]
  return {
      **_header('host', backbone, mode, batch, image, 'float32', source, epochs),
      'steps': steps,
      'host_us_per_step': round(cpu / steps / 1e3, 1),
      'wall_us_per_step': round(wall / steps / 1e3, 1),
      'every_steps': every_steps,
  }
