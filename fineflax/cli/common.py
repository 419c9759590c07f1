"""What the command-line tools share: `--config` parsing, joining a multi-host job
(`--coordinator`, `--num_processes`, `--process_id`), logging, the device check and the
compilation cache (`fineflax.distributed.runtime`), plain error messages."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from fineflax import config as config_lib, distributed
from fineflax.distributed import runtime
from fineflax.errors import ConfigError, FineflaxError
from fineflax.run import reporting, restore

logger = logging.getLogger('fineflax.cli')


def define_distributed_flags(uses_devices: bool = True) -> Callable[[], None]:
  """Defines `--coordinator`, `--num_processes`, `--process_id` (fineflax.distributed).

  Returns the function that joins the multi-host job with their values, logging where
  this process stands in it, then (for a tool that `uses_devices`) logs the devices,
  stops if JAX misses the machine's accelerator and sets up the compilation cache
  (`fineflax.distributed.runtime.start`); a tool calls it first in its absl main, before it logs or
  touches a device.
  """
  holders = {
      'coordinator': flags.DEFINE_string(
          'coordinator',
          None,
          'Multi-host runs: HOST:PORT of process 0 (default: '
          f'${distributed.ENV_COORDINATOR}, or detected on TPU pods, SLURM, Open MPI).',
      ),
      'num_processes': flags.DEFINE_integer(
          'num_processes',
          None,
          'Multi-host runs: number of processes (default: '
          f'${distributed.ENV_NUM_PROCESSES}, or detected; 1: run alone).',
      ),
      'process_id': flags.DEFINE_integer(
          'process_id',
          None,
          'Multi-host runs: index of this process, 0 to num_processes-1 '
          f'(default: ${distributed.ENV_PROCESS_ID}, or detected).',
      ),
  }

  def join() -> None:
    distributed.initialize(**{name: holder.value for name, holder in holders.items()})
    # After joining: logging asks for jax.process_index(), which starts JAX's backends.
    reporting.setup_logging()
    if jax.process_count() > 1:
      logger.info('multi-host run, %s', distributed.describe())
    runtime.start(uses_devices)

  return join


def define_weights_flag() -> flags.FlagHolder:
  """--weights: which weights of a checkpoint a program uses."""
  return flags.DEFINE_enum(
      'weights',
      'raw',
      list(restore.WEIGHTS),
      "The checkpoint's parameters ('raw') or their moving average ('ema', config.ema).",
  )


def program_name() -> str:
  """The program as the user started it: 'python -m fineflax.train' for `python -m`, else
  the command's file name ('fineflax-train'), never a path into the package."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  if spec is not None:
    return f"python -m {spec.name.removesuffix('.__main__')}"
  return os.path.basename(sys.argv[0])


def show_in_help() -> None:
  """Makes the flags fineflax defines (--config, a program's own, the multi-host ones)
  those `--help` lists: absl lists only the flags of the file it was started from."""
  for module, defined in flags.FLAGS.flags_by_module_dict().items():
    if 'fineflax' in module or 'config_flags' in module:
      for flag in defined:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run_absl(
    absl_main: Callable[[list[str]], None], usage: str, argv: list[str] | None = None
) -> None:
  """Runs `absl_main` under absl, its `--help` the text `usage` followed by the flags under
  the program's name (`program_name`); a FineflaxError ends the program with its message.

  absl prints the docstring of `__main__` and heads the flags with `sys.argv[0]`: through
  the console script that docstring is empty, and under `python -m` the header would be
  the path of the package's __main__.py. Both are set here for the run and put back after.
  """
  main_module = sys.modules['__main__']
  saved = sys.argv[0], main_module.__doc__
  sys.argv[0] = program_name()
  main_module.__doc__ = usage
  argv = [sys.argv[0], *(sys.argv if argv is None else argv)[1:]]
  show_in_help()
  try:
    app.run(absl_main, argv=argv, flags_parser=parse_flags)
  except FineflaxError as e:
    sys.exit(f'error: {e}')
  finally:
    sys.argv[0], main_module.__doc__ = saved


