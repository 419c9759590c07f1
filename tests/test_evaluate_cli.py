"""Opening a finished run: load_run, evaluate_run and the evaluate command (predict:
tests/test_predict.py).

Every test reads conftest's `demo_run` (the demo smoke config, two phases of one epoch:
checkpoints at steps 2 and 4, best/ by val_loss), some on all eight devices. A test that
writes (an evaluation writes DIR/eval/) works on a copy of it in its tmp_path.
"""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from fineflax import models
from fineflax.errors import ConfigError
from fineflax.inference import evaluate
from fineflax.run import RunDir, checkpoints, restore
from tests import helpers
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # trains runs and starts the programs

# Loss sums are float32 per device in training and float64 over examples here.
LOSS_RTOL = 1e-5


def _steps(folder):
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@pytest.fixture(scope='module')
def run_dir(demo_run):
  return demo_run


def _copy_run(run_dir, dest, without=()):
  shutil.copytree(run_dir, dest, ignore=lambda d, names: [n for n in names if n in without])
  return dest


def test_load_run_best_latest_and_a_step(run_dir):
  best_steps = _steps(RunDir(run_dir).best)
  assert _steps(RunDir(run_dir).latest) == [2, 4] and len(best_steps) == 1

  latest = restore.load_run(run_dir, 'latest')
  assert (latest.step, latest.label, latest.meta['phase']) == (4, 'latest', 'finetune')
  assert latest.checkpoint_dir == RunDir(run_dir).latest / '4'
  assert latest.class_names == tuple(str(d) for d in range(10))
  assert latest.image_shape == (8, 8, 3)
  expected = models.abstract_variables(latest.model, latest.image_shape)
  assert jax.tree.structure(latest.variables) == jax.tree.structure(expected)
  assert {x.dtype for x in jax.tree.leaves(latest.variables)} == {np.dtype('float32')}

  best = restore.load_run(run_dir)
  assert (best.step, best.label) == (best_steps[0], 'best')
  step2 = restore.load_run(run_dir, '2')
  assert (step2.step, step2.label, step2.meta['phase']) == (2, 'step2', 'scratch')
  # Phase 2 trained conv5 and the head: the two checkpoints differ there, not in conv1.
  for name, same in [('conv1_conv', True), ('conv5_block1_1_conv', False)]:
    a = step2.variables['params']['backbone'][name]['kernel']
    b = latest.variables['params']['backbone'][name]['kernel']
    assert np.array_equal(a, b) == same, name


def test_best_falls_back_to_latest_with_a_warning(run_dir, tmp_path, caplog):
  workdir = _copy_run(run_dir, tmp_path / 'run', without=('best',))
  restore.logger.addHandler(caplog.handler)  # 'fineflax' may not propagate to the root
  try:
    run = restore.load_run(workdir)
  finally:
    restore.logger.removeHandler(caplog.handler)
  assert (run.step, run.label) == (4, 'latest')
  assert any(
      r.levelno == logging.WARNING and 'no best checkpoint' in r.getMessage()
      for r in caplog.records
  )


def test_clear_errors_for_what_is_not_a_run(run_dir, tmp_path):
  with pytest.raises(ConfigError, match='no such run directory') as error:
    restore.load_run(tmp_path / 'missing')
  assert str(tmp_path / 'missing') in str(error.value)
  with pytest.raises(ConfigError, match='is not a fineflax run: it has no config.json'):
    restore.load_run(tmp_path)
  with pytest.raises(ConfigError) as error:
    restore.load_run(run_dir, 7)
  assert str(error.value) == (
      f'{run_dir / "checkpoints"} has no step 7 (no folder latest/7 '
      f'or best/7); its steps: best/ {_steps(RunDir(run_dir).best)}, '
      'latest/ [2, 4]'
  )
  with pytest.raises(ConfigError, match="checkpoint 'newest': expected 'best', 'latest'"):
    restore.load_run(run_dir, 'newest')
  bare = _copy_run(run_dir, tmp_path / 'bare', without=('checkpoints',))
  with pytest.raises(ConfigError, match='no checkpoint'):
    restore.load_run(bare)


