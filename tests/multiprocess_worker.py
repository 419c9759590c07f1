"""One process of a two-process JAX job on 127.0.0.1, run by tests/test_multiprocess.py.

Arguments: PORT PROCESS_ID OUTPUT_JSON [folder PHOTOS WORKDIR]. Without the last three it
reads its share of the digits' splits and evaluates a fixed model on the validation split
over the global mesh; with them it trains a run on the image folder PHOTOS in WORKDIR.
"""

import json
import sys

import jax


def main(port: int, process_id: int, output: str, job: list[str]) -> None:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                             process_id=process_id, initialization_timeout=60,
                             coordinator_bind_address=f'127.0.0.1:{port}')
  from tests import multiprocess_job  # pylint: disable=g-import-not-at-top
  if job and job[0] == 'folder':
    result = multiprocess_job.train_folder(job[1], job[2])
  else:
    result = multiprocess_job.run()
  with open(output, 'w') as f:
    json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
