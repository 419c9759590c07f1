"""An exponential moving average of the trainable parameters (`config.ema`).

The average is part of the train state (`TrainState.ema`: {'params': a trainable view,
'start': the step it began at, and 'batch_stats' of the BatchNorm layers that run in
training mode, if any}), updated inside the compiled step after each optimizer update,
saved in every checkpoint and restored with it. It covers what the phase changes: a
frozen leaf would be the same in both, so only one copy is kept. Training-mode BatchNorm
statistics are averaged too, as timm's and torchvision's model EMA average a model's
buffers. Evaluation of the average takes the variables with its leaves put in their
place (`TrainState.ema_variables`).

optax.ema averages updates, not parameters, and big_vision and the flax examples keep
none, so the update is written here: with a warm-up it is TensorFlow's
ExponentialMovingAverage with `num_updates` (timm's and torchvision's `--model-ema` use
the same form).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fineflax.config import registry
from fineflax.errors import ConfigError
from fineflax.pytree import overlay

SUFFIX = '_ema'  # of the metrics measured with the average (val_accuracy_ema)


@dataclasses.dataclass(frozen=True)
class Ema:
  """How the average is kept: `decay`, `warmup` (TF's num_updates rule) and `scope`."""

  decay: float
  warmup: bool = True
  scope: str = 'run'

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Ema | None:
    """The run's EMA, or None when `config.ema.decay` is None."""
    ema = config.ema
    if ema.decay is None:
      return None
    return cls(float(ema.decay), bool(ema.warmup), str(ema.scope))

  def rate(self, updates: jax.Array) -> jax.Array:
    """The decay of the update that follows `updates` earlier ones."""
    if not self.warmup:
      return jnp.asarray(self.decay, jnp.float32)
    t = jnp.asarray(updates, jnp.float32)
    return jnp.minimum(jnp.float32(self.decay), (1 + t) / (10 + t))

  def update(
      self, average: dict[str, Any], current: dict[str, Any], step: jax.Array
  ) -> dict[str, Any]:
    """The average after the update of `step` (the step count before it) gave `current`
    (the trainable view of 'params', and `trained_stats` where the average has them)."""
    d = self.rate(step - average['start'])
    moved = {
        k: jax.tree.map(lambda a, p: d * a + (1 - d) * p, average[k], current[k])
        for k in ('params', 'batch_stats')
        if k in average
    }
    return {**moved, 'start': average['start']}


def trained_stats(batch_stats: dict[str, Any], bn_train: frozenset[str]) -> dict[str, Any]:
  """The statistics of the BatchNorm layers that run in training mode (`bn_train`:
  'group/layer' paths): what the average keeps of `batch_stats`."""
  out = {
      group: {name: v for name, v in layers.items() if f'{group}/{name}' in bn_train}
      for group, layers in batch_stats.items()
  }
  return {group: layers for group, layers in out.items() if layers}


@jax.jit
def _copy(tree: Any) -> Any:
  # Fresh buffers with the inputs' sharding: the average must not alias the parameters,
  # which the train step donates.
  return jax.tree.map(jnp.copy, tree)


def begin(
    ema: Ema,
    trainable: Any,
    batch_stats: Any | None,
    step: jax.Array,
    previous: dict[str, Any] | None,
) -> dict[str, Any]:
  """The average at a phase's start, over `trainable` (the phase's trainable view) and
  `batch_stats` (`trained_stats`; None: the phase's BatchNorm is frozen).

  A new one equals the variables; with scope 'run' the previous phase's average goes on,
  a leaf that starts training joining it at its value and one that stops leaving it.
  """
  current = {'params': trainable, 'start': step}
  if batch_stats is not None:
    current['batch_stats'] = batch_stats
  if previous is None or ema.scope == 'phase':
    return _copy(current)
  kept = {k: overlay(v, previous[k]) if k in previous else v for k, v in current.items()}
  return _copy(dict(kept, start=previous['start']))


def _check_monitors(config: ml_collections.ConfigDict) -> None:
  """A metric of the average is watched only where there is one."""
  # Keys not set yet take their defaults after the checks (an older run's config.json).
  if (config.get('ema') or {}).get('decay') is not None:
    return
  watched = {'config.checkpoint.monitor': (config.get('checkpoint') or {}).get('monitor')}
  for i, p in enumerate(config.phases):
    watched[f'config.phases[{i}].early_stopping.monitor'] = (p.get('early_stopping') or {}).get(
        'monitor'
    )
  for key, monitor in watched.items():
    if isinstance(monitor, str) and monitor.endswith(SUFFIX):
      raise ConfigError(
          f'{key}={monitor!r} watches the moving average, but config.ema.decay is None'
      )


registry.register_config_check('ema monitors', _check_monitors)