def test_a_checkpoint_of_another_model_is_refused(run_dir, tmp_path):
  workdir = _copy_run(run_dir, tmp_path / 'run')
  config = json.loads((workdir / 'config.json').read_text())
  config['model']['head']['hidden'] = [8]
  (workdir / 'config.json').write_text(json.dumps(config))
  with pytest.raises(checkpoints.CheckpointMismatchError) as error:
    restore.load_run(workdir, 'latest')
  message = str(error.value)
  assert str(workdir / 'checkpoints' / 'latest' / '4') in message
  assert "leaves missing from the checkpoint, e.g. ['params/head/dense_1/bias'" in message
  assert "params/head/dense/bias: saved ((10,), 'float32'), expected ((8,), 'float32')" in message


def test_evaluate_run_equals_the_run_s_own_test_results(run_dir, tmp_path):
  """On the eight devices, where the run trained on one; 24 does not divide the 32 test
  examples: the last batch is two thirds padding, spread over the devices."""
  from sklearn.metrics import top_k_accuracy_score  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8
  workdir = _copy_run(run_dir, tmp_path / 'run', without=('eval',))
  results = json.loads((workdir / 'results.json').read_text())
  report = evaluate.evaluate_run(workdir, 'test', 'latest', batch_size=24)
  assert report['examples'] == results['test_examples'] == 32
  assert report['loss'] == pytest.approx(results['test_loss'], rel=LOSS_RTOL)
  assert report['accuracy'] == results['test_accuracy']
  assert report['step'] == results['step'] == 4
  per_class = report['per_class']
  assert [r['class'] for r in per_class] == [str(d) for d in range(10)]
  assert sum(r['examples'] for r in per_class) == 32
  matrix = np.asarray(report['confusion_matrix'])
  assert matrix.sum() == 32
  np.testing.assert_array_equal(matrix.sum(axis=1), [r['examples'] for r in per_class])
  np.testing.assert_array_equal(np.diag(matrix), [r['correct'] for r in per_class])
  assert np.trace(matrix) == round(results['test_accuracy'] * 32)
  saved = np.load(report['files']['predictions'])
  assert report['files']['predictions'] == str(workdir / 'eval' / 'test-latest-predictions.npz')
  np.testing.assert_array_equal(saved['logits'].argmax(-1), saved['predicted'])
  assert np.mean(saved['predicted'] == saved['labels']) == report['accuracy']
  # Top-5 by scikit-learn from the saved logits (whose loss and accuracy match the run's).
  top5 = top_k_accuracy_score(saved['labels'], saved['logits'], k=5, labels=np.arange(10))
  assert report['top5_accuracy'] == pytest.approx(top5, abs=1e-12)
  assert report['top5_accuracy'] != report['accuracy']  # so the two cannot be mixed up
  assert json.loads(Path(report['files']['json']).read_text()) == report
  assert report['files']['json'] == str(workdir / 'eval' / 'test-latest.json')
  png = workdir / 'eval' / 'test-latest-confusion.png'
  assert report['files']['confusion_png'] == str(png)
  with Image.open(png) as image:
    assert image.format == 'PNG' and min(image.size) > 100


def test_evaluate_run_on_val_by_role_and_by_name_gives_the_best_val_loss(run_dir, tmp_path):
  """best/'s meta holds the val_loss it was chosen by: the same number, recomputed."""
  workdir = _copy_run(run_dir, tmp_path / 'run', without=('eval',))
  best = restore.load_run(workdir, 'best')
  one = jax.devices()[:1]
  by_role = evaluate.evaluate_run(workdir, 'val', devices=one)
  by_name = evaluate.evaluate_run(workdir, 'validation', best.step, devices=one)
  assert by_role['split_name'] == by_name['split_name'] == 'validation'
  assert by_role['loss'] == pytest.approx(best.meta['value'], rel=LOSS_RTOL)
  assert by_role['loss'] == by_name['loss'] and by_role['accuracy'] == by_name['accuracy']
  assert json.loads((workdir / 'eval' / 'val-best.json').read_text())['loss'] == by_role['loss']
  assert (workdir / 'eval' / f'validation-step{best.step}-confusion.png').is_file()
  with pytest.raises(ConfigError, match=r"--split=holdout: the dataset has the splits \['test', "):
    evaluate.resolve_split('holdout', best.config.data, ['train', 'validation', 'test'])


def test_binary_metrics_threshold_at_logit_zero():
  logits = np.array([[2.0], [-1.0], [0.5], [-3.0], [1.0]], np.float32)
  labels = np.array([1, 1, 0, 0, 1], np.int32)
  report = evaluate.classification_metrics(logits, labels, ('cat', 'dog'))
  assert report['confusion_matrix'] == [[1, 1], [1, 2]]
  assert report['accuracy'] == pytest.approx(3 / 5)
  assert [(r['examples'], r['correct']) for r in report['per_class']] == [(2, 1), (3, 2)]
  expected = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(np.float32))
  assert report['loss'] == pytest.approx(float(np.mean(expected)), rel=1e-6)
  assert 'top5_accuracy' not in report


