"""Two JAX processes on 127.0.0.1 (gloo collectives, 2 CPU devices each) read disjoint
shares of every split that together cover it, and evaluate exactly across them; shares
made uneven by unreadable files still train every example and evaluate each once."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fineflax.run.reporting import MetricsLog
from tests import multiprocess_job

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(tmp_path: Path, *job: str) -> list[dict]:
  """What tests/multiprocess_worker.py returns in each of two processes running `job`."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  outputs = [tmp_path / f'{i}.json' for i in range(2)]
  procs = [subprocess.Popen([sys.executable, '-m', 'tests.multiprocess_worker', str(port),
                             str(i), str(outputs[i]), *job], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  results = [json.loads(o.read_text()) for o in outputs]
  assert [r['process_count'] for r in results] == [2, 2]
  return results


def test_two_processes_read_disjoint_covering_shares(tmp_path):
  results = _two_processes(tmp_path)

  # One process alone, on 4 devices as the two processes have together.
  alone = multiprocess_job.run()
  for name, everything in alone['shares'].items():
    a, b = results[0]['shares'][name], results[1]['shares'][name]
    assert not set(a) & set(b)  # disjoint
    assert sorted(a + b) == everything  # covering
    assert results[0]['sizes'][name] == results[1]['sizes'][name] == len(everything)
  for r in results:
    assert r['metrics']['count'] == alone['metrics']['count'] == 37
    np.testing.assert_allclose(r['metrics']['loss'], alone['metrics']['loss'], rtol=1e-6)
    assert r['metrics']['accuracy'] == alone['metrics']['accuracy']


def _jpegs(folder: Path, names: list[str], rng: np.random.Generator, shade: int) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  for name in names:
    pixels = rng.integers(0, 100, (12, 14, 3)) + shade
    Image.fromarray(pixels.astype(np.uint8)).save(folder / name)


def test_shares_made_uneven_by_unreadable_files_train_every_example(tmp_path):
  """Process p reads every 2nd file from the p-th: the even-numbered files of train/a are
  all unreadable, so process 0 reads 4 train images and process 1 reads 12. An epoch then
  takes ceil(12 / 4) = 3 batches of 4 a process (2 if it were sized from the 16 read
  examples split evenly, leaving 4 of process 1's unseen), the last two of process 0 all
  padding; nothing is NaN, and evaluation counts each readable example once."""
  rng = np.random.default_rng(0)
  photos = tmp_path / 'photos'
  _jpegs(photos / 'train' / 'a', [f'{i:02d}.jpg' for i in range(1, 16, 2)], rng, 0)
  for i in range(0, 16, 2):
    (photos / 'train' / 'a' / f'{i:02d}.jpg').write_bytes(b'unreadable')
  _jpegs(photos / 'train' / 'b', [f'{i:02d}.jpg' for i in range(8)], rng, 150)
  for split, n in (('validation', 3), ('test', 4)):
    for cls, shade in (('a', 0), ('b', 150)):
      _jpegs(photos / split / cls, [f'{i:02d}.jpg' for i in range(n)], rng, shade)
    (photos / split / 'b' / '99.jpg').write_bytes(b'')  # one unreadable file each
  workdir = tmp_path / 'run'
  results = _two_processes(tmp_path, 'folder', str(photos), str(workdir))

  assert [r['share'] for r in results] == [4, 12]
  assert [(r['size'], r['largest_share']) for r in results] == [(16, 12)] * 2
  assert results[0]['results'] == results[1]['results']
  assert results[0]['results']['test_examples'] == 8
  assert np.isfinite(results[0]['results']['test_loss'])
  splits = json.loads((workdir / 'dataset.json').read_text())['splits']
  assert {role: (s['examples'], s['skipped_files']) for role, s in splits.items()} == {
      'train': (16, 8), 'val': (6, 1), 'test': (8, 1)}
  records = MetricsLog(workdir).read()
  assert [r['step'] for r in records] == [3, 6, 9]
  assert all(np.isfinite([r['loss'], r['val_loss']]).all() for r in records), records