def run_program(
    main: Callable[..., None],
    usage: str,
    required: Sequence[str] = ('config',),
    positional: str | None = None,
    uses_devices: bool = True,
) -> None:
  """Defines `--config` (`path[:arg]`, overridable by `--config.key=value`), then runs
  `main(config)` under absl, or `main(config, args)` when the tool takes `positional`
  arguments; `usage` is what `--help` prints above the flags (`run_absl`); a FineflaxError
  ends the program with its message alone.

  `--config.KEY=None` sets KEY to None, and a key that may be None takes a value even
  where the config file left it at None (`fineflax.config.overrides`).
  Flags are defined here rather than at import, so that tools and tests can import
  each other's modules. Before `main` runs (and before anything touches a device) the
  process joins its multi-host job, if it is in one (`fineflax.distributed`), and, unless
  the tool computes nothing on the devices (`uses_devices=False`), checks that JAX uses
  the machine's accelerator (`fineflax.distributed.runtime`).
  """
  try:
    config_lib.check_override_flags(sys.argv[1:])
  except ConfigError as e:
    sys.exit(f'error: {e}')
  argv, overrides = config_lib.split_overrides(sys.argv)
  # sys_argv: ml_collections reads its overrides from sys.argv unless told, and would see
  # the ones split off above, typing them by the config's (None) values.
  config = config_flags.DEFINE_config_file(
      'config', None, 'Experiment config file, path[:smoke].', sys_argv=argv
  )
  flags.mark_flags_as_required(list(required))
  join = define_distributed_flags(uses_devices)

  def absl_main(argv: list[str]) -> None:
    join()
    value = _loaded(config)
    if value is not None:
      config_lib.apply_overrides(value, overrides)
    if positional:
      if len(argv) < 2:
        raise app.UsageError(f'expected one or more {positional}')
      main(value, argv[1:])
      return
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    main(value)

  run_absl(absl_main, usage, argv)


def _loaded(holder: flags.FlagHolder) -> ml_collections.ConfigDict | None:
  """The config `--config` loaded (None without the flag), or a ConfigError saying why it
  could not be loaded: ml_collections defers that error to the config's first use."""
  value = holder.value
  if value is None or isinstance(value, ml_collections.ConfigDict):
    if value is None and flags.FLAGS['config'].present:
      raise ConfigError(
          f'--config {config_flags.get_config_filename(flags.FLAGS["config"])}: '
          'its get_config() returned None (a missing return?)'
      )
    return value
  try:
    value.keys()  # ml_collections' placeholder raises the loading error on any use
  except OSError as e:
    reason = str(e.__cause__ or e).strip().splitlines()[-1].strip()
    raise ConfigError(
        f'--config {config_flags.get_config_filename(flags.FLAGS["config"])}: '
        f'cannot load it: {reason}'
    ) from None
  raise ConfigError(
      f'--config: get_config() returned a {type(value).__name__}, not a ' 'ConfigDict'
  )


def _config_error(error: BaseException | None) -> ConfigError | None:
  """The first fineflax ConfigError in an error's chain, if any (ml_collections raises a
  copy whose message is the traceback of the original)."""
  found = None
  while error is not None:
    found = error if isinstance(error, ConfigError) else found
    error = error.__cause__ or error.__context__
  return found


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, except that a ConfigError raised while the config file loads
  (in its `get_config`) ends the program with its message alone, not inside a traceback,
  and so does an override of a phase the config does not have."""
  try:
    return flags.FLAGS(argv)
  except IndexError:
    phases = [a for a in argv if a.startswith('--config.phases[')]
    sys.exit(
        f'error: {" ".join(phases)}: the config has no such phase (phases are ' 'numbered from 0)'
    )
  except flags.Error as e:
    if (error := _config_error(e)) is not None:
      sys.exit(f'error: {error}')
    sys.exit(
        f'FATAL Flags parsing error: {e}\n'  # absl's words for its own errors
        'Pass --helpshort or --helpfull to see help on flags.'
    )
