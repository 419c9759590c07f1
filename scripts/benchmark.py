"""Images per second of fineflax's train step, or of its whole training loop.

    python scripts/benchmark.py --backbone resnet50 --batch 256 --image 224
    python scripts/benchmark.py --backbone resnet50 --batch 512 --image 32 --modes head,conv5
    python scripts/benchmark.py --loop --backbone resnet50 --batch 256 --image 224 \
        --data synthetic:50000:32

Step mode times the step `fineflax.train` runs (`step.make_train_step` with the freeze
plan's `optax.multi_transform` optimizer; `step.make_features_step` for `forward`) on a
synthetic batch already on the devices, BatchNorm frozen, in the compute dtype ('auto':
bfloat16 on GPU/TPU). Modes: forward (feature extraction), head (backbone frozen), conv5
(Keras `layers[:143]` of ResNet50 frozen: everything before the first conv5 layer), full.
Compilation is timed apart; the figure is the median of `--windows` windows of `--steps`
steps after a warm-up window. `--loop` runs `fineflax.train.train_and_evaluate` instead,
on uint8 images of `--data` through the real input pipeline (resized on the device to
`--image`), and reports the last epoch's images/s from its metrics.jsonl.

One JSON line per configuration, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np

from fineflax import config as config_lib, freeze, models, optimizers, parallel
from fineflax import state as state_lib, step as step_lib
from fineflax.reporting import MetricsLog

MODES = ('forward', 'head', 'conv5', 'full')
# The first layer that trains in 'conv5' mode, per backbone family (Keras names).
_CONV5_PREFIXES = ('conv5_', 'block5_')


def freeze_spec(mode: str, backbone_layers: tuple[Any, ...]) -> str:
  """The freeze spec of a benchmark mode ('forward' trains nothing: 'backbone' for shape)."""
  if mode in ('forward', 'head'):
    return 'backbone'
  if mode == 'full':
    return 'none'
  for i, layer in enumerate(backbone_layers):
    if layer.name.startswith(_CONV5_PREFIXES):
      return f'layers[:{i}]'
  raise ValueError('mode conv5: the backbone has no conv5/block5 layer')


def _windows(run: Callable[[int], Any], windows: int, steps: int) -> list[float]:
  """Seconds of each timed window of `steps` calls, after one untimed warm-up window."""
  jax.block_until_ready(run(steps))
  out = []
  for _ in range(windows):
    start = time.perf_counter()
    jax.block_until_ready(run(steps))
    out.append(time.perf_counter() - start)
  return out


def bench_step(backbone: str, mode: str, batch: int, image: int, dtype: str, windows: int,
               steps: int, num_classes: int = 10) -> dict[str, Any]:
  """Times the train (or features) step of one mode; returns the JSON record."""
  cfg = config_lib.default_config()
  cfg.model.backbone = backbone
  compute = models.compute_dtype(dtype)
  model = models.build_model(cfg.model, num_classes, dtype=compute)
  variables = state_lib.init_variables(model, (image, image, 3), seed=0)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(batch, mesh, '--batch')
  rng = np.random.default_rng(0)
  local = batch // jax.process_count()
  host = {'image': rng.integers(0, 256, (local, image, image, 3), dtype=np.uint8),
          'label': rng.integers(0, num_classes, local).astype(np.int32),
          'weight': np.ones(local, np.float32)}
  data = parallel.shard_batch(host, mesh)
  labels = freeze.freeze_labels(variables['params'], freeze_spec(mode, model.backbone.layers),
                                model.backbone.layers)
  if mode == 'forward':
    step = step_lib.make_features_step(model, mesh)
    variables = parallel.replicate(variables, mesh)
    start = time.perf_counter()
    compiled = step.lower(variables, data, {}).compile()
    compile_s = time.perf_counter() - start

    def run(n):
      out = None
      for _ in range(n):
        out = compiled(variables, data, {})
      return out
  else:
    phase = config_lib.phase(freeze=freeze_spec(mode, model.backbone.layers))
    tx = freeze.partition_optimizer(optimizers.build_optimizer(phase, 1).tx, labels)
    state = parallel.replicate(state_lib.create_train_state(variables, tx, labels), mesh)
    step = step_lib.make_train_step(model, tx, labels, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, data, {}).compile()
    compile_s = time.perf_counter() - start
    holder = {'state': state}

    def run(n):
      metrics = None
      for _ in range(n):
        holder['state'], metrics = compiled(holder['state'], data, {})
      return metrics
  seconds = _windows(run, windows, steps)
  rates = [batch * steps / s for s in seconds]
  trainable = sum(label == freeze.TRAINABLE for label in jax.tree.leaves(labels))
  return {'what': 'step', 'backbone': backbone, 'mode': mode, 'batch': batch, 'image': image,
          'dtype': str(np.dtype(compute)), 'devices': mesh.devices.size,
          'platform': jax.devices()[0].platform, 'device_kind': jax.devices()[0].device_kind,
          'compile_s': round(compile_s, 2), 'img_per_s': round(statistics.median(rates), 1),
          'window_img_per_s': [round(r, 1) for r in rates], 'steps_per_window': steps,
          'trainable_leaves': 0 if mode == 'forward' else trainable}


def bench_loop(backbone: str, mode: str, batch: int, image: int, dtype: str, source: str,
               epochs: int) -> dict[str, Any]:
  """Runs `train_and_evaluate` on `source` for `epochs` and reports its last epoch."""
  from fineflax import train  # pylint: disable=g-import-not-at-top
  cfg = config_lib.default_config()
  cfg.batch_size = batch
  cfg.dtype = dtype
  cfg.model.backbone = backbone
  cfg.model.image_size = image
  cfg.data.source = source
  cfg.data.val_split = cfg.data.test_split = None
  cfg.data.augment.flip = 'horizontal'  # the loop includes on-device augmentation
  cfg.features.cache = 'off'
  cfg.report.update(progress='off', tensorboard=False, plot=False)
  layers = models.BACKBONES[backbone].build().layers
  if mode == 'forward':
    raise ValueError('--loop measures training: modes head, conv5, full')
  cfg.phases = (config_lib.phase(name=mode, freeze=freeze_spec(mode, layers), epochs=epochs),)
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(cfg, workdir)
    last = MetricsLog(workdir).read()[-1]
  return {'what': 'loop', 'backbone': backbone, 'mode': mode, 'batch': batch, 'image': image,
          'data': source, 'dtype': str(np.dtype(models.compute_dtype(dtype))),
          'devices': jax.device_count(), 'platform': jax.devices()[0].platform,
          'device_kind': jax.devices()[0].device_kind,
          'img_per_s': round(last['images_per_sec'], 1), 'epochs': epochs}


def table(records: list[dict[str, Any]]) -> str:
  """The records as a Markdown table."""
  rows = ['| what | backbone | mode | batch | image | dtype | devices | compile s | img/s |',
          '|---|---|---|---|---|---|---|---|---|']
  for r in records:
    rows.append(f"| {r['what']} | {r['backbone']} | {r['mode']} | {r['batch']} | "
                f"{r['image']} | {r['dtype']} | {r['devices']} {r['device_kind']} | "
                f"{r.get('compile_s', '')} | {r['img_per_s']:,.0f} |")
  return '\n'.join(rows)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Parses the flags, runs every mode, prints JSON lines and the table."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--backbone', default='resnet50', choices=sorted(models.BACKBONES))
  parser.add_argument('--batch', type=int, default=256, help='global batch size')
  parser.add_argument('--image', type=int, default=224, help='model input side')
  parser.add_argument('--modes', default=None,
                      help='comma-separated modes (default: all; --loop: all but forward)')
  parser.add_argument('--dtype', default='auto', choices=('auto', 'float32', 'bfloat16'))
  parser.add_argument('--windows', type=int, default=5, help='timed windows (median)')
  parser.add_argument('--steps', type=int, default=20, help='steps per window')
  parser.add_argument('--loop', action='store_true', help='time the whole training loop')
  parser.add_argument('--data', default='synthetic:50000:32', help='--loop: data source')
  parser.add_argument('--epochs', type=int, default=2, help='--loop: epochs (last reported)')
  args = parser.parse_args(argv)
  default = ','.join(MODES[1:] if args.loop else MODES)
  modes = [m for m in (args.modes or default).split(',') if m]
  unknown = sorted(set(modes) - set(MODES))
  if unknown:
    parser.error(f'unknown modes {unknown}; expected some of {list(MODES)}')
  records = []
  for mode in modes:
    if args.loop:
      record = bench_loop(args.backbone, mode, args.batch, args.image, args.dtype, args.data,
                          args.epochs)
    else:
      record = bench_step(args.backbone, mode, args.batch, args.image, args.dtype,
                          args.windows, args.steps)
    print(json.dumps(record), flush=True)
    records.append(record)
  print(table(records))
  return records


if __name__ == '__main__':
  main()
