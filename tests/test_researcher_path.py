"""The newcomer's walkthrough, replayed as they ran it: a folder of their own photos with
configs/folder.py, from the summary to evaluate, on the command line.

What each step must do: a test/ folder is used and `evaluate` (default --split test)
takes it; three classes on the binary config are refused with the fix named; the final
results and the best checkpoint are labelled; a run without a test split ends with its
validation figures, in results.json too; another backbone is told the freeze spec that
fits it; `--help` lists every flag; `evaluate --split validation` decodes that split only;
a missing weight file is said before any photo is decoded; libraries' lines (TensorFlow's
start-up notices, Orbax's save waits) stay out of fineflax's.
"""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import helpers
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # trains a run and starts the programs

CLASSES = ('cracked', 'dented', 'intact')
# configs/folder.py at :smoke on a small random network: the walkthrough's flow, not its
# ResNet50 (whose ImageNet weights are not on this machine). Its `layers[:143]` is
# ResNet50's conv5; on another backbone the README says to freeze `stages[:-1]`.
SMALL = (
    '--config.model.weights=None',
    '--config.model.backbone=resnet_tiny',
    '--config.phases[0].freeze=stages[:-1]',
)


def _photos(root: Path, splits: dict[str, int]) -> Path:
  rng = np.random.default_rng(0)
  for split, count in splits.items():
    for c, name in enumerate(CLASSES):
      folder = root / split / name if split else root / name
      folder.mkdir(parents=True)
      for i in range(count):
        pixels = rng.integers(0, 90, (18, 20, 3)) + 80 * c
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i:02d}.jpg')
  return root


