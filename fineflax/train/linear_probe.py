"""A linear head fitted exactly on fixed features: the linear probe of LP-FT.

Kumar et al. 2022 fine-tune from a head fitted to convergence on the frozen backbone's
features; big_vision fits its few-shot probes in closed form. Two fits, on float32
features of shape (n, d):

- 'logistic': multinomial (softmax) or, for one output, binary (sigmoid) logistic
  regression, minimising  (1/n) sum_i c_i CE(x_i W + b, y_i) + (l2 / 2) ||W||^2  with
  optax's L-BFGS on the device. With C = 1 / (l2 n) this is scikit-learn's
  `LogisticRegression(C=C)` (its intercept is not penalised either), `sample_weight` c.
- 'ridge': least squares to +-1 one-hot targets (big_vision's few-shot targets; one
  column for a binary head, so that the sign of the output is the class), minimising
  (1/n) sum_i c_i ||x_i W + b - t_i||^2 + l2 ||W||^2  in closed form, from one eigen
  decomposition of the smaller Gram matrix (primal d x d, or dual n x n when d > n), so
  a grid of l2 values costs one decomposition.

c_i is the class weight of example i (Keras' `class_weight`: the mean is still over
examples). The l2 strength is chosen on the validation split from a grid
(`choose_l2`): the highest accuracy wins, then the lower loss, then the first.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from fineflax.errors import ConfigError

logger = logging.getLogger('fineflax.train')
FITS = ('logistic', 'ridge')  # config.phases[i].fit
HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 or bfloat16 passes: the fit is compared to 1e-3
LOGISTIC_TOLERANCE = 1e-7  # L-BFGS stops when the gradient's norm is below this
LOGISTIC_MAX_ITERATIONS = 2000
LOGISTIC_STALLED = 20  # iterations in a row without a lower objective that end a fit
MAX_GRAM = 16384  # the largest Gram matrix side ridge decomposes (16384^2 floats: 1 GiB)


@dataclasses.dataclass(frozen=True)
class LinearFit:
  """A fitted head and how it was chosen.

  Attributes:
    kernel: (d, outputs) float32.
    bias: (outputs,) float32.
    l2: the strength it was fitted with.
    iterations: L-BFGS iterations (logistic); 0 for ridge.
    grid: one {'l2', 'val_accuracy', 'val_loss'} per candidate (empty without a choice).
  """

  kernel: np.ndarray
  bias: np.ndarray
  l2: float
  iterations: int = 0
  grid: tuple[dict[str, float], ...] = ()


def _logits(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  return jnp.matmul(x, kernel, precision=HIGHEST) + bias


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy: sigmoid for one output column, softmax otherwise."""
  if logits.shape[-1] == 1:
    return optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(logits.dtype))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy; one output column is a binary classifier deciding at logit 0."""
  logits = np.asarray(logits)
  predicted = (logits[:, 0] > 0).astype(int) if logits.shape[1] == 1 else logits.argmax(-1)
  return float(np.mean(predicted == np.asarray(labels)))


@jax.jit
def _fit_logistic(
    x: jax.Array, labels: jax.Array, weights: jax.Array, l2: jax.Array, init: dict[str, jax.Array]
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  n = x.shape[0]

  def objective(params: dict[str, jax.Array]) -> jax.Array:
    losses = cross_entropy(_logits(x, params['kernel'], params['bias']), labels)
    return jnp.sum(weights * losses) / n + 0.5 * l2 * jnp.sum(params['kernel'] ** 2)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state, stalled = carry
    before = otu.tree_get(state, 'value')
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    stalled = jnp.where(otu.tree_get(state, 'value') < before, 0, stalled + 1)
    return optax.apply_updates(params, updates), state, stalled

  def going(carry):
    _, state, stalled = carry
    count = otu.tree_get(state, 'count')
    grad = otu.tree_get(state, 'grad')
    # The first iteration has no gradient yet (count 0). After STALLED iterations in a row
    # that do not lower the objective, float32's rounding floor is reached: more would only
    # repeat failing line searches.
    return (count == 0) | (
        (count < LOGISTIC_MAX_ITERATIONS)
        & (otu.tree_norm(grad) >= LOGISTIC_TOLERANCE)
        & (stalled < LOGISTIC_STALLED)
    )

  params, state, _ = jax.lax.while_loop(going, step, (init, solver.init(init), jnp.int32(0)))
  return params, otu.tree_get(state, 'count'), otu.tree_norm(otu.tree_get(state, 'grad'))


def fit_logistic(
    x: jax.Array,
    labels: jax.Array,
    outputs: int,
    l2: float,
    weights: jax.Array,
    start: LinearFit | None = None,
) -> LinearFit:
  """Logistic regression of `labels` on `x` (see the module docstring), from `start`'s
  parameters (a fit of a nearby l2 is a warm start: the objective is strictly convex, so
  the minimum is the same) or from zeros."""
  init = {
      'kernel': jnp.zeros((x.shape[1], outputs), jnp.float32),
      'bias': jnp.zeros((outputs,), jnp.float32),
  }
  if start is not None:
    init = {'kernel': jnp.asarray(start.kernel), 'bias': jnp.asarray(start.bias)}
  params, count, grad_norm = jax.device_get(
      _fit_logistic(x, labels, weights, jnp.float32(l2), init)
  )
  if count >= LOGISTIC_MAX_ITERATIONS and grad_norm >= LOGISTIC_TOLERANCE:
    logger.warning(
        'logistic fit, l2 %g: %d L-BFGS iterations (the most it runs) left the gradient norm '
        'at %.2g (tolerance %g); its figures are of the parameters reached',
        l2,
        count,
        grad_norm,
        LOGISTIC_TOLERANCE,
    )
  return LinearFit(np.asarray(params['kernel']), np.asarray(params['bias']), l2, int(count))


def targets(labels: jax.Array, outputs: int) -> jax.Array:
  """Ridge's targets: +1 for the class, -1 elsewhere (one column for a binary head)."""
  if outputs == 1:
    return (2.0 * (labels > 0) - 1.0)[:, None].astype(jnp.float32)
  return 2.0 * jax.nn.one_hot(labels, outputs, dtype=jnp.float32) - 1.0


