"""Multi-host runs: `python -m fineflax.train` as two processes on 127.0.0.1 (2 CPU devices
each, gloo collectives), writing to a gs:// run folder, trains as one process on 4 devices
does, resumes after both are killed, and fails, rather than hangs, when one of them dies."""

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import pytest

from fineflax import distributed, storage
from fineflax.run import RunDir, checkpoints, restore
from fineflax.run.reporting import MetricsLog
from tests import helpers, storage_emulator
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # starts two-process training jobs

CONFIG = 'configs/demo.py:smoke'  # two phases of one epoch, 2 steps each
RUN_TIMEOUT_S = 300  # a whole run; about a minute when 2 cores run it alongside 3 others
# The survivor ends about fineflax.distributed.HEARTBEAT_TIMEOUT_S (30 s) after its peer
# died; with JAX's own default (100 s) it took 94 s here.
DEATH_NOTICED_WITHIN_S = 75


# 6 epochs of 2 steps in the first phase: time to signal one process mid-phase (the
# processes stopped at the end of epoch 2 on the 2-core machine). No history plot: it is
# drawn at every epoch and checked elsewhere.
PREEMPTED_OVERRIDES = ('--config.phases[0].epochs=6', '--config.report.plot=False')

CLUSTER_VARIABLES = (
    'SLURM_',
    'OMPI_',
    'TPU_',
    'JAX_COORDINATOR',
    distributed.ENV_COORDINATOR,
    distributed.ENV_NUM_PROCESSES,
    distributed.ENV_PROCESS_ID,
)


def _without_cluster(env: dict[str, str]) -> dict[str, str]:
  """`env` without the variables that make a process part of a job (CI may run in one)."""
  return {k: v for k, v in env.items() if not k.startswith(CLUSTER_VARIABLES)}


@pytest.fixture
def joins(monkeypatch):
  """The calls initialize() makes to jax.distributed.initialize (recorded, not made), on
  a machine without cluster settings whose JAX backends have not started."""
  for name in set(os.environ) - set(_without_cluster(os.environ)):
    monkeypatch.delenv(name)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: False)
  return calls


def _slurm(monkeypatch, tasks: int) -> None:
  for name, value in {
      'SLURM_JOB_ID': '4242',
      'SLURM_STEP_NODELIST': 'node[007-008]',
      'SLURM_NTASKS': str(tasks),
      'SLURM_PROCID': '1',
      'SLURM_LOCALID': '0',
  }.items():
    monkeypatch.setenv(name, value)


def test_initialize_does_nothing_on_one_machine(joins, monkeypatch):
  distributed.initialize()
  distributed.initialize(num_processes=1)
  _slurm(monkeypatch, tasks=1)  # a job of one task is one machine too
  distributed.initialize()
  assert not joins