def _run(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
  environ = helpers.program_env(**env)
  return subprocess.run(
      [sys.executable, '-m', *args],
      cwd=cwd,
      env=environ,
      capture_output=True,
      text=True,
      timeout=600,
  )


@pytest.fixture(scope='module')
def walkthrough(tmp_path_factory):
  """A trained folder run with train/, validation/ and test/ folders of three classes."""
  tmp = tmp_path_factory.mktemp('walkthrough')
  photos = _photos(tmp / 'photos', {'train': 8, 'validation': 4, 'test': 3})
  workdir = tmp / 'runs' / 'photos'
  train = [
      'fineflax.train',
      '--config',
      'configs/folder.py:smoke',
      '--workdir',
      str(workdir),
      f'--config.data.source=folder:{photos}',
      *SMALL,
  ]
  refused = _run(*train)
  refused_wrote = workdir.exists()
  done = _run(*train, '--config.model.num_classes=None')
  return {
      'tmp': tmp,
      'photos': photos,
      'workdir': workdir,
      'refused': refused,
      'done': done,
      'refused_wrote': refused_wrote,
  }


def test_three_classes_are_refused_with_the_fix_named(walkthrough):
  refused = walkthrough['refused']
  assert refused.returncode == 1
  last = refused.stderr.strip().splitlines()[-1]
  assert last.startswith(
      'error: config.model.num_classes=1 (a binary classifier) but the '
      "dataset has 3 classes ['cracked', 'dented', 'intact']"
  ), last
  assert '--config.model.num_classes=None' in last
  assert not walkthrough['refused_wrote']


def test_the_test_folder_is_used_and_both_results_are_labelled(walkthrough):
  done, workdir = walkthrough['done'], walkthrough['workdir']
  assert done.returncode == 0, done.stderr[-3000:]
  splits = json.loads((workdir / 'dataset.json').read_text())['splits']
  assert splits['test'] == {'name': 'test', 'examples': 9, 'skipped_files': 0}
  results = json.loads((workdir / 'results.json').read_text())
  final, best = results['final'], results['best']
  assert final['checkpoint'] == 'final parameters' and final['step'] == results['step']
  assert final['test_examples'] == results['test_examples'] == 9
  assert best['checkpoint'] == 'best' and best['monitor'] == 'val_loss'
  assert workdir / best['dir'] == workdir / 'checkpoints' / 'best' / str(best['step'])
  lines = [line for line in done.stdout.splitlines() if line.startswith('test_accuracy: ')]
  assert lines[0].startswith(
      f"test_accuracy: {final['test_accuracy']:.4f} (final parameters, "
      f"step {final['step']}; 9 examples"
  )
  if best['step'] != final['step']:  # the best checkpoint evaluated too, and labelled
    assert best['test_examples'] == 9
    assert lines[1].startswith(
        f"test_accuracy: {best['test_accuracy']:.4f} (best, step " f"{best['step']}; 9 examples"
    )
  else:
    assert len(lines) == 1


def test_the_run_ends_with_a_summary_and_the_commands_that_reuse_it(walkthrough):
  done, workdir = walkthrough['done'], walkthrough['workdir']
  tail = done.stderr[done.stderr.index('run finished at step') :]
  assert f'python -m fineflax.evaluate --workdir {workdir}' in tail
  assert f'python -m fineflax.predict --workdir {workdir} IMAGE...' in tail
  assert 'best checkpoint, step ' in tail and 'final parameters, step ' in tail
  # One line for each split's size.
  assert done.stderr.count("split 'train': 24 examples") == 1


def test_evaluate_takes_the_test_folder_and_decodes_only_the_split_asked_for(walkthrough):
  workdir = walkthrough['workdir']
  test = _run('fineflax.evaluate', '--workdir', str(workdir))  # --split test by default
  assert test.returncode == 0, test.stderr[-3000:]
  step = json.loads((workdir / 'results.json').read_text())['best']['step']
  assert test.stdout.startswith(
      f"{workdir}: checkpoint best (step {step}), split 'test' " '(test), 9 examples'
  ), test.stdout[:300]
  validation = _run('fineflax.evaluate', '--workdir', str(workdir), '--split', 'validation')
  assert validation.returncode == 0, validation.stderr[-3000:]
  assert "split 'validation': 12 examples" in validation.stderr
  assert "split 'train'" not in validation.stderr and "split 'test'" not in validation.stderr


def test_a_run_without_a_test_split_ends_with_its_validation_figures(tmp_path):
  photos = _photos(tmp_path / 'photos', {'': 10})  # one folder per class: 20% carved out
  workdir = tmp_path / 'run'
  done = _run(
      'fineflax.train',
      '--config',
      'configs/folder.py:smoke',
      '--workdir',
      str(workdir),
      f'--config.data.source=folder:{photos}',
      *SMALL,
      '--config.model.num_classes=None',
      '--config.data.validation_split=0.2',
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'test_accuracy' not in done.stdout
  assert 'no folder; no test split' in done.stderr or 'no such folder; no test split' in done.stderr
  results = json.loads((workdir / 'results.json').read_text())
  assert 'test_accuracy' not in results and results['best']['monitor'] == 'val_loss'
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  # The validation figures are in results.json too: the final parameters' are those of
  # the last epoch's evaluation, the best checkpoint's those of its epoch (the value
  # best/ was chosen by).
  final, best = results['final'], results['best']
  assert final['val_loss'] == pytest.approx(records[-1]['val_loss'], rel=1e-6)
  assert final['val_accuracy'] == pytest.approx(records[-1]['val_accuracy'], rel=1e-6)
  assert results['val_loss'] == final['val_loss'] and final['val_examples'] == 6
  at_best = next(r for r in records if r['step'] == best['step'])
  assert best['val_loss'] == pytest.approx(at_best['val_loss'], rel=1e-6) == best['value']
  assert best['val_accuracy'] == pytest.approx(at_best['val_accuracy'], rel=1e-6)
  tail = done.stderr[done.stderr.index('run finished at step') :]
  assert (
      f"final parameters, step {records[-1]['step']}: val_loss " f"{records[-1]['val_loss']:.4f}"
  ) in tail
  assert f"best checkpoint, step {results['best']['step']}: val_loss" in tail


def test_another_backbone_is_told_and_takes_the_stages_spec():
  """configs/folder.py freezes ResNet50's `layers[:143]`; on resnet_tiny that index is
  beyond the backbone, and the error names the spec that fits any backbone, which then
  freezes every stage but the last (conv5 and the head train)."""
  base = (
      'fineflax.summary',
      '--config',
      'configs/folder.py',
      '--config.model.backbone=resnet_tiny',
      '--config.model.weights=None',
  )
  refused = _run(*base)
  assert refused.returncode == 1
  last = refused.stderr.strip().splitlines()[-1]
  assert 'index 143 is beyond the backbone, which has 55 layers' in last, last
  assert "'stages[:-1]' (every stage but the last) fits any backbone" in last, last
  shown = _run(*base, '--config.phases[0].freeze=stages[:-1]')
  assert shown.returncode == 0, shown.stderr[-3000:]
  rows = [line.split() for line in shown.stdout.splitlines() if re.match(r'^\w+ \(\w+\)', line)]
  trains = {row[0] for row in rows if row[-1] == 'Y'}
  assert trains and all(
      name.startswith(('conv5_', 'dense', 'batch_normalization')) for name in trains
  ), trains
  assert {row[0] for row in rows if row[-1] == 'N'} >= {'conv1_conv', 'conv4_block1_3_conv'}


def test_a_missing_weight_file_is_said_before_the_photos_are_decoded(tmp_path):
  photos = _photos(tmp_path / 'photos', {'train': 4, 'validation': 2})
  done = _run(
      'fineflax.train',
      '--config',
      'configs/folder.py:smoke',
      '--workdir',
      str(tmp_path / 'run'),
      f'--config.data.source=folder:{photos}',
      FINEFLAX_CACHE=str(tmp_path / 'empty-cache'),
      FINEFLAX_WEIGHTS_MIRROR='',
  )
  assert done.returncode == 1
  assert 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5' in done.stderr
  assert "split 'train'" not in done.stderr  # nothing was decoded first


# A line in absl's or glog's format (TensorFlow's and XLA's C++ logging, and absl's Python
# handler for the libraries' loggers): "I1127 08:26:11.48 ..." or "W0000 00:00:...".
_LIBRARY_LINE = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d')


def test_the_run_prints_fineflax_lines_only(walkthrough):
  done = walkthrough['done']
  assert done.stdout.splitlines() == [
      line for line in done.stdout.splitlines() if line.startswith('test_accuracy: ')
  ]
  noise = [
      line
      for line in done.stderr.splitlines()
      if _LIBRARY_LINE.match(line) or 'All log messages before absl' in line
  ]
  assert not noise, noise


def test_tensorflow_starts_without_a_word():
  """The tfds path imports TensorFlow: its start-up notices (oneDNN, CPU features, cuInit)
  printed themselves before any fineflax line."""
  started = subprocess.run(
      [sys.executable, '-c', 'from fineflax.data import tfds_source; tfds_source._tfds()'],
      cwd=ROOT,
      env=helpers.program_env(),
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert started.returncode == 0, started.stderr[-2000:]
  assert started.stderr == ''


def test_orbax_waiting_for_a_previous_save_is_not_reported(caplog):
  """Orbax warns when a save waited over a second for the previous one, which on a smoke
  run is every epoch; its other warnings still come through."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  from fineflax.run import reporting  # pylint: disable=g-import-not-at-top

  reporting.setup_logging()
  with caplog.at_level(logging.WARNING, logger='absl'):
    absl_logging.warning(
        'Waiting for previous save to complete took %f seconds. If this'
        ' number is high, consider checkpointing less frequently.',
        1.5,
    )
    absl_logging.warning('Orbax could not write the file')
  assert [r.getMessage() for r in caplog.records] == ['Orbax could not write the file']
