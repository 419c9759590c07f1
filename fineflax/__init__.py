"""fineflax: fine-tuning ImageNet-pretrained classifiers with JAX and Flax.

From Python, a finished run is one call away:

    import fineflax
    run = fineflax.load_run('runs/demo')        # model, variables, config, class names
    probs = fineflax.predict_fn(run)(images)    # uint8 images of any size -> probabilities

Training is `python -m fineflax.train --config configs/cifar10.py --workdir runs/x`.
"""

from typing import Any

__all__ = ['RestoredRun', 'load_run', 'predict_fn']

# Imported on first use, not here: `python -m fineflax.predict` (or evaluate) must not
# find its own module imported already by the package.
_HOMES = {'RestoredRun': 'fineflax.restore', 'load_run': 'fineflax.restore',
          'predict_fn': 'fineflax.predict'}


def __getattr__(name: str) -> Any:
  if name not in _HOMES:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  import importlib  # pylint: disable=g-import-not-at-top
  return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
  return sorted(list(globals()) + __all__)
