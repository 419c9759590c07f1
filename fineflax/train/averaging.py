"""Averages of whole sets of weights: WiSE-FT's interpolation between two points of a run
(Wortsman et al. 2022, "Robust fine-tuning of zero-shot models") and the uniform and
greedy soups of several (Wortsman et al. 2022, "Model soups").

The arithmetic is done on the host in float64 and stored in each leaf's dtype: an
interpolation at alpha 0 or 1 is its end bit for bit, and an average does not depend on
the order of its ingredients beyond float64 rounding. Leaves that are not floating point
(none today) would be taken from the end, or from the first ingredient. The choice of an
alpha or of a soup's ingredients sees the validation split only; the test split is
measured once, with what was chosen.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import numpy as np

from fineflax.errors import ConfigError
from fineflax.run import checkpoints

logger = logging.getLogger('fineflax.averaging')

Variables = dict[str, Any]  # {'params', 'batch_stats'} on the host
Evaluate = Callable[[Variables, str], dict[str, float]]  # (variables, role) -> loss, accuracy
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def _is_float(x: np.ndarray) -> bool:
  return np.issubdtype(np.asarray(x).dtype, np.floating)


def interpolate(start: Variables, end: Variables, alpha: float) -> Variables:
  """(1 - alpha) * start + alpha * end, leaf by leaf (the trees must match)."""

  def mix(a, b):
    if not _is_float(b):
      return np.asarray(b)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return ((1.0 - alpha) * a64 + alpha * b64).astype(np.asarray(b).dtype)

  return jax.tree.map(mix, start, end)


def average(ingredients: Sequence[Variables]) -> Variables:
  """The uniform average of `ingredients` (trees of one structure), leaf by leaf."""

  def mean(*leaves):
    if not _is_float(leaves[0]):
      return np.asarray(leaves[0])
    total = sum(np.asarray(x, np.float64) for x in leaves)
    return (total / len(leaves)).astype(np.asarray(leaves[0]).dtype)

  return jax.tree.map(mean, *ingredients)


def first_difference(a: Variables, b: Variables) -> str | None:
  """The first leaf two trees of variables do not share, or share at another shape, in
  words; None when they can be averaged."""
  sa, sb = checkpoints.leaf_specs(a), checkpoints.leaf_specs(b)
  for key in sorted(set(sa) | set(sb)):
    if key not in sa or key not in sb:
      return f'{key} is in one and not the other'
    if sa[key][0] != sb[key][0]:
      return f'{key} has shape {sa[key][0]} in one and {sb[key][0]} in the other'
  return None


def better(a: dict[str, float], b: dict[str, float] | None) -> bool:
  """Whether validation metrics `a` beat `b`: higher accuracy, then lower loss."""
  if b is None:
    return True
  return (a['accuracy'], -a['loss']) > (b['accuracy'], -b['loss'])


@dataclasses.dataclass(frozen=True)
class Interpolation:
  """A WiSE-FT search: each alpha's validation metrics, the chosen alpha and its weights."""

  alphas: tuple[float, ...]
  val: tuple[dict[str, float], ...]
  alpha: float
  variables: Variables

  def record(self) -> dict[str, Any]:
    """results.json's `wise_ft` record, less what the caller adds (test metrics, ends)."""
    return {
        'alpha': self.alpha,
        'val_loss': self.val[self.alphas.index(self.alpha)]['loss'],
        'val_accuracy': self.val[self.alphas.index(self.alpha)]['accuracy'],
        'curve': [
            {'alpha': a, 'val_loss': m['loss'], 'val_accuracy': m['accuracy']}
            for a, m in zip(self.alphas, self.val)
        ],
    }


def wise_ft(
    start: Variables, end: Variables, alphas: Sequence[float], evaluate: Evaluate
) -> Interpolation:
  """Evaluates the interpolation at each alpha on the validation split and keeps the best
  (ties: the smaller loss, then the first alpha)."""
  alphas = tuple(float(a) for a in alphas)
  if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
    raise ConfigError(f'WiSE-FT alphas {list(alphas)}: expected values in [0, 1]')
  difference = first_difference(start, end)
  if difference:
    raise ConfigError(f'WiSE-FT: the two ends cannot be interpolated: {difference}')
  val, best, chosen = [], None, None
  for alpha in alphas:
    metrics = evaluate(interpolate(start, end, alpha), 'val')
    logger.info(
        'WiSE-FT alpha %g: val_loss %.4f val_accuracy %.4f',
        alpha,
        metrics['loss'],
        metrics['accuracy'],
    )
    val.append(metrics)
    if better(metrics, best):
      best, chosen = metrics, alpha
  return Interpolation(alphas, tuple(val), chosen, interpolate(start, end, chosen))


@dataclasses.dataclass(frozen=True)
class Soup:
  """A soup: the ingredients kept (their names, in the order added) and their average."""

  kept: tuple[str, ...]
  variables: Variables
  val: dict[str, float] | None
  tried: tuple[dict[str, Any], ...] = ()


def greedy_soup(
    ingredients: Sequence[tuple[str, Variables]],
    individual: Sequence[dict[str, float]],
    evaluate: Evaluate,
) -> Soup:
  """Wortsman et al.'s greedy soup: the ingredients sorted by their own validation
  accuracy (`individual`), each added to the soup only if the average's validation
  accuracy does not drop."""
  order = sorted(
      range(len(ingredients)),
      key=lambda i: (-individual[i]['accuracy'], individual[i]['loss'], i),
  )
  first = order[0]
  kept, soup_val = [first], individual[first]
  tried = [{'ingredient': ingredients[first][0], 'kept': True, **_val(individual[first])}]
  for i in order[1:]:
    candidate = average([ingredients[j][1] for j in kept + [i]])
    metrics = evaluate(candidate, 'val')
    keep = metrics['accuracy'] >= soup_val['accuracy']
    tried.append({'ingredient': ingredients[i][0], 'kept': keep, **_val(metrics)})
    if keep:
      kept, soup_val = kept + [i], metrics
  variables = average([ingredients[j][1] for j in kept])
  return Soup(tuple(ingredients[j][0] for j in kept), variables, soup_val, tuple(tried))


def _val(metrics: dict[str, float]) -> dict[str, float]:
  return {'val_loss': metrics['loss'], 'val_accuracy': metrics['accuracy']}