@jax.jit
def _ridge_basis(x: jax.Array, t: jax.Array, weights: jax.Array) -> tuple[jax.Array, ...]:
  """What every l2 of the grid shares: the weighted means and the eigen decomposition of
  the smaller Gram matrix of the centred, sqrt(weight)-scaled rows."""
  total = jnp.sum(weights)
  x_mean = jnp.matmul(weights, x, precision=HIGHEST) / total
  t_mean = jnp.matmul(weights, t, precision=HIGHEST) / total
  root = jnp.sqrt(weights)[:, None]
  xs, ts = (x - x_mean) * root, (t - t_mean) * root
  primal = x.shape[1] <= x.shape[0]
  gram = (
      jnp.matmul(xs.T, xs, precision=HIGHEST) if primal else jnp.matmul(xs, xs.T, precision=HIGHEST)
  )
  values, vectors = jnp.linalg.eigh(gram)
  # Primal: W = Q (L + n l2)^-1 Q^T Xs^T Ts; dual: W = Xs^T Q (L + n l2)^-1 Q^T Ts.
  projected = jnp.matmul(
      vectors.T, jnp.matmul(xs.T, ts, precision=HIGHEST) if primal else ts, precision=HIGHEST
  )
  return values, vectors, projected, xs, x_mean, t_mean


@jax.jit
def _ridge_solution(basis: tuple[jax.Array, ...], n_l2: jax.Array) -> tuple[jax.Array, jax.Array]:
  values, vectors, projected, xs, x_mean, t_mean = basis
  solved = jnp.matmul(vectors, projected / (values + n_l2)[:, None], precision=HIGHEST)
  kernel = (
      solved if vectors.shape[0] == xs.shape[1] else jnp.matmul(xs.T, solved, precision=HIGHEST)
  )
  return kernel, t_mean - jnp.matmul(x_mean, kernel, precision=HIGHEST)


