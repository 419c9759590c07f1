"""LoRA adapters (Hu et al. 2021) on the backbone's convolutions and dense layers, and
their merge into the kernels.

An adapted layer with kernel W (Dense: (in, out); Conv2D: (kh, kw, in, out)) gets two
factors in its own parameters, beside `kernel` and `bias`:

    lora_a  (in, r) or (kh, kw, in, r)   kaiming-uniform, as peft draws it
    lora_b  (r, out)                     zeros, so the adapted model starts as the base

and computes y = x W + b + (alpha / r) * (x A) B, where `x A` is the layer itself with r
outputs, no bias and A as its kernel (for a convolution: A a kh x kw convolution with the
layer's strides and padding, B a 1x1 one, as peft's Conv2d LoRA). This equals the layer
with the kernel W + (alpha / r) * A @ B; `merge` folds the factors into it, so that
evaluation, prediction and export run the plain model. Run as a branch, the backward pass
needs no gradient of W: a frozen base costs its input gradient only.

Which layers: the Conv2D (one group: depthwise and grouped convolutions get none) and
Dense layers of the backbone whose kernel path ('backbone/conv1_conv/kernel') the target
regex `re.search`-matches. The head trains in full, so it never gets adapters; nor do
SeparableConv2D and the Vision Transformer's attention projections (its MLP's Dense
layers do).

The adapters are added by a Flax method interceptor (`nn.intercept_methods`) around the
backbone's call, so the layer list and the modules that run it know nothing of them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fineflax.config import registry
from fineflax.errors import ConfigError

A, B = 'lora_a', 'lora_b'  # the factors' leaf names
DEFAULT_TARGET = '^backbone/'  # every convolution and dense layer of the backbone
# peft's `kaiming_uniform_(a=sqrt(5))`: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
A_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What gets adapters, and their rank and scale.

  Attributes:
    rank: r, the inner width of A @ B.
    alpha: the branch is scaled by alpha / r; None: alpha = r (a scale of 1).
    target: regex over kernel paths ('backbone/conv2_block1_1_conv/kernel').
  """

  rank: int
  alpha: float | None = None
  target: str = DEFAULT_TARGET

  @property
  def scale(self) -> float:
    """alpha / rank, the factor of the branch (x A) B."""
    return (self.rank if self.alpha is None else float(self.alpha)) / self.rank


def spec_from_config(lora_config: Any) -> LoraSpec | None:
  """The LoraSpec of `config.model.lora` (None, or a rank of 0 or None: no adapters)."""
  if lora_config is None or not lora_config.get('rank'):
    return None
  return LoraSpec(
      int(lora_config['rank']),
      lora_config.get('alpha'),
      lora_config.get('target') or DEFAULT_TARGET,
  )


def target_error(value: Any) -> str | None:
  """What is wrong with a `config.model.lora.target` regex, or None."""
  try:
    re.compile(value)
  except re.error as e:
    return f'bad regular expression: {e}'
  return None


registry.register_check('model.lora.target', target_error)


def adaptable(module: nn.Module) -> bool:
  """Whether `module` is a kind that takes an adapter: Dense, or Conv of one group."""
  if isinstance(module, nn.Conv):
    return module.feature_group_count == 1
  return isinstance(module, nn.Dense)


def _branch(spec: LoraSpec, module: nn.Module, x: jax.Array) -> jax.Array:
  """(alpha / r) * (x A) B of an adapted layer, creating its factors at init."""
  r = spec.rank
  if isinstance(module, nn.Conv):
    size = module.kernel_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    a_shape = size + (x.shape[-1], r)
  else:
    a_shape = (x.shape[-1], r)
  a = module.param(A, A_INIT, a_shape, jnp.float32)
  b = module.param(B, nn.initializers.zeros, (r, module.features), jnp.float32)
  # The layer itself with r outputs and A as its kernel: same strides, padding, dtype.
  # Unbound (parent=None): its path is (), which the interceptor passes by.
  down = module.clone(parent=None, features=r, use_bias=False)
  z = down.apply({'params': {'kernel': a}}, x)
  return spec.scale * (z @ b.astype(z.dtype))


def interceptor(spec: LoraSpec, adapted: list[str]) -> Callable[..., Any]:
  """The method interceptor that adds the branch to every targeted layer's output, and
  appends the layer's path ('backbone/conv1_conv') to `adapted`."""
  pattern = re.compile(spec.target)

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    path = module.path
    if (
        context.method_name != '__call__'
        or not path
        or path[0] != 'backbone'
        or not adaptable(module)
        or not pattern.search('/'.join(path) + '/kernel')
    ):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    adapted.append('/'.join(path))
    return y + _branch(spec, module, args[0]).astype(y.dtype)

  return intercept


def check_adapted(spec: LoraSpec, adapted: list[str]) -> None:
  """ConfigError when the target matched no layer (checked as the model is initialised)."""
  if not adapted:
    raise ConfigError(
        f'config.model.lora.target={spec.target!r} matches no kernel of a convolution or '
        "dense layer of the backbone (paths such as 'backbone/conv1_conv/kernel')"
    )


def _adapted_layers(params: Any, prefix: str = '') -> Iterator[tuple[str, dict[str, Any]]]:
  """(path, layer dict) of every layer of `params` that holds factors."""
  if not isinstance(params, dict) and not hasattr(params, 'items'):
    return
  if A in params and B in params:
    yield prefix, params
    return
  for key, value in params.items():
    if hasattr(value, 'items'):
      yield from _adapted_layers(value, f'{prefix}/{key}' if prefix else key)


def is_factor(path: str) -> bool:
  """Whether the parameter at `path` is a LoRA factor."""
  return path.rsplit('/', 1)[-1] in (A, B)


def has_adapters(params: Any) -> bool:
  """Whether `params` holds any LoRA factor."""
  return next(_adapted_layers(params), None) is not None


def merged_kernel(kernel: Any, a: Any, b: Any, scale: float) -> np.ndarray:
  """W + scale * A @ B, computed in float64 on the host, in the kernel's dtype."""
  kernel = np.asarray(kernel)
  delta = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  return (kernel.astype(np.float64) + scale * delta).astype(kernel.dtype)


def merge(params: Any, scale: float) -> dict[str, Any]:
  """`params` with every adapted kernel replaced by W + scale * A @ B and the factors
  removed: the parameters of the same model built without adapters."""

  def walk(tree):
    if not hasattr(tree, 'items'):
      return tree
    if A in tree and B in tree:
      rest = {k: v for k, v in tree.items() if k not in (A, B)}
      rest['kernel'] = merged_kernel(tree['kernel'], tree[A], tree[B], scale)
      return rest
    return {k: walk(v) for k, v in tree.items()}

  return walk(params)
