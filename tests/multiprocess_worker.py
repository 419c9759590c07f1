"""One process of a two-process JAX job on 127.0.0.1, run by tests/test_multiprocess.py.

Arguments: PORT PROCESS_ID OUTPUT_JSON JOB...: with no JOB it reads its share of the
digits' splits and evaluates a fixed model on the validation split over the global mesh;
`folder PHOTOS WORKDIR` trains a run on the image folder PHOTOS in WORKDIR;
`edges PHOTOS TFDS_DIR RUN RUN_ONE` runs `multiprocess_job.edges`.
"""

import json
import os
import sys
import traceback

import jax


def main(port: int, process_id: int, output: str, job: list[str]) -> None:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=f'127.0.0.1:{port}',
      num_processes=2,
      process_id=process_id,
      initialization_timeout=60,
      # A peer that died fails this process in 30 s (fineflax's own
      # setting), not JAX's 100 s.
      heartbeat_timeout_seconds=30,
      coordinator_bind_address=f'127.0.0.1:{port}',
  )
  from tests import multiprocess_job  # pylint: disable=g-import-not-at-top

  if job and job[0] == 'folder':
    result = multiprocess_job.train_folder(job[1], job[2])
  elif job and job[0] == 'edges':
    result = multiprocess_job.edges(*job[1:])
  else:
    result = multiprocess_job.run()
  with open(output, 'w') as f:
    json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  try:
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
  except BaseException:  # pylint: disable=broad-except
    # Out at once: a normal exit would wait in jax.distributed's shutdown for the peer,
    # which waits for this process in its next collective.
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access