def test_initialize_joins_as_told_by_flags_or_environment(joins, monkeypatch):
  previous = jax.config.jax_cpu_collectives_implementation
  jax.config.update('jax_cpu_collectives_implementation', None)  # older JAX's default
  try:
    distributed.initialize('10.0.0.1:1234', 2, 1)
    # CPU devices of several processes need an implementation of collectives.
    assert jax.config.jax_cpu_collectives_implementation == 'gloo'
  finally:
    jax.config.update('jax_cpu_collectives_implementation', previous)
  monkeypatch.setenv('FINEFLAX_COORDINATOR', '127.0.0.1:5678')
  monkeypatch.setenv('FINEFLAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('FINEFLAX_PROCESS_ID', '3')
  distributed.initialize()
  distributed.initialize(process_id=2)  # a flag wins over the environment
  common = dict(
      cluster_detection_method='deactivate',
      local_device_ids=None,
      initialization_timeout=distributed.INIT_TIMEOUT_S,
      heartbeat_timeout_seconds=distributed.HEARTBEAT_TIMEOUT_S,
      shutdown_timeout_seconds=distributed.SHUTDOWN_TIMEOUT_S,
  )
  assert joins == [
      dict(
          common,
          coordinator_address='10.0.0.1:1234',
          num_processes=2,
          process_id=1,
          coordinator_bind_address=None,
      ),
      # A loopback coordinator listens on the loopback interface only.
      dict(
          common,
          coordinator_address='127.0.0.1:5678',
          num_processes=4,
          process_id=3,
          coordinator_bind_address='127.0.0.1:5678',
      ),
      dict(
          common,
          coordinator_address='127.0.0.1:5678',
          num_processes=4,
          process_id=2,
          coordinator_bind_address='127.0.0.1:5678',
      ),
  ]


def test_initialize_lets_jax_read_a_slurm_job_of_several_tasks(joins, monkeypatch):
  _slurm(monkeypatch, tasks=2)
  assert distributed.detected_cluster() == 'slurm'
  distributed.initialize()
  assert len(joins) == 1
  assert joins[0]['cluster_detection_method'] == 'slurm'
  assert (joins[0]['coordinator_address'], joins[0]['num_processes'], joins[0]['process_id']) == (
      None,
      None,
      None,
  )
  distributed.initialize(num_processes=1)  # alone by request
  assert len(joins) == 1


@pytest.mark.parametrize(
    'kwargs, env, message',
    [
        (dict(process_id=0), {}, "missing ['--coordinator', '--num_processes']"),
        (
            dict(coordinator='h:1', num_processes=2, process_id=2),
            {},
            'process_id=2 with num_processes=2: process ids run from 0 to 1',
        ),
        (
            dict(coordinator='h', num_processes=2, process_id=0),
            {},
            "coordinator='h': expected HOST:PORT",
        ),
        (dict(num_processes=0), {}, 'num_processes=0: must be >= 1'),
        (
            {},
            {'FINEFLAX_NUM_PROCESSES': 'two'},
            "FINEFLAX_NUM_PROCESSES='two': expected an integer",
        ),
    ],
)
def test_initialize_explains_settings_that_do_not_fit(joins, monkeypatch, kwargs, env, message):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(distributed.DistributedError, match=re.escape(message)):
    distributed.initialize(**kwargs)
  assert not joins


def test_initialize_fails_clearly_after_jax_was_used_or_when_jax_refuses(joins, monkeypatch):
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  with monkeypatch.context() as patch:
    patch.setattr(xla_bridge, 'backends_are_initialized', lambda: True)
    with pytest.raises(
        distributed.DistributedError, match='JAX was used .* before the ' 'processes were joined'
    ):
      distributed.initialize('h:1', 2, 0)

  def refuse(**kwargs):
    raise jax.errors.JaxRuntimeError('INVALID_ARGUMENT: Unexpected task registered')

  monkeypatch.setattr(jax.distributed, 'initialize', refuse)
  with pytest.raises(
      distributed.DistributedError,
      match='could not join coordinator h:1 as process 1 of 2: .*Unexpected task',
  ):
    distributed.initialize('h:1', 2, 1)


def test_initialize_once(joins, monkeypatch):
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  distributed.initialize('h:1', 2, 0)
  assert not joins


@pytest.mark.parametrize(
    'command',
    [
        ['fineflax.summary', '--config', 'configs/demo.py'],
        ['fineflax.evaluate', '--workdir', 'runs/none'],
    ],
)
def test_every_command_line_tool_takes_the_flags(command):
  result = subprocess.run(
      [sys.executable, '-m', *command, '--process_id=1'],
      cwd=ROOT,
      env=_without_cluster(helpers.program_env()),
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      'error: a multi-host run needs --coordinator, --num_processes and --process_id (or '
      'FINEFLAX_COORDINATOR, FINEFLAX_NUM_PROCESSES, FINEFLAX_PROCESS_ID); missing '
      "['--coordinator', '--num_processes'] and no TPU pod, SLURM or Open MPI job was "
      'detected to supply them'
  )


def _env(cache: Path, devices: int) -> dict[str, str]:
  return _without_cluster(helpers.program_env(devices=devices, cache=cache))


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
  with log.open('w') as out:
    return subprocess.Popen(
        [sys.executable, '-m', *command], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
    )


class Job:
  """The processes of one run, their output in files named `log` with the launch and
  process numbers added."""

  _launches = itertools.count()

  def __init__(self, log: Path, commands: list[list[str]], env: dict[str, str]):
    launch = next(self._launches)
    self.logs = [log.with_name(f'{log.name}.{launch}.{i}.log') for i in range(len(commands))]
    self.procs = [_start(c, env, log) for c, log in zip(commands, self.logs)]

  @classmethod
  def two_processes(
      cls, workdir: Path | str, log: Path, env: dict[str, str], *overrides: str
  ) -> 'Job':
    """`python -m fineflax.train` as processes 0 and 1 of a job on 127.0.0.1."""
    port = helpers.free_port()
    return cls(
        log,
        [
            [
                'fineflax.train',
                '--config',
                CONFIG,
                *overrides,
                '--workdir',
                str(workdir),
                f'--coordinator=127.0.0.1:{port}',
                '--num_processes=2',
                f'--process_id={i}',
            ]
            for i in range(2)
        ],
        env,
    )

  def output(self, i: int) -> str:
    return self.logs[i].read_text()

  def tails(self) -> str:
    return '\n'.join(f'--- process {i}:\n{self.output(i)[-3000:]}' for i in range(len(self.logs)))

  def wait(self, timeout: float = RUN_TIMEOUT_S) -> list[int]:
    """The exit codes; all killed (and the test failed) past `timeout`."""
    deadline = time.monotonic() + timeout
    try:
      return [p.wait(max(deadline - time.monotonic(), 0)) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f'the processes did not finish within {timeout} s\n{self.tails()}')

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _final_variables(workdir: Path | str) -> dict:
  run = restore.load_run(workdir, 'latest')
  assert run.step == 4, run.step  # 2 phases x 1 epoch x 2 steps
  return run.variables


def _assert_same_variables(actual: dict, expected: dict) -> None:
  """Bit for bit, leaf by leaf: the same data, steps and collectives leave no rounding
  difference to allow for (see tests/multihost_reference.py)."""
  assert checkpoints.leaf_specs(actual) == checkpoints.leaf_specs(expected)
  for (path, a), (_, b) in zip(
      jax.tree_util.tree_flatten_with_path(actual)[0],
      jax.tree_util.tree_flatten_with_path(expected)[0],
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def _wait_until(job: Job, done: Callable[[], bool], what: str) -> None:
  """Waits until `done()`; fails the test when a process ends first or the run times out."""
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while not done():
    if any(p.poll() is not None for p in job.procs) or time.monotonic() > deadline:
      job.kill()
      pytest.fail(f'never {what} (a process ended, or {RUN_TIMEOUT_S} s passed)\n' f'{job.tails()}')
    time.sleep(0.05)


def _first_checkpoint(job: Job, workdir: Path | str) -> None:
  """Waits until the run's first checkpoint (the end of its first phase) is complete, as
  Orbax tells it (on Cloud Storage a step's folder exists from the start of its save)."""
  latest = RunDir(workdir).latest
  _wait_until(job, lambda: 2 in checkpoints.complete_steps(latest), f'saved {latest}/2')


def _kill_second(job: Job) -> float:
  """Kills process 1; returns when."""
  job.procs[1].send_signal(signal.SIGKILL)
  return time.monotonic()


def _end_of_first(job: Job, killed: float) -> dict:
  """Waits (a bounded time) for process 0 to end: {'code': its exit code or None,
  'seconds': how long after `killed` it took}."""
  try:
    code = job.procs[0].wait(max(killed + DEATH_NOTICED_WITHIN_S - time.monotonic(), 0))
  except subprocess.TimeoutExpired:
    code = None
  seconds = time.monotonic() - killed
  job.kill()  # both, whatever happened
  return {'code': code, 'seconds': seconds}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Every run of the module, overlapping (most of a run's time is spent waiting on the
  other process), while a Cloud Storage emulator (tests/storage_emulator.py) runs:

  one: the config on one process of 4 devices, fed the global batches of two processes;
  killed: two processes on a gs:// run folder (both write their shards of every Orbax
    save to Cloud Storage, process 0 the reports), process 1 killed after the first
    checkpoint ('death': how process 0 ended), then the same two commands again (the job
    'resumed', which restores from Cloud Storage);
  preempted: two processes with a longer first phase; process 1 alone gets SIGTERM after
    the first epoch, then the same two commands again ('preempted_resumed'). Started once
    'killed' has compiled its first step into the shared XLA cache, to load it from there.
  """
  root = tmp_path_factory.mktemp('multihost')
  cache = root / 'cache'
  with storage_emulator.running(root / 'emulator.log') as gcs, storage_emulator.environment(gcs):
    yield _run_jobs(root, cache, dict(_env(cache, 2), **gcs))


def _run_jobs(root: Path, cache: Path, env: dict[str, str]) -> dict:
  """The runs of `runs`, with their outcomes; `env`: the two-process jobs' environment."""
  killed = f'gs://{storage_emulator.BUCKET}/multihost/killed'
  jobs = {
      'one': Job(
          root / 'one',
          [['tests.multihost_reference', CONFIG, str(root / 'one'), str(helpers.free_port())]],
          _env(cache, 4),
      ),
      'killed': Job.two_processes(killed, root / 'killed', env),
  }
  try:
    _wait_until(
        jobs['killed'], lambda: 'compiled the train step' in jobs['killed'].output(0), 'compiled'
    )
    jobs['preempted'] = Job.two_processes(
        root / 'preempted', root / 'preempted', env, *PREEMPTED_OVERRIDES
    )
    _first_checkpoint(jobs['killed'], killed)
    killed_at = _kill_second(jobs['killed'])
    _wait_until(
        jobs['preempted'],
        lambda: '[scratch] epoch 1/' in jobs['preempted'].output(0),
        'finished an epoch',
    )
    jobs['preempted'].procs[1].send_signal(signal.SIGTERM)
    death = _end_of_first(jobs['killed'], killed_at)
    jobs['resumed'] = Job.two_processes(killed, root / 'killed', env)
    preempted = jobs['preempted'].wait()
    jobs['preempted_resumed'] = Job.two_processes(
        root / 'preempted', root / 'preempted', env, *PREEMPTED_OVERRIDES
    )
    codes = {name: job.wait() for name, job in jobs.items() if name not in ('killed', 'preempted')}
  finally:
    for job in jobs.values():
      job.kill()
  for name, code in codes.items():
    assert code == [0] * len(code), f'{name}:\n{jobs[name].tails()}'
  return dict(
      jobs=jobs,
      death=death,
      preempted_codes=preempted,
      killed=killed,
      **{name: root / name for name in ('one', 'preempted')},
  )


def test_two_processes_train_as_one_process_on_their_devices(runs):
  """The resumed job of 'killed' (its records hold both launches' epochs)."""
  job = runs['jobs']['resumed']
  assert 'multi-host run, process 0 of 2: 2 local cpu devices, 4 in all' in job.output(0)
  # Only process 0 logs progress and writes the records: one per epoch.
  assert '[finetune] epoch 1/1 (run epoch 2, step 4)' in job.output(0), job.tails()
  assert 'run epoch' not in job.output(1)
  for i in range(2):  # Gloo's connection lines and JAX's INFO lines are left out
    assert '[Gloo]' not in job.output(i) and 'JAX distributed service' not in job.output(i)
  assert job.output(0).count('test_accuracy: ') == 2  # stdout still reaches the log
  records = MetricsLog(runs['killed']).read()
  assert [(r['phase'], r['step']) for r in records] == [('scratch', 2), ('finetune', 4)]
  assert storage.as_path(runs['killed']).joinpath('results.json').is_file()
  # The records process 0 rewrote on gs:// at each epoch hold the local run's figures.
  drop = lambda records: [{k: v for k, v in r.items() if k != 'images_per_sec'} for r in records]
  assert drop(records) == drop(MetricsLog(runs['one']).read())
  # Read back from gs://, where each process wrote its own shards.
  _assert_same_variables(_final_variables(runs['killed']), _final_variables(runs['one']))


def test_a_dead_process_fails_the_other_and_the_run_resumes(runs):
  killed, death = runs['jobs']['killed'], runs['death']
  assert (
      death['code'] is not None
  ), f'process 0 still ran {DEATH_NOTICED_WITHIN_S} s after process 1 died\n{killed.tails()}'
  assert death['code'] != 0, killed.tails()
  print(f"process 0 exited with {death['code']}, {death['seconds']:.1f} s after process 1 died")
  # The same two commands again resumed from the checkpoint of step 2 and finished (to
  # the bits of the one-process run: test_two_processes_train_as_one_process_on_their_devices).
  resumed = runs['jobs']['resumed']
  assert 'resuming from step 2:' in resumed.output(0), resumed.tails()


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_the_run_resumes(runs):
  job = runs['jobs']['preempted']
  # Both processes saved the one step JAX's preemption service chose, then exited as
  # preempted (143), although only process 1 was signalled.
  assert runs['preempted_codes'] == [143, 143], job.tails()
  saved = re.search(r'SIGTERM: saved step (\d+)', job.output(0))
  assert saved, job.tails()
  assert f'SIGTERM: saved step {saved.group(1)}' in job.output(1), job.tails()
  step = int(saved.group(1))
  assert 2 < step < 12, step  # after the first epoch, before the phase's end

  resumed = runs['jobs']['preempted_resumed']
  assert f'resuming from step {step}:' in resumed.output(0), resumed.tails()
  records = MetricsLog(runs['preempted']).read()
  assert [r['step'] for r in records] == [2 * i for i in range(1, 8)]
  assert restore.load_run(runs['preempted'], 'latest').step == 14
