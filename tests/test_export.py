"""fineflax.export: BatchNormalization folding, and each export format loaded by its own
runtime (JAX for StableHLO, TensorFlow for the SavedModel, the LiteRT interpreter) giving
the probabilities of fineflax's `predict_fn` to 1e-5, on the demo run's resnet_tiny and
on ResNet50 with random weights."""

import contextlib
import dataclasses
import io
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fineflax
from fineflax import config as config_lib, data, models
from fineflax.cli import export as cli_export
from fineflax.data import augment as augmentation
from fineflax.export import exporter, folding, formats, serving as serving_lib
from fineflax.run import restore
from fineflax.train import state as state_lib
from tests import helpers

pytestmark = pytest.mark.slow  # converts models, starts a program

TOL = 1e-5


def _random_batchnorm(variables, seed=0):
  """`variables` with BatchNormalization statistics and affine parameters drawn away from
  their init (1, 0): a fold of the init values would hide a wrong formula."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(path[-1].key)
    if name in ('var', 'scale'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name in ('mean',) or (name == 'bias' and 'bn' in str(path[-2].key)):
      return rng.normal(0, 0.2, leaf.shape).astype(np.float32)
    return np.asarray(leaf)

  return jax.tree_util.tree_map_with_path(draw, variables)


def _model(backbone, size, num_classes=5, dtype=jnp.float32):
  cfg = config_lib.default_config()
  cfg.model.backbone, cfg.model.image_size, cfg.model.weights = backbone, size, None
  return models.build_model(cfg.model, num_classes, dtype)


@pytest.fixture(scope='module')
def run(demo_run):
  return restore.load_run(demo_run)


@pytest.fixture(scope='module')
def images(run):
  rng = np.random.default_rng(1)
  return rng.integers(0, 256, (5, *run.image_shape), dtype=np.uint8)


@pytest.fixture(scope='module')
def resnet50_run(run):
  """The demo run with ResNet50 (random weights, random BN statistics) at 64 px."""
  model = _model('resnet50', 64, num_classes=len(run.class_names))
  variables = state_lib.init_variables(model, (64, 64, 3), seed=0)
  return dataclasses.replace(run, model=model, variables=_random_batchnorm(variables))


# --- folding -----------------------------------------------------------------------------


@pytest.mark.parametrize('backbone,size,count', [('resnet_tiny', 32, 17), ('resnet50', 64, 53)])
def test_fold_batchnorm_keeps_the_outputs(backbone, size, count):
  model = _model(backbone, size)
  variables = _random_batchnorm(state_lib.init_variables(model, (size, size, 3), seed=0))
  x = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
  folded_model, folded = folding.fold_batchnorm(model, variables)
  assert folding.folded_layers(model, variables) == count
  assert not jax.tree.leaves(folded['batch_stats'])  # every BN of a ResNet follows a conv
  want = np.asarray(model.apply(variables, x), np.float64)
  got = np.asarray(folded_model.apply(folded, x), np.float64)
  # Logits of tens: compared relative to their size; probabilities absolutely.
  assert np.abs(got - want).max() <= TOL * np.abs(want).max()
  np.testing.assert_allclose(jax.nn.softmax(got), jax.nn.softmax(want), atol=TOL, rtol=0)


def test_fold_batchnorm_formula_on_one_conv():
  """One Conv2D + BatchNormalization against the formula written out in NumPy."""
  from fineflax.models.graph import KerasGraph, Layer, chain  # pylint: disable=g-import-not-at-top

  layers = chain(
      [
          Layer('input', 'InputLayer'),
          Layer('c', 'Conv2D', filters=4, kernel=3, padding='same'),
          Layer('bn', 'BatchNormalization'),
      ]
  )
  graph = KerasGraph(layers=layers, bn_epsilon=1e-3)
  x = np.random.default_rng(2).normal(size=(2, 5, 5, 3)).astype(np.float32)
  variables = _random_batchnorm(graph.init(jax.random.key(1), x), seed=3)
  folded_graph, folded = folding.fold_batchnorm(graph, variables)
  c, bn, st = variables['params']['c'], variables['params']['bn'], variables['batch_stats']['bn']
  s = np.asarray(bn['scale']) / np.sqrt(np.asarray(st['var']) + 1e-3)
  np.testing.assert_allclose(
      folded['params']['c']['kernel'], np.asarray(c['kernel']) * s, rtol=1e-6
  )
  np.testing.assert_allclose(
      folded['params']['c']['bias'],
      (np.asarray(c['bias']) - np.asarray(st['mean'])) * s + np.asarray(bn['bias']),
      rtol=1e-5,
      atol=1e-6,
  )
  np.testing.assert_allclose(
      folded_graph.apply(folded, x), graph.apply(variables, x), atol=1e-5, rtol=0
  )


# --- the serving function ----------------------------------------------------------------


def test_serving_applies_the_temperature_and_is_float32(run, images):
  # fineflax's forward: evaluation's preparation, the model, its logits.
  x = augmentation.prepare(
      images, None, data.augment_from_config(run.config.data), run.model.image_size, train=False
  )
  z = np.asarray(run.model.apply(run.variables, x), np.float64) / 2.0
  e = np.exp(z - z.max(-1, keepdims=True))
  serve = serving_lib.make_serving(run, temperature=2.0)
  got = np.asarray(jax.jit(serve.fn)(images))
  assert got.dtype == np.float32 and serve.metadata['temperature'] == 2.0
  np.testing.assert_allclose(got, e / e.sum(-1, keepdims=True), atol=TOL, rtol=0)
  # The export-time reference (predict_fn's probabilities sharpened in NumPy) agrees.
  np.testing.assert_allclose(got, serving_lib.reference(run, images, 2.0), atol=TOL, rtol=0)


def test_a_bfloat16_run_exports_in_float32(run, images):
  model = run.model.clone(
      backbone=run.model.backbone.clone(dtype=jnp.bfloat16),
      head=run.model.head.clone(dtype=jnp.bfloat16),
  )
  bf16 = dataclasses.replace(run, model=model)
  assert np.abs(fineflax.predict_fn(bf16)(images) - fineflax.predict_fn(run)(images)).max() > TOL
  got = np.asarray(jax.jit(serving_lib.make_serving(bf16).fn)(images))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, fineflax.predict_fn(run)(images), atol=TOL, rtol=0)


# --- the formats, in their runtimes ------------------------------------------------------


def _load_and_run(fmt, path, images):
  """The export run by its own runtime, written out here rather than through
  fineflax.export.formats, as a user would."""
  if fmt == 'stablehlo':
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    return np.asarray(exported.call(images))
  if fmt == 'onnx':
    import onnxruntime  # pylint: disable=g-import-not-at-top

    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return session.run(['probabilities'], {'images': images})[0]
  if fmt == 'keras':
    import keras  # pylint: disable=g-import-not-at-top

    return np.asarray(keras.models.load_model(path)(images, training=False))
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if fmt == 'saved_model':
    serve = tf.saved_model.load(str(path)).signatures['serving_default']
    return serve(images=tf.constant(images))['probabilities'].numpy()
  interpreter = tf.lite.Interpreter(model_path=str(path))
  interpreter.allocate_tensors()
  inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
  rows = []
  for image in images:
    interpreter.set_tensor(inp['index'], image[None])
    interpreter.invoke()
    rows.append(interpreter.get_tensor(out['index'])[0])
  return np.stack(rows)


FORMATS = ('stablehlo', 'saved_model', 'litert', 'onnx', 'keras')
OUT_NAMES = {
    'stablehlo': 'demo.stablehlo',
    'saved_model': 'demo_savedmodel',
    'litert': 'demo.tflite',
    'onnx': 'demo.onnx',
    'keras': 'demo.keras',
}  # as docs/checkpoints.md names them


@pytest.fixture(scope='module')
def exports(demo_run, tmp_path_factory):
  """The demo run exported once in each serving format by the program's main, with what
  it printed."""
  folder = tmp_path_factory.mktemp('exports')
  printed = {}
  for fmt in FORMATS:
    out = folder / OUT_NAMES[fmt]
    args = ['--workdir', str(demo_run), '--format', fmt, '--out', str(out)]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
      assert cli_export.main(args) == 0
    printed[fmt] = stdout.getvalue()
  return folder, printed


@pytest.mark.parametrize('fmt', FORMATS)
def test_each_format_in_its_runtime(exports, run, images, fmt):
  folder, printed = exports
  out = folder / OUT_NAMES[fmt]
  assert 'check: max |probability - fineflax| = ' in printed[fmt]
  assert ('17 BatchNormalization' in printed[fmt]) == (fmt != 'keras')
  got = _load_and_run(fmt, out, images)
  np.testing.assert_allclose(got, fineflax.predict_fn(run)(images), atol=TOL, rtol=0)
  if fmt == 'saved_model':
    meta_path = out / 'assets.extra' / formats.METADATA_FILE
  else:
    meta_path = formats.sidecar(out)
  meta = json.loads(meta_path.read_text())
  assert meta['class_names'] == list(run.class_names) and meta['exported_format'] == fmt
  assert meta['input'] == {'dtype': 'uint8', 'shape': [None, *run.image_shape]}
  if fmt != 'litert':  # a dynamic batch: another batch size runs the same program
    np.testing.assert_allclose(_load_and_run(fmt, out, images[:2]), got[:2], atol=1e-6, rtol=0)


def test_the_docs_loading_code(exports, run, monkeypatch):
  """docs/checkpoints.md ("Export for serving"): each block, as written, on the exports."""
  folder, _ = exports
  text = (helpers.ROOT / 'docs' / 'checkpoints.md').read_text()
  text = text[text.index('## Export for serving') :]
  text = text[: text.index('\n## ', 1) if '\n## ' in text[1:] else None]
  setup, *blocks = re.findall(r'^```python\n(.*?)^```', text, re.M | re.S)
  assert len(blocks) == len(FORMATS)
  monkeypatch.chdir(folder)
  scope = {}
  exec(compile(setup, 'docs/checkpoints.md', 'exec'), scope)  # pylint: disable=exec-used
  want = fineflax.predict_fn(run)(scope['images'])
  for block in blocks:
    exec(compile(block, 'docs/checkpoints.md', 'exec'), scope)  # pylint: disable=exec-used
    np.testing.assert_allclose(scope.pop('probs'), want, atol=TOL, rtol=0, err_msg=block)


def test_quantized_litert_reports_its_change(demo_run, tmp_path):
  report = exporter.export(demo_run, 'litert', tmp_path / 'q.tflite', quantize='dynamic')
  assert report.top1_agreement is not None and 0 <= report.top1_agreement <= 1
  assert report.accuracy_change is not None  # the demo's validation images were read
  assert report.max_abs_diff < 0.05  # int8 weights: close, not exact


# The writers that rebuild the layers themselves meet ResNet50's identity blocks here
# (resnet_tiny has one block a stage, each with a projection shortcut); stablehlo and
# saved_model trace the model's own JAX function, whatever its layers.
@pytest.mark.parametrize('fmt', ['onnx', 'keras'])
def test_resnet50_formats(resnet50_run, tmp_path, fmt):
  serve = serving_lib.make_serving(resnet50_run)
  assert serve.folded == 53
  out = tmp_path / f'r50.{fmt}'
  formats.WRITERS[fmt](serve, out)
  x = np.random.default_rng(3).integers(0, 256, (3, *resnet50_run.image_shape), dtype=np.uint8)
  want = fineflax.predict_fn(resnet50_run)(x)
  np.testing.assert_allclose(_load_and_run(fmt, out, x), want, atol=TOL, rtol=0)


def test_program_shim(demo_run, tmp_path):
  """`python -m fineflax.export`, as the docs show it."""
  out = tmp_path / 'demo.stablehlo'
  done = subprocess.run(
      [
          sys.executable,
          '-m',
          'fineflax.export',
          '--workdir',
          str(demo_run),
          '--format',
          'stablehlo',
          '--out',
          str(out),
      ],
      cwd=helpers.ROOT,
      env=helpers.program_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert out.is_file() and 'tolerance 1e-05' in done.stdout


# --- bad input ---------------------------------------------------------------------------


def test_bad_input(demo_run, tmp_path, capsys, monkeypatch):
  from fineflax.cli import export as cli  # pylint: disable=g-import-not-at-top

  def error(*args):
    assert cli.main(['--workdir', str(demo_run), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    return err

  out = str(tmp_path / 'x')
  assert 'stablehlo, saved_model, litert, onnx, keras, npz, safetensors' in error(
      '--format', 'pt', '--out', out
  )
  assert 'only --format litert' in error(
      '--format', 'stablehlo', '--quantize', 'dynamic', '--out', out
  )
  (tmp_path / 'old').write_text('keep')
  assert '--overwrite' in error('--format', 'npz', '--out', str(tmp_path / 'old'))
  assert (tmp_path / 'old').read_text() == 'keep'
  assert 'has no step 99' in error('--format', 'npz', '--checkpoint', '99', '--out', out)
  monkeypatch.setitem(sys.modules, 'tensorflow', None)
  assert "pip install 'fineflax[export]'" in error('--format', 'saved_model', '--out', out)
  monkeypatch.undo()
  # An export that does not match fineflax is refused and not kept.
  real = formats.RUNNERS['stablehlo']
  monkeypatch.setitem(formats.RUNNERS, 'stablehlo', lambda p: (lambda x: real(p)(x) + 2e-5))
  assert 'tolerance 1e-05' in error('--format', 'stablehlo', '--out', out)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['old']


@pytest.mark.parametrize('fmt', ['onnx', 'keras', 'stablehlo'])
def test_a_binary_head_gives_both_columns(run, tmp_path, fmt):
  """A one-logit head: [1 - p, p] of its sigmoid, in the writers that build it themselves
  (onnx, keras) and through JAX (stablehlo), with a temperature."""
  cfg = config_lib.from_dict(config_lib.to_dict(run.config))
  cfg.model.num_classes = 1
  model = models.build_model(cfg.model, 1)
  variables = state_lib.init_variables(model, tuple(run.image_shape), seed=4)
  binary = dataclasses.replace(
      run, model=model, variables=_random_batchnorm(variables), class_names=('no', 'yes')
  )
  serve = serving_lib.make_serving(binary, temperature=1.5)
  out = tmp_path / f'binary.{fmt}'
  formats.WRITERS[fmt](serve, out)
  x = np.random.default_rng(5).integers(0, 256, (4, *run.image_shape), dtype=np.uint8)
  got = _load_and_run(fmt, out, x)
  assert got.shape == (4, 2)
  np.testing.assert_allclose(got, serving_lib.reference(binary, x, 1.5), atol=TOL, rtol=0)
  # The reference, sharpened in NumPy: sigmoid(logit / T) from predict_fn's [1 - p, p].
  p = fineflax.predict_fn(binary)(x)[:, 1].astype(np.float64)
  logit = np.log(p) - np.log1p(-p)
  np.testing.assert_allclose(got[:, 1], 1 / (1 + np.exp(-logit / 1.5)), atol=TOL, rtol=0)
