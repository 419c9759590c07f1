"""Fit phases (`phase(fit='logistic' | 'ridge')`): the head fitted exactly on the frozen
backbone's features, checked against scikit-learn and NumPy."""

import json
import shutil
import warnings

import jax
import numpy as np
import pytest
import threadpoolctl
from flax import traverse_util
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from fineflax import config as config_lib, train
from fineflax.errors import ConfigError
from fineflax.run import restore
from fineflax.train import linear_probe, state as state_lib, training
from tests import helpers

TOLERANCE = 1e-3  # the issue's: parameters to 1e-3 of scikit-learn's


@pytest.fixture(scope='module')
def digits():
  x, y = load_digits(return_X_y=True)
  return (x / 16).astype(np.float32), y.astype(np.int32)


def _sklearn_logistic(x, y, l2, sample_weight=None):
  """scikit-learn's fit of the same objective: C = 1 / (l2 n); Newton's method to a
  gradient far below float32's, so the reference is the minimum itself."""
  # One BLAS thread: beside JAX's threads, more make scikit-learn ten times slower.
  with warnings.catch_warnings(), threadpoolctl.threadpool_limits(1):
    warnings.simplefilter('ignore')
    return LogisticRegression(
        C=1 / (l2 * len(y)), solver='newton-cholesky', tol=1e-10, max_iter=1000
    ).fit(x.astype(np.float64), y, sample_weight=sample_weight)


def _centred(bias):
  # A softmax's logits are defined up to a shift shared by the classes, and the bias is
  # not penalised: only its differences are determined.
  return bias - bias.mean()


def test_logistic_fit_equals_scikit_learn_multiclass_with_class_weights_and_binary(digits):
  x, y = digits
  class_weights = np.linspace(0.5, 2.0, 10)
  weights = class_weights[y]
  fit = linear_probe.fit_logistic(x, y, 10, 1e-3, np.float32(weights))
  reference = _sklearn_logistic(x, y, 1e-3, weights)
  np.testing.assert_allclose(fit.kernel, reference.coef_.T, atol=TOLERANCE)
  np.testing.assert_allclose(_centred(fit.bias), _centred(reference.intercept_), atol=TOLERANCE)

  binary = (y >= 5).astype(np.int32)
  fit = linear_probe.fit_logistic(x, binary, 1, 1e-3, np.ones(len(y), np.float32))
  reference = _sklearn_logistic(x, binary, 1e-3)
  np.testing.assert_allclose(fit.kernel[:, 0], reference.coef_[0], atol=TOLERANCE)
  np.testing.assert_allclose(fit.bias, reference.intercept_, atol=TOLERANCE)


def _ridge_by_normal_equations(x, t, weights, l2):
  """min (1/n) sum_i w_i ||[x_i 1] beta - t_i||^2 + l2 ||W||^2 (the bias row of beta not
  penalised), solved from its normal equations in float64."""
  n = len(x)
  a = np.concatenate([x.astype(np.float64), np.ones((n, 1))], 1)
  penalty = np.eye(a.shape[1]) * n * l2
  penalty[-1, -1] = 0
  beta = np.linalg.solve(a.T @ (weights[:, None] * a) + penalty, a.T @ (weights[:, None] * t))
  return beta[:-1], beta[-1]


@pytest.mark.parametrize('examples', [1797, 40], ids=['primal', 'dual'])
def test_ridge_fit_equals_numpy_solve(digits, examples):
  x, y = digits[0][:examples], digits[1][:examples]
  weights = np.linspace(0.5, 2.0, 10)[y]
  l2s = (1e-3, 1e-1)
  fits = linear_probe.fit_ridge_grid(x, y, 10, l2s, np.float32(weights))
  targets = 2 * np.eye(10)[y] - 1
  for fit, l2 in zip(fits, l2s):
    kernel, bias = _ridge_by_normal_equations(x, targets, weights, l2)
    np.testing.assert_allclose(fit.kernel, kernel, atol=1e-4)
    np.testing.assert_allclose(fit.bias, bias, atol=1e-4)
  # Through the phase's entry point, with the class weights of config.loss.class_weight.
  fit = linear_probe.choose_l2('ridge', (x, y), None, 10, (1e-3,), np.linspace(0.5, 2.0, 10))
  kernel, bias = _ridge_by_normal_equations(x, targets, weights, 1e-3)
  np.testing.assert_allclose(fit.kernel, kernel, atol=1e-4)
  binary = (y >= 5).astype(np.int32)
  (fit,) = linear_probe.fit_ridge_grid(x, binary, 1, (1e-2,), np.float32(weights))
  kernel, bias = _ridge_by_normal_equations(x, (2.0 * binary - 1)[:, None], weights, 1e-2)
  np.testing.assert_allclose(fit.kernel, kernel, atol=1e-4)
  np.testing.assert_allclose(fit.bias, bias, atol=1e-4)


