"""Run folders on Cloud Storage (gs://), against an emulator on 127.0.0.1
(tests/storage_emulator.py): the same command trains, is stopped by SIGTERM and resumes,
evaluates and is opened by `fineflax.load_run` as with a local folder, and ends on the
same bits as an uninterrupted local run; URLs that cannot work fail at once, in one line."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from fineflax import storage
from fineflax.errors import ConfigError
from fineflax.run import RunDir, checkpoints, restore
from fineflax.run.reporting import MetricsLog
from tests import helpers, run_configs, storage_emulator
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # starts the programs against a Cloud Storage emulator

RUN = f'gs://{storage_emulator.BUCKET}/runs/cut'

# The suite's SIGTERM to a one-process command (a local folder differs in its storage
# only), with random rotations: a resume must replay every random draw.
_CONFIG = run_configs.two_phase(
    '  config.report.every_steps = 40\n  config.data.augment.rotation = 0.05',
    'epochs=2, early_stopping=dict(restore_best=True)',
)


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
  """The emulator's client variables, also set in this process while the module runs."""
  log = tmp_path_factory.mktemp('emulator') / 'emulator.log'
  with storage_emulator.running(log) as env, storage_emulator.environment(env):
    yield env


@pytest.fixture(scope='module')
def runs(emulator, tmp_path_factory):
  """A run on gs:// stopped by SIGTERM mid-epoch and resumed by the same command, and the
  same config run uninterrupted in a local folder: (gs:// workdir, local workdir, the
  outputs of the gs:// commands, their working folder)."""
  tmp = tmp_path_factory.mktemp('gcs_runs')
  config = tmp / 'config.py'
  config.write_text(_CONFIG)
  cwd = tmp / 'cwd'  # where a 'gs:' folder would appear if the URL became a local path
  cwd.mkdir()
  env = helpers.program_env(cache=tmp / 'cache', **emulator)
  command = lambda workdir: [
      sys.executable,
      '-m',
      'fineflax.train',
      '--config',
      str(config),
      '--workdir',
      str(workdir),
  ]
  local = tmp / 'whole'
  whole = subprocess.run(
      command(local), cwd=cwd, env=env, capture_output=True, text=True, timeout=600
  )
  assert whole.returncode == 0, whole.stderr[-3000:]

  proc = subprocess.Popen(
      command(RUN), cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
  )
  for line in proc.stdout:  # the second epoch runs when the first one is logged
    if 'epoch 1/2 (run epoch' in line:
      proc.send_signal(signal.SIGTERM)
      break
  stopped = line + proc.stdout.read()
  assert proc.wait(timeout=300) == 143, stopped[-3000:]
  meta = checkpoints.Checkpoints(RunDir(RUN).latest).latest_meta()
  again = subprocess.run(
      command(RUN), cwd=cwd, env=env, capture_output=True, text=True, timeout=600
  )
  assert again.returncode == 0, again.stderr[-3000:]
  evaluated = subprocess.run(
      [sys.executable, '-m', 'fineflax.evaluate', '--workdir', RUN, '--checkpoint', 'latest'],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  return {
      'local': local,
      'cwd': cwd,
      'stopped': stopped,
      'meta': meta,
      'again': again,
      'evaluated': evaluated,
  }


def _gs(path: str):
  return storage.as_path(path)


def test_sigterm_on_gs_saves_mid_epoch_and_the_same_command_resumes_bitwise(runs):
  assert 'SIGTERM: saved step' in runs['stopped']
  meta = runs['meta']
  assert meta['phase_index'] == 0 and meta['phase_epochs_done'] == 1 and meta['batch'] > 0
  assert 'resuming from step' in runs['again'].stderr
  results = json.loads(_gs(f'{RUN}/results.json').read_text())
  local_results = json.loads((runs['local'] / 'results.json').read_text())
  assert results == local_results
  final = lambda workdir: restore.load_run(workdir, 'latest').variables
  for a, b in zip(jax.tree.leaves(final(RUN)), jax.tree.leaves(final(runs['local'])), strict=True):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert not any(runs['cwd'].iterdir())  # nothing local, no folder named 'gs:'


def test_gs_run_folder_holds_what_a_local_one_does(runs, tmp_path):
  local, gs = RunDir(runs['local']), RunDir(RUN)
  for name in ('config.json', 'dataset.json', 'history.png', 'samples.png', 'results.json'):
    assert (gs.root / name).is_file(), name
  assert json.loads(gs.dataset_json.read_text()) == json.loads(local.dataset_json.read_text())
  drop = lambda records: [{k: v for k, v in r.items() if k != 'images_per_sec'} for r in records]
  # The same records, though the gs:// file was rewritten at each one and cut back at the
  # resume. The resumed command starts a new window of per-step records where it resumed:
  # records at the same step over the same number of steps are the same.
  assert drop(MetricsLog(RUN).read()) == drop(MetricsLog(local.root).read())
  gs_steps = {r['step']: r for r in drop(MetricsLog(RUN).read_steps())}
  local_steps = drop(MetricsLog(local.root).read_steps())
  assert local_steps and {r['step'] for r in local_steps} <= set(gs_steps)
  same = [r for r in local_steps if gs_steps[r['step']]['steps'] == r['steps']]
  assert len(same) >= len(local_steps) - 1
  assert all(gs_steps[r['step']] == r for r in same)
  # Checkpoints: the same complete steps; Orbax marked each one on gs:// with its file.
  for kind in ('latest', 'best', 'phase_best'):
    folder = getattr(gs, kind)
    assert checkpoints.complete_steps(folder) == checkpoints.complete_steps(
        getattr(local, kind)
    ), kind
    for step in checkpoints.complete_steps(folder):
      assert (folder / str(step) / checkpoints.COMMIT_MARK).exists()
  # TensorBoard: one event file per command (two here), as TensorFlow reads them.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  events = sorted(p.name for p in gs.tensorboard.iterdir())
  assert len(events) == 2, events
  scalars = set()
  for name in events:
    (tmp_path / name).write_bytes((gs.tensorboard / name).read_bytes())
    scalars |= {
        (e.step, v.tag)
        for e in tf.compat.v1.train.summary_iterator(str(tmp_path / name))
        for v in e.summary.value
    }
  records = MetricsLog(RUN).read()
  assert {(r['step'], 'val/loss') for r in records} <= scalars
  assert {(r['step'], 'step/loss') for r in MetricsLog(RUN).read_steps()} <= scalars


def test_evaluate_and_load_run_read_a_gs_run(runs):
  report = json.loads(_gs(f'{RUN}/eval/test-latest.json').read_text())
  local = json.loads((runs['local'] / 'results.json').read_text())
  assert report['accuracy'] == pytest.approx(local['test_accuracy'], abs=1e-6)
  assert report['examples'] == local['test_examples']
  assert f'wrote {RUN}/eval/test-latest.json' in runs['evaluated'].stdout
  for suffix in ('-confusion.png', '-predictions.npz'):
    assert _gs(f'{RUN}/eval/test-latest{suffix}').is_file()
  with _gs(f'{RUN}/eval/test-latest-predictions.npz').open('rb') as f:
    predictions = np.load(f)
    assert len(predictions['labels']) == local['test_examples']
  run = restore.load_run(RUN)  # best
  assert run.label == 'best' and os.fspath(run.checkpoint_dir).startswith(f'{RUN}/')
  # init_from a gs:// run: the folder of its best step's parameters.
  assert restore.init_from_folder(RUN) == run.checkpoint_dir / 'state'


def test_memory_mapped_features_of_a_gs_run_go_to_a_local_folder(emulator):
  features = RunDir(RUN).features
  assert storage.is_local(features)
  assert os.fspath(features).startswith(tempfile.gettempdir())
  assert features.name == f'gs_{storage_emulator.BUCKET}_runs_cut_features'


def test_partial_saves_on_gs_are_ignored_then_deleted(emulator, caplog):
  """On Cloud Storage a save writes its step folder in place and commit_success.txt last:
  a step folder without that file is a killed save."""
  folder = _gs(f'gs://{storage_emulator.BUCKET}/partial/latest')
  state = {'w': np.arange(6, dtype=np.float32)}
  ckpts = checkpoints.Checkpoints(folder, keep=3)
  for step in (1, 2):
    ckpts.save(state, {'step': step})
  ckpts.close()
  (folder / '2' / checkpoints.COMMIT_MARK).unlink()  # as if killed before its last file
  assert checkpoints.complete_steps(folder) == [1]
  with caplog.at_level(logging.WARNING, logger='fineflax.checkpoints'):
    ckpts = checkpoints.Checkpoints(folder, keep=3)
  assert "ignoring ['2'], left by saves that did not finish" in caplog.text
  assert ckpts.latest_meta() == {'step': 1}
  ckpts.save(state, {'step': 2})  # the killed step saves again, whole
  ckpts.close()
  assert checkpoints.complete_steps(folder) == [1, 2]
  checkpoints.remove_steps_after(folder, 0)
  assert checkpoints.complete_steps(folder) == []
  assert not folder.exists() or not list(folder.iterdir())


@pytest.mark.parametrize(
    'url, message',
    [
        (
            's3://bucket/run',
            's3://bucket/run: s3:// run folders are not supported; use a local '
            'folder, gs://BUCKET/PATH or a mounted bucket',
        ),
        ('hdfs://host/run', 'hdfs://host/run: hdfs:// run folders are not supported'),
    ],
)
def test_a_url_scheme_that_cannot_work_fails_in_one_line(url, message, tmp_path):
  with pytest.raises(ConfigError) as error:
    RunDir(url)
  assert str(error.value).startswith(message)
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'fineflax.train',
          '--config',
          f'{ROOT}/configs/demo.py:smoke',
          '--workdir',
          url,
      ],
      cwd=tmp_path,
      env=helpers.program_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith(f'error: {message}')
  assert not any(tmp_path.iterdir())  # no local folder named after the URL


def test_unreachable_cloud_storage_fails_fast_naming_the_endpoint(monkeypatch):
  storage._unreachable.cache_clear()
  closed = helpers.free_port()  # nothing listens there
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', f'http://127.0.0.1:{closed}')
  start = time.monotonic()
  with pytest.raises(
      ConfigError,
      match=rf'^gs://b/run: cannot reach Cloud Storage at '
      rf'127.0.0.1:{closed} \(Connection refused\); a gs:// folder needs '
      r'the network$',
  ):
    RunDir('gs://b/run')
  assert time.monotonic() - start < 5
  storage._unreachable.cache_clear()
