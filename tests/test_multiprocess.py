"""Two JAX processes on 127.0.0.1 (gloo collectives, 2 CPU devices each) read disjoint
shares of every split that together cover it (digits, an image folder, a tfds dataset,
with and without max_examples), and evaluate exactly across them (`step.evaluate` and
`evaluate_run`, as one process does), also when a process's share is empty; shares made
uneven by unreadable files still train every example and evaluate each once.

The checks of shares and evaluation share one launch of two processes (`edges_job`: each
launch costs seconds of JAX start-up and compilation); training on a folder is another.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from fineflax import config as config_lib, data
from fineflax.data import tfds_source
from fineflax.inference import evaluate as evaluate_lib
from fineflax.run.reporting import MetricsLog
from tests import helpers, multiprocess_job
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # starts two-process jobs

# Losses are float32 per example, summed in float32 per device (step.evaluate) or in
# float64 on the host (evaluate_run); a process count changes the batch layout and so the
# order of the sums and the convolutions' batch: agreement to float32 rounding.
LOSS_RTOL = 1e-5
JOB_TIMEOUT_S = 300  # a launch takes about a minute; a hang fails rather than waits


def _two_processes(tmp_path: Path, *job: str) -> list[dict]:
  """What tests/multiprocess_worker.py returns in each of two processes running `job`.

  When a process fails, its peer may wait for it in a collective for minutes: it is
  killed then, as are both when the job has not ended within JOB_TIMEOUT_S (a hang); the
  test fails with their logs."""
  port = helpers.free_port()
  env = helpers.program_env(devices=2)
  outputs = [tmp_path / f'{i}.json' for i in range(2)]
  logs = [tmp_path / f'{i}.log' for i in range(2)]
  procs = []
  for i in range(2):
    with logs[i].open('w') as log:  # the child keeps its own copy of the descriptor
      procs.append(
          subprocess.Popen(
              [
                  sys.executable,
                  '-m',
                  'tests.multiprocess_worker',
                  str(port),
                  str(i),
                  str(outputs[i]),
                  *job,
              ],
              cwd=ROOT,
              env=env,
              stdout=log,
              stderr=subprocess.STDOUT,
          )
      )
  deadline = time.monotonic() + JOB_TIMEOUT_S
  while any(p.poll() is None for p in procs):
    failed = any(p.returncode not in (None, 0) for p in procs)
    if failed or time.monotonic() > deadline:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
      if not failed:
        pytest.fail(
            f'{job}: no end in {JOB_TIMEOUT_S} s (hung?):\n'
            + '\n'.join(f'--- process {i}\n{log.read_text()[-2000:]}' for i, log in enumerate(logs))
        )
      break
    time.sleep(0.2)
  assert [p.returncode for p in procs] == [0, 0], '\n'.join(  # -9: killed here
      f'--- process {i}\n{log.read_text()[-3000:]}' for i, log in enumerate(logs)
  )
  results = [json.loads(o.read_text()) for o in outputs]
  assert [r['process_count'] for r in results] == [2, 2]
  return results


def _pngs(folder: Path, count: int, rng: np.random.Generator) -> None:
  folder.mkdir(parents=True)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, multiprocess_job.IMAGE, dtype=np.uint8)).save(
        folder / f'{i}.png'
    )  # PNG: lossless, every reader decodes the same pixels


def _folder_examples(photos: Path) -> dict[str, tuple[np.ndarray, int]]:
  """{digest: (image, label)} of every image of PHOTOS, read with PIL here."""
  examples = {}
  for label, cls in enumerate(sorted(p for p in photos.iterdir() if p.is_dir())):
    for path in sorted(cls.iterdir()):
      with Image.open(path) as image:
        pixels = np.asarray(image.convert('RGB'))
      examples[multiprocess_job.digest(pixels, label)] = (pixels, label)
  return examples


@pytest.fixture(scope='module')
def edges_job(tmp_path_factory, demo_run):
  """One launch of `multiprocess_job.edges` on two processes, and what it read.

  Its inputs: an image folder of 8 PNGs in three classes (3, 3, 2) from which one
  validation image is carved (config.data.validation_split=0.125), leaving 7 to train on
  (4 on process 0, 3 on process 1; validation: 1 and 0); a folder for the tiny tfds
  dataset; two copies of conftest's demo run (only read there, so copied: evaluate_run
  writes DIR/eval/), one of whose config cuts each digits split to 1 example.
  """
  tmp = tmp_path_factory.mktemp('edges')
  rng = np.random.default_rng(11)
  photos = tmp / 'photos'
  for cls, count in (('a', 3), ('b', 3), ('c', 2)):
    _pngs(photos / cls, count, rng)
  run, run_one = tmp / 'run', tmp / 'run_one'
  for copy in (run, run_one):
    shutil.copytree(demo_run, copy, ignore=shutil.ignore_patterns('eval'))
  config = json.loads((run_one / 'config.json').read_text())
  config['data']['max_examples'] = 1
  (run_one / 'config.json').write_text(json.dumps(config))
  results = _two_processes(tmp, 'edges', str(photos), str(tmp / 'tfds'), str(run), str(run_one))
  return {'results': results, 'photos': photos, 'run': run, 'run_one': run_one}


def _disjoint_and_covering(shares: list[list[str]], everything: list[str]) -> None:
  a, b = shares
  assert not set(a) & set(b)  # disjoint
  assert sorted(a + b) == sorted(everything)  # covering, each example once


def _tiny_train() -> dict[str, tuple[np.ndarray, int]]:
  """{digest: (image, label)} of the tiny tfds dataset's train split, made with NumPy."""
  return {
      multiprocess_job.digest(x, y): (x, y)
      for x, y in zip(*multiprocess_job.tiny_examples(*multiprocess_job.TINY_SPLITS['train']))
  }