def test_evaluate_command_line(run_dir, tmp_path):
  workdir = _copy_run(run_dir, tmp_path / 'run', without=('eval',))
  assert not (workdir / 'eval').exists()
  results = json.loads((workdir / 'results.json').read_text())
  # A compilation cache the user set up for JAX gets the compiled steps, not fineflax's.
  env = helpers.program_env(
      cache=tmp_path,
      JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'users-cache'),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
  )
  command = [
      sys.executable,
      '-m',
      'fineflax.evaluate',
      '--workdir',
      str(workdir),
      '--checkpoint',
      'latest',
  ]
  done = subprocess.run(
      command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert any((tmp_path / 'users-cache').iterdir()) and not (tmp_path / 'xla').exists()
  assert f'compilation cache: {tmp_path / "users-cache"} (set for JAX)' in done.stderr
  assert 'devices: backend cpu: 1 x cpu' in done.stderr
  assert f"accuracy {results['test_accuracy']:.4f}" in done.stdout
  assert "split 'test' (test), 32 examples" in done.stdout
  written = json.loads((workdir / 'eval' / 'test-latest.json').read_text())
  assert (written['examples'], written['step']) == (32, 4)
  assert written['accuracy'] == results['test_accuracy']
  assert written['loss'] == pytest.approx(results['test_loss'], rel=LOSS_RTOL)


def _photos(root: Path, splits: dict[str, int], classes=('cat', 'dog')) -> Path:
  rng = np.random.default_rng(0)
  for split, count in splits.items():
    for c, name in enumerate(classes):
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        pixels = rng.integers(0, 90, (18, 20, 3)) + 80 * c
        Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f'{i:02d}.jpg')
  return root


def test_a_run_without_a_test_folder_names_the_splits_it_has(tmp_path):
  """A photo folder with train/ and validation/ only, trained and evaluated as the user
  ran it: the run's closing hint offers no test split, and `evaluate --split test` (also
  the default) says the run has none and which splits it has."""
  photos = _photos(tmp_path / 'photos', {'train': 6, 'validation': 3})
  workdir = tmp_path / 'run'
  env = helpers.program_env(cache=tmp_path)

  def program(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

  done = program(
      'fineflax.train',
      '--config',
      'configs/folder.py:smoke',
      '--workdir',
      str(workdir),
      f'--config.data.source=folder:{photos}',
      '--config.model.weights=None',
      '--config.model.backbone=resnet_tiny',
      '--config.phases[0].freeze=none',
  )
  assert done.returncode == 0, done.stderr[-3000:]
  [hint] = [line for line in done.stderr.splitlines() if 'python -m fineflax.evaluate' in line]
  assert hint == (
      f'  evaluate: python -m fineflax.evaluate --workdir {workdir} --split '
      'train|val [--checkpoint best|latest|STEP]'
  )

  expected = (
      f"error: --split=test: the run has no test split (config.data.test_split='test': "
      f"config.data.source='folder:{photos}' has no such split); its splits: "
      "train ('train'), val ('validation')"
  )
  for split in (['--split', 'test'], []):
    refused = program('fineflax.evaluate', '--workdir', str(workdir), *split)
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == expected, refused.stderr[-2000:]
  validation = program('fineflax.evaluate', '--workdir', str(workdir), '--split', 'val')
  assert validation.returncode == 0, validation.stderr[-3000:]
  assert "split 'val' (validation), 6 examples" in validation.stdout


def test_a_split_the_run_lacks_is_named_with_the_splits_there_are(run_dir):
  """Only the split asked for is loaded: the others are named from the config."""
  data_config = restore.read_config(run_dir).data
  with pytest.raises(ConfigError) as error:
    evaluate.resolve_split('test', data_config, [], absent=('test',))
  assert str(error.value) == (
      f"--split=test: the run has no test split (config.data.test_split='test': "
      f'config.data.source={data_config.source!r} has no such split); its splits: '
      "train ('train'), val ('validation')"
  )
  data_config.test_split = None
  with pytest.raises(ConfigError) as error:
    evaluate.resolve_split('test', data_config, [])
  assert str(error.value) == (
      '--split=test: the run has no test split (config.data.test_split '
      "is None); its splits: train ('train'), val ('validation')"
  )
