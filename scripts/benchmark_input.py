"""Images per second an input pipeline delivers on the host, at 224 x 224 from a folder of
JPEGs: fineflax's streaming path beside torchvision's DataLoader and tf.data.

    python scripts/benchmark_input.py --make 1024 --workers 0,1,2 --batch 32 --repeats 3
    python scripts/benchmark_input.py --folder ~/photos --workers 8 --only fineflax,torch \
        --markdown

FOLDER holds one sub-folder per class (as `folder:PATH` sources and torchvision's
ImageFolder want it); `--make N` first writes N synthetic photos (500x375 and 375x500
JPEGs, quality 90, smooth colour fields plus grain: ~63 KB each) into a temporary folder.
Every pipeline does the same work per image: read the file, decode the whole JPEG to
RGB, take an Inception-style random crop (area 8-100 %, aspect 3/4-4/3), resize it
bilinearly to 224 x 224, and deliver uint8 batches of `--batch` images in a shuffled
order, on the host (nothing goes to a device):

- fineflax: the `folder:` source with `pipeline='stream'`, `augment.crop=
  'random_resized'`, `workers=W`; `stream.read_batches` over `data.train_batches`, a new
  one every epoch as the training loop does (the split's W decoding processes, started at
  its first read, serve every epoch). W=0: grain's threads in this process (one per core,
  up to 16). `jpeg_draft` is on, but a 500x375 photo has no crop it could draft.
- torch: `ImageFolder` with `RandomResizedCrop(224)` + `PILToTensor()` (uint8, no
  normalisation), `DataLoader(batch_size=B, num_workers=W, shuffle=True)`, a new iterator
  every epoch (its default: workers are not persistent). W=0: this process loads, on one
  torch thread (as each worker does).
- tf: file names shuffled, `tf.io.read_file` -> `tf.io.decode_jpeg(channels=3)` -> a crop
  from `tf.image.stateless_sample_distorted_bounding_box` (the same area and aspect
  ranges) -> `tf.image.resize` (bilinear; TF's default: no antialiasing, which PIL's
  resize does, so TF's resize is the cheaper one) -> uint8, `map(num_parallel_calls=
  AUTOTUNE)`, batch, prefetch, `repeat()`. TF is given W threads: tf.data's private
  thread pool of W threads, 1 thread per op (`max_intra_op_parallelism`) and an autotune
  CPU budget of W. W=0: a sequential map on a private pool of 1 thread.
- tf-accurate (only when `--only` names it): tf with PIL's filters, to tell the filters'
  cost from the pipelines': `decode_jpeg(dct_method='INTEGER_ACCURATE')` (PIL's exact
  IDCT; TF's default is a faster, less exact one) and `resize(antialias=True)`.

Timing: each run starts its pipeline, takes `--warmup` batches untimed (the first carries
the start-up: worker processes, the first files; the libraries are imported before a
pipeline's first run), then times `--batches` batches. The figure is images/s over the
timed batches (every image of each batch counts, as each was decoded); `startup_s` is the
wait for the first batch (median of the runs); `cores` (in the table: cores busy) the CPU
time of this process and its worker processes over the timed window, per second of it
(from /proc, Linux only; counted in clock ticks of ~10 ms, so time a second or more):
how many of the W cores a pipeline really kept busy, and with it the images per
CPU-second, the figure that other load on the machine disturbs least.
Batches run on across epochs, so when the timed window reaches past an epoch, a later
epoch's start (grain's or torch's workers starting again) is inside it: `epochs_timed`
says how many began there. An epoch of fineflax or torch that ends without all its
batches stops the benchmark. Each (pipeline, W) runs `--repeats` times, the W and
repeats taken in turn so that other load on the machine spreads over all of them; the
record keeps every rate, the best and the spread. Pipelines run one after the other in
this process, in the order fineflax, torch, tf, tf-accurate whatever `--only` says: TF
last, as torch forks its workers and a fork after TF's threads start is unsafe.

One JSON line for the machine, one per pipeline and W, then a plain table (a Markdown
table with `--markdown`). A peer that is not installed gets a row that says so.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import itertools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

PIPELINES = ('fineflax', 'torch', 'tf', 'tf-accurate')
DEFAULT_PIPELINES = ('fineflax', 'torch', 'tf')
SIZE = 224
PHOTO = (500, 375)  # a typical photo: ImageNet's median is 500x375 (or 375x500)
CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults, as fineflax's
CROP_RATIO = (3 / 4, 4 / 3)
logger = logging.getLogger('fineflax.benchmark_input')


def machine() -> dict[str, Any]:
  """The host: its CPU count, the cores this process may use, the CPU model, and the
  load average (other work on the machine makes the figures noisy)."""
  model = 'unknown'
  with contextlib.suppress(OSError):
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        model = line.split(':', 1)[1].strip()
        break
  usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
  load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, 'getloadavg') else None
  return {'what': 'machine', 'cpu_count': os.cpu_count(), 'usable_cpus': usable,
          'cpu_model': model, 'loadavg_1_5_15min': load}


def make_folder(root: str | os.PathLike, count: int, classes: int = 4, seed: int = 0
                ) -> Path:
  """Writes `count` synthetic photos into `classes` class folders under `root`.

  Noise JPEGs would be unlike photos (large files, slow entropy decoding); smooth colour
  fields with some grain come out near a photo's size and decode like one.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root, rng = Path(root), np.random.default_rng(seed)
  for c in range(classes):
    (root / f'class{c}').mkdir(parents=True, exist_ok=True)
  for i in range(count):
    width, height = PHOTO if i % 2 == 0 else PHOTO[::-1]
    field = rng.integers(0, 256, (6, 8, 3), np.uint8)
    pixels = np.asarray(Image.fromarray(field).resize((width, height),
                                                      Image.Resampling.BICUBIC), np.int16)
    pixels = pixels + rng.normal(0, 10, pixels.shape).astype(np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image.save(root / f'class{i % classes}' / f'{i:06d}.jpg', quality=90)
  return root


def jpegs(folder: Path) -> list[Path]:
  """The JPEG files in the class folders of `folder` (at any depth below them)."""
  return sorted(p for p in folder.glob('*/**/*')
                if p.is_file() and p.suffix.lower() in ('.jpg', '.jpeg'))


def _rows(images: Any, channels_first: bool = False) -> int:
  """The number of images in a delivered batch, after checking their shape and dtype."""
  shape = tuple(images.shape[1:])
  want = (3, SIZE, SIZE) if channels_first else (SIZE, SIZE, 3)
  if shape != want or 'uint8' not in str(images.dtype):
    raise AssertionError(f'a batch of {shape} {images.dtype}, expected {want} uint8')
  return int(images.shape[0])


def _check_epoch(pipeline: str, delivered: int, expected: int) -> None:
  """Raises unless a whole epoch gave all its batches: rates over dropped batches lie."""
  if delivered != expected:
    raise AssertionError(f'{pipeline}: an epoch delivered {delivered} batches, not {expected}')


def fineflax_batches(folder: Path, workers: int, batch: int, seed: int = 0
                     ) -> Iterator[int]:
  """Endless batches of fineflax's streaming path (the rows of each)."""
  from fineflax import config as config_lib, data  # pylint: disable=g-import-not-at-top
  from fineflax.data import decoders, stream  # pylint: disable=g-import-not-at-top
  cfg = config_lib.default_config()
  cfg.data.source = f'folder:{folder}'
  cfg.data.load_size = SIZE
  cfg.data.pipeline = 'stream'
  cfg.data.workers = workers
  cfg.data.augment.crop = 'random_resized'
  cfg.data.validation_split = 0.0
  cfg.data.val_split = cfg.data.test_split = None
  split = data.load_dataset(cfg.data, keys=('train_split',)).splits[cfg.data.train_split]
  try:
    for epoch in itertools.count():
      batches = stream.read_batches(split, data.train_batches(
          split, batch, np.random.default_rng([seed, epoch])))
      delivered = 0
      with contextlib.closing(batches):  # a pass stopped mid-epoch releases the workers
        for images in batches:
          delivered += 1
          yield _rows(images['image'])
      _check_epoch('fineflax', delivered, data.num_batches(split, batch))
  finally:
    decoders.close_workers()  # the next run's start-up counts its own


def torch_batches(folder: Path, workers: int, batch: int, seed: int = 0) -> Iterator[int]:
  """Endless batches of torchvision's ImageFolder + DataLoader."""
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import datasets, transforms  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  transform = transforms.Compose([
      transforms.RandomResizedCrop(SIZE, scale=CROP_SCALE, ratio=CROP_RATIO),
      transforms.PILToTensor()])
  loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), transform),
                                       batch_size=batch, num_workers=workers, shuffle=True)
  # torch's workers run on 1 thread each; loading in this process (W=0), so does it here:
  # on its default of one thread per core, stacking a batch of permuted uint8 images took
  # 20x longer on the loaded 2-core machine (83 ms against 4 ms).
  threads = torch.get_num_threads()
  if not workers:
    torch.set_num_threads(1)
  try:
    while True:
      iterator, delivered = iter(loader), 0
      try:
        for images, _ in iterator:
          delivered += 1
          yield _rows(images, channels_first=True)
        _check_epoch('torch', delivered, len(loader))
      finally:
        # Stopped mid-epoch: shut the worker processes down now, not at garbage collection.
        shutdown = getattr(iterator, '_shutdown_workers', None)
        if shutdown is not None:
          shutdown()
  finally:
    torch.set_num_threads(threads)