def _reference(examples: list[tuple[np.ndarray, int]]) -> dict[str, float]:
  """Mean softmax cross-entropy and argmax accuracy of `fixed_model` on the examples, in
  NumPy from its logits on each example alone (a batch of one, on one device)."""
  model, variables = multiprocess_job.fixed_model()
  one = jax.devices()[0]
  variables = jax.device_put(variables, one)
  single = jax.jit(lambda v, x: model.apply(v, x, train=False))
  logits = np.concatenate(
      [
          np.asarray(
              single(variables, jax.device_put(image[None].astype(np.float32), one)), np.float64
          )
          for image, _ in examples
      ]
  )
  labels = np.asarray([label for _, label in examples])
  shifted = logits - logits.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return {
      'loss': float(-log_p[np.arange(len(labels)), labels].mean()),
      'accuracy': float(np.mean(logits.argmax(-1) == labels)),
      'count': len(labels),
  }


def test_two_processes_read_disjoint_covering_shares(edges_job):
  """The digits' shares, and a fixed model's evaluation on 37 validation examples: the
  same as one process alone on as many devices."""
  results = [r['digits'] for r in edges_job['results']]

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
      'train': (16, 8),
      'val': (6, 1),
      'test': (8, 1),
  }
  records = MetricsLog(workdir).read()
  assert [r['step'] for r in records] == [3, 6, 9]
  assert all(np.isfinite([r['loss'], r['val_loss']]).all() for r in records), records


def test_folder_shares_are_disjoint_and_cover_the_folder(edges_job):
  """Every image of the folder is read by exactly one process, into the split it was
  carved into: the train and validation shares together are the folder's 8 images, each
  once, and every process knows each split's size and largest share. Process 1's empty
  validation share has the image shape of process 0's: the rows of a global batch are
  shaped alike on every process, or each would trace a program of its own."""
  shares = [r['folder']['shares'] for r in edges_job['results']]
  everything = list(_folder_examples(edges_job['photos']))
  _disjoint_and_covering(
      [s['train']['digests'] + s['validation']['digests'] for s in shares], everything
  )
  assert [len(s['train']['digests']) for s in shares] == [4, 3]  # every 2nd file from the p-th
  assert [len(s['validation']['digests']) for s in shares] == [1, 0]
  for s in shares:
    assert (s['train']['size'], s['train']['largest_share']) == (7, 4)
    assert (s['validation']['size'], s['validation']['largest_share']) == (1, 1)
    assert s['train']['image_shape'] == s['validation']['image_shape'] == [8, 8, 3]


def test_evaluation_across_processes_counts_each_example_once(edges_job):
  """`step.evaluate` over the global mesh (4 devices, a global batch of 4) on the folder's
  splits gives the mean loss and accuracy of NumPy's reference over the examples both
  processes read: 7 train examples (the last batch of process 1 half padding), and the
  single validation example, whose process 1 has an empty share and contributes a batch
  of padding only, without which process 0 would wait for it forever."""
  examples = _folder_examples(edges_job['photos'])
  first, second = edges_job['results']
  for name, count in (('train', 7), ('validation', 1)):
    digests = [d for r in (first, second) for d in r['folder']['shares'][name]['digests']]
    want = _reference([examples[d] for d in digests])
    assert want['count'] == count
    for r in (first, second):  # the sums are psummed: every process gets the same
      got = r['folder']['metrics'][name]
      assert got['count'] == count, name
      np.testing.assert_allclose(got['loss'], want['loss'], rtol=LOSS_RTOL, err_msg=name)
      assert got['accuracy'] == want['accuracy'], name  # k / n either way: exact


