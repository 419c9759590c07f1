"""The moving average of the weights (config.ema): the formula, step by step, on 1 and 8
devices; what a run records and saves; the programs that open it. (Resuming to the same
average after a SIGTERM: tests/test_train.py's resume test keeps one.)"""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from fineflax import config as config_lib, models, pytree, train, weights
from fineflax.distributed import parallel
from fineflax.distributed.preemption import sigterm_flag
from fineflax.errors import ConfigError
from fineflax.inference.evaluate import evaluate_run
from fineflax.inference.predict import predict_run_paths
from fineflax.run import RunDir, restore
from fineflax.run.reporting import MetricsLog
from fineflax.train import ema as ema_lib, freeze, state as state_lib, step as step_lib
from tests import helpers, scripts_loader

pytestmark = pytest.mark.slow  # compiles train steps and trains a run

IMAGE = (16, 16, 3)
BATCH = 16
CONV5 = 'regex:^backbone/conv[1-4]_'  # conv5 and the head train


def _leaves(tree):
  return {
      pytree.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _steps(devices, average: ema_lib.Ema, steps: int = 4):
  """The states after each of `steps` SGD steps (conv5 + head, conv5's BatchNorm in
  training mode) of resnet_tiny, keeping `average`."""
  cfg = config_lib.default_config()
  cfg.model.update(backbone='resnet_tiny', preprocessing='tf')
  cfg.model.head.dropout = 0.5
  model = models.build_model(cfg.model, 4, bn_axis_name=parallel.AXIS)
  variables = state_lib.init_variables(model, IMAGE, seed=0)
  opt = helpers.phase_optimizer(
      model, variables['params'], CONV5, optimizer='sgd', learning_rate=0.05, momentum=0.0
  )
  mesh = parallel.make_mesh(devices)
  bn_train = freeze.bn_train_layers(opt.labels, model.layer_groups())
  train_step = step_lib.make_train_step(model, opt, mesh, bn_train=bn_train, ema=average)
  state = parallel.replicate(state_lib.create_train_state(variables, opt), mesh)
  state = state.replace(
      ema=ema_lib.begin(
          average,
          opt.trainable(state.params),
          ema_lib.trained_stats(state.batch_stats, bn_train),
          state.step,
          None,
      )
  )
  rng = np.random.default_rng(0)
  states = [jax.device_get(state)]
  for _ in range(steps):
    batch = {
        'image': rng.integers(0, 256, (BATCH,) + IMAGE, dtype=np.uint8),
        'label': rng.integers(0, 4, BATCH).astype(np.int32),
        'weight': np.ones(BATCH, np.float32),
    }
    state, _ = train_step(state, parallel.shard_batch(batch, mesh), {})
    states.append(jax.device_get(state))
  return opt, states


@pytest.fixture(scope='module')
def one_device():
  return _steps(jax.devices()[:1], ema_lib.Ema(0.9))


def test_the_average_is_the_formula_over_the_steps_of_what_trains(one_device):
  opt, states = one_device
  trainable = _leaves(opt.trainable(states[0].params))
  averaged = {f'params/{k}' for k in trainable} | {
      f'batch_stats/{k}' for k in _leaves(states[0].batch_stats) if k.startswith('backbone/conv5_')
  }
  # TensorFlow's ExponentialMovingAverage with num_updates: decay min(0.9, (1+t)/(10+t)).
  expected = {
      **{f'params/{k}': v for k, v in _leaves(opt.trainable(states[0].params)).items()},
      **{f'batch_stats/{k}': v for k, v in _leaves(states[0].batch_stats).items()},
  }
  for t, state in enumerate(states[1:]):
    d = min(0.9, (1 + t) / (10 + t))
    now = {f'params/{k}': v for k, v in _leaves(state.params).items()}
    now.update({f'batch_stats/{k}': v for k, v in _leaves(state.batch_stats).items()})
    expected = {k: d * v + (1 - d) * now[k] for k, v in expected.items() if k in now}
  final = states[-1]
  got = {f'{k}/{p}': v for k in ('params', 'batch_stats') for p, v in _leaves(final.ema[k]).items()}
  assert set(got) == averaged and int(final.ema['start']) == 0
  for key in averaged:
    np.testing.assert_allclose(got[key], expected[key], rtol=2e-6, atol=1e-7, err_msg=key)
    assert not np.array_equal(got[key], now[key]), key  # an average, not the last value
  # The frozen layers are read from the parameters themselves: no second copy.
  used = _leaves(final.ema_variables)
  for key, value in _leaves(final.variables).items():
    if key not in averaged:
      np.testing.assert_array_equal(used[key], value, err_msg=key)


def test_eight_devices_keep_the_average_one_device_keeps(one_device):
  _, states = one_device
  _, eight = _steps(jax.devices(), ema_lib.Ema(0.9))
  for key, value in _leaves(states[-1].ema).items():
    np.testing.assert_allclose(_leaves(eight[-1].ema)[key], value, rtol=1e-5, atol=1e-5)


def test_without_warmup_the_first_step_already_decays_at_the_rate():
  rate = ema_lib.Ema(0.99, warmup=False).rate
  assert float(rate(0)) == pytest.approx(0.99) and float(
      ema_lib.Ema(0.99).rate(0)
  ) == pytest.approx(0.1)
  assert float(ema_lib.Ema(0.99).rate(10_000)) == pytest.approx(0.99)


def test_a_metric_of_the_average_needs_one():
  cfg = helpers.tiny_config()
  cfg.checkpoint.monitor = 'val_accuracy_ema'
  with pytest.raises(
      ConfigError, match=r"checkpoint.monitor='val_accuracy_ema'.*ema.decay is None"
  ):
    config_lib.validate(cfg)
  cfg.ema.decay = 0.9
  assert config_lib.validate(cfg).checkpoint.mode == 'max'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """One epoch of conv5 + head on 40 digits, keeping an average, best/ by its accuracy."""
  cfg = helpers.tiny_config(
      config_lib.phase(name='conv5', freeze=CONV5, learning_rate=3e-3, epochs=2),
      batch_size=16,
      max_examples=40,
  )
  cfg.ema.decay = 0.8
  cfg.checkpoint.monitor = 'val_accuracy_ema'
  workdir = tmp_path_factory.mktemp('ema') / 'run'
  return workdir, train.train_and_evaluate(cfg, workdir, devices=jax.devices()[:2])


def test_a_run_records_and_reports_the_average(run):
  workdir, results = run
  records = MetricsLog(workdir).read()
  assert all({'val_loss_ema', 'val_accuracy_ema'} <= set(r) for r in records)
  assert results['ema']['step'] == results['step']
  assert {'val_accuracy', 'test_accuracy', 'test_loss'} <= set(results['ema'])
  # The last epoch's record measured the same weights as results.json's ema record.
  assert records[-1]['val_loss_ema'] == pytest.approx(results['ema']['val_loss'], rel=1e-6)
  assert records[-1]['val_loss_ema'] != records[-1]['val_loss']
  assert results['best']['monitor'] == 'val_accuracy_ema'


def test_evaluate_and_load_run_open_the_average_on_request(run):
  workdir, results = run
  report = evaluate_run(workdir, 'test', 'latest', weights='ema', devices=jax.devices()[:1])
  assert report['checkpoint'] == 'latest-ema'
  assert report['loss'] == pytest.approx(results['ema']['test_loss'], rel=1e-5)
  assert report['accuracy'] == results['ema']['test_accuracy']
  raw = restore.load_run(workdir, 'latest')
  average = restore.load_run(workdir, 'latest', weights='ema')
  assert average.weights == 'ema' and average.label == 'latest-ema'
  saved = ocp.StandardCheckpointer().restore(
      RunDir(workdir).latest / str(results['step']) / 'state'
  )
  averaged = _leaves(saved['ema']['params'])
  assert averaged and not any(k.startswith('backbone/conv1_') for k in averaged)
  for key, value in _leaves(average.variables['params']).items():
    np.testing.assert_array_equal(value, averaged.get(key, _leaves(saved['params'])[key]), key)
    assert np.array_equal(value, _leaves(raw.variables['params'])[key]) == (key not in averaged)


def test_init_from_takes_the_average_on_request(run, tmp_path, caplog):
  workdir, _ = run
  cfg = helpers.tiny_config(batch_size=16, max_examples=40)
  cfg.init_from = str(workdir)
  cfg.init_from_weights = 'ema'
  with caplog.at_level('INFO', logger='fineflax.train'), sigterm_flag() as stop:
    new, _, variables = train.setup(cfg, tmp_path / 'new', jax.devices()[:1], stop)
    new.close()
  assert '(its EMA weights)' in caplog.text
  [best] = RunDir(workdir).best.iterdir()  # init_from takes the best step
  saved = ocp.StandardCheckpointer().restore(best / 'state')
  loaded = _leaves(variables['params'])
  for key, value in _leaves(saved['params']).items():
    average = _leaves(saved['ema']['params']).get(key)
    np.testing.assert_array_equal(loaded[key], value if average is None else average, key)


def test_weights_without_an_average_are_refused_in_one_line(tmp_path):
  model = helpers.tiny_model()
  variables = state_lib.init_variables(model, IMAGE, seed=0)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'state', variables)
  with pytest.raises(weights.WeightFileError, match=r'holds no moving average.*config.ema.decay'):
    weights.read_variable_tree(tmp_path / 'state', ema=True)
  with pytest.raises(ConfigError, match=r"weights 'mean': expected one of raw, ema"):
    restore.read_variables(tmp_path, {}, 'mean')


def test_export_and_predict_take_the_average_on_request(run, tmp_path):
  workdir, _ = run
  export = scripts_loader.load('export')
  assert (
      export.main(
          ['--workdir', str(workdir), '--weights', 'ema', '--out', str(tmp_path / 'ema.npz')]
      )
      == 0
  )
  average = restore.load_run(workdir, weights='ema')
  with np.load(tmp_path / 'ema.npz') as saved:
    assert json.loads(saved['__metadata__'].item())['checkpoint'] == 'best-ema'
    for key, value in _leaves(average.variables['params']).items():
      np.testing.assert_array_equal(saved[f'params/{key}'], value, err_msg=key)
  image = tmp_path / 'digit.png'
  Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(image)
  one = jax.devices()[:1]
  averaged = predict_run_paths(workdir, [str(image)], k=10, weights='ema', devices=one)
  raw = predict_run_paths(workdir, [str(image)], k=10, devices=one)
  assert averaged.source() == f'{workdir}: checkpoint best-ema (step {average.step})'
  assert averaged.top != raw.top  # other weights, other probabilities
