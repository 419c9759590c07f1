"""Calibration (`fineflax.inference.calibration`): ECE, NLL, balanced accuracy and
per-class recall against NumPy, SciPy and scikit-learn; the temperature against SciPy's
bounded minimisation; `evaluate --calibrate` on conftest's `demo_run` (a copy), and the
saved temperature as predict and scripts/export.py apply it.
"""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import optimize, special

from fineflax import data
from fineflax.data import augment as augmentation
from fineflax.errors import ConfigError
from fineflax.inference import calibration, evaluate, predict
from fineflax.run import restore
from tests import helpers, scripts_loader
from tests.helpers import ROOT


def _numpy_ece(probs, labels, bins=15):
  """Guo et al.'s ECE as their code computes it: bins (lower, upper] over linspace(0, 1)."""
  confidence, predicted = probs.max(-1), probs.argmax(-1)
  edges = np.linspace(0, 1, bins + 1)
  ece = 0.0
  for lower, upper in zip(edges[:-1], edges[1:]):
    inside = (confidence > lower) & (confidence <= upper)
    if inside.any():
      gap = np.mean(predicted[inside] == labels[inside]) - np.mean(confidence[inside])
      ece += inside.mean() * abs(gap)
  return ece


def _softmax(logits):
  return special.softmax(np.asarray(logits, np.float64), axis=-1)


def _scipy_temperature(nll_of):
  found = optimize.minimize_scalar(
      lambda log_t: nll_of(np.exp(log_t)),
      bounds=(np.log(calibration.MIN_TEMPERATURE), np.log(calibration.MAX_TEMPERATURE)),
      method='bounded',
      options={'xatol': 1e-10},
  )
  return float(np.exp(found.x))


def _softmax_nll(logits, labels, t=1.0):
  z = np.asarray(logits, np.float64) / t
  return -np.mean(special.log_softmax(z, axis=-1)[np.arange(len(labels)), labels])


