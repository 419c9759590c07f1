"""What the command-line tools share: `--config` parsing, logging, plain error messages."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from fineflax import config as config_lib, reporting
from fineflax.errors import ConfigError


def run(main: Callable[..., None], required: Sequence[str] = ('config',),
        positional: str | None = None) -> None:
  """Defines `--config` (`path[:arg]`, overridable by `--config.key=value`), then runs
  `main(config)` under absl, or `main(config, args)` when the tool takes `positional`
  arguments; a ConfigError ends the program with its message alone.

  Flags are defined here rather than at import, so that tools and tests can import
  each other's modules.
  """
  try:
    config_lib.check_override_flags(sys.argv[1:])
  except ConfigError as e:
    sys.exit(f'error: {e}')
  config = config_flags.DEFINE_config_file('config', None,
                                           'Experiment config file, path[:smoke].')
  flags.mark_flags_as_required(list(required))

  def absl_main(argv: list[str]) -> None:
    reporting.setup_logging()
    if positional:
      if len(argv) < 2:
        raise app.UsageError(f'expected one or more {positional}')
      main(config.value, argv[1:])
      return
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    main(config.value)

  try:
    app.run(absl_main)
  except ConfigError as e:
    sys.exit(f'error: {e}')
