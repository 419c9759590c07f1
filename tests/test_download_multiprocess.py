"""Many processes, one download: two JAX processes on 127.0.0.1 (gloo) sharing one
FINEFLAX_CACHE fetch weight files from an HTTP server on 127.0.0.1 that counts requests.
Process 0 downloads while process 1 waits (`fineflax.distributed.once`); a failure on
process 0 stops process 1 at once with process 0's error, and nobody hangs.

Three launches (each costs seconds of JAX start-up): tests/download_worker.py running
every case of `fetch_job`, the training program itself for the one-line errors at exit,
and a process 0 that dies while process 1 waits.
"""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fineflax.distributed import once
from tests import helpers, local_server
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # starts two-process jobs and the training program

JOB_TIMEOUT_S = 180  # a launch takes seconds; a hang fails rather than waits
# Each response waits this long before its first byte: were process 1 not waiting for
# process 0, it would find no file in the cache and send a request of its own meanwhile.
SERVE_DELAY_S = 1.0
GOOD = bytes(range(256)) * 4000  # 1 MB


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  """Serves a folder on 127.0.0.1, slowly; yields (base URL, folder, request paths)."""
  served = tmp_path_factory.mktemp('served')
  with local_server.serve(served, SERVE_DELAY_S) as (url, requests):
    yield url, served, requests


def _launch(
    tmp: Path, commands: list[list[str]], env: dict[str, str]
) -> tuple[list[int], list[str], float]:
  """Runs the two processes' commands; (exit codes, logs, seconds until both ended).
  Both are killed, and the test fails, when they have not ended within JOB_TIMEOUT_S."""
  logs = [tmp / f'{i}.log' for i in range(2)]
  procs = []
  start = time.monotonic()
  for command, log_path in zip(commands, logs):
    with log_path.open('w') as log:  # the child keeps its own copy of the descriptor
      procs.append(
          subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
      )
  try:
    for p in procs:
      p.wait(timeout=max(1.0, start + JOB_TIMEOUT_S - time.monotonic()))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
      p.wait()
    pytest.fail(
        f'no end in {JOB_TIMEOUT_S} s (hung?):\n'
        + '\n'.join(f'--- process {i}\n{log.read_text()[-2000:]}' for i, log in enumerate(logs))
    )
  return (
      [p.returncode for p in procs],
      [log.read_text() for log in logs],
      time.monotonic() - start,
  )


def _env(cache: Path, **extra: str) -> dict[str, str]:
  return helpers.program_env(devices=1, cache=cache, unset=('FINEFLAX_WEIGHTS_MIRROR',), **extra)


@pytest.fixture(scope='module')
def fetch_job(server, tmp_path_factory):
  """One launch of tests/download_worker.py on two processes sharing one cache.

  Cases, in order: a good file fetched twice; a file the server does not have (404); a
  file whose bytes do not match its md5; the same good and missing cases with the
  device-collective fallback in place of the key-value store; process 0 slower than
  process 1 is willing to wait."""
  base, served, requests = server
  tmp = tmp_path_factory.mktemp('fetch_job')
  md5 = hashlib.md5(GOOD).hexdigest()
  for name in ('good.h5', 'good_devices.h5'):
    (served / name).write_bytes(GOOD)
  (served / 'corrupt.h5').write_bytes(GOOD[:-1] + b'x')
  cases = [
      {
          'name': 'good',
          'kind': 'fetch',
          'url': f'{base}/good.h5',
          'md5': md5,
          'times': 2,
          'devices': False,
      },
      {
          'name': 'missing',
          'kind': 'fetch',
          'url': f'{base}/missing.h5',
          'md5': md5,
          'times': 1,
          'devices': False,
      },
      {
          'name': 'corrupt',
          'kind': 'fetch',
          'url': f'{base}/corrupt.h5',
          'md5': md5,
          'times': 1,
          'devices': False,
      },
      {
          'name': 'good_devices',
          'kind': 'fetch',
          'url': f'{base}/good_devices.h5',
          'md5': md5,
          'times': 2,
          'devices': True,
      },
      {
          'name': 'missing_devices',
          'kind': 'fetch',
          'url': f'{base}/missing_devices.h5',
          'md5': md5,
          'times': 1,
          'devices': True,
      },
      {'name': 'slow', 'kind': 'slow', 'sleep_s': 4, 'timeout_s': 1},
  ]
  (tmp / 'cases.json').write_text(json.dumps(cases))
  port = helpers.free_port()
  outputs = [tmp / f'{i}.json' for i in range(2)]
  codes, logs, seconds = _launch(
      tmp,
      [
          [
              sys.executable,
              '-m',
              'tests.download_worker',
              str(port),
              str(i),
              str(tmp / 'cases.json'),
              str(outputs[i]),
          ]
          for i in range(2)
      ],
      _env(tmp / 'cache'),
  )
  assert codes == [0, 0], '\n'.join(f'--- process {i}\n{log[-3000:]}' for i, log in enumerate(logs))
  results = [json.loads(o.read_text()) for o in outputs]
  assert [r['process_count'] for r in results] == [2, 2]
  return {
      'cases': [r['cases'] for r in results],
      'requests': list(requests),
      'base': base,
      'cache': tmp / 'cache' / 'weights',
      'seconds': seconds,
  }


