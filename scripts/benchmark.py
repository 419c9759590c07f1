r"""Images per second of fineflax's train step, or of its whole training loop; or what the
compiled step costs (FLOPs, memory) and how large a batch fits, without running it.

    python scripts/benchmark.py --backbone resnet50 --batch 256 --image 224
    python scripts/benchmark.py --backbone resnet50 --batch 512 --image 32 --modes head,conv5
    python scripts/benchmark.py --loop --backbone resnet50 --batch 256 --image 224 \
        --data synthetic:50000:32
    python scripts/benchmark.py --host --backbone resnet_tiny --batch 32 --image 16
    python scripts/benchmark.py --cost --backbone resnet50 --batch 8 --image 224
    python scripts/benchmark.py --max-batch 80 --backbone resnet50 --batch 8 --image 224

Step mode times the step `fineflax.train` runs (`step.make_train_step` with the freeze
plan's `optax.multi_transform` optimizer; `step.make_features_step` for `forward`) on a
synthetic batch already on the devices, BatchNorm frozen, in the compute dtype ('auto':
bfloat16 on GPU/TPU). Modes: forward (feature extraction), head (backbone frozen), conv5
(Keras `layers[:143]` of ResNet50 frozen: everything before the first conv5 layer; VGG16:
before block5; ConvNeXt: before its last stage), full; and, when named in --modes, the
parameter-efficient norm (BatchNorm's scale and offset, and the head: 'norm+head') and
lora (LoRA adapters of rank --lora-rank on the backbone's convolutions and dense layers,
and the head).
Compilation is timed apart; the figure is the median of `--windows` windows of `--steps`
steps after a warm-up window. `--loop` runs `fineflax.train.train_and_evaluate` instead,
on uint8 images of `--data` through the real input pipeline (resized on the device to
`--image`), and reports the last epoch's images/s from its metrics.jsonl; `--host` runs
that loop with a train step that does no work, and reports the host's time per step
(scripts/benchmark_loop.py).

`--cost` compiles the same steps at `--batch` (default 256, as for timing; `--batch 8` is
plenty on a CPU) and runs nothing: per mode, XLA's cost analysis (GFLOP per image of one
device's program over its share of the batch; `x_forward`, the mode's FLOPs over the
forward step's, which is always compiled as the reference) and memory analysis (argument,
output, temporary, aliased MB per device), with the mode's trainable parameters and the
bytes of its optimizer state. Per-image FLOPs hardly depend on the batch,
except that the optimizer's per-step update (~24 FLOPs a trainable parameter) is
shared by fewer images in a small per-device batch. `--max-batch GIB` (alone or with
`--cost`) adds, per mode, the largest global batch whose compiled step (arguments +
outputs + temporaries - donated aliases) fits in GIB GiB per device, from a few compiles'
memory analyses; it is the backend's own analysis, so a CPU compile's answer is not a GPU's.

One JSON line per configuration, then a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from fineflax import config as config_lib, models
from fineflax.distributed import parallel, runtime
from fineflax.errors import FineflaxError
from fineflax.train import ema as ema_lib, freeze, optimizers, state as state_lib, step as step_lib

# This script's folder, for its cost and loop modules: on the path when the script runs,
# not when a test loads it by its path (tests/scripts_loader.py).
if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.append(str(Path(__file__).resolve().parent))

from benchmark_cost import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    cost_table,
    flops,
    max_batch,
    mode_label,
    step_bytes,
)
from benchmark_loop import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    MODES,
    PEFT_MODES,
    bench_host,
    bench_loop,
    freeze_spec,
)

MB = 2**20
logger = logging.getLogger('fineflax.benchmark')


@dataclasses.dataclass
class BuiltStep:
  """A mode's jitted step and its arguments: the features step's `(variables, batch,
  data)`, or the train step's `(carry, fixed, batch, data, metrics)` as the training loop
  passes them (`fineflax.train.step.TrainStep.jitted`, its `structure` static), whose
  carry (the first argument and output) is donated."""

  step: Any  # jax.jit-wrapped
  args: tuple[Any, ...]
  mesh: Mesh
  compute: Any  # the compute dtype
  trainable_leaves: int  # 0 for forward
  static: tuple[Any, ...] = ()  # arguments the compiled step is specialised on
  ema_decay: float | None = None  # the train step keeps a moving average of the weights
  trainable_params: int = 0  # values of the trainable leaves
  opt_state_bytes: int = 0  # the optimizer state's (one device's copy)

  @property
  def trains(self) -> bool:
    return self.trainable_leaves > 0

  def compile(self, batch: int | None = None) -> Any:
    """The compiled step, lowered on the arguments' shapes and shardings only (nothing is
    read or donated), with the batch resized to `batch` rows when given."""
    spec = lambda x, shape=None: jax.ShapeDtypeStruct(
        shape or x.shape, x.dtype, sharding=x.sharding
    )
    args = [jax.tree.map(spec, a) for a in self.args]
    rows = 2 if self.trains else 1  # the batch argument
    args[rows] = jax.tree.map(
        lambda x: spec(x, (batch or x.shape[0],) + x.shape[1:]), self.args[rows]
    )
    return self.step.lower(*args, *self.static).compile()


def build_step(
    backbone: str,
    mode: str,
    batch: int,
    image: int,
    dtype: str,
    num_classes: int = 10,
    devices: Sequence[jax.Device] | None = None,
    ema_decay: float | None = None,
    lora_rank: int = 8,
) -> BuiltStep:
  """The step of one mode, as `fineflax.train` builds it, on a random uint8 batch, over
  `devices` (default: all); `ema_decay`: keeping a moving average of the weights;
  `lora_rank`: the adapters' rank in mode 'lora'."""
  cfg = config_lib.default_config()
  cfg.model.backbone = backbone
  if mode == 'lora':
    cfg.model.lora.rank = lora_rank
  compute = models.compute_dtype(dtype)
  model = models.build_model(cfg.model, num_classes, dtype=compute)
  variables = state_lib.init_variables(model, (image, image, 3), seed=0)
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(batch, mesh, '--batch')
  rng = np.random.default_rng(0)
  local = batch // jax.process_count()
  host = {
      'image': rng.integers(0, 256, (local, image, image, 3), dtype=np.uint8),
      'label': rng.integers(0, num_classes, local).astype(np.int32),
      'weight': np.ones(local, np.float32),
  }
  data = parallel.shard_batch(host, mesh)
  spec = freeze_spec(mode, model.backbone.layers)
  if mode == 'forward':
    return BuiltStep(
        step_lib.make_features_step(model, mesh),
        (parallel.replicate(variables, mesh), data, {}),
        mesh,
        compute,
        0,
    )
  optimizer = optimizers.make_optimizer(
      model, variables['params'], config_lib.phase(freeze=spec), 1
  )
  state = parallel.replicate(state_lib.create_train_state(variables, optimizer), mesh)
  trainable = sum(label == freeze.TRAINABLE for label in jax.tree.leaves(optimizer.labels))
  trainable_params = sum(x.size for x in jax.tree.leaves(optimizer.trainable(variables['params'])))
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  average = None if ema_decay is None else ema_lib.Ema(ema_decay)
  if average is not None:
    begun = ema_lib.begin(average, optimizer.trainable(state.params), None, state.step, None)
    state = state.replace(ema=begun)
  train_step = step_lib.make_train_step(model, optimizer, mesh, ema=average)
  carry, fixed, structure = train_step.split(state)
  start = parallel.replicate(np.zeros((), np.int32), mesh)
  metrics = parallel.replicate(np.zeros((1, 3), np.float32), mesh)
  return BuiltStep(
      train_step.jitted,
      (carry, fixed, data, {'start': start}, metrics),
      mesh,
      compute,
      trainable,
      (structure,),
      ema_decay,
      trainable_params,
      opt_bytes,
  )


