"""What users really feed fineflax, and the clear, early message each gets, with nothing
that was saved before lost.

Covered elsewhere and not repeated here: unreadable image files and empty class folders
(test_data.py), weight files of another backbone or with a parameter of another shape
(test_weights.py), checkpoints of another train state (test_checkpoints.py), a batch size
that does not split over the devices (test_config.py).
"""

import json
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fineflax import config as config_lib, train
from fineflax.errors import ConfigError, DataError, TrainingDivergedError
from fineflax.run import RunDir, checkpoints
from fineflax.run.reporting import MetricsLog
from tests import helpers
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # trains runs and starts the programs

DEVICES = jax.devices()[:2]


def _set(path, value):
  def mutate(cfg):
    node = cfg
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value

  return mutate


def _lora_target(target):
  return _set(('model', 'lora', 'target'), target)


def _phase(**values):
  return lambda cfg: setattr(cfg, 'phases', (config_lib.phase(**values),))


@pytest.mark.parametrize(
    'mutate, message',
    [
        (
            lambda cfg: cfg.__setattr__('batchsize', 8),
            "unknown config key config.batchsize (did you mean 'batch_size'?)",
        ),
        (
            _set(('model', 'head', 'dropuot'), 0.5),
            "unknown config key config.model.head.dropuot (did you mean 'dropout'?)",
        ),
        (_set(('eval_batch_size',), 0), 'config.eval_batch_size=0: must be > 0'),
        (
            _set(('data', 'augment', 'rotation'), 2.0),
            'config.data.augment.rotation=2.0: must be in',
        ),
        (
            _phase(freeze='regex:^backbone/no_such_layer'),
            "freeze spec 'regex:^backbone/no_such_layer' matches no parameter",
        ),
        (_phase(freeze='layers[:999]'), 'index 999 is beyond the backbone, which has'),
        (
            _phase(freeze='backbone', optimizer='sgd', nesterov=True),
            "config.phases[0].nesterov=True needs optimizer 'sgd' with momentum > 0",
        ),
        (_set(('model', 'num_classes'), 3), 'num_classes'),
        (_set(('data', 'train_split'), 'training'), "config.data.train_split='training'"),
        (
            _set(('loss', 'class_weight'), (1.0, 2.0)),
            'class_weight has 2 weights but the dataset ' 'has 10 classes',
        ),
        (_set(('init_from',), '/no/such/run'), "config.init_from='/no/such/run': no such run"),
        (_set(('model', 'lora', 'rank'), -1), 'config.model.lora.rank=-1: must be >= 0'),
        (_set(('model', 'lora', 'alpha'), 0.0), 'config.model.lora.alpha=0.0: must be > 0'),
        (
            _set(('model', 'lora', 'target'), 'conv[1'),
            "config.model.lora.target='conv[1': bad regular expression",
        ),
        (
            lambda cfg: (_set(('model', 'lora', 'rank'), 2)(cfg), _lora_target('^head/')(cfg)),
            "config.model.lora.target='^head/' matches no kernel of a convolution or dense",
        ),
        (
            _phase(freeze='lora+head'),
            "freeze spec 'lora+head': 'lora' trains LoRA adapters, but the model has none",
        ),
    ],
)
def test_refused_before_anything_is_written(tmp_path, mutate, message):
  cfg = helpers.two_phase_config()
  mutate(cfg)
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(cfg, tmp_path / 'run', devices=DEVICES)
  assert message in str(error.value)
  assert not (tmp_path / 'run').exists()


