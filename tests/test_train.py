"""Whole runs: phases, metrics.jsonl, resume, the command line, the demo's accuracy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fineflax import config as config_lib, train
from fineflax.distributed import preemption
from fineflax.distributed.preemption import sigterm_flag
from fineflax.errors import ConfigError
from fineflax.run import RunDir, checkpoints
from fineflax.run.reporting import MetricsLog
from tests import helpers
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # trains runs and starts the programs


class Interrupt(Exception):
  pass


def _interrupt_after(monkeypatch, phase_index, phase_epochs_done):
  """Makes the run die right after the checkpoint of the given epoch is written."""
  original = checkpoints.Checkpoints.save

  def save(self, state, meta):
    original(self, state, meta)
    if (meta['phase_index'], meta['phase_epochs_done']) == (phase_index, phase_epochs_done):
      self.wait()
      raise Interrupt

  monkeypatch.setattr(checkpoints.Checkpoints, 'save', save)


def _records(workdir):
  return [{k: v for k, v in r.items() if k != 'images_per_sec'} for r in MetricsLog(workdir).read()]


def _averaged():
  """The two-phase run keeping a moving average of its weights across the phases (scratch
  averages BatchNorm statistics too): a resumed run must restore it to the bit."""
  cfg = helpers.two_phase_config()
  cfg.ema.decay = 0.9
  cfg.report.plot = True  # every output a run writes
  return cfg


def test_resume_mid_phase_and_between_phases_equals_uninterrupted(tmp_path, monkeypatch):
  devices = jax.devices()[:2]
  full = train.train_and_evaluate(_averaged(), tmp_path / 'full', devices=devices)
  expected = _records(tmp_path / 'full')
  assert all(r['val_accuracy_ema'] is not None for r in expected) and 'ema' in full
  assert [(r['phase'], r['phase_epoch'], r['epoch'], r['step']) for r in expected] == [
      ('scratch', 1, 1, 3),
      ('scratch', 2, 2, 6),
      ('conv5', 1, 3, 9),
      ('conv5', 2, 4, 12),
  ]

  workdir = tmp_path / 'interrupted'
  with monkeypatch.context() as patch:  # at the end of phase 1
    _interrupt_after(patch, 0, 2)
    with pytest.raises(Interrupt):
      train.train_and_evaluate(_averaged(), workdir, devices=devices)
  with monkeypatch.context() as patch:  # mid-phase: a SIGTERM noted at an epoch's last step
    patch.setattr(preemption.StopRequest, 'at', lambda self, step: step == 9)
    with pytest.raises(
        preemption.Preempted, match=r"saved step 9 \(phase 'conv5', the end of epoch 1\)"
    ):
      train.train_and_evaluate(_averaged(), workdir, devices=devices)
  # A record written after the last checkpoint must not survive the resume.
  MetricsLog(workdir).write({'step': 99, 'phase': 'stale'})
  resumed = train.train_and_evaluate(_averaged(), workdir, devices=devices)

  assert _records(workdir) == expected
  assert resumed == full
  assert set(os.listdir(workdir)) == {
      'checkpoints',
      'metrics.jsonl',
      'results.json',
      'samples.png',
      'config.json',
      'dataset.json',
      'tb',
      'history.png',
  }
  assert json.loads((workdir / 'results.json').read_text()) == full


def _cli(*args, cwd=ROOT):
  env = helpers.program_env()
  return subprocess.run(
      [sys.executable, '-m', *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
  )


def test_the_demo_smoke_run_records_each_epoch(demo_run):
  """The records of conftest's run of `configs/demo.py:smoke` (the command line's run
  and its printed test accuracy: test_researcher_path.py)."""
  records = MetricsLog(demo_run).read()
  assert [r['phase'] for r in records] == ['scratch', 'finetune']
  assert {
      'phase',
      'epoch',
      'step',
      'loss',
      'accuracy',
      'val_loss',
      'val_accuracy',
      'learning_rate',
      'images_per_sec',
  } <= set(records[0])


def test_cli_rejects_bad_keys_before_running(tmp_path):
  result = _cli(
      'fineflax.train',
      '--config',
      'configs/demo.py',
      '--workdir',
      str(tmp_path),
      '--config.batchsize=8',
  )
  assert result.returncode != 0
  assert "unknown config key config.batchsize (did you mean 'batch_size'?)" in result.stderr
  # A key whose default is None stays overridable after :smoke; its value is checked.
  result = _cli(
      'fineflax.train',
      '--config',
      'configs/demo.py:smoke',
      '--workdir',
      str(tmp_path),
      '--config.model.weights=imagenet',
  )
  assert result.returncode != 0
  assert (
      "config.model.weights='imagenet': no such weights for backbone 'resnet_tiny'" in result.stderr
  )
  bad_file = tmp_path / 'typo.py'
  bad_file.write_text(
      'from configs.demo import get_config as base\n'
      'def get_config(arg=None):\n'
      '  c = base(arg)\n  c.model.head.dropuot = 0.5\n  return c\n'
  )
  result = _cli('fineflax.train', '--config', str(bad_file), '--workdir', str(tmp_path / 'r'))
  assert result.returncode != 0
  assert "unknown config key config.model.head.dropuot (did you mean 'dropout'?)" in result.stderr
  assert not (tmp_path / 'r').exists()


def test_summary_cli(tmp_path):
  from fineflax.train import summary  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, str(ROOT))
  from configs import demo  # pylint: disable=g-import-not-at-top

  expected, _ = summary.summarize_config(demo.get_config(), phase=1)
  result = _cli('fineflax.summary', '--config', 'configs/demo.py', '--phase', '1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Trainable params: {expected.trainable:,}' in result.stdout
  assert f'Non-trainable params: {expected.non_trainable:,}' in result.stdout
  assert 'conv5_block1_1_conv (Conv2D)' in result.stdout


def test_summary_needs_no_dataset_when_the_config_knows_the_classes_and_size(tmp_path):
  """configs/folder.py names a photo folder that is not here; its class count (1: binary)
  and image size are in the config, so the table is printed (with Keras' own counts), and
  `--config.KEY=None` sets None (here: no weights to look up)."""
  result = _cli(
      'fineflax.summary', '--config', 'configs/folder.py', '--config.model.weights=None', cwd=ROOT
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Trainable params: 14,982,145' in result.stdout
  assert 'Non-trainable params: 8,615,808' in result.stdout


def test_none_on_the_command_line_is_none(tmp_path):
  from fineflax import config as config_module  # pylint: disable=g-import-not-at-top

  argv, pairs = config_module.split_overrides(
      [
          'prog',
          '--config.data.test_split=None',
          '--config.seed=3',
          '--config.phases[1].clip_norm=None',
          '--config.model.weights=Nonesuch',
      ]
  )
  # seed is never None: left to ml_collections; weights may be None: typed here.
  assert argv == ['prog', '--config.seed=3']
  assert pairs == [
      ('data.test_split', None),
      ('phases[1].clip_norm', None),
      ('model.weights', 'Nonesuch'),
  ]
  cfg = _demo_config()
  cfg.phases[1].clip_norm = 1.0
  config_module.apply_overrides(cfg, pairs[:2])
  assert cfg.data.test_split is None and cfg.phases[1].clip_norm is None
  assert config_lib.validate(cfg).data.test_split is None


def test_a_key_the_config_file_left_at_none_takes_a_value(tmp_path):
  """configs/folder.py sets test_split = None; ml_collections alone refused
  `--config.data.test_split=test` ("Type NoneType ... is not supported for overriding")."""
  from fineflax import config as config_module  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, str(ROOT))
  from configs import folder  # pylint: disable=g-import-not-at-top

  cfg = folder.get_config()
  cfg.data.test_split = None
  cfg.loss.class_weight = 'balanced'
  _, pairs = config_module.split_overrides(
      [
          'prog',
          '--config.data.test_split=test',
          '--config.phases[0].clip_norm=0.5',
          '--config.loss.class_weight=(1, 2.5)',
          '--config.eval_batch_size=8',
      ]
  )
  config_module.apply_overrides(cfg, pairs)
  assert (
      cfg.data.test_split,
      cfg.phases[0].clip_norm,
      cfg.loss.class_weight,
      cfg.eval_batch_size,
  ) == ('test', 0.5, (1, 2.5), 8)
  with pytest.raises(ConfigError, match=r'--config.eval_batch_size=eight: expected int'):
    config_module.split_overrides(['prog', '--config.eval_batch_size=eight'])


def _demo_config(dtype: str = 'auto'):
  sys.path.insert(0, str(ROOT))
  from configs import demo  # pylint: disable=g-import-not-at-top

  config = demo.get_config()
  config.dtype = dtype
  return config


@pytest.fixture(scope='module')
def demo_results(tmp_path_factory):
  """The README's first command, on one CPU device as there (float32 on a CPU), compiled
  as the README's command compiles it: its 16 epochs take longer to run than to compile."""
  with helpers.optimized_compilation():
    return train.train_and_evaluate(
        _demo_config(), tmp_path_factory.mktemp('demo'), devices=jax.devices()[:1]
    )


def test_demo_reaches_95_percent(demo_results):
  assert demo_results['test_examples'] == 270
  assert demo_results['test_accuracy'] >= 0.95


def _final_state(workdir: Path):
  step = json.loads((workdir / 'results.json').read_text())['step']
  return ocp.StandardCheckpointer().restore(RunDir(workdir).latest / str(step) / 'state')


def test_demo_in_bfloat16_resumes_bitwise_and_matches_float32(tmp_path, monkeypatch, demo_results):
  """`--config.dtype=bfloat16`, what accelerators run: both phases train, evaluate and
  save with a float32 state; the test accuracy is within 1.5 points of float32's
  (measured on the 2-core CPU: 0.9926 in bfloat16, 0.9963 in float32); a stop mid-epoch
  resumes to the same bits as a run that was not stopped (on the demo cut to 1 + 1
  epochs, stopped mid-epoch: resuming is the same code whatever the phases' lengths;
  test_data_order.py resumes into later epochs' orders)."""
  with helpers.optimized_compilation():  # bound by execution, as `demo_results`
    _demo_in_bfloat16(tmp_path, monkeypatch, demo_results)


def _demo_in_bfloat16(tmp_path, monkeypatch, demo_results):
  config = _demo_config('bfloat16')
  whole = train.train_and_evaluate(config, tmp_path / 'whole', devices=jax.devices()[:1])
  assert [r['phase'] for r in _records(tmp_path / 'whole')] == ['scratch'] * 12 + ['finetune'] * 4
  assert {str(x.dtype) for x in jax.tree.leaves(_final_state(tmp_path / 'whole'))} == {
      'float32',
      'int32',
  }
  assert whole['test_examples'] == 270
  assert abs(whole['test_accuracy'] - demo_results['test_accuracy']) <= 0.015, (whole, demo_results)

  config.phases[0].epochs, config.phases[1].epochs = 1, 1
  short = train.train_and_evaluate(config, tmp_path / 'short', devices=jax.devices()[:1])
  with monkeypatch.context() as patch:  # SIGTERM noted at step 10 of the first phase's 20
    patch.setattr(preemption.StopRequest, 'at', lambda self, step: step == 10)
    with pytest.raises(
        preemption.Preempted, match=r"saved step 10 \(phase 'scratch', 10 " 'batches into an epoch'
    ):
      train.train_and_evaluate(config, tmp_path / 'cut', devices=jax.devices()[:1])
  resumed = train.train_and_evaluate(config, tmp_path / 'cut', devices=jax.devices()[:1])

  assert resumed == short and _records(tmp_path / 'cut') == _records(tmp_path / 'short')
  assert [r['phase'] for r in _records(tmp_path / 'short')] == ['scratch', 'finetune']
  a, b = _final_state(tmp_path / 'short'), _final_state(tmp_path / 'cut')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.mark.parametrize(
    'mutate, message',
    [
        (
            lambda c: setattr(
                c, 'phases', c.phases + (config_lib.phase(name='x', freeze='layers[:99]'),)
            ),
            "config.phases[2].freeze: freeze spec 'layers[:99]': index 99 is beyond the backbone",
        ),
        (
            lambda c: setattr(c.data, 'val_split', 'valid'),
            "config.data.val_split='valid': the dataset has the splits ['test', 'train', "
            "'validation']",
        ),
        (lambda c: setattr(c.model, 'num_classes', 5), 'num_classes=5 but the dataset has 10'),
    ],
)
def test_run_refuses_what_does_not_fit_before_writing_anything(tmp_path, mutate, message):
  cfg = helpers.two_phase_config()
  mutate(cfg)
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(cfg, tmp_path / 'run', devices=jax.devices()[:2])
  assert message in str(error.value)
  assert not (tmp_path / 'run').exists()


def test_early_stopping_stops_and_restores_the_best_epoch(tmp_path, monkeypatch):
  """val_loss, patience 2: the phase stops 2 epochs after its best, which is neither its
  first nor its last epoch (val_loss measured here: 2.488, 2.430, 2.589, 2.651, ...), and
  ends on the parameters of that epoch's checkpoint, read back with Orbax from latest/,
  not on those of the last epoch."""
  from fineflax.train import training  # pylint: disable=g-import-not-at-top

  devices = jax.devices()[:2]
  cfg = helpers.two_phase_config()
  cfg.phases = (
      config_lib.phase(
          name='only',
          learning_rate=3e-3,
          epochs=10,
          early_stopping=dict(patience=2, restore_best=True),
      ),
  )
  cfg.checkpoint.every_steps = 2  # mid-epoch saves, and one at an epoch's last step
  cfg.checkpoint.keep = 50  # every save stays, the best epoch's among them
  final = {}
  original = training.report_results

  def report_results(run, state, position, best):
    final['state'] = jax.device_get(state)
    return original(run, state, position, best)

  monkeypatch.setattr(training, 'report_results', report_results)
  stopped = train.train_and_evaluate(cfg, tmp_path / 'stopped', devices=devices)
  records = MetricsLog(tmp_path / 'stopped').read()
  val = [r['val_loss'] for r in records]
  best = int(np.argmin(val))  # 0-based; the first of equal values, as Keras keeps it
  # What Keras' EarlyStopping does with these values: 2 epochs without a lower val_loss
  # after the best one, then stop. The test means something only if the best epoch is
  # neither the first (restoring the first) nor the last (not restoring at all).
  assert 0 < best < len(records) - 1, val
  assert len(records) == best + 1 + 2 and min(val[best + 1 :]) >= val[best], val
  assert [r['phase_epoch'] for r in records] == list(range(1, len(records) + 1))
  best_step, last_step = records[best]['step'], records[-1]['step']
  # Only the parameters go back (Keras' restore_best_weights): the step goes on.
  assert stopped['step'] == int(final['state'].step) == last_step == 3 * len(records)
  latest = checkpoints.Checkpoints(RunDir(tmp_path / 'stopped').latest)
  meta = latest.latest_meta()
  latest.close()
  assert (meta['step'], meta['phase_epochs_done'], meta['batch']) == (last_step, len(records), 0)

  read = lambda step: ocp.StandardCheckpointer().restore(
      RunDir(tmp_path / 'stopped').latest / str(step) / 'state'
  )
  at_best, at_last = read(best_step), read(last_step)
  assert int(at_best['step']) == best_step and int(at_last['step']) == last_step
  for collection in ('params', 'batch_stats'):
    ours = jax.tree.leaves(getattr(final['state'], collection))
    for a, b in zip(ours, jax.tree.leaves(at_best[collection]), strict=True):
      np.testing.assert_array_equal(a, b)
  differs = [
      not np.array_equal(a, b)
      for a, b in zip(
          jax.tree.leaves(final['state'].params), jax.tree.leaves(at_last['params']), strict=True
      )
  ]
  assert sum(differs) > len(differs) // 2  # the last epoch's parameters are not kept


def test_refuses_a_best_checkpoint_without_latest_and_unwatchable_early_stopping(tmp_path):
  (RunDir(tmp_path / 'run').best / '12').mkdir(parents=True)
  with pytest.raises(ConfigError, match='holds a checkpoint but .*latest has none to resume'):
    train.train_and_evaluate(
        helpers.two_phase_config(), tmp_path / 'run', devices=jax.devices()[:2]
    )
  cfg = helpers.two_phase_config()
  cfg.data.val_split = None
  cfg.phases = (config_lib.phase(name='only', epochs=3, early_stopping=dict(patience=1)),)
  with pytest.raises(
      ConfigError,
      match=r"phases\[0\].early_stopping.monitor='val_loss' but " 'config.data.val_split is None',
  ):
    train.train_and_evaluate(cfg, tmp_path / 'other', devices=jax.devices()[:2])
  assert not (tmp_path / 'other').exists()


def test_init_from_another_run_with_a_new_head(tmp_path, caplog):
  devices = jax.devices()[:2]
  source = helpers.two_phase_config()
  source.phases = source.phases[:1]
  train.train_and_evaluate(source, tmp_path / 'source', devices=devices)
  cfg = helpers.two_phase_config()
  cfg.model.head.hidden = (32,)  # 'dense' is now a hidden layer of another shape
  cfg.init_from = str(tmp_path / 'source')
  with caplog.at_level('INFO', logger='fineflax.train'), sigterm_flag() as stop:
    run, _, variables = train.setup(cfg, tmp_path / 'new', devices, stop)
    run.close()
  assert 'initialised (not in the file): head/dense, head/dense_1' in caplog.text
  for leaf, have, want in (('kernel', (512, 10), (512, 32)), ('bias', (10,), (32,))):
    assert (
        f'params head/dense/{leaf}: the file has shape {have}, the model expects {want}'
        in caplog.text
    )
  [best] = (RunDir(tmp_path / 'source').best).iterdir()  # init_from takes the best step
  saved = ocp.StandardCheckpointer().restore(best / 'state')
  for collection in ('params', 'batch_stats'):
    for a, b in zip(
        jax.tree.leaves(saved[collection]['backbone']),
        jax.tree.leaves(variables[collection]['backbone']),
        strict=True,
    ):
      np.testing.assert_array_equal(a, b)