def _header(
    what: str, backbone: str, mode: str, batch: int, image: int, built: BuiltStep
) -> dict[str, Any]:
  device = built.mesh.devices.flat[0]
  return {
      'what': what,
      'backbone': backbone,
      'mode': mode,
      'batch': batch,
      'image': image,
      'dtype': str(np.dtype(built.compute)),
      'devices': built.mesh.devices.size,
      'platform': device.platform,
      'device_kind': device.device_kind,
      'ema': built.ema_decay,
  }


def _windows(run: Callable[[int], Any], windows: int, steps: int) -> list[float]:
  """Seconds of each timed window of `steps` calls, after one untimed warm-up window."""
  jax.block_until_ready(run(steps))
  out = []
  for _ in range(windows):
    start = time.perf_counter()
    jax.block_until_ready(run(steps))
    out.append(time.perf_counter() - start)
  return out


def bench_step(
    backbone: str,
    mode: str,
    batch: int,
    image: int,
    dtype: str,
    windows: int,
    steps: int,
    num_classes: int = 10,
    ema_decay: float | None = None,
) -> dict[str, Any]:
  """Times the train (or features) step of one mode; returns the JSON record."""
  built = build_step(backbone, mode, batch, image, dtype, num_classes, ema_decay=ema_decay)
  start = time.perf_counter()
  compiled = built.compile()
  compile_s = time.perf_counter() - start
  args = list(built.args)

  def run(n):
    out = None
    for _ in range(n):
      out = compiled(*args)
      if built.trains:  # the train step donated its carry: pass the new one on
        args[0], out = out
    return out

  seconds = _windows(run, windows, steps)
  rates = [batch * steps / s for s in seconds]
  return {
      **_header('step', backbone, mode, batch, image, built),
      'compile_s': round(compile_s, 2),
      'img_per_s': round(statistics.median(rates), 1),
      'window_img_per_s': [round(r, 1) for r in rates],
      'steps_per_window': steps,
      'trainable_leaves': built.trainable_leaves,
  }


