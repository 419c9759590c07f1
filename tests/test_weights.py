"""Pretrained weights: parity with Keras 3 and torchvision on files they write themselves,
head handling, wrong files, zero-shot prediction, conversion, training from a file."""

import h5py
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fineflax import config as config_lib, models, train, weights
from fineflax.data.images import read_image
from fineflax.inference import zero_shot
from fineflax.train import state as state_lib
from fineflax.weights import files
from tests import helpers

pytestmark = pytest.mark.slow  # compares with Keras and torchvision

# name: (Keras class, input side for the test, Keras preprocess module). ResNet101 and
# ResNet152 are ResNet50's blocks and loader with more blocks a stage: their layers and
# parameters are checked against Keras through jax.eval_shape (tests/test_models.py).
KERAS = {
    'resnet50': ('ResNet50', 64, 'resnet'),
    'vgg16': ('VGG16', 32, 'vgg16'),
    'xception': ('Xception', 71, 'xception'),
}
# Float32 parity bound: max |fineflax - reference| <= TOLERANCE x max |reference| (seen
# here: 1e-7 to 1e-6).
TOLERANCE = 1e-4


def _randomise_bn(keras, model, seed=0):
  """BN statistics away from identity, so that a mix-up of them shows."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      c = layer.get_weights()[0].shape
      layer.set_weights(
          [
              rng.uniform(0.5, 1.5, c),
              rng.normal(0, 0.1, c),
              rng.normal(0, 0.1, c),
              rng.uniform(0.5, 1.5, c),
          ]
      )


@pytest.fixture(scope='module')
def keras_file(keras, tmp_path_factory):
  """Builds (once) a Keras model with random weights and writes it in the legacy HDF5
  layout of keras.applications files; returns (path, keras model)."""
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top

  made = {}

  def make(name, include_top):
    if (name, include_top) not in made:
      cls, size, _ = KERAS[name]
      keras.backend.clear_session()  # Keras' automatic layer names restart at conv2d, add
      kwargs = {'classifier_activation': None} if include_top else {}
      model = getattr(keras.applications, cls)(
          include_top=include_top, weights=None, input_shape=(size, size, 3), **kwargs
      )
      _randomise_bn(keras, model)
      path = tmp_path_factory.mktemp('h5') / f'{name}{"" if include_top else "_notop"}.h5'
      with h5py.File(path, 'w') as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
      made[name, include_top] = (path, model)
    return made[name, include_top]

  return make


def _model_config(backbone, weights_spec, include_top=False, **kw):
  cfg = config_lib.default_config()
  cfg.model.update(backbone=backbone, weights=str(weights_spec), include_top=include_top, **kw)
  return cfg


def _load(cfg, size, num_classes=3):
  model = models.build_model(cfg.model, 1000 if cfg.model.include_top else num_classes)
  variables = state_lib.init_variables(model, (size, size, 3), seed=0)
  variables, report = weights.load_pretrained(cfg.model, model, variables)
  return model, variables, report


def _features(model, variables, images):
  """The backbone's output (the last layer of the Keras layer list)."""
  apply = lambda v, x: model.apply(v, x, mutable=['intermediates'])[1]
  return np.asarray(
      jax.jit(apply)(variables, images)['intermediates']['backbone']['layer_outputs'][-1]
  )


@pytest.mark.parametrize('include_top', [False, True])
@pytest.mark.parametrize('name', sorted(KERAS))
def test_keras_file_parity(keras, keras_file, name, include_top):
  path, reference = keras_file(name, include_top)
  _, size, module = KERAS[name]
  model, variables, report = _load(_model_config(name, path, include_top), size)
  assert report.num_loaded == reference.count_params()
  assert report.skipped == []
  assert report.initialised == ([] if include_top else ['head/dense'])
  images = np.random.default_rng(1).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  preprocess = getattr(keras.applications, module).preprocess_input
  expected = np.asarray(reference(preprocess(images.astype(np.float32)), training=False))
  got = (
      np.asarray(jax.jit(model.apply)(variables, images))
      if include_top
      else _features(model, variables, images)
  )
  assert got.shape == expected.shape
  assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max()


def test_full_file_into_a_new_head_skips_the_top(keras_file):
  path, _ = keras_file('resnet50', True)
  _, _, report = _load(_model_config('resnet50', path), 64)
  assert report.skipped == [
      'predictions: the model has a new head (config.model.include_top is False)'
  ]
  assert report.initialised == ['head/dense']
  assert 'loaded 106 layers' in report.text()