def test_the_l2_of_the_best_validation_accuracy_is_chosen(digits):
  x, y = digits
  train, val = (x[:300], y[:300]), (x[300:700], y[300:700])
  l2s = (1e-4, 1e-2, 1.0, 30.0)
  chosen = linear_probe.choose_l2('ridge', train, val, 10, l2s, None)
  targets = 2 * np.eye(10)[train[1]] - 1
  scores = []
  for l2 in l2s:
    kernel, bias = _ridge_by_normal_equations(train[0], targets, np.ones(300), l2)
    logits = val[0] @ kernel + bias
    shifted = logits - logits.max(1, keepdims=True)
    nll = np.mean(np.log(np.exp(shifted).sum(1)) - shifted[np.arange(400), val[1]])
    scores.append((-np.mean(logits.argmax(1) == val[1]), nll))
  best = min(range(len(l2s)), key=lambda i: scores[i] + (i,))
  assert chosen.l2 == l2s[best]
  assert [g['val_accuracy'] for g in chosen.grid] == pytest.approx([-s[0] for s in scores])
  assert len({s[0] for s in scores}) > 1  # the grid's accuracies differ: a real choice


def _probe_config(fit='logistic', **probe):
  cfg = helpers.tiny_config(
      config_lib.phase(name='probe', fit=fit, **probe),
      config_lib.phase(name='tune', freeze='regex:^backbone/conv[1-4]_', epochs=1),
      batch_size=16,
      max_examples=200,
  )
  cfg.model.head.dropout = 0.2
  return cfg


def test_a_logistic_probe_then_a_fine_tune_runs_and_the_probe_equals_scikit_learn(tmp_path):
  workdir = tmp_path / 'run'
  # One device: it compiles faster than eight (the fit itself runs on one).
  devices = jax.devices()[:1]
  results = train.train_and_evaluate(_probe_config(fit_l2=(1e-3, 1e-1)), workdir, devices=devices)
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  probe = records[0]
  assert probe['phase'] == 'probe' and probe['step'] == 1
  assert [g['l2'] for g in probe['fit']['grid']] == [1e-3, 1e-1]
  assert records[-1]['phase'] == 'tune' and results['step'] > 1

  fitted = restore.load_run(workdir, probe['step'])
  initial = state_lib.init_variables(fitted.model, fitted.image_shape, fitted.config.seed)
  # The fit changes the head's Dense layer only.
  got = traverse_util.flatten_dict(fitted.variables, sep='/')
  for path, leaf in traverse_util.flatten_dict(initial, sep='/').items():
    if not path.startswith('params/head/dense/'):
      np.testing.assert_array_equal(got[path], leaf, err_msg=path)

  # The reference: scikit-learn on the train split's features, computed here.
  split = training.load_data(fitted.config)[1]['train']
  features = np.asarray(
      jax.jit(lambda v, x: fitted.model.apply(v, x, method='features'))(initial, split.images)
  )
  reference = _sklearn_logistic(features, split.labels, probe['fit']['l2'])
  dense = fitted.variables['params']['head']['dense']
  np.testing.assert_allclose(dense['kernel'], reference.coef_.T, atol=TOLERANCE)
  np.testing.assert_allclose(
      _centred(dense['bias']), _centred(reference.intercept_), atol=TOLERANCE
  )
  # The fine-tune phase starts from the probe: its phase_end checkpoint is the probe.
  assert (workdir / 'checkpoints' / 'phase_end' / str(probe['step'])).is_dir()

  # Stopped right after the probe: the same command resumes the fine-tune from the
  # probe's checkpoint, without fitting again, and ends where the whole run ended.
  for kind in ('latest', 'best'):
    for folder in (workdir / 'checkpoints' / kind).iterdir():
      if int(folder.name) > probe['step']:
        shutil.rmtree(folder)
  again = train.train_and_evaluate(_probe_config(fit_l2=(1e-3, 1e-1)), workdir, devices=devices)
  assert again['step'] == results['step']
  assert again['test_loss'] == results['test_loss']
  assert (workdir / 'metrics.jsonl').read_text().count('"probe"') == 1


@pytest.mark.parametrize(
    'change, message',
    [
        (
            lambda c: c.model.head.update(hidden=(8,)),
            "config.phases[0].fit='logistic' fits a linear head (pooling, dropout, Dense), "
            'but config.model.head.hidden=(8,)',
        ),
        (
            lambda c: c.phases[0].update(epochs=3),
            'config.phases[0].epochs=3: a fit phase fits once (epochs=1)',
        ),
        (
            lambda c: c.phases[0].update(freeze='stages[:-1]'),
            "config.phases[0].freeze='stages[:-1]': a fit phase fits the head alone",
        ),
        (
            lambda c: c.phases[0].update(fit='svm'),
            "config.phases[0].fit='svm': expected one of ['logistic', 'ridge']",
        ),
        (
            lambda c: c.phases[0].update(fit_l2=(0.1, -1)),
            'config.phases[0].fit_l2=(0.1, -1): must be a non-empty sequence of positive',
        ),
    ],
)
def test_a_fit_phase_that_cannot_fit_is_refused_in_one_line(change, message):
  cfg = _probe_config()
  change(cfg)
  with pytest.raises(ConfigError, match=None) as error:
    config_lib.validate(cfg)
  assert message in str(error.value) and '\n' not in str(error.value)


def test_choosing_among_l2s_without_a_validation_split_is_refused(digits):
  with pytest.raises(ConfigError, match='config.data.val_split is None: set fit_l2 to one'):
    linear_probe.choose_l2('logistic', digits, None, 10, (1e-3, 1e-2), None)
