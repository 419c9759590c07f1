"""Two JAX processes on 127.0.0.1 (gloo collectives, 2 CPU devices each) read disjoint
shares of every split that together cover it, and evaluate exactly across them."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from tests import multiprocess_job

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_read_disjoint_covering_shares(tmp_path):
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  outputs = [tmp_path / f'{i}.json' for i in range(2)]
  procs = [subprocess.Popen([sys.executable, '-m', 'tests.multiprocess_worker', str(port),
                             str(i), str(outputs[i])], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  results = [json.loads(o.read_text()) for o in outputs]
  assert [r['process_count'] for r in results] == [2, 2]

  # One process alone, on 4 devices as the two processes have together.
  alone = multiprocess_job.run()
  for name, everything in alone['shares'].items():
    a, b = results[0]['shares'][name], results[1]['shares'][name]
    assert not set(a) & set(b)  # disjoint
    assert sorted(a + b) == everything  # covering
    assert results[0]['sizes'][name] == results[1]['sizes'][name] == len(everything)
  for r in results:
    assert r['metrics']['count'] == alone['metrics']['count'] == 37
    np.testing.assert_allclose(r['metrics']['loss'], alone['metrics']['loss'], rtol=1e-6)
    assert r['metrics']['accuracy'] == alone['metrics']['accuracy']