def test_corrupt_or_foreign_init_from_is_refused_before_anything_is_written(tmp_path):
  corrupt = tmp_path / 'corrupt'
  corrupt.mkdir()
  (corrupt / 'checkpoint').write_bytes(b'\x00not an orbax checkpoint')
  foreign = tmp_path / 'foreign'  # an Orbax tree of another network
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(
        foreign,
        {'params': {'backbone': {'block9_conv': {'kernel': np.zeros((3, 3, 3, 8), np.float32)}}}},
    )
  for source, message in (
      (corrupt, 'not a readable Orbax checkpoint'),
      (foreign, 'lacks 34 backbone layers'),
  ):
    cfg = helpers.two_phase_config()
    cfg.init_from = str(source)
    with pytest.raises(DataError) as error:
      train.train_and_evaluate(cfg, tmp_path / 'run', devices=DEVICES)
    assert message in str(error.value) and str(source) in str(error.value)
    assert not (tmp_path / 'run').exists()


def _one_epoch(cfg):
  cfg.phases = (config_lib.phase(name='first', learning_rate=3e-3, epochs=1),)
  return cfg


def test_a_workdir_of_another_config_is_not_resumed_into(tmp_path):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(_one_epoch(helpers.two_phase_config()), workdir, devices=DEVICES)
  before = {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob('*') if p.is_file()}

  other = _one_epoch(helpers.two_phase_config())
  other.model.head.dropout = 0.5
  other.phases[0].learning_rate = 1e-2
  other.phases = other.phases + (config_lib.phase(name='more', freeze='backbone'),)
  with pytest.raises(
      ConfigError,
      match=r'holds a run of another config; .*'
      r'model.head.dropout: 0.3 -> 0.5; phases\[0\].learning_rate: 0.003 -> '
      r'0.01\). Use another workdir, or set config.allow_config_change=True',
  ):
    train.train_and_evaluate(other, workdir, devices=DEVICES)
  after = {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  assert after == before  # nothing written, nothing lost

  # Longer phases, an appended phase and other reporting are a continuation, not another run.
  longer = _one_epoch(helpers.two_phase_config())
  longer.phases[0].epochs = 2
  longer.phases = longer.phases + (config_lib.phase(name='more', freeze='backbone'),)
  longer.report.plot = True
  results = train.train_and_evaluate(longer, workdir, devices=DEVICES)
  assert results['epoch'] == 3
  assert json.loads((workdir / 'config.json').read_text())['phases'][0]['epochs'] == 2


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  cfg = helpers.two_phase_config()
  cfg.phases = (
      config_lib.phase(name='good', learning_rate=3e-3, epochs=1),
      config_lib.phase(name='bad', optimizer='sgd', learning_rate=1e30, epochs=2),
  )
  with pytest.raises(
      TrainingDivergedError,
      match=r'\[bad\] the training loss is (nan|inf) at '
      r'step [4-6]; the run stopped without saving that state \(the last '
      r'checkpoint, step 3, is kept',
  ):
    train.train_and_evaluate(cfg, tmp_path / 'run', devices=DEVICES)
  assert [r['phase'] for r in MetricsLog(tmp_path / 'run').read()] == ['good']
  latest = checkpoints.Checkpoints(RunDir(tmp_path / 'run').latest)
  meta = latest.latest_meta()
  assert meta['step'] == 3 and meta['phase'] == 'good'
  latest.close()
  saved = ocp.StandardCheckpointer().restore(RunDir(tmp_path / 'run').latest / '3' / 'state')
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved['params']))


def test_parameters_that_overflow_while_the_loss_is_still_finite_are_never_saved(tmp_path):
  """An update that overflows leaves its own step's loss finite (it was computed before
  the update): the saved state itself is checked, so no checkpoint holds it."""
  cfg = helpers.two_phase_config()
  cfg.checkpoint.every_steps = 1
  cfg.phases = (
      config_lib.phase(name='good', learning_rate=3e-3, epochs=1),
      config_lib.phase(name='bad', optimizer='sgd', learning_rate=float('inf'), epochs=1),
  )
  with pytest.raises(
      TrainingDivergedError,
      match=r'\[bad\] the parameters hold NaN or inf '
      r'after step 4; the run stopped without saving that state \(the last '
      r'checkpoint, step 3, is kept',
  ):
    train.train_and_evaluate(cfg, tmp_path / 'run', devices=DEVICES)
  for folder in (RunDir(tmp_path / 'run').latest, RunDir(tmp_path / 'run').best):
    for step in checkpoints.complete_steps(folder):
      saved = ocp.StandardCheckpointer().restore(folder / str(step) / 'state')
      assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved['params'])), folder / str(step)


