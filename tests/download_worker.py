"""One process of a two-process JAX job on 127.0.0.1, run by tests/test_download_multiprocess.py.

Arguments: PORT PROCESS_ID CASES_JSON OUTPUT_JSON. CASES_JSON is a list of cases, each
run in order by both processes, each caught and recorded (so that one launch runs them
all): `{"name", "kind": "fetch", "url", "md5", "times", "devices"}` fetches a weight file
`times` times (with `devices`, the coordination service's key-value store is hidden and
the device-collective fallback waits instead); `{"name", "kind": "slow", "sleep_s",
"timeout_s"}` has process 0 sleep in `process_zero_first` while process 1 waits at most
`timeout_s`; `{"name", "kind": "die"}` has process 0 exit (status 3) in the middle of
`process_zero_first`. OUTPUT_JSON gets, per case: the error (type and message) or the result, and
the seconds it took.
"""

import json
import os
import sys
import time
import traceback

import jax


def run_case(case: dict) -> dict:
  from fineflax.distributed import once  # pylint: disable=g-import-not-at-top
  from fineflax.weights import WeightFile, download  # pylint: disable=g-import-not-at-top

  if case['kind'] == 'die':
    die = os._exit  # pylint: disable=protected-access
    return {
        'result': once.process_zero_first(
            'dying', lambda: die(3) if jax.process_index() == 0 else 'alive'
        )
    }
  if case['kind'] == 'slow':
    return {
        'result': once.process_zero_first(
            f'sleeping {case["sleep_s"]} s',
            lambda: time.sleep(case['sleep_s'] if jax.process_index() == 0 else 0) or 'slept',
            timeout_s=case['timeout_s'],
        )
    }
  file = WeightFile(case['url'], md5=case['md5'])
  client = once._client  # pylint: disable=protected-access
  if case['devices']:
    once._client = lambda: None  # pylint: disable=protected-access
  try:
    paths = [str(download.fetch(file)) for _ in range(case['times'])]
  finally:
    once._client = client  # pylint: disable=protected-access
  return {'result': paths}


def main(port: int, process_id: int, cases: str, output: str) -> None:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=f'127.0.0.1:{port}',
      num_processes=2,
      process_id=process_id,
      initialization_timeout=60,
      heartbeat_timeout_seconds=10,
      coordinator_bind_address=f'127.0.0.1:{port}',
  )
  from fineflax.distributed import once  # pylint: disable=g-import-not-at-top

  once.WAIT_TIMEOUT_S = 30  # a broken handshake fails the case, not the test's deadline
  results = {}
  for case in json.loads(open(cases).read()):
    start = time.perf_counter()
    try:
      outcome = run_case(case)
    except Exception as e:  # pylint: disable=broad-except
      outcome = {'error_type': type(e).__name__, 'error': str(e)}
    outcome['seconds'] = time.perf_counter() - start
    results[case['name']] = outcome
  with open(output, 'w') as f:
    json.dump({'process_count': jax.process_count(), 'cases': results}, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  try:
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
  except BaseException:  # pylint: disable=broad-except
    # Out at once: a normal exit would wait in jax.distributed's shutdown for the peer.
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access
