"""Weight averages of whole runs: WiSE-FT at the end of a run and by
`python -m fineflax.interpolate`, and soups by `python -m fineflax.soup`, each compared with
the same average computed in NumPy from the checkpoints Orbax reads back."""

import json
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from fineflax import config as config_lib, pytree, train
from fineflax.data import digits
from fineflax.errors import ConfigError
from fineflax.inference.evaluate import evaluate_run
from fineflax.inference.predict import predict_run_files
from fineflax.inference.soup import soup_runs
from fineflax.run import RunDir, checkpoints, restore
from fineflax.run.reporting import MetricsLog
from fineflax.train import averaging
from tests import helpers, scripts_loader
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # trains two runs


def _params(step_dir):
  """The params of a checkpoint step folder, read by Orbax alone: {'path': array}."""
  saved = ocp.StandardCheckpointer().restore(step_dir / 'state')
  return {
      pytree.path_str(p): np.asarray(v)
      for p, v in jax.tree_util.tree_flatten_with_path(saved['params'])[0]
  }


def _only_step(folder):
  [step] = checkpoints.complete_steps(folder)
  return folder / str(step)


def _config(learning_rate_scale=1.0, wise_ft=False):
  cfg = helpers.two_phase_config()
  for phase in cfg.phases:
    phase.learning_rate *= learning_rate_scale
  cfg.wise_ft.enabled = wise_ft
  return cfg


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two two-phase runs of one model at two learning rates; the first ends with WiSE-FT."""
  root = tmp_path_factory.mktemp('averaging')
  devices = jax.devices()[:2]
  a = train.train_and_evaluate(_config(wise_ft=True), root / 'a', devices=devices)
  train.train_and_evaluate(_config(0.5), root / 'b', devices=devices)
  return root, a


def test_wise_ft_at_the_end_of_a_run_chooses_alpha_on_validation(runs):
  root, results = runs
  record, folder = results['wise_ft'], RunDir(root / 'a')
  assert json.loads(folder.results_json.read_text())['wise_ft'] == record
  curve = {p['alpha']: p for p in record['curve']}
  assert sorted(curve) == [round(0.1 * i, 1) for i in range(11)]
  # alpha 1 is the final parameters, alpha 0 the end of the first phase, as trained.
  assert curve[1.0]['val_accuracy'] == results['final']['val_accuracy']
  assert curve[1.0]['val_loss'] == pytest.approx(results['final']['val_loss'], rel=1e-6)
  scratch_end = [r for r in MetricsLog(folder.root).read() if r['phase'] == 'scratch'][-1]
  assert curve[0.0]['val_accuracy'] == scratch_end['val_accuracy']
  assert curve[0.0]['val_loss'] == pytest.approx(scratch_end['val_loss'], rel=1e-6)
  assert record['start'] == {'phase': 'scratch', 'step': scratch_end['step']}
  best = max(record['curve'], key=lambda p: (p['val_accuracy'], -p['val_loss']))
  assert record['alpha'] == best['alpha']
  # The weights kept: (1 - alpha) * start + alpha * end, from the checkpoints on disk.
  alpha = record['alpha']
  start = _params(folder.phase_end / str(scratch_end['step']))
  end = _params(folder.latest / str(results['step']))
  kept = _params(_only_step(folder.wise_ft))
  for key, value in kept.items():
    expected = (1 - np.float32(alpha)) * start[key] + np.float32(alpha) * end[key]
    np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7, err_msg=key)
  report = evaluate_run(folder.root, 'test', 'wise_ft', devices=jax.devices()[:1])
  assert report['checkpoint'] == 'wise_ft'
  assert report['accuracy'] == record['test_accuracy']
  assert report['loss'] == pytest.approx(record['test_loss'], rel=1e-5)
  assert folder.wise_ft_png.is_file()


def _cli(*args):
  return subprocess.run(
      [sys.executable, '-m', *map(str, args)],
      cwd=ROOT,
      env=helpers.program_env(),
      capture_output=True,
      text=True,
      timeout=600,
  )


def test_the_interpolate_program_searches_again_and_replaces_the_last(runs, tmp_path):
  root, results = runs
  run = tmp_path / 'a'
  shutil.copytree(root / 'a', run)
  done = _cli('fineflax.interpolate', '--workdir', run, '--alphas', '0,0.5,1', '--end', 'best')
  assert done.returncode == 0, done.stderr[-3000:]
  record = json.loads(RunDir(run).results_json.read_text())['wise_ft']
  assert [p['alpha'] for p in record['curve']] == [0.0, 0.5, 1.0]
  best_step = results['best']['step']
  assert record['end'] == {'checkpoint': 'best', 'step': best_step}
  assert checkpoints.complete_steps(RunDir(run).wise_ft) == [best_step]
  assert f"alpha 0.50: val_loss {record['curve'][1]['val_loss']:.4f}" in done.stdout
  assert 'weights: ' in done.stdout and '--checkpoint wise_ft' in done.stdout


def test_a_uniform_soup_is_the_mean_of_the_runs_and_opens_as_a_run(runs, tmp_path):
  root, _ = runs
  report = soup_runs(tmp_path / 'soup', [root / 'a', root / 'b'], devices=jax.devices()[:1])
  assert report['method'] == 'uniform' and len(report['kept']) == 2
  a = _params(_only_step(RunDir(root / 'a').best))
  b = _params(_only_step(RunDir(root / 'b').best))
  soup = _params(_only_step(RunDir(tmp_path / 'soup').soup))
  for key, value in soup.items():
    np.testing.assert_allclose(value, (a[key] + b[key]) / 2, rtol=1e-6, atol=1e-7, err_msg=key)
  evaluated = evaluate_run(tmp_path / 'soup', 'test', devices=jax.devices()[:1])
  assert evaluated['checkpoint'] == 'soup' and evaluated['accuracy'] == report['test_accuracy']
  image = tmp_path / 'digit.png'
  Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(image)
  [ranked] = predict_run_files(tmp_path / 'soup', [str(image)], k=3, devices=jax.devices()[:1])
  assert len(ranked) == 3
  assert restore.load_run(tmp_path / 'soup').label == 'soup'
  # config.init_from starts from it as from a trained run's best checkpoint.
  assert (
      restore.init_from_folder(str(tmp_path / 'soup'))
      == _only_step(RunDir(tmp_path / 'soup').soup) / 'state'
  )


def test_the_greedy_soup_program_writes_the_mean_of_what_it_kept(runs, tmp_path):
  root, _ = runs
  out = tmp_path / 'greedy'
  done = _cli('fineflax.soup', '--greedy', '--out', out, root / 'a', root / 'b')
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(RunDir(out).results_json.read_text())['soup']
  assert report['method'] == 'greedy' and report['tried'][0]['kept']
  soup_accuracy = report['tried'][0]['val_accuracy']
  for step in report['tried'][1:]:
    assert step['kept'] == (step['val_accuracy'] >= soup_accuracy)
    soup_accuracy = step['val_accuracy'] if step['kept'] else soup_accuracy
  kept = [_params(_only_step(RunDir(name.split(':')[0]).best)) for name in report['kept']]
  soup = _params(_only_step(RunDir(out).soup))
  for key, value in soup.items():
    expected = np.mean([k[key] for k in kept], axis=0)
    np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7, err_msg=key)
  assert f"val: accuracy {report['val_accuracy']:.4f}" in done.stdout


def test_a_greedy_soup_adds_an_ingredient_only_if_validation_accuracy_does_not_drop():
  # A validation 'accuracy' of 1 - |mean weight - 1|: the soup of 0.75 and 1.25 scores 1,
  # adding 3.0 would bring it to 0.33.
  def evaluate(variables, role):
    assert role == 'val'
    miss = abs(float(variables['params']['w'].mean()) - 1.0)
    return {'accuracy': 1.0 - miss, 'loss': miss}

  ingredients = [
      (name, {'params': {'w': np.full(3, w, np.float32)}})
      for name, w in (('far', 3.0), ('low', 0.75), ('high', 1.25))
  ]
  individual = [evaluate(v, 'val') for _, v in ingredients]
  soup = averaging.greedy_soup(ingredients, individual, evaluate)
  assert soup.kept == ('low', 'high')  # sorted by their own accuracy, ties by order
  assert [(t['ingredient'], t['kept']) for t in soup.tried] == [
      ('low', True),
      ('high', True),
      ('far', False),
  ]
  np.testing.assert_allclose(soup.variables['params']['w'], 1.0, rtol=1e-7)
  assert soup.val['accuracy'] == pytest.approx(1.0)


def test_the_last_checkpoints_of_one_run_average_as_numpy_averages_them(runs, tmp_path):
  root, _ = runs
  report = soup_runs(tmp_path / 'last', [root / 'a'], last=2, devices=jax.devices()[:1])
  steps = checkpoints.complete_steps(RunDir(root / 'a').latest)[-2:]
  assert report['kept'] == [f"{RunDir(root / 'a').root}:step{s}" for s in steps]
  first, second = (_params(RunDir(root / 'a').latest / str(s)) for s in steps)
  for key, value in _params(_only_step(RunDir(tmp_path / 'last').soup)).items():
    np.testing.assert_allclose(value, (first[key] + second[key]) / 2, rtol=1e-6, err_msg=key)


@pytest.mark.parametrize(
    'change, message',
    [
        (lambda c, d: c['model']['head'].update(hidden=[32]), 'another head'),
        (lambda c, d: c['model'].update(backbone='resnet50'), 'another backbone'),
        (lambda c, d: d.update(class_names=d['class_names'][::-1]), 'another class list'),
    ],
)
def test_runs_of_another_model_are_refused_naming_the_difference(runs, tmp_path, change, message):
  root, _ = runs
  other = tmp_path / 'other'
  other.mkdir()
  config = json.loads(RunDir(root / 'a').config_json.read_text())
  dataset = json.loads(RunDir(root / 'a').dataset_json.read_text())
  change(config, dataset)
  RunDir(other).config_json.write_text(json.dumps(config))
  RunDir(other).dataset_json.write_text(json.dumps(dataset))
  with pytest.raises(ConfigError, match=f'{other} cannot be averaged with .*: {message}'):
    soup_runs(tmp_path / 'soup', [root / 'a', other])
  assert not (tmp_path / 'soup').exists()


def test_a_wise_ft_the_config_cannot_make_is_refused_before_training():
  one = helpers.tiny_config()
  one.wise_ft.enabled = True
  with pytest.raises(ConfigError, match='needs two phases or more'):
    config_lib.validate(one)
  cfg = _config(wise_ft=True)
  cfg.wise_ft.start = 'conv5'
  with pytest.raises(
      ConfigError,
      match=r"start='conv5': expected the name of a phase before the last, one of \['scratch'\]",
  ):
    config_lib.validate(cfg)


def test_the_shifted_digits_are_the_demo_splits_few_shot_with_a_shifted_test_split(tmp_path):
  make = scripts_loader.load('make_shifted_digits')
  counts = make.write(tmp_path / 'a', per_class=3, degrees=30, noise=40)
  assert counts == {'train': 30, 'validation': 269, 'test': 270}
  make.write(tmp_path / 'b', per_class=3, degrees=30, noise=40)
  demo = digits.load('digits', ml_collections.ConfigDict({'max_examples': None}))
  for split, shifted in (('validation', False), ('test', True)):
    written = sorted((tmp_path / 'a' / split).glob('*/*.png'))
    assert len(written) == len(demo.splits[split].labels)
    index = int(written[0].stem)
    image = np.asarray(Image.open(written[0]))
    assert int(written[0].parent.name) == demo.splits[split].labels[index]
    assert np.array_equal(image, demo.splits[split].images[index]) != shifted
    # the same seed, the same files
    assert np.array_equal(
        image, np.asarray(Image.open(tmp_path / 'b' / written[0].relative_to(tmp_path / 'a')))
    )
