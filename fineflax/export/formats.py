"""The export formats: each writes a run's serving function and runs it back in its own
runtime, which is how `export.export` checks it (and how the tests load it).

    stablehlo    jax.export, serialized (one file), batch a symbolic dimension 'b'
    saved_model  a TensorFlow SavedModel (folder) of jax2tf's native serialization, with
                 a 'serving_default' signature: images (uint8) -> probabilities
    litert       a .tflite flat buffer converted from that function at batch 1;
                 `quantize='dynamic'`: int8 weights (its accuracy change is reported)
    onnx         an ONNX graph written from the layer list (`onnx_graph`), batch symbolic
    keras        a Keras 3 .keras file of the same network, BN kept (`keras_model`)
    npz, safetensors   the checkpoint's arrays (`fineflax.export.arrays`)

The metadata (class names, image shape, temperature, the run's config) goes beside a
one-file export as OUT.json, and into a SavedModel as assets.extra/fineflax.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fineflax.errors import ConfigError
from fineflax.export import keras_model, onnx_graph
from fineflax.export.serving import Serving

EXTRA = "pip install 'fineflax[export]'"
METADATA_FILE = 'fineflax.json'  # in a SavedModel's assets.extra/
LITERT_BATCH = 1
_PLATFORMS = {'gpu': 'cuda', 'tpu': 'tpu'}  # jax.default_backend() -> jax.export's name


def sidecar(out: Path) -> Path:
  """Where a one-file export's metadata goes: OUT.json beside it."""
  return out.with_name(out.name + '.json')


def _tensorflow() -> Any:
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from jax.experimental import jax2tf  # noqa: F401  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f'this format needs TensorFlow ({e}): {EXTRA}') from None
  return tf


def platforms() -> list[str]:
  """What exports are lowered for: the CPU, and this machine's accelerator if it has one
  (an exported module runs only on the platforms it was lowered for)."""
  return ['cpu'] + [p for p in [_PLATFORMS.get(jax.default_backend())] if p]


# --- stablehlo -----------------------------------------------------------------------------


def write_stablehlo(serving: Serving, out: Path, quantize: str | None = None) -> None:
  """jax.export of the serving function, batch symbolic, serialized (`platforms`)."""
  del quantize
  (batch,) = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((batch, *serving.image_shape), jnp.uint8)
  exported = jax.export.export(jax.jit(serving.fn), platforms=platforms())(spec)
  out.write_bytes(exported.serialize())


def run_stablehlo(path: Path) -> Callable[[np.ndarray], np.ndarray]:
  """The serialized program at `path`, deserialized and run by JAX."""
  exported = jax.export.deserialize(bytearray(Path(path).read_bytes()))
  return lambda images: np.asarray(exported.call(images))


# --- saved_model ---------------------------------------------------------------------------


def _tf_function(
    serving: Serving,
    batch: int | None = None,
    lowered_for: list[str] | None = None,
    variables: Any = None,
) -> Any:
  """The serving function as a tf.function of jax2tf (native serialization); `batch`
  None: any batch size. `variables` (tf.Variables shaped as `serving.variables`): passed
  to the module as arguments, so that a SavedModel keeps them once, in its variables/,
  rather than as constants of the module; None: the constants."""
  tf = _tensorflow()
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  height, width, channels = serving.image_shape
  shape = f'({batch or "b"}, {height}, {width}, {channels})'
  options = dict(with_gradient=False, native_serialization_platforms=lowered_for or platforms())
  if variables is None:
    converted = jax2tf.convert(serving.fn, polymorphic_shapes=[shape], **options)
  else:
    applied = jax2tf.convert(serving.apply, polymorphic_shapes=[None, shape], **options)
    converted = lambda images: applied(variables, images)
  return tf.function(
      lambda images: {'probabilities': converted(images)},
      autograph=False,
      input_signature=[tf.TensorSpec([batch, height, width, channels], tf.uint8, name='images')],
  )


def write_saved_model(serving: Serving, out: Path, quantize: str | None = None) -> None:
  """A SavedModel folder: signature 'serving_default' (images uint8 -> probabilities),
  the weights as its variables, `class_names` a string variable of the module, the
  metadata in assets.extra/."""
  del quantize
  tf = _tensorflow()
  module = tf.Module()
  module.weights = jax.tree.map(lambda a: tf.Variable(a, trainable=False), serving.variables)
  module.serve = _tf_function(serving, variables=module.weights)
  module.class_names = tf.Variable(list(serving.class_names), trainable=False, dtype=tf.string)
  tf.saved_model.save(
      module, str(out), signatures={'serving_default': module.serve.get_concrete_function()}
  )
  (out / 'assets.extra').mkdir(exist_ok=True)
  (out / 'assets.extra' / METADATA_FILE).write_text(json.dumps(serving.metadata))


def run_saved_model(path: Path) -> Callable[[np.ndarray], np.ndarray]:
  """The SavedModel's serving signature, run by TensorFlow."""
  tf = _tensorflow()
  signature = tf.saved_model.load(str(path)).signatures['serving_default']
  return lambda images: signature(images=tf.constant(images))['probabilities'].numpy()


# --- litert --------------------------------------------------------------------------------


def write_litert(serving: Serving, out: Path, quantize: str | None = None) -> None:
  """A .tflite flat buffer of the serving function (float32, or int8 weights), batch
  LITERT_BATCH: the converter cannot lower the preprocessing's gather (the centre crop and
  resize) with a dynamic batch, and LiteRT's interpreters run one image at a time."""
  tf = _tensorflow()
  module = tf.Module()
  module.serve = _tf_function(serving, LITERT_BATCH, ['cpu'])  # LiteRT runs its own ops
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [module.serve.get_concrete_function()], module
  )
  if quantize == 'dynamic':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  out.write_bytes(converter.convert())


def run_litert(path: Path) -> Callable[[np.ndarray], np.ndarray]:
  """The .tflite file run by the LiteRT interpreter (ai_edge_litert where installed,
  else TensorFlow's tf.lite), resized to each batch."""
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  except ImportError:
    Interpreter = _tensorflow().lite.Interpreter  # pylint: disable=invalid-name
  interpreter = Interpreter(model_path=str(path))
  interpreter.allocate_tensors()
  (inp,), (outp,) = interpreter.get_input_details(), interpreter.get_output_details()

  def one(image: np.ndarray) -> np.ndarray:
    interpreter.set_tensor(inp['index'], np.ascontiguousarray(image[None]))
    interpreter.invoke()
    return interpreter.get_tensor(outp['index'])[0].copy()

  return lambda images: np.stack([one(image) for image in images])


WRITERS = {
    'stablehlo': write_stablehlo,
    'saved_model': write_saved_model,
    'litert': write_litert,
    'onnx': onnx_graph.write_onnx,
    'keras': keras_model.write_keras,
}
RUNNERS = {
    'stablehlo': run_stablehlo,
    'saved_model': run_saved_model,
    'litert': run_litert,
    'onnx': onnx_graph.run_onnx,
    'keras': keras_model.run_keras,
}
