"""The serving function of a run: what every exported format computes.

uint8 images (batch, H, W, 3) at the run's stored image shape -> float32 class
probabilities (softmax; for a one-logit head the two columns [1 - p, p] of its sigmoid),
with inside it what fineflax's evaluation does to an image (centre crop, resize to the
model's input, the backbone's normalisation), the temperature `evaluate --calibrate`
saved for the checkpoint (logits / T), LoRA merged (`load_run`), inference-mode
BatchNormalization folded into the convolution before it (`folding`), float32 whatever
dtype the run trained in. The variables are closed over: an exported program is one
function of the images.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fineflax import config as config_lib, data
from fineflax.data import augment as augmentation
from fineflax.export import folding
from fineflax.inference.arrays import predict_fn
from fineflax.inference.evaluate import probabilities
from fineflax.run.restore import RestoredRun

FORMAT_NAME = 'fineflax-export-1'


@dataclasses.dataclass(frozen=True)
class Serving:
  """A run's serving function and what an export says about it.

  Attributes:
    fn: uint8 (n, H, W, 3) -> float32 (n, classes) probabilities; pure JAX, traceable.
    image_shape: (H, W, 3), the run's stored image shape: the input an export takes.
    class_names: the classes, index = column of the probabilities.
    temperature: what the logits are divided by (None: nothing was saved).
    folded: how many BatchNormalization layers were folded.
    metadata: JSON-able facts written beside (or into) each export.
    model, variables: the (folded, float32) classifier `fn` runs, and its variables.
    augment: the run's augmentations (`prepare` uses its evaluation crop).
    raw_model, raw_variables: the float32 classifier and variables before the fold (the
      keras format keeps BatchNormalization).
    apply: `fn` with the variables an argument: apply(variables, images).
  """

  fn: Callable[[jax.Array], jax.Array]
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  temperature: float | None
  folded: int
  metadata: dict[str, Any]
  model: Any = None
  variables: Any = None
  augment: Any = None
  raw_model: Any = None
  raw_variables: Any = None
  apply: Callable[[Any, jax.Array], jax.Array] | None = None


def float32_model(model: Any) -> Any:
  """The classifier `model` computing in float32 (a bfloat16 run's export is float32)."""
  return model.clone(
      backbone=model.backbone.clone(dtype=jnp.float32), head=model.head.clone(dtype=jnp.float32)
  )


def metadata(run: RestoredRun, temperature: float | None = None) -> dict[str, Any]:
  """Where an export comes from and how to read its output (JSON-able values)."""
  return {
      'format': FORMAT_NAME,
      'step': run.step,
      'checkpoint': run.label,
      'checkpoint_dir': str(run.checkpoint_dir),
      'class_names': list(run.class_names),
      'image_shape': list(run.image_shape),
      'meta': run.meta,
      'config': config_lib.to_dict(run.config),
      'temperature': temperature,
  }


def make_serving(run: RestoredRun, temperature: float | None = None, fold: bool = True) -> Serving:
  """The serving function of `run` (`fold` False: BatchNormalization left as it is)."""
  model = float32_model(run.model)
  variables = jax.tree.map(lambda a: np.asarray(a, np.float32), run.variables)
  folded, raw_model, raw = 0, model, variables
  if fold:
    folded = folding.folded_layers(model, variables)
    model, variables = folding.fold_batchnorm(model, variables)
  augment = data.augment_from_config(run.config.data)
  scale = 1.0 if temperature is None else 1.0 / temperature

  def apply(variables: dict[str, Any], images: jax.Array) -> jax.Array:
    x = augmentation.prepare(images, None, augment, model.image_size, train=False)
    logits = model.apply(variables, x, train=False).astype(jnp.float32)
    return probabilities(logits * scale if temperature is not None else logits)

  fn = functools.partial(apply, variables)

  meta = metadata(run, temperature)
  meta.update(
      input={'dtype': 'uint8', 'shape': [None, *run.image_shape]},
      output='probabilities',
      batchnorm_folded=folded,
  )
  return Serving(
      fn,
      tuple(run.image_shape),
      tuple(run.class_names),
      temperature,
      folded,
      meta,
      model,
      variables,
      augment,
      raw_model,
      raw,
      apply,
  )


def reference(run: RestoredRun, images: np.ndarray, temperature: float | None) -> np.ndarray:
  """fineflax's own probabilities of `images` (`predict_fn`, in float32), with the
  temperature applied: softmax(log p / T) is softmax(logits / T), and for a binary head's
  [1 - p, p] the sigmoid of logit / T."""
  run = dataclasses.replace(run, model=float32_model(run.model))
  probs = np.asarray(predict_fn(run)(images), np.float64)
  if temperature is None:
    return probs.astype(np.float32)
  logp = np.log(probs) / temperature
  e = np.exp(logp - logp.max(axis=-1, keepdims=True))
  return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
