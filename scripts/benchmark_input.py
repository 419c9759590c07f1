"""Images per second an input pipeline delivers on the host, at 224 x 224 from a folder of
JPEGs: fineflax's streaming path beside torchvision's DataLoader and tf.data.

    python scripts/benchmark_input.py --make 1024 --workers 0,1,2 --batch 32 --repeats 3
    python scripts/benchmark_input.py --folder ~/photos --workers 8 --only fineflax,torch \
        --markdown

FOLDER holds one sub-folder per class (as `folder:PATH` sources and torchvision's
ImageFolder want it); `--make N` first writes N synthetic photos (500x375 and 375x500
JPEGs, quality 90, smooth colour fields plus grain: ~63 KB each) into a temporary folder.
Every pipeline does the same work per image and delivers uint8 batches of `--batch`
images on the host: scripts/benchmark_input_pipelines.py says how each does it (fineflax,
torch, tf; tf-accurate, TF with PIL's filters, only when `--only` names it).

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
import importlib
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
from typing import Any, Iterator, Sequence

# This script's folder, for its pipelines module: on the path when the script runs, not
# when a test loads it by its path (tests/scripts_loader.py).
if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.append(str(Path(__file__).resolve().parent))

from benchmark_input_pipelines import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    MODULES,
    PIPELINES,
    RUNNERS,
    SIZE,
    jpegs,
    make_folder,
    missing,
)

DEFAULT_PIPELINES = ('fineflax', 'torch', 'tf')
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
  return {
      'what': 'machine',
      'cpu_count': os.cpu_count(),
      'usable_cpus': usable,
      'cpu_model': model,
      'loadavg_1_5_15min': load,
  }


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


def cores_used(
    before: dict[int, float] | None, after: dict[int, float] | None, seconds: float
) -> float | None:
  """The cores busy on average between two `cpu_seconds` readings `seconds` apart."""
  if before is None or after is None:
    return None
  return sum(t - before.get(pid, 0.0) for pid, t in after.items()) / seconds


def time_run(
    batches: Iterator[int], warmup: int, timed: int, epoch_batches: int
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
  return {
      'images': images,
      'seconds': seconds,
      'img_per_s': images / seconds,
      'startup_s': startup,
      'epochs_timed': epochs,
      'cores': cores,
  }


def _record(
    pipeline: str, workers: int, batch: int, runs: list[dict[str, float]], note: str | None = None
) -> dict[str, Any]:
  record: dict[str, Any] = {
      'what': 'input',
      'pipeline': pipeline,
      'workers': workers,
      'batch': batch,
      'image': SIZE,
  }
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
      images=runs[0]['images'],
      timed_s=[round(r['seconds'], 3) for r in runs],
      startup_s=round(statistics.median(r['startup_s'] for r in runs), 2),
      # The best run's: the cores it kept busy (this process and its workers).
      cores=None
      if runs[rates.index(best)]['cores'] is None
      else round(runs[rates.index(best)]['cores'], 2),
      epochs_timed=runs[0]['epochs_timed'],
  )
  return record


def _cell(value: Any, fmt: str = '{:,.0f}') -> str:
  return '-' if value is None else fmt.format(value)


def table(records: list[dict[str, Any]], markdown: bool = False) -> str:
  """The records as a table (a Markdown one with `markdown`)."""
  head = [
      'pipeline',
      'workers',
      'batch',
      'img/s (best)',
      'img/s per worker',
      'spread %',
      'runs img/s',
      'cores busy',
      'img per CPU s',
      'start-up s',
  ]
  rows = []
  for r in records:
    if r['img_per_s'] is None:
      rows.append(
          [r['pipeline'], str(r['workers']), str(r['batch']), r['note'], '', '', '', '', '', '']
      )
      continue
    rows.append(
        [
            r['pipeline'],
            str(r['workers']),
            str(r['batch']),
            _cell(r['img_per_s']),
            _cell(r['img_per_s_per_worker']),
            _cell(r['spread_pct'], '{:.0f}'),
            ', '.join(f'{x:,.0f}' for x in r['run_img_per_s']),
            _cell(r['cores'], '{:.2f}'),
            _cell(r['img_per_s'] / r['cores'] if r['cores'] else None),
            _cell(r['startup_s'], '{:.2f}'),
        ]
    )
  if markdown:
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])
  widths = [max(len(x) for x in column) for column in zip(head, *rows)]
  return '\n'.join(
      '  '.join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *rows]
  )


def run(
    folder: Path,
    pipelines: Sequence[str],
    workers: Sequence[int],
    batch: int,
    timed: int,
    warmup: int,
    repeats: int,
) -> list[dict[str, Any]]:
  """Every pipeline at every W, `repeats` times each; one record per pipeline and W."""
  epoch_batches = -(-len(jpegs(folder)) // batch)
  records = []
  for pipeline in pipelines:
    absent = missing(pipeline)
    if absent:
      records += [_record(pipeline, w, batch, [], f'not installed ({absent})') for w in workers]
      continue
    for module in MODULES[pipeline]:  # imported here, not in the first run's start-up
      importlib.import_module(module)
    runs: dict[int, list[dict[str, float]]] = {w: [] for w in workers}
    for _, w in itertools.product(range(repeats), workers):
      runs[w].append(time_run(RUNNERS[pipeline](folder, w, batch), warmup, timed, epoch_batches))
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
  where.add_argument(
      '--make',
      type=int,
      metavar='N',
      help='write N synthetic 500x375 JPEGs into a temporary folder first',
  )
  parser.add_argument(
      '--workers', default='0,1,2', help='comma-separated worker counts W (0: no worker processes)'
  )
  parser.add_argument('--batch', type=int, default=32, help='images per batch')
  parser.add_argument('--batches', type=int, default=16, help='timed batches per run')
  parser.add_argument(
      '--warmup', type=int, default=2, help='untimed batches first (at least 1: the start-up)'
  )
  parser.add_argument('--repeats', type=int, default=1, help='runs of each pipeline and W')
  parser.add_argument(
      '--only',
      default=','.join(DEFAULT_PIPELINES),
      help=f'comma-separated pipelines among {",".join(PIPELINES)}',
  )
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
      args.make is not None and args.make < 1
  ):
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
    records = run(folder, pipelines, workers, args.batch, args.batches, args.warmup, args.repeats)
  for record in records:
    print(json.dumps(record), flush=True)
  print(table(records, args.markdown))
  return records


if __name__ == '__main__':
  main()
