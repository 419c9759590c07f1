"""Config files the tests write for `python -m fineflax.train` subprocesses."""


def two_phase(lines: str = '', phase_b: str = 'epochs=1') -> str:
  """A small two-phase run on the demo's digits (resnet_tiny at 16 px, batch 8, dropout
  and flips: randomness a resume must replay): phase 'a' trains everything for two
  epochs, phase 'b' (`phase_b`: its other arguments) conv5 and the head. `lines`: more
  config statements, indented by two spaces."""
  return f"""
from fineflax import config as ffc

def get_config(arg=None):
  config = ffc.default_config()
  config.batch_size = 8
  config.model.backbone = 'resnet_tiny'
  config.model.image_size = 16
  config.model.preprocessing = 'tf'
  config.model.head.dropout = 0.3
  config.data.augment.flip = 'horizontal'
{lines}
  config.phases = (ffc.phase(name='a', batchnorm='train', learning_rate=3e-3, epochs=2),
                   ffc.phase(name='b', freeze='regex:^backbone/conv[1-4]_', {phase_b}))
  return ffc.finish(config, arg)
"""