def test_an_old_keras_top_named_probs_loads_by_order(keras_file, tmp_path):
  """keras_applications' ResNet files call their top `probs`, Keras 3 `predictions`."""
  path, _ = keras_file('resnet50', True)
  renamed = tmp_path / 'probs.h5'
  renamed.write_bytes(path.read_bytes())
  with h5py.File(renamed, 'r+') as f:
    names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs['layer_names']]
    f.attrs['layer_names'] = [('probs' if n == 'predictions' else n).encode() for n in names]
    f.move('predictions', 'probs')
  _, _, report = _load(_model_config('resnet50', renamed, True), 64)
  assert report.initialised == [] and 'head/predictions' in report.loaded


def test_a_folder_named_like_a_source_is_not_a_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'imagenet').mkdir()
  assert not weights.is_path('imagenet') and weights.is_path('./imagenet')


@pytest.mark.parametrize(
    'backbone, torchvision',
    [
        ('resnet50', 'resnet50_torchvision'),
        ('convnext_tiny', 'convnext_tiny_torchvision'),
        ('efficientnetv2_s', 'efficientnet_v2_s_torchvision'),
    ],
)
def test_a_torch_file_for_a_keras_layout_backbone_is_refused(tmp_path, backbone, torchvision):
  path = tmp_path / 'w.pth'
  path.write_bytes(b'')
  with pytest.raises(
      weights.WeightFileError,
      match=rf"torch file loads into a backbone of torchvision's layout .*not '{backbone}'",
  ):
    weights.resolve(str(path), backbone, False)
  assert weights.resolve(str(path), torchvision, False) == path


def test_file_of_another_backbone_is_refused(keras_file):
  resnet, _ = keras_file('resnet50', False)
  vgg, _ = keras_file('vgg16', False)
  with pytest.raises(
      weights.WeightFileError,
      match=r'backbone/block1_conv1/kernel: the file '
      r'has shape \(7, 7, 3, 64\), the model expects \(3, 3, 3, 64\)',
  ):
    _load(_model_config('vgg16', resnet), 32)
  with pytest.raises(
      weights.WeightFileError, match='has 13 layers with weights but the ' 'backbone has 106'
  ):
    _load(_model_config('resnet50', vgg), 64)


