"""Config files the tests write for `python -m fineflax.train` subprocesses."""


def two_phase(lines: str = '', phase_b: str = 'epochs=1') -> str:
  """A small two-phase run on 640 of the demo's digits (80 steps an epoch: time for a
  signal sent at the end of the first epoch to land in the second; resnet_tiny at 16 px,
  batch 8, dropout and flips: randomness a resume must replay): phase 'a' trains
  everything for two epochs, phase 'b' (`phase_b`: its other arguments) conv5 and the
  head. `lines`: more config statements, indented by two spaces."""
  return f"""
from fineflax import config as ffc
from tests import helpers

def get_config(arg=None):
  config = helpers.tiny_config(
      ffc.phase(name='a', batchnorm='train', learning_rate=3e-3, epochs=2),
      ffc.phase(name='b', freeze='regex:^backbone/conv[1-4]_', {phase_b}),
      max_examples=640)
  config.model.head.dropout = 0.3
  config.report.plot = True  # a run folder holds every output
  config.data.augment.flip = 'horizontal'
{lines}
  return ffc.finish(config, arg)
"""
