"""Multi-host runs: joining the processes of a job through `jax.distributed`.

Every fineflax command calls `initialize` before it touches a device. It joins the job
when told to, by arguments (the CLIs' `--coordinator`, `--num_processes`, `--process_id`)
or the environment (`FINEFLAX_COORDINATOR`, `FINEFLAX_NUM_PROCESSES`,
`FINEFLAX_PROCESS_ID`), or when JAX recognises the cluster it runs in with more than one
process (a TPU pod slice, a SLURM job step, an Open MPI job). On a plain machine it does
nothing: one process. See docs/multihost.md.

After it, `jax.devices()` lists the devices of every process, the training mesh spans
them all, and a process that dies makes the others fail within about
`HEARTBEAT_TIMEOUT_S` rather than wait on it forever.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Sequence

import jax

from fineflax.distributed import gloo_output
from fineflax.errors import FineflaxError

logger = logging.getLogger('fineflax.distributed')

ENV_COORDINATOR = 'FINEFLAX_COORDINATOR'
ENV_NUM_PROCESSES = 'FINEFLAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'FINEFLAX_PROCESS_ID'

# JAX's defaults (100 s heartbeat, 300 s shutdown) leave the survivors of a dead process
# waiting for minutes; heartbeats come from a thread of their own, so long compilations
# or input stalls do not miss them, and a shorter timeout costs nothing.
INIT_TIMEOUT_S = 300  # how long process 0 waits for the others to start
HEARTBEAT_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 30

# JAX's cluster environments (jax._src.clusters) recognised without being asked for.
# Kubernetes and mpi4py are left out: the first is present in any pod, the second in any
# environment that has mpi4py installed, single-process runs included.
AUTO_DETECTED = ('ompi', 'slurm', 'gketpu', 'gcetpu')


class DistributedError(FineflaxError, RuntimeError):
  """The multi-process settings do not fit, or the job could not be joined."""


def _from_env(value: str | int | None, name: str, kind: type) -> str | int | None:
  if value is not None:
    return value
  text = os.environ.get(name, '').strip()
  if not text:
    return None
  if kind is int:
    try:
      return int(text)
    except ValueError:
      raise DistributedError(f'{name}={text!r}: expected an integer') from None
  return text


def detected_cluster() -> str | None:
  """The name of the JAX cluster environment (`AUTO_DETECTED`) this process runs in
  with more than one process, or None (a plain machine, or a job of one process)."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top

    kinds = list(clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access
  except (ImportError, AttributeError):  # a JAX that moved its private module
    logger.warning(
        'cannot check for a cluster environment in this JAX version; '
        'pass --coordinator, --num_processes and --process_id for a multi-host run'
    )
    return None
  for env in kinds:
    if getattr(env, 'name', None) not in AUTO_DETECTED or not env.is_env_present():
      continue
    try:
      count = env.get_process_count()
    except Exception as e:  # pylint: disable=broad-except
      # Running alone on one host of a pod would train on a fraction of the data while
      # the others wait: fail instead.
      raise DistributedError(
          f'found a {env.name} cluster environment but could not read its '
          f'process count ({type(e).__name__}: {e}); pass '
          '--num_processes=1 to run alone'
      ) from e
    if count > 1:
      return env.name
  return None


def _check(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
  if num_processes is not None and num_processes < 1:
    raise DistributedError(f'num_processes={num_processes}: must be >= 1')
  if process_id is not None and process_id < 0:
    raise DistributedError(f'process_id={process_id}: must be >= 0')
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise DistributedError(
        f'process_id={process_id} with num_processes={num_processes}: '
        f'process ids run from 0 to {num_processes - 1}'
    )
  if coordinator is not None and not re.fullmatch(r'\S+:\d+', coordinator):
    raise DistributedError(
        f'coordinator={coordinator!r}: expected HOST:PORT, the address of '
        'process 0 and a free port on it, e.g. 10.0.0.1:1234'
    )


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    initialization_timeout_s: int = INIT_TIMEOUT_S,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S,
) -> None:
  """Joins the processes of a multi-host job, if this process is one of them.

  Arguments left None are read from FINEFLAX_COORDINATOR / FINEFLAX_NUM_PROCESSES /
  FINEFLAX_PROCESS_ID; what is still unknown JAX detects on TPU pods, SLURM and Open MPI.
  Nothing happens on a single machine, with `num_processes=1`, or when JAX's distributed
  runtime is already up. Must run before anything asks JAX for its devices.

  Args:
    coordinator: HOST:PORT of process 0, where it serves the coordination service.
      Process 0 listens on every interface at PORT.
    num_processes: processes in the job (one per host, or one per GPU).
    process_id: this process's index, 0 to num_processes - 1.
    local_device_ids: the local devices this process uses (default: all, or on SLURM and
      Open MPI with GPUs the one of its local rank, as JAX chooses).
    initialization_timeout_s: how long to wait for every process to connect.
    heartbeat_timeout_s: after how long without heartbeats a process counts as dead and
      the job fails.
    shutdown_timeout_s: how long a finishing process waits for the others at exit.
  Raises:
    DistributedError: the settings do not fit together, JAX was used before, or JAX
      refused them. (A coordinator that does not answer within `initialization_timeout_s`
      makes JAX end the process with DEADLINE_EXCEEDED instead.)
  """
  if jax.distributed.is_initialized():
    return
  coordinator = _from_env(coordinator, ENV_COORDINATOR, str)
  num_processes = _from_env(num_processes, ENV_NUM_PROCESSES, int)
  process_id = _from_env(process_id, ENV_PROCESS_ID, int)
  _check(coordinator, num_processes, process_id)
  if num_processes == 1:
    return  # alone by request, even inside a cluster job
  given = {
      '--coordinator': coordinator,
      '--num_processes': num_processes,
      '--process_id': process_id,
  }
  cluster = None
  if None in given.values():
    cluster = detected_cluster()  # fills in what is not given
    if cluster is None and all(v is None for v in given.values()):
      return  # one machine
    if cluster is None:
      missing = [flag for flag, v in given.items() if v is None]
      raise DistributedError(
          f'a multi-host run needs --coordinator, --num_processes and --process_id (or '
          f'{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing {missing} '
          'and no TPU pod, SLURM or Open MPI job was detected to supply them'
      )
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  if xla_bridge.backends_are_initialized():
    raise DistributedError(
        'JAX was used (its devices listed or an array made) before the '
        'processes were joined: fineflax.distributed.initialize must run '
        'first, before the config or the data touch JAX'
    )
  if jax.config.jax_cpu_collectives_implementation is None:
    # Without an implementation a computation over CPU devices of several processes
    # fails; gloo needs nothing beyond the coordination service.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if jax.config.jax_cpu_collectives_implementation == 'gloo':
    gloo_output.drop_gloo_lines()
  # JAX logs its own "Starting/Connecting to JAX distributed service" lines at INFO before
  # fineflax's logging is set up; the line printed below says the same once.
  logging.getLogger('jax._src.distributed').setLevel(logging.WARNING)
  # Process 0 binds the port on every interface (JAX's default), unless the coordinator
  # is a loopback address: then only there, so a local test opens nothing to the network.
  bind = coordinator if coordinator and coordinator.startswith(('127.', 'localhost:')) else None
  where = f'coordinator {coordinator}' if coordinator else f'the {cluster} job'
  # Said before connecting (logging is set up only after, as it needs the process index):
  # when the coordinator never answers, JAX ends the process itself, without an exception.
  who = f'process {process_id} of {num_processes}' if process_id is not None else 'a process'
  print(
      f'fineflax: {who} joining {where} (waiting up to {initialization_timeout_s} s for '
      'every process)',
      file=sys.stderr,
      flush=True,
  )
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=list(local_device_ids) if local_device_ids is not None else None,
        cluster_detection_method=cluster if cluster else 'deactivate',
        initialization_timeout=initialization_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        shutdown_timeout_seconds=shutdown_timeout_s,
        coordinator_bind_address=bind,
    )
  except (RuntimeError, ValueError, TypeError) as e:
    raise DistributedError(
        f'could not join {where} as process {process_id} of {num_processes}: {e} (is '
        'process 0 running, its port reachable from this host, and do all processes agree '
        'on --num_processes?)'
    ) from e


def describe() -> str:
  """One line on this process's place in the job (it starts JAX's backends)."""
  return (
      f'process {jax.process_index()} of {jax.process_count()}: '
      f'{jax.local_device_count()} local {jax.default_backend()} devices, '
      f'{jax.device_count()} in all'
  )