def check_ridge_size(n: int, d: int) -> None:
  """ConfigError when both the primal and the dual Gram matrix are too big to decompose."""
  if min(n, d) > MAX_GRAM:
    raise ConfigError(
        f"fit='ridge' on {n} examples of {d} features needs a {min(n, d)}-square Gram "
        f"matrix (limit {MAX_GRAM}): use fit='logistic', or pool the features "
        "(config.model.head.pooling='avg')"
    )


def fit_ridge_grid(
    x: jax.Array, labels: jax.Array, outputs: int, l2s: Sequence[float], weights: jax.Array
) -> list[LinearFit]:
  """Ridge regression (see the module docstring) for each of `l2s`."""
  check_ridge_size(*x.shape)
  basis = _ridge_basis(x, targets(labels, outputs), weights)
  n = x.shape[0]
  fits = []
  for l2 in l2s:
    kernel, bias = jax.device_get(_ridge_solution(basis, jnp.float32(n * l2)))
    fits.append(LinearFit(np.asarray(kernel), np.asarray(bias), float(l2)))
  return fits


def score(
    fit: LinearFit,
    x: np.ndarray | jax.Array,
    labels: np.ndarray | jax.Array,
    class_weights: Sequence[float] | None = None,
) -> tuple[float, float]:
  """(loss, accuracy) of `fit` on (x, labels): the mean cross-entropy, each example's
  times its class weight (as training reports its loss), and the top-1 accuracy."""
  x, labels = jnp.asarray(x, jnp.float32), jnp.asarray(labels, jnp.int32)
  logits = _logits(x, jnp.asarray(fit.kernel), jnp.asarray(fit.bias))
  losses = cross_entropy(logits, labels)
  if class_weights is not None:
    losses = losses * jnp.asarray(class_weights, jnp.float32)[labels]
  return float(jnp.mean(losses)), accuracy(np.asarray(logits), np.asarray(labels))


def choose_l2(
    kind: str,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    outputs: int,
    l2s: Sequence[float],
    class_weights: Sequence[float] | None,
) -> LinearFit:
  """The `kind` fit on `train` (features, labels) with the l2 of `l2s` that does best on
  `val` (accuracy, then lower loss, then the first); without `val`, `l2s` must hold one
  value. Class weights weigh the training examples only."""
  if kind not in FITS:
    raise ConfigError(f'fit {kind!r}: expected one of {", ".join(FITS)}')
  if val is None and len(l2s) != 1:
    raise ConfigError(
        f'fit {kind!r} chooses its l2 among {len(l2s)} values on the validation split, '
        'but config.data.val_split is None: set fit_l2 to one value'
    )
  x, labels = jnp.asarray(train[0], jnp.float32), jnp.asarray(train[1], jnp.int32)
  weights = (
      jnp.ones(len(labels), jnp.float32)
      if class_weights is None
      else jnp.asarray(class_weights, jnp.float32)[labels]
  )
  if kind == 'ridge':
    fits = fit_ridge_grid(x, labels, outputs, l2s, weights)
  else:
    # The strongest l2 first, each fit starting from the last: the weakest, slowest to
    # converge from zeros, starts near its minimum.
    by_index: dict[int, LinearFit] = {}
    last = None
    for i in sorted(range(len(l2s)), key=lambda i: -l2s[i]):
      last = by_index[i] = fit_logistic(x, labels, outputs, float(l2s[i]), weights, last)
    fits = [by_index[i] for i in range(len(l2s))]
  if val is None:
    return fits[0]
  val_x, val_labels = jnp.asarray(val[0], jnp.float32), jnp.asarray(val[1], jnp.int32)
  scores = [score(fit, val_x, val_labels) for fit in fits]
  grid = tuple(
      {'l2': fit.l2, 'val_accuracy': acc, 'val_loss': loss}
      for fit, (loss, acc) in zip(fits, scores)
  )
  best = min(range(len(fits)), key=lambda i: (-scores[i][1], scores[i][0], i))
  return dataclasses.replace(fits[best], grid=grid)