def _logits(seed, n=400, classes=6, scale=4.0):
  """Overconfident logits: informative (the label's logit raised) and scaled up."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  logits = rng.normal(size=(n, classes))
  logits[np.arange(n), labels] += 1.5
  return (scale * logits).astype(np.float32), labels.astype(np.int32)


def test_metrics_equal_numpy_and_scikit_learn():
  from sklearn import metrics  # pylint: disable=g-import-not-at-top

  # Confidences spread over the bins (not all in the top one), so that their number shows.
  logits, labels = _logits(0, scale=1.5)
  labels[labels == 5] = 4  # a class without examples: its recall is undefined, not 0
  report = evaluate.classification_metrics(logits, labels, [str(c) for c in range(6)])
  probs = _softmax(logits)
  assert report['ece'] == pytest.approx(_numpy_ece(probs, labels), abs=1e-12)
  assert report['ece'] > 0.05  # so that a wrong bin or weight shows
  assert report['nll'] == pytest.approx(_softmax_nll(logits, labels), rel=1e-12)

  assert report['balanced_accuracy'] != pytest.approx(report['accuracy'], abs=1e-3)
  with pytest.warns(UserWarning, match='y_pred contains classes not in y_true'):
    balanced = metrics.balanced_accuracy_score(labels, probs.argmax(-1))
  recall = metrics.recall_score(labels, probs.argmax(-1), labels=range(5), average=None)
  precision = metrics.precision_score(labels, probs.argmax(-1), labels=range(5), average=None)
  assert report['balanced_accuracy'] == pytest.approx(balanced, abs=1e-12)
  rows = report['per_class']
  np.testing.assert_allclose([r['recall'] for r in rows[:5]], recall, atol=1e-12)
  np.testing.assert_allclose([r['precision'] for r in rows[:5]], precision, atol=1e-12)
  assert rows[5]['recall'] is None
  counts = report['reliability']['count']
  assert len(counts) == 15 and sum(counts) == len(labels) and max(counts) < len(labels) / 3


def test_binary_ece_uses_the_predicted_class_s_probability():
  rng = np.random.default_rng(1)
  logits = (3 * rng.normal(size=(300, 1))).astype(np.float32)
  labels = (rng.random(300) < special.expit(0.5 * logits[:, 0])).astype(np.int32)
  p = special.expit(logits[:, 0].astype(np.float64))
  probs = np.stack([1 - p, p], axis=-1)
  assert calibration.expected_calibration_error(logits, labels) == pytest.approx(
      _numpy_ece(probs, labels), abs=1e-12
  )
  nll = -np.mean(np.log(np.where(labels == 1, p, 1 - p)))
  assert calibration.nll(logits, labels) == pytest.approx(nll, rel=1e-9)


def test_the_temperature_minimises_the_nll_as_scipy_finds():
  logits, labels = _logits(2)
  got = calibration.fit_temperature(logits, labels)
  want = _scipy_temperature(lambda t: _softmax_nll(logits, labels, t))
  assert got == pytest.approx(want, rel=1e-4) and 1.5 < got < 100  # overconfident: T > 1
  # A one-logit head: the sigmoid's NLL.
  rng = np.random.default_rng(3)
  z = (4 * rng.normal(size=(300, 1))).astype(np.float32)
  y = (rng.random(300) < special.expit(0.7 * z[:, 0])).astype(np.int32)
  signed = np.where(y == 1, z[:, 0], -z[:, 0]).astype(np.float64)
  want = _scipy_temperature(lambda t: np.mean(np.logaddexp(0, -signed / t)))
  assert calibration.fit_temperature(z, y) == pytest.approx(want, rel=1e-4)
  # Separated perfectly: the NLL falls towards T -> 0, and T is the bound.
  assert calibration.fit_temperature(np.array([[4.0, 0], [0, 4.0]]), np.array([0, 1])) == (
      calibration.MIN_TEMPERATURE
  )


@pytest.fixture(scope='module')
def calibrated(demo_run, tmp_path_factory):
  """A copy of the demo run, its latest checkpoint evaluated on test with --calibrate.

  The copy's config swaps the dataset's validation and test splits: the smoke model is
  right on no validation digit, and there the temperature runs to its bound (100); on the
  test digits it is inside (about 0.3), where a fit on the wrong split would show."""
  workdir = shutil.copytree(demo_run, tmp_path_factory.mktemp('calibration') / 'run')
  config = json.loads((workdir / 'config.json').read_text())
  config['data']['val_split'], config['data']['test_split'] = 'test', 'validation'
  (workdir / 'config.json').write_text(json.dumps(config))
  report = evaluate.evaluate_run(
      workdir, 'test', 'latest', calibrate=True, devices=jax.devices()[:1]
  )
  return workdir, report


def _split_logits(run, role):
  """(logits float64, labels) of a split by `model.apply` on the prepared images."""
  split = data.load_dataset(run.config.data, [f'{role}_split']).splits[
      run.config.data[f'{role}_split']
  ]
  augment = data.augment_from_config(run.config.data)
  x = augmentation.prepare(jnp.asarray(split.images), None, augment, run.model.image_size, False)
  return np.asarray(run.model.apply(run.variables, x, train=False), np.float64), split.labels


@pytest.mark.slow
def test_evaluate_calibrate_fits_on_val_and_reports_before_and_after(calibrated):
  workdir, report = calibrated
  run = restore.load_run(workdir, 'latest')
  val_logits, val_labels = _split_logits(run, 'val')
  want = _scipy_temperature(lambda t: _softmax_nll(val_logits, val_labels, t))
  fitted = report['calibration']
  assert fitted['temperature'] == pytest.approx(want, rel=1e-4)
  assert calibration.MIN_TEMPERATURE < fitted['temperature'] < calibration.MAX_TEMPERATURE / 10
  assert fitted['fitted_on'] == 'test' and fitted['fitted_examples'] == len(val_labels)
  # The test split's figures, from its saved logits, before and after T.
  saved = np.load(report['files']['predictions'])
  logits, labels = saved['logits'].astype(np.float64), saved['labels']
  t = fitted['temperature']
  assert report['ece'] == fitted['before']['ece']
  assert fitted['before']['ece'] == pytest.approx(_numpy_ece(_softmax(logits), labels), abs=1e-9)
  assert fitted['before']['nll'] == pytest.approx(_softmax_nll(logits, labels), rel=1e-9)
  assert fitted['after']['ece'] == pytest.approx(_numpy_ece(_softmax(logits / t), labels), abs=1e-9)
  assert fitted['after']['nll'] == pytest.approx(_softmax_nll(logits, labels, t), rel=1e-9)
  assert fitted['after']['ece'] != pytest.approx(fitted['before']['ece'], abs=1e-4)
  np.testing.assert_allclose(saved['calibrated_probabilities'], _softmax(logits / t), atol=1e-6)
  saved_entry = json.loads((workdir / 'calibration.json').read_text())['latest']
  assert (saved_entry['temperature'], saved_entry['step']) == (t, 4)
  with Image.open(report['files']['reliability_png']) as image:
    assert image.format == 'PNG' and min(image.size) > 100
  assert report['files']['reliability_png'] == str(workdir / 'eval/test-latest-reliability.png')


def _write_temperature(workdir, run, temperature):
  calibration.save_temperature(workdir, run, {'temperature': temperature})


@pytest.mark.slow
def test_predict_and_export_apply_the_saved_temperature(calibrated, tmp_path, capsys):
  workdir, _ = calibrated
  run = restore.load_run(workdir, 'latest')
  images = data.load_dataset(run.config.data, ['test_split']).splits['validation'].images[:3]
  paths = []
  for i, image in enumerate(images):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(image).save(paths[-1])
  # A temperature far from 1, so that applying it or not cannot be mistaken.
  _write_temperature(workdir, run, 0.25)

  def probs(**kwargs):
    ranked = predict.predict_run_files(workdir, paths, k=10, checkpoint='latest', **kwargs)
    return np.array([[p for _, p in sorted(r, key=lambda e: int(e[0]))] for r in ranked])

  raw, scaled = probs(calibrated=False), probs()
  np.testing.assert_allclose(scaled, _softmax(np.log(raw) / 0.25), atol=1e-5)
  assert np.abs(scaled - raw).max() > 0.01
  found = predict.predict_run_paths(workdir, paths, k=3, checkpoint='latest')
  assert found.source() == (
      f'{workdir}: checkpoint latest (step 4), temperature 0.2500 (evaluate --calibrate)'
  )

  export = scripts_loader.load('export')
  assert (
      export.main(
          ['--workdir', str(workdir), '--checkpoint', 'latest', '--out', str(tmp_path / 'e.npz')]
      )
      == 0
  )
  assert 'temperature 0.2500 in its metadata' in capsys.readouterr().out
  with np.load(tmp_path / 'e.npz') as f:
    assert json.loads(f[export.NPZ_METADATA_KEY].item())['temperature'] == 0.25

  # Fitted on another step of the label: neither applies it.
  entries = json.loads((workdir / 'calibration.json').read_text())
  entries['latest']['step'] = 2
  (workdir / 'calibration.json').write_text(json.dumps(entries))
  np.testing.assert_allclose(probs(), raw, atol=1e-6)
  assert (
      export.main(
          ['--workdir', str(workdir), '--checkpoint', 'latest', '--out', str(tmp_path / 'f.npz')]
      )
      == 0
  )
  assert 'fitted at step 2, the checkpoint is now step 4: not applied' in capsys.readouterr().err
  with np.load(tmp_path / 'f.npz') as f:
    assert json.loads(f[export.NPZ_METADATA_KEY].item())['temperature'] is None
  # Another label (here best/) has no entry: nothing applied.
  assert calibration.saved_temperature(workdir, restore.load_run(workdir, 'best')) == (None, None)


@pytest.mark.slow
def test_calibrate_without_a_validation_split_is_one_line(demo_run, tmp_path):
  workdir = shutil.copytree(demo_run, tmp_path / 'run')
  config = json.loads((workdir / 'config.json').read_text())
  config['data']['val_split'] = 'holdout'
  (workdir / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ConfigError) as error:
    evaluate.evaluate_run(workdir, 'test', 'latest', calibrate=True)
  assert str(error.value) == (
      '--calibrate: the run has no validation split to fit the temperature on '
      "(config.data.val_split='holdout': config.data.source='digits' has no such split)"
  )
  with pytest.raises(ConfigError, match=r"^--tta 'crop': expected one of none, flip, 5crop"):
    evaluate.evaluate_run(workdir, 'test', 'latest', tta='crop')
  assert not (workdir / 'calibration.json').exists()


@pytest.mark.slow
def test_the_documented_command(calibrated, tmp_path):
  """docs/running.md's command, as a user runs it; and --tta misspelt, one line."""
  workdir, _ = calibrated
  env = helpers.program_env(cache=tmp_path)

  def evaluate_program(*args):
    return subprocess.run(
        [sys.executable, '-m', 'fineflax.evaluate', '--workdir', str(workdir), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

  refused = evaluate_program('--tta', 'flips')
  assert refused.returncode == 1
  assert refused.stderr.splitlines()[-1] == (
      "error: --tta 'flips': expected one of none, flip, 5crop, 10crop"
  )
  done = evaluate_program('--calibrate', '--tta', 'flip')
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  best = restore.load_run(workdir, 'best')
  assert lines[0] == (
      f"{workdir}: checkpoint best (step {best.step}), split 'test' (validation), 32 examples, "
      'tta flip'
  )
  assert lines[2].startswith('balanced accuracy ') and ' ECE ' in lines[2]
  assert lines[3].startswith('temperature ') and ' -> ' in lines[3]
  assert f'{workdir}/eval/test-best-flip-reliability.png' in lines[-1]
  assert (workdir / 'eval' / 'test-best-flip-reliability.png').is_file()
  assert json.loads((workdir / 'calibration.json').read_text())['best']['tta'] == 'flip'