def cost_records(
    backbone: str,
    modes: list[str],
    batch: int,
    image: int,
    dtype: str,
    max_batch_gib: float | None = None,
    num_classes: int = 10,
    devices: Sequence[jax.Device] | None = None,
    ema_decay: float | None = None,
    lora_rank: int = 8,
) -> Iterator[dict[str, Any]]:
  """Compiles each mode's step at `batch` (and forward's, the reference) without running
  it; yields one 'cost' record per mode, with `max_batch` when `max_batch_gib` is given."""
  forward_flops = None
  for mode in ['forward'] + [m for m in modes if m != 'forward']:
    decay = None if mode == 'forward' else ema_decay
    built = build_step(backbone, mode, batch, image, dtype, num_classes, devices, decay, lora_rank)
    start = time.perf_counter()
    compiled = built.compile()
    compile_s = time.perf_counter() - start
    mode_flops = flops(compiled)
    forward_flops = forward_flops or mode_flops
    m = compiled.memory_analysis()
    # Under SPMD the analyses describe one device's program, which sees its share of rows.
    per_device = batch // built.mesh.devices.size
    record = {
        **_header('cost', backbone, mode, batch, image, built),
        'compile_s': round(compile_s, 2),
        'gflop_per_image': round(mode_flops / per_device / 1e9, 4),
        'x_forward': round(mode_flops / forward_flops, 4),
        'temp_mb': round(m.temp_size_in_bytes / MB, 2),
        'argument_mb': round(m.argument_size_in_bytes / MB, 2),
        'output_mb': round(m.output_size_in_bytes / MB, 2),
        'alias_mb': round(m.alias_size_in_bytes / MB, 2),
        'step_mb': round(step_bytes(compiled) / MB, 2),
        'trainable_leaves': built.trainable_leaves,
        'trainable_params': built.trainable_params,
        'opt_state_mb': round(built.opt_state_bytes / MB, 2),
        'lora_rank': lora_rank if mode == 'lora' else None,
    }
    if max_batch_gib is not None and mode in modes:
      known = {batch: step_bytes(compiled)}
      record['max_batch'] = max_batch(
          lambda b: step_bytes(built.compile(b)),
          max_batch_gib * 2**30,
          known,
          quantum=built.mesh.devices.size,
      )
      record['max_batch_gib'] = max_batch_gib
      record['max_batch_compiles'] = len(known)
    if mode in modes:
      yield record