def tf_batches(folder: Path, workers: int, batch: int, seed: int = 0,
               accurate: bool = False) -> Iterator[int]:
  """Endless batches of a tf.data pipeline doing the same work on W threads; `accurate`:
  with PIL's filters (exact IDCT, antialiased resize) instead of TF's defaults."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # host only, as the others
  files = [str(p) for p in jpegs(folder)]
  # The class is the top folder under FOLDER, as ImageFolder and `folder:` sources have it.
  classes = [Path(f).relative_to(folder).parts[0] for f in files]
  labels = {name: i for i, name in enumerate(sorted(set(classes)))}

  def load(index, example):
    path, label = example
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3,
                              dct_method='INTEGER_ACCURATE' if accurate else '')
    key = tf.stack([tf.constant(seed, tf.int64), index])  # a crop per example and seed
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([1, 0, 4]), seed=key, min_object_covered=0.0,
        aspect_ratio_range=CROP_RATIO, area_range=CROP_SCALE, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.image.resize(tf.slice(image, begin, size), (SIZE, SIZE), antialias=accurate)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

  dataset = tf.data.Dataset.from_tensor_slices((files, [labels[c] for c in classes]))
  dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
  dataset = dataset.enumerate().map(load, num_parallel_calls=tf.data.AUTOTUNE if workers
                                    else None)
  dataset = dataset.batch(batch).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.threading.private_threadpool_size = max(workers, 1)
  options.threading.max_intra_op_parallelism = 1
  options.autotune.cpu_budget = max(workers, 1)
  for images, _ in dataset.with_options(options).as_numpy_iterator():
    yield _rows(images)


RUNNERS: dict[str, Callable[[Path, int, int], Iterator[int]]] = {
    'fineflax': fineflax_batches, 'torch': torch_batches, 'tf': tf_batches,
    'tf-accurate': functools.partial(tf_batches, accurate=True)}
_MODULES = {'fineflax': ('grain', 'fineflax.data'), 'torch': ('torch', 'torchvision'),
            'tf': ('tensorflow',), 'tf-accurate': ('tensorflow',)}


def missing(pipeline: str) -> str | None:
  """The first module `pipeline` needs that is not installed, else None."""
  return next((m for m in _MODULES[pipeline] if importlib.util.find_spec(m) is None), None)


def cpu_seconds() -> dict[int, float] | None:
  """CPU seconds (user + system, all threads) of this process and of each of its
  descendants (worker processes), by process id; None where /proc cannot tell.

  Each counts its waited-for children's too (cutime, cstime): a worker that ends and is
  joined moves its time into its parent's, so a sum over the tree misses no process
  that ended between two readings.
  """
  tick = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100
  stats, parents = {}, {}
  for entry in Path('/proc').glob('[0-9]*'):
    with contextlib.suppress(OSError, ValueError, IndexError):
      # Fields after the command name, which may hold spaces: see proc(5).
      fields = (entry / 'stat').read_text().rsplit(')', 1)[1].split()
      pid = int(entry.name)
      parents[pid] = int(fields[1])
      stats[pid] = sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
  me = os.getpid()
  if me not in stats:
    return None
  ours, grew = {me}, True
  while grew:
    more = {pid for pid, parent in parents.items() if parent in ours} - ours
    ours |= more
    grew = bool(more)
  return {pid: stats[pid] for pid in ours if pid in stats}


def cores_used(before: dict[int, float] | None, after: dict[int, float] | None,
               seconds: float) -> float | None:
  """The cores busy on average between two `cpu_seconds` readings `seconds` apart."""
  if before is None or after is None:
    return None
  return sum(t - before.get(pid, 0.0) for pid, t in after.items()) / seconds


def time_run(batches: Iterator[int], warmup: int, timed: int, epoch_batches: int
             ) -> dict[str, float]:
  """Times `timed` batches of `batches` after `warmup` untimed ones; closes it."""
  with contextlib.closing(batches):
    start = time.perf_counter()
    next(batches)
    startup = time.perf_counter() - start
    for _ in range(warmup - 1):
      next(batches)
    cpu, start, images = cpu_seconds(), time.perf_counter(), 0
    for _ in range(timed):
      images += next(batches)
    seconds = time.perf_counter() - start
    cores = cores_used(cpu, cpu_seconds(), seconds)
  # Epochs that began inside the timed window (batches warmup+1 .. warmup+timed).
  epochs = (warmup + timed - 1) // epoch_batches - (warmup - 1) // epoch_batches
  return {'images': images, 'seconds': seconds, 'img_per_s': images / seconds,
          'startup_s': startup, 'epochs_timed': epochs, 'cores': cores}


def _record(pipeline: str, workers: int, batch: int, runs: list[dict[str, float]],
            note: str | None = None) -> dict[str, Any]:
  record: dict[str, Any] = {'what': 'input', 'pipeline': pipeline, 'workers': workers,
                            'batch': batch, 'image': SIZE}
  if not runs:
    record.update(img_per_s=None, note=note)
    return record
  rates = [r['img_per_s'] for r in runs]
  best = max(rates)
  record.update(
      img_per_s=round(best, 1),
      img_per_s_per_worker=round(best / workers, 1) if workers else None,
      spread_pct=round(100 * (best - min(rates)) / best, 1),
      run_img_per_s=[round(r, 1) for r in rates],
      images=runs[0]['images'], timed_s=[round(r['seconds'], 3) for r in runs],
      startup_s=round(statistics.median(r['startup_s'] for r in runs), 2),
      # The best run's: the cores it kept busy (this process and its workers).
      cores=None if runs[rates.index(best)]['cores'] is None else
      round(runs[rates.index(best)]['cores'], 2),
      epochs_timed=runs[0]['epochs_timed'])
  return record


def _cell(value: Any, fmt: str = '{:,.0f}') -> str:
  return '-' if value is None else fmt.format(value)


def table(records: list[dict[str, Any]], markdown: bool = False) -> str:
  """The records as a table (a Markdown one with `markdown`)."""
  head = ['pipeline', 'workers', 'batch', 'img/s (best)', 'img/s per worker', 'spread %',
          'runs img/s', 'cores busy', 'img per CPU s', 'start-up s']
  rows = []
  for r in records:
    if r['img_per_s'] is None:
      rows.append([r['pipeline'], str(r['workers']), str(r['batch']), r['note'], '', '', '',
                   '', '', ''])
      continue
    rows.append([r['pipeline'], str(r['workers']), str(r['batch']), _cell(r['img_per_s']),
                 _cell(r['img_per_s_per_worker']), _cell(r['spread_pct'], '{:.0f}'),
                 ', '.join(f'{x:,.0f}' for x in r['run_img_per_s']),
                 _cell(r['cores'], '{:.2f}'),
                 _cell(r['img_per_s'] / r['cores'] if r['cores'] else None),
                 _cell(r['startup_s'], '{:.2f}')])
  if markdown:
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])
  widths = [max(len(x) for x in column) for column in zip(head, *rows)]
  return '\n'.join('  '.join(x.ljust(w) for x, w in zip(row, widths)).rstrip()
                   for row in [head, *rows])


def run(folder: Path, pipelines: Sequence[str], workers: Sequence[int], batch: int,
        timed: int, warmup: int, repeats: int) -> list[dict[str, Any]]:
  """Every pipeline at every W, `repeats` times each; one record per pipeline and W."""
  epoch_batches = -(-len(jpegs(folder)) // batch)
  records = []
  for pipeline in pipelines:
    absent = missing(pipeline)
    if absent:
      records += [_record(pipeline, w, batch, [], f'not installed ({absent})')
                  for w in workers]
      continue
    for module in _MODULES[pipeline]:  # imported here, not in the first run's start-up
      importlib.import_module(module)
    runs: dict[int, list[dict[str, float]]] = {w: [] for w in workers}
    for _, w in itertools.product(range(repeats), workers):
      runs[w].append(time_run(RUNNERS[pipeline](folder, w, batch), warmup, timed,
                              epoch_batches))
      logger.info('%s W=%d: %.1f img/s', pipeline, w, runs[w][-1]['img_per_s'])
    records += [_record(pipeline, w, batch, runs[w]) for w in workers]
  return records


def _list(text: str) -> list[str]:
  return [x.strip() for x in text.split(',') if x.strip()]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Parses the flags, runs the pipelines, prints JSON lines and the table."""
  parser = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument('--folder', type=Path, help='a folder of class folders of JPEGs')
  where.add_argument('--make', type=int, metavar='N',
                     help='write N synthetic 500x375 JPEGs into a temporary folder first')
  parser.add_argument('--workers', default='0,1,2',
                      help='comma-separated worker counts W (0: no worker processes)')
  parser.add_argument('--batch', type=int, default=32, help='images per batch')
  parser.add_argument('--batches', type=int, default=16, help='timed batches per run')
  parser.add_argument('--warmup', type=int, default=2,
                      help='untimed batches first (at least 1: the start-up)')
  parser.add_argument('--repeats', type=int, default=1, help='runs of each pipeline and W')
  parser.add_argument('--only', default=','.join(DEFAULT_PIPELINES),
                      help=f'comma-separated pipelines among {",".join(PIPELINES)}')
  parser.add_argument('--markdown', action='store_true', help='a Markdown table')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s', force=True)
  pipelines = _list(args.only)
  unknown = sorted(set(pipelines) - set(PIPELINES))
  if unknown:
    parser.error(f'--only: unknown pipelines {unknown}; expected some of {list(PIPELINES)}')
  pipelines = sorted(set(pipelines), key=PIPELINES.index)  # TF last: see the docstring
  try:
    workers = [int(w) for w in _list(args.workers)]
  except ValueError:
    parser.error(f'--workers takes comma-separated integers, not {args.workers!r}')
  if not workers or min(workers) < 0:
    parser.error('--workers: at least one count, none negative')
  if min(args.batch, args.batches, args.warmup, args.repeats) < 1 or (
      args.make is not None and args.make < 1):
    parser.error('--batch, --batches, --warmup, --repeats and --make must be at least 1')
  if 'jax' not in sys.modules:
    # Host only: fineflax's data module asks JAX for the process count, and that needs
    # no accelerator started (nor its memory taken).
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  # jax warns at every fork of this (multithreaded) process; torch's workers are forked
  # and run no JAX.
  warnings.filterwarnings('ignore', message='os.fork\\(\\) was called')
  with tempfile.TemporaryDirectory(prefix='fineflax-input-') as temp:
    folder = make_folder(temp, args.make) if args.make else args.folder.expanduser()
    if not folder.is_dir():
      parser.error(f'--folder {folder}: not a folder')
    print(json.dumps(machine()), flush=True)
    records = run(folder, pipelines, workers, args.batch, args.batches, args.warmup,
                  args.repeats)
  for record in records:
    print(json.dumps(record), flush=True)
  print(table(records, args.markdown))
  return records


if __name__ == '__main__':
  main()