def test_tfds_shares_are_disjoint_cover_the_split_and_keep_max_examples(edges_job):
  """`tfds.split_for_jax_process` shares of the tiny dataset's 9 train examples (5 and 4)
  are disjoint and cover them; with an odd config.data.max_examples=5 the shares add up
  to exactly 5 (3 and 2: the first process takes the one left over), are examples of the
  split, and Split.size is 5 on both processes. The reference is the dataset's own
  examples, generated here with NumPy. The dataset, not prepared before, is prepared by
  process 0 alone."""
  everything = list(_tiny_train())
  # Unprepared in one data_dir: process 0 prepared it while process 1 waited.
  assert [r['tfds']['prepared_here'] for r in edges_job['results']] == [1, 0]
  whole = [r['tfds']['whole'] for r in edges_job['results']]
  _disjoint_and_covering([s['digests'] for s in whole], everything)
  assert [(s['size'], s['largest_share']) for s in whole] == [(9, 5)] * 2
  cut = [r['tfds']['max5'] for r in edges_job['results']]
  assert [len(s['digests']) for s in cut] == [3, 2]
  assert not set(cut[0]['digests']) & set(cut[1]['digests'])
  assert set(cut[0]['digests'] + cut[1]['digests']) <= set(everything)
  assert [(s['size'], s['largest_share']) for s in cut] == [(5, 3)] * 2
  for s in whole + cut:
    assert s['image_shape'] == [8, 8, 3]


def test_tfds_max_examples_below_the_process_count_leaves_an_empty_share(edges_job):
  """max_examples=1 on two processes: process 0 takes 1 example, process 1 none; both know
  the split has 1 example, process 1's empty share has the images' shape, and evaluating
  `fixed_model` on the split counts that example once (NumPy's reference) without either
  process hanging."""
  shares = [r['tfds']['max1'] for r in edges_job['results']]
  assert [len(s['digests']) for s in shares] == [1, 0]
  assert [(s['size'], s['largest_share'], s['image_shape']) for s in shares] == [
      (1, 1, [8, 8, 3])
  ] * 2
  want = _reference([_tiny_train()[shares[0]['digests'][0]]])
  for s in shares:
    assert s['metrics']['count'] == 1
    np.testing.assert_allclose(s['metrics']['loss'], want['loss'], rtol=LOSS_RTOL)
    assert s['metrics']['accuracy'] == want['accuracy']


def test_evaluate_run_on_two_processes_equals_one_process(edges_job, tmp_path):
  """`evaluate_run` of a finished run's latest checkpoint, run by two processes over their
  4 devices, reports what one process on one device reports for the same checkpoint (and
  the run's own results.json): the 32 test examples once each, the same accuracy, the
  same loss. With the digits cut to 1 example a split, process 1's share of the test
  split is empty: the example still counts once, and neither process hangs."""
  results = json.loads((edges_job['run'] / 'results.json').read_text())
  for name, count in (('run', 32), ('run_one', 1)):
    # One process, on a copy of its own (the job's copies hold the job's eval/ files).
    alone = evaluate_lib.evaluate_run(
        shutil.copytree(edges_job[name], tmp_path / name),
        'test',
        'latest',
        devices=jax.devices()[:1],
    )
    assert (alone['examples'], alone['step']) == (count, 4)
    for r in edges_job['results']:
      got = r['evaluate_run'][name]
      assert (got['examples'], got['step']) == (count, 4), name
      assert got['accuracy'] == alone['accuracy'], name
      np.testing.assert_allclose(got['loss'], alone['loss'], rtol=LOSS_RTOL, err_msg=name)
  got = edges_job['results'][0]['evaluate_run']['run']
  assert got['examples'] == results['test_examples']
  assert got['accuracy'] == results['test_accuracy']
  np.testing.assert_allclose(got['loss'], results['test_loss'], rtol=LOSS_RTOL)
  # Process 0 wrote the report of the two-process evaluation, with every example in it.
  written = json.loads((edges_job['run'] / 'eval' / 'test-latest.json').read_text())
  assert (written['examples'], written['accuracy']) == (32, got['accuracy'])


def test_a_tfds_process_with_an_empty_share_reads_no_example(tmp_path, monkeypatch):
  """Process 1 of 2 and the tiny dataset's 1-example test split: tfds gives process 0 the
  example and process 1 nothing, which it must take as an empty share (as the folder and
  in-memory sources do) and still join the collective count of read_split.

  Simulated in this one process: jax says it is process 1 of 2 (to fineflax and to
  `tfds.split_for_jax_process`), and read_split, the collective, is recorded instead."""
  multiprocess_job.tiny_tfds(str(tmp_path), prepare=True)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  shares = []

  def read_split(images, labels, skipped=0):
    shares.append(len(labels))
    return data.Split(images, labels, size=1, largest_share=1, skipped=skipped)

  monkeypatch.setattr(tfds_source, 'read_split', read_split)
  cfg = config_lib.default_config().data
  cfg.update(
      source=f'tfds:{multiprocess_job.TINY_TFDS}',
      data_dir=str(tmp_path),
      train_split='test',
      val_split=None,
      test_split=None,
  )
  dataset = tfds_source.load(cfg.source, cfg, ('train_split',))
  assert shares == [0] and len(dataset.splits['test']) == 0