def test_torchvision_parity_pth_and_safetensors(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  subprocess.run(
      [sys.executable, '-m', 'tests.torchvision_reference', str(tmp_path)],
      cwd=helpers.ROOT,
      check=True,
      timeout=300,
  )
  images, expected = np.load(tmp_path / 'images.npy'), np.load(tmp_path / 'logits.npy')
  for suffix in ('.pth', '.safetensors'):
    cfg = _model_config('resnet50_torchvision', tmp_path / f'resnet50{suffix}', True)
    model, variables, report = _load(cfg, 64)
    assert report.skipped == [] and report.initialised == []
    got = np.asarray(jax.jit(model.apply)(variables, images))
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max(), suffix
  # A new head: the backbone loads, torch's fc is skipped.
  _, _, report = _load(_model_config('resnet50_torchvision', tmp_path / 'resnet50.pth'), 64)
  assert report.skipped == [
      'predictions: the model has a new head (config.model.include_top is False)'
  ]
  # A ResNet101 file has every ResNet50 layer, and more: refused, not silently cut.
  with pytest.raises(weights.WeightFileError, match='has 102 layers this backbone lacks'):
    _load(_model_config('resnet50_torchvision', tmp_path / 'resnet101.safetensors'), 64)


def test_weight_names_are_checked_against_the_backbone():
  config_lib.validate(_model_config('resnet50', 'keras:imagenet'))
  config_lib.validate(_model_config('resnet50_torchvision', 'torchvision:IMAGENET1K_V1'))
  config_lib.validate(_model_config('vgg16', '/data/vgg16_notop.h5'))
  with pytest.raises(
      config_lib.ConfigError,
      match=r"config.model.weights='keras:imagenet': no "
      r"such weights for backbone 'resnet50_torchvision'; known: \['imagenet', "
      r"'torchvision:IMAGENET1K_V1', 'torchvision:IMAGENET1K_V2'\]",
  ):
    config_lib.validate(_model_config('resnet50_torchvision', 'keras:imagenet'))
  with pytest.raises(weights.WeightFileError, match='no such file'):
    weights.resolve('/nonexistent/w.h5', 'resnet50', False)


def test_sources_are_complete():
  for source in weights.SOURCES:
    assert source.backbone in models.BACKBONES
    # (Checksums and URLs: against Keras and torchvision, in the two tests below.)
    assert source.top1.endswith('%') and source.licence
    assert source.full.url.startswith('https://')
    assert weights.named_source('imagenet', source.backbone) is not None
  assert weights.named_source('keras:imagenet', 'resnet50').file(False).filename == (
      'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5'
  )


# The torchvision side, in a process of its own (torchvision after TensorFlow crashes; see
# tests/torchvision_reference.py): each ResNet50 weight enum's URL, the sha256 prefix torch
# hub checks (its HASH_REGEX on the file name), top-1, the names of its metadata (where a
# full checksum would be) and the default.
_TORCHVISION_WEIGHTS = """
import json
import torch.hub
from torchvision.models import ResNet50_Weights
out = {w.name: {'url': w.url, 'acc1': w.meta['_metrics']['ImageNet-1K']['acc@1'],
                'prefix': torch.hub.HASH_REGEX.search(w.url.rsplit('/', 1)[1]).group(1),
                'meta': sorted(w.meta)}
       for w in ResNet50_Weights}
print(json.dumps({'weights': out, 'default': ResNet50_Weights.DEFAULT.name}))
"""


def test_keras_checksums_and_urls_are_those_of_the_installed_keras():
  """Each `keras:imagenet` file against keras.applications' own code (no network): the
  URL it downloads and the md5 `file_hash` it checks, with and without the top; and each
  entry's `checksum_source` names the installed Keras source file that holds its md5s."""
  import importlib  # pylint: disable=g-import-not-at-top
  import inspect  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top

  published = {}  # url -> md5, as Keras downloads and checks it
  resnet = importlib.import_module('keras.src.applications.resnet')
  assert 'f"{weights_name}_weights_tf_dim_ordering_tf_kernels_notop.h5"' in inspect.getsource(
      resnet
  )
  for name, (full, notop) in resnet.WEIGHTS_HASHES.items():
    stem = f'{resnet.BASE_WEIGHTS_PATH}{name}_weights_tf_dim_ordering_tf_kernels'
    published[f'{stem}.h5'], published[f'{stem}_notop.h5'] = full, notop
  for module_name in ('vgg16', 'xception'):
    module = importlib.import_module(f'keras.src.applications.{module_name}')
    calls = re.findall(
        r'get_file\(\s*"([^"]+)",\s*(WEIGHTS_PATH(?:_NO_TOP)?),\s*'
        r'cache_subdir="models",\s*file_hash="([0-9a-f]{32})"',
        inspect.getsource(module),
    )
    assert len(calls) == 2, module_name  # the file with the top and the one without
    for filename, constant, md5 in calls:
      url = getattr(module, constant)
      assert url.endswith('/' + filename)
      published[url] = md5
  # The families Keras checks by md5 (ConvNeXt's sha256s: tests/test_convnext.py; the
  # EfficientNets' md5s, in files named otherwise: tests/test_efficientnet.py).
  keras_sources = [
      s
      for s in weights.SOURCES
      if s.name == 'keras:imagenet' and s.full.md5 and not s.backbone.startswith('efficientnet')
  ]
  assert sorted(s.backbone for s in keras_sources) == [
      'resnet101',
      'resnet152',
      'resnet50',
      'vgg16',
      'xception',
  ]
  for source in keras_sources:
    for file in (source.full, source.notop):
      assert file.url in published, file.url
      assert (file.md5, file.sha256, file.sha256_prefix) == (published[file.url], None, None)
    named = re.fullmatch(
        r"Keras' md5s, in keras.applications' `(keras/src/applications/" r'(\w+)\.py)`',
        source.checksum_source,
    )
    assert named, source.checksum_source
    module = importlib.import_module(f'keras.src.applications.{named.group(2)}')
    assert Path(inspect.getsourcefile(module)).as_posix().endswith('/' + named.group(1))
    text = Path(inspect.getsourcefile(module)).read_text()
    assert source.full.md5 in text and source.notop.md5 in text, source.backbone


def test_torchvision_checksums_and_urls_are_those_of_the_installed_torchvision():
  """Each `torchvision:` entry against torchvision's weight enums: its URL, top-1 and
  checksum, which is exactly the 8-hex sha256 prefix in the file name, as its
  `checksum_source` says: torchvision publishes no other (none in the enums' metadata)."""
  import json  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  done = subprocess.run(
      [sys.executable, '-c', _TORCHVISION_WEIGHTS],
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  published = json.loads(done.stdout.strip().splitlines()[-1])
  ours = {s.name: s for s in weights.SOURCES if s.backbone == 'resnet50_torchvision'}
  assert sorted(ours) == sorted(f'torchvision:{n}' for n in published['weights'])
  for name, tv in published['weights'].items():
    source = ours[f'torchvision:{name}']
    assert source.notop is None
    assert (source.full.url, source.full.sha256_prefix) == (tv['url'], tv['prefix'])
    assert source.full.md5 is None and source.full.sha256 is None
    assert source.top1 == f"{tv['acc1']:.2f}%"
    assert re.fullmatch(r'resnet50-([0-9a-f]{8})\.pth', source.full.filename).group(1) == (
        source.full.sha256_prefix
    )
    assert source.checksum_source.startswith('the 8-hex sha256 prefix in the file name')
    assert not [k for k in tv['meta'] if 'sha' in k.lower() or 'hash' in k.lower()], tv['meta']
  assert weights.sources.DEFAULTS['resnet50_torchvision'] == (f"torchvision:{published['default']}")


def test_docs_list_every_source():
  """docs/models_and_weights.md lists every named source (the README links to it)."""
  page = (helpers.ROOT / 'docs' / 'models_and_weights.md').read_text()
  assert weights.sources.markdown_table() in page


def test_imagenet_class_names():
  classes = zero_shot.imagenet_classes()
  assert len(classes) == 1000 and len({w for w, _ in classes}) == 1000
  assert classes[0] == ('n01440764', 'tench')
  assert classes[101] == ('n01871265', 'tusker')
  assert classes[386] == ('n02504458', 'African_elephant')


def test_zero_shot_predict_matches_keras(keras, keras_file, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  path, reference = keras_file('resnet50', True)
  rng = np.random.default_rng(3)
  paths = []
  for i, size in enumerate([(80, 50), (64, 64)]):  # resized to 64x64 on the way in
    paths.append(str(tmp_path / f'img{i}.png'))
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(paths[-1])
  cfg = _model_config('resnet50', path, include_top=True, image_size=64)
  got = zero_shot.predict_files(cfg, paths, k=3)
  images = np.stack([read_image(p, 64) for p in paths]).astype(np.float32)
  logits = np.asarray(reference(keras.applications.resnet.preprocess_input(images)))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  classes = zero_shot.imagenet_classes()
  for row, best in zip(probs, got):
    top = np.argsort(-row)[:3]
    assert [name for name, _ in best] == [f'{classes[i][1]} ({classes[i][0]})' for i in top]
    np.testing.assert_allclose([p for _, p in best], row[top], rtol=1e-4)


def test_converted_checkpoint_loads_the_same(keras_file, tmp_path):
  from tests import scripts_loader  # pylint: disable=g-import-not-at-top

  convert_weights = scripts_loader.load('convert_weights')
  path, _ = keras_file('xception', False)
  convert_weights.convert('xception', str(path), str(tmp_path / 'ckpt'))
  _, direct, _ = _load(_model_config('xception', path), 71)
  _, converted, report = _load(_model_config('xception', tmp_path / 'ckpt'), 71)
  assert report.initialised == ['head/dense']
  helpers.assert_same_backbone(direct, converted, ('params', 'batch_stats'))


def test_training_from_a_keras_file_keeps_the_frozen_part_as_in_the_file(keras_file, tmp_path):
  path, _ = keras_file('vgg16', False)
  cfg = _model_config('vgg16', path, image_size=32)
  cfg.batch_size = 16
  cfg.data.max_examples = 32
  cfg.phases = (config_lib.phase(name='block5', freeze='layers[:15]', learning_rate=1e-3),)
  # What an earlier run that died before its first checkpoint leaves behind: the weights
  # must still be loaded, not skipped as if resuming.
  (tmp_path / 'run' / 'checkpoints' / 'latest' / '7.orbax-checkpoint-tmp-1').mkdir(parents=True)
  train.train_and_evaluate(cfg, tmp_path / 'run', devices=jax.devices()[:2])
  step_dir = max(
      (p for p in (tmp_path / 'run' / 'checkpoints' / 'latest').iterdir() if p.name.isdigit()),
      key=lambda p: int(p.name),
  )
  state = ocp.StandardCheckpointer().restore(step_dir / 'state')
  trained = state['params']['backbone']
  layers = [layer for layer in models.BACKBONES['vgg16'].build().layers if layer.kind == 'Conv2D']
  for layer, (_, arrays) in zip(layers, files.read_keras_h5(path), strict=True):
    frozen = not layer.name.startswith('block5')  # layers[:15] ends with block4_pool
    for key, value in zip(('kernel', 'bias'), arrays):
      same = np.asarray(trained[layer.name][key]).tobytes() == value.tobytes()
      assert same == frozen, (layer.name, key)