def table(records: list[dict[str, Any]]) -> str:
  """The records as a Markdown table (cost records: FLOPs and memory, others: speed)."""
  if records and records[0]['what'] == 'cost':
    return cost_table(records)
  if records and records[0]['what'] == 'host':
    return _host_table(records)
  rows = [
      '| what | backbone | mode | batch | image | dtype | devices | compile s | img/s |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in records:
    rows.append(
        f"| {r['what']} | {r['backbone']} | {mode_label(r)} | {r['batch']} | "
        f"{r['image']} | {r['dtype']} | {r['devices']} {r['device_kind']} | "
        f"{r.get('compile_s', '')} | {r['img_per_s']:,.0f} |"
    )
  return '\n'.join(rows)


def _host_table(records: list[dict[str, Any]]) -> str:
  rows = [
      '| backbone | mode | batch | image | data | every_steps | devices | steps | '
      'host us/step (thread CPU) | wall us/step |',
      '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in records:
    rows.append(
        f"| {r['backbone']} | {r['mode']} | {r['batch']} | {r['image']} | "
        f"{r['data']} | {r['every_steps'] or '-'} | {r['devices']} "
        f"{r['device_kind']} | {r['steps']} | {r['host_us_per_step']:.0f} | "
        f"{r['wall_us_per_step']:.0f} |"
    )
  return '\n'.join(rows)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Parses the flags, runs every mode, prints JSON lines and the table."""
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--backbone', default='resnet50', choices=sorted(models.BACKBONES))
  parser.add_argument('--batch', type=int, default=256, help='global batch size')
  parser.add_argument('--image', type=int, default=224, help='model input side')
  parser.add_argument(
      '--modes', default=None, help='comma-separated modes (default: all; --loop: all but forward)'
  )
  parser.add_argument('--dtype', default='auto', choices=('auto', 'float32', 'bfloat16'))
  parser.add_argument('--windows', type=int, default=5, help='timed windows (median)')
  parser.add_argument('--steps', type=int, default=20, help='steps per window')
  parser.add_argument('--loop', action='store_true', help='time the whole training loop')
  parser.add_argument(
      '--ema',
      type=float,
      default=None,
      metavar='DECAY',
      help='step and --cost: the train step keeps a moving average of the weights',
  )
  parser.add_argument(
      '--host',
      action='store_true',
      help="the training loop's host time per step (a step that does no " 'work)',
  )
  parser.add_argument(
      '--lora-rank', type=int, default=8, help="mode lora: the adapters' rank (default 8)"
  )
  parser.add_argument('--data', default='synthetic:50000:32', help='--loop: data source')
  parser.add_argument('--epochs', type=int, default=2, help='--loop: epochs (last reported)')
  parser.add_argument(
      '--every-steps',
      type=int,
      default=None,
      help='--loop, --host: with per-step records every N steps ' '(report.every_steps)',
  )
  parser.add_argument(
      '--cost',
      action='store_true',
      help='compile only: XLA FLOPs and memory per mode (--batch 8 is ' 'plenty on a CPU)',
  )
  parser.add_argument(
      '--max-batch',
      type=float,
      default=None,
      metavar='GIB',
      help='compile only: the largest global batch per mode whose step '
      'fits in GIB GiB of device memory (implies --cost)',
  )
  args = parser.parse_args(argv)
  # fineflax's INFO on stderr: stdout carries only the JSON lines and the table. The
  # libraries' at WARNING: JAX logs at INFO each backend it tried and does not have
  # ("Unable to initialize backend 'tpu'" on every machine without one).
  # force: importing fineflax (absl) has already given the root logger a handler.
  logging.basicConfig(level=logging.WARNING, format='%(message)s', force=True)
  logging.getLogger('fineflax').setLevel(logging.INFO)
  try:
    runtime.check_backend()
  except FineflaxError as e:  # ConfigError, or runtime's AcceleratorUnusedError
    parser.exit(2, f'error: {e}\n')
  cost = args.cost or args.max_batch is not None
  if (args.loop or args.host) and cost:
    parser.error('--loop and --host time training; --cost/--max-batch compile only')
  if args.max_batch is not None and args.max_batch <= 0:
    parser.error('--max-batch takes a positive number of GiB')
  default = ','.join(MODES[1:] if args.loop or args.host else MODES)
  modes = [m for m in (args.modes or default).split(',') if m]
  unknown = sorted(set(modes) - set(MODES + PEFT_MODES))
  if unknown:
    parser.error(f'unknown modes {unknown}; expected some of {list(MODES + PEFT_MODES)}')
  if args.lora_rank <= 0:
    parser.error('--lora-rank takes a positive rank')
  if cost:
    runs = cost_records(
        args.backbone,
        modes,
        args.batch,
        args.image,
        args.dtype,
        args.max_batch,
        ema_decay=args.ema,
        lora_rank=args.lora_rank,
    )
  elif args.loop:
    runs = (
        bench_loop(
            args.backbone,
            mode,
            args.batch,
            args.image,
            args.dtype,
            args.data,
            args.epochs,
            args.every_steps,
        )
        for mode in modes
    )
  elif args.host:
    runs = (
        bench_host(
            args.backbone, mode, args.batch, args.image, args.data, args.epochs, args.every_steps
        )
        for mode in modes
    )
  else:
    runs = (
        bench_step(
            args.backbone,
            mode,
            args.batch,
            args.image,
            args.dtype,
            args.windows,
            args.steps,
            ema_decay=args.ema,
        )
        for mode in modes
    )
  records = []
  for record in runs:
    print(json.dumps(record), flush=True)
    records.append(record)
  print(table(records))
  return records


if __name__ == '__main__':
  main()