ONE_LINE_ERRORS = [
    (
        ['--config', 'configs/no_such.py'],
        'error: --config configs/no_such.py: cannot load '
        "it: [Errno 2] No such file or directory: 'configs/no_such.py'",
    ),
    # A ConfigError of the config file's get_config: its message, not a traceback.
    (
        ['--config', 'configs/demo.py:fast'],
        "error: config argument 'fast': expected nothing or 'smoke'",
    ),
    (
        ['--config', 'configs/demo.py:smoke', '--config.phases[2].epochs=3'],
        'error: --config.phases[2].epochs=3: the config has no such phase (phases are numbered '
        'from 0)',
    ),
    # None is None, not the string 'None', and refused where a key does not take it.
    (
        ['--config', 'configs/demo.py', '--config.batch_size=None'],
        'error: config.batch_size: None is not allowed (Global training batch size (all devices, '
        'all hosts).)',
    ),
    (
        ['--config', 'configs/demo.py', '--config.phases[0].freeze=None'],
        "error: config.phases[0].freeze: None is not allowed (What is frozen: 'none', "
        "'backbone', 'layers[A:B]' (Keras layer slice), 'stages[A:B]' (slice of the backbone's "
        "stages, as layer_decay counts them: 'stages[:-1]' leaves the last stage and the head "
        "trainable, whatever the backbone), 'regex:PATTERN' (parameter paths), or what trains: "
        "'norm', 'bias', 'head', 'lora' (the adapters of config.model.lora) joined by '+' "
        "('norm+head').)",
    ),
]


@pytest.mark.parametrize('args, message', ONE_LINE_ERRORS)
def test_a_config_that_cannot_be_loaded_is_said_in_one_line(args, message):
  env = helpers.program_env()
  result = subprocess.run(
      [sys.executable, '-m', 'fineflax.summary', *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.returncode == 1
  assert result.stderr.strip() == message


def test_data_that_cannot_be_used_is_said_in_one_line(tmp_path):
  """A DataError (here a folder without class folders) ends the program as a ConfigError
  does: its message alone."""
  (tmp_path / 'photos').mkdir()
  env = helpers.program_env()
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'fineflax.train',
          '--config',
          'configs/demo.py:smoke',
          '--workdir',
          str(tmp_path / 'run'),
          f'--config.data.source=folder:{tmp_path / "photos"}',
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: {tmp_path / "photos"} has no class folders (one sub-folder per class expected)'
  )
  assert not (tmp_path / 'run').exists()


def test_an_unsupported_url_workdir_is_refused_at_once(tmp_path, monkeypatch):
  """pathlib would make `--workdir s3://bucket/run` the local folder ./s3:/bucket/run, and
  Orbax fail at its first save, an epoch later: every entry point refuses a URL whose
  scheme a run folder cannot have at once, in one line naming it, and writes nothing
  (gs:// works: tests/test_gcs_run_folder.py)."""
  monkeypatch.chdir(tmp_path)
  message = (
      r'^s3://bucket/run: s3:// run folders are not supported; use a local folder, '
      r'gs://BUCKET/PATH or a mounted bucket$'
  )
  from fineflax.inference import evaluate  # pylint: disable=g-import-not-at-top
  from fineflax.run import restore  # pylint: disable=g-import-not-at-top

  for call in (
      lambda: train.train_and_evaluate(helpers.two_phase_config(), 's3://bucket/run'),
      lambda: restore.load_run('s3://bucket/run'),
      lambda: evaluate.evaluate_run('s3://bucket/run'),
      lambda: RunDir('s3://bucket/run'),
  ):
    with pytest.raises(ConfigError, match=message):
      call()
  assert list(tmp_path.iterdir()) == []
