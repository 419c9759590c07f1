"""The errors fineflax raises on purpose; the command-line programs print their message
alone, on one line (`error: ...`), without a traceback."""


class FineflaxError(Exception):
  """The base of fineflax's own errors: each message names the key, file or value."""


class ConfigError(FineflaxError, ValueError):
  """A config key or value, freeze spec or phase that does not fit, found before training."""


class DataError(FineflaxError, ValueError):
  """A dataset, image or weight file that cannot be read or used as it is (unreadable,
  missing, of another layout), or a dataset that cannot be had offline."""


class TrainingDivergedError(FineflaxError, RuntimeError):
  """The training loss or the parameters became NaN or infinite; the state was not saved."""