@pytest.mark.parametrize('name', ['good', 'good_devices'])
def test_one_download_and_both_processes_read_the_verified_file(fetch_job, name):
  """Fetched twice by each process: one request in all, and both processes get the
  cached path, whose bytes are the served file's (the md5 was checked)."""
  assert fetch_job['requests'].count(f'/{name}.h5') == 1, fetch_job['requests']
  path = fetch_job['cache'] / f'{name}.h5'
  for process in fetch_job['cases']:
    assert process[name] == {'result': [str(path)] * 2, 'seconds': process[name]['seconds']}
  assert path.read_bytes() == GOOD


@pytest.mark.parametrize(
    'name,reason',
    [
        ('missing', 'cannot download'),
        ('corrupt', 'checksum mismatch'),
        ('missing_devices', 'cannot download'),
    ],
)
def test_a_failure_on_process_0_stops_process_1_with_its_error(fetch_job, name, reason):
  """Process 0 fails with its own one-line error (the URL or the cache path in it);
  process 1 does not try (one request in all) and fails at once with a one-line error
  naming what process 0 failed at, and why where the key-value store carries it. Nothing
  is left in the cache."""
  url = f'{fetch_job["base"]}/{name}.h5'
  assert fetch_job['requests'].count(f'/{name}.h5') == 1, fetch_job['requests']
  first, second = (process[name] for process in fetch_job['cases'])
  assert first['error_type'] == (
      'ChecksumError' if name == 'corrupt' else 'WeightsUnavailableError'
  )
  assert reason in first['error'] and url in first['error']
  assert second['error_type'] == 'ProcessZeroFailedError'
  assert second['error'].startswith(
      f'process 1 of 2: process 0 failed at fetching {name}.h5 (so not tried here): '
  )
  if name.endswith('_devices'):  # the device fallback carries a flag, not the message
    assert second['error'].endswith('(its log says why)')
  else:
    assert second['error'].endswith(f"{first['error_type']}: {first['error']}")
  for process in fetch_job['cases']:
    assert '\n' not in process[name]['error']
    assert process[name]['seconds'] < 10 * SERVE_DELAY_S  # no wait beyond the request
  assert not (fetch_job['cache'] / f'{name}.h5').exists()
  assert not [p for p in fetch_job['cache'].iterdir() if p.name.startswith(f'.{name}.')]


def test_process_1_waits_no_longer_than_its_timeout(fetch_job):
  """Process 0 takes 4 s, process 1 waits 1 s: process 1 fails after about 1 s with a
  one-line error saying what it waited for; process 0 finishes its work."""
  first, second = (process['slow'] for process in fetch_job['cases'])
  assert first['result'] == 'slept' and first['seconds'] >= 4
  assert second['error_type'] == 'DistributedError'
  assert second['error'].startswith(
      'process 1 of 2: waited 1 s for process 0 to finish sleeping 4 s, in vain ('
  )
  assert '\n' not in second['error'] and 1 <= second['seconds'] < 3


def test_alone_the_work_just_runs():
  """Without `jax.distributed` (one process): `fn()`, as often as called."""
  calls = []
  assert [
      once.process_zero_first('x', lambda: calls.append(1) or len(calls)) for _ in range(2)
  ] == [1, 2]


def test_training_on_two_processes_exits_with_one_line_errors(server, tmp_path):
  """`python -m fineflax.train` on two processes whose weight file the mirror lacks:
  both exit with status 1 and an `error:` line, process 1's naming process 0's failure,
  one request in all, and no wait beyond the request."""
  base, _, requests = server
  name = 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5'
  before = len(requests)
  port = helpers.free_port()
  codes, logs, seconds = _launch(
      tmp_path,
      [
          [
              sys.executable,
              '-m',
              'fineflax.train',
              '--config',
              'configs/demo.py:smoke',
              '--workdir',
              str(tmp_path / 'run'),
              '--config.model.backbone=resnet50',
              '--config.model.weights=imagenet',
              f'--coordinator=127.0.0.1:{port}',
              '--num_processes=2',
              f'--process_id={i}',
          ]
          for i in range(2)
      ],
      _env(tmp_path / 'cache', FINEFLAX_WEIGHTS_MIRROR=base),
  )
  last = [log.strip().splitlines()[-1] for log in logs]
  assert codes == [1, 1], '\n'.join(f'--- process {i}\n{log[-3000:]}' for i, log in enumerate(logs))
  first = f'error: cannot download {base}/{name} (File not found). Offline, put the file at '
  assert last[0].startswith(first), logs[0][-3000:]
  assert last[1] == (
      f'error: process 1 of 2: process 0 failed at fetching {name} (so not '
      f'tried here): WeightsUnavailableError: {last[0][len("error: "):]}'
  )
  assert requests[before:] == [f'/{name}']
  print(f'two training processes ended in {seconds:.1f} s')


def test_a_process_0_that_dies_ends_the_wait(tmp_path):
  """Process 0 exits in the middle of the work: process 1, waiting on the coordination
  service that process 0 served, is ended by JAX at once (an abort), not left waiting."""
  port = helpers.free_port()
  (tmp_path / 'cases.json').write_text(json.dumps([{'name': 'die', 'kind': 'die'}]))
  codes, logs, seconds = _launch(
      tmp_path,
      [
          [
              sys.executable,
              '-m',
              'tests.download_worker',
              str(port),
              str(i),
              str(tmp_path / 'cases.json'),
              str(tmp_path / f'{i}.json'),
          ]
          for i in range(2)
      ],
      _env(tmp_path / 'cache'),
  )
  assert codes[0] == 3 and codes[1] not in (0, None), '\n'.join(logs)
  assert 'detected fatal errors' in logs[1], logs[1][-3000:]
  assert seconds < 30, seconds  # the worker's heartbeat timeout (10 s) and start-up
  print(f'process 1 ended {seconds:.1f} s after the launch')
