"""Memory of the two input paths: a streamed run's peak does not grow with the
dataset, and the in-memory path holds a split once while reading it, not twice.

Measured on the 2-core CPU machine (peak RSS in MB, VmHWM, each run a fresh process,
compiled as the suite compiles; N = 500 JPEGs decoded at load_size 320 are 146.5 MB, 4N
585.9 MB): stream N 844, stream 4N 812; memory 4N 1937 (the split is held on the host
and, placed whole, on the device).
tracemalloc's peak while folder.load reads 200 images (58.6 MB decoded): 60.3 MB (1.03 x)
into one array; twice the split (seen at 224 px: 2.01 x) when the images were listed, then
stacked. The file takes about 60 s alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # four training runs, each in a process of its own

N = 500  # JPEGs of the small folder; the large one has 4N
LOAD_SIZE = 320  # decoded: 320 * 320 * 3 = 307 KB an image, whatever the file's size
# Small batches: every step in flight holds its batch (fineflax.train.loop.IN_FLIGHT of
# them; before that bound, dispatch ran dozens of steps ahead on the CPU and the queue
# alone reached some 300 MB at 64 images of 224 px), so 16 (2.4 MB) keeps that term small
# beside the 100 MB margin.
BATCH = 16
MB = 2**20


def _write_folder(root: Path, count: int, rng: np.random.Generator) -> Path:
  """`count` JPEGs of 64 x 64 in two class folders: small files (fast to write and to
  decode) that `load_size` makes 224 x 224 as they are read."""
  for c in range(2):
    (root / f'class{c}').mkdir(parents=True)
  for i in range(count):
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / f'class{i % 2}' / f'{i:05d}.jpg', quality=50)
  return root


@pytest.fixture(scope='module')
def folders(tmp_path_factory) -> dict[int, Path]:
  """{number of JPEGs: folder}, written once for the module (about a second)."""
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp('memory')
  return {n: _write_folder(root / str(n), n, rng) for n in (N, 4 * N)}


def _child_env(cache: Path) -> dict[str, str]:
  env = dict(os.environ)
  # glibc keeps memory a program has freed for reuse, more of it the longer the program
  # runs and the more threads allocate: peaks that differ by tens of MB from run to run
  # and drift up over an epoch. One arena, large blocks mapped and unmapped as they are
  # freed, and the heap trimmed, make RSS what the program holds.
  env.update(MALLOC_ARENA_MAX='1', MALLOC_MMAP_THRESHOLD_='131072', MALLOC_TRIM_THRESHOLD_='131072')
  # One compilation cache for the runs: a run that compiles peaks higher (and less
  # predictably) than one that loads the compiled steps, and takes three times as long.
  env.update(
      JAX_COMPILATION_CACHE_DIR=str(cache),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
  )
  return env


def _peak_rss_mb(
    folder: Path, pipeline: str, workdir: Path, cache: Path, max_examples: int | None = None
) -> float:
  """The peak RSS of one epoch trained on `folder`, in a fresh process: a process's peak
  covers its whole life, so runs in one process would hide each other's."""
  args = [sys.executable, __file__, str(folder), pipeline, str(workdir), str(max_examples)]
  done = subprocess.run(
      args, env=_child_env(cache), capture_output=True, text=True, timeout=300, check=False
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])['peak_rss_mb']


def test_a_streamed_run_peaks_the_same_on_four_times_the_data(folders, tmp_path):
  """Four times the images (430 MB more decoded) leave a streamed run's peak within 100
  MB; the larger folder read into memory peaks over 300 MB above its streamed run (the
  measurement sees a split held in memory)."""
  decoded = {n: n * LOAD_SIZE**2 * 3 / MB for n in folders}
  assert decoded[4 * N] - decoded[N] > 400
  cache = tmp_path / 'xla'
  # A run of one batch compiles the streamed step for the cache: both runs measured load
  # it. The in-memory steps take the split as an argument, so each run compiles its own.
  _peak_rss_mb(folders[N], 'stream', tmp_path / 'warm', cache, max_examples=BATCH)
  peaks = {
      (pipeline, n): _peak_rss_mb(folders[n], pipeline, tmp_path / f'{pipeline}{n}', cache)
      for pipeline, n in (('stream', N), ('stream', 4 * N), ('memory', 4 * N))
  }
  print({f'{pipeline} {n}': round(mb) for (pipeline, n), mb in peaks.items()})
  assert abs(peaks['stream', 4 * N] - peaks['stream', N]) < 100, peaks
  assert peaks['memory', 4 * N] - peaks['stream', 4 * N] > 300, peaks


def test_the_in_memory_path_holds_a_split_once_while_reading_it(folders, tmp_path):
  """tracemalloc's peak (numpy reports its arrays to it) while a folder of 200 images is
  read: about the decoded split, where a list of the images stacked at the end held it
  twice."""
  from fineflax import config as config_lib  # pylint: disable=g-import-not-at-top
  from fineflax.data import folder  # pylint: disable=g-import-not-at-top

  for c in range(2):
    (tmp_path / f'class{c}').mkdir()
    for f in sorted((folders[N] / f'class{c}').iterdir())[:100]:
      os.link(f, tmp_path / f'class{c}' / f.name)
  cfg = config_lib.default_config().data
  cfg.update(
      source=f'folder:{tmp_path}',
      load_size=LOAD_SIZE,
      pipeline='memory',
      validation_split=0.0,
      val_split=None,
      test_split=None,
  )
  tracemalloc.start()
  try:
    dataset = folder.load(cfg.source, cfg)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  decoded = dataset.splits['train'].images.nbytes
  assert decoded == 200 * LOAD_SIZE**2 * 3
  assert peak < 1.3 * decoded, (peak / MB, decoded / MB)


def _train_one_epoch(folder: str, pipeline: str, workdir: str, max_examples: str) -> None:
  """The child: one epoch of resnet_tiny at 32 px on `folder`; prints its peak RSS."""
  import jax  # pylint: disable=g-import-not-at-top

  from fineflax import config as config_lib, train  # pylint: disable=g-import-not-at-top

  cfg = config_lib.default_config()
  cfg.batch_size = BATCH
  cfg.model.backbone = 'resnet_tiny'
  cfg.model.image_size = 32  # a small model: what is measured is the images' memory
  cfg.model.weights = None
  cfg.data.source = f'folder:{folder}'
  cfg.data.load_size = LOAD_SIZE
  cfg.data.max_examples = None if max_examples == 'None' else int(max_examples)
  cfg.data.validation_split = 0.0
  cfg.data.val_split = None
  cfg.data.test_split = None
  cfg.data.pipeline = pipeline
  # Threads, not worker processes: the decoding then happens in this process, whose peak
  # VmHWM reports. RUSAGE_CHILDREN would give the largest worker's peak, not the sum
  # of the workers', and starting them costs seconds on a machine of two cores.
  cfg.data.workers = 0
  cfg.phases = (config_lib.phase(name='a', batchnorm='train', learning_rate=1e-3, epochs=1),)
  train.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  # VmHWM, the peak of this process's own memory since its exec: ru_maxrss would start
  # from the peak of the process that forked it (a pytest worker's: gigabytes), which
  # hid every run's own in the full suite.
  status = Path('/proc/self/status').read_text()
  peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith('VmHWM:')))
  print(json.dumps({'peak_rss_mb': peak_kb / 1024}))


if __name__ == '__main__':
  _train_one_epoch(*sys.argv[1:5])
