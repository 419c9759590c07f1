"""Devices and hosts: the device mesh (`parallel`), joining a multi-host job (`join`,
whose API is re-exported here), work done by process 0 before the others (`once`, also
re-exported), preemption, and the device check and compilation cache of a program's
start (`runtime`)."""

from fineflax.distributed.join import (
    AUTO_DETECTED,
    ENV_COORDINATOR,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    HEARTBEAT_TIMEOUT_S,
    INIT_TIMEOUT_S,
    SHUTDOWN_TIMEOUT_S,
    DistributedError,
    describe,
    detected_cluster,
    initialize,
)
from fineflax.distributed.once import ProcessZeroFailedError, process_zero_first

__all__ = [
    'AUTO_DETECTED',
    'DistributedError',
    'ENV_COORDINATOR',
    'ENV_NUM_PROCESSES',
    'ENV_PROCESS_ID',
    'HEARTBEAT_TIMEOUT_S',
    'INIT_TIMEOUT_S',
    'ProcessZeroFailedError',
    'SHUTDOWN_TIMEOUT_S',
    'describe',
    'detected_cluster',
    'initialize',
    'process_zero_first',
]
