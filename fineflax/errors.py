"""The error users get for input fineflax refuses; the command-line tools print it plainly."""


class ConfigError(ValueError):
  """A config key or value, freeze spec or dataset that does not fit, found before training."""


class TrainingDivergedError(RuntimeError):
  """The training loss became NaN or infinite; the state was not saved."""
