"""Test setup: 8 virtual CPU devices for the data-parallel tests, Keras on JAX, an
on-disk compilation cache so that steps compiled by several tests compile once, and a
temporary $FINEFLAX_CACHE for every test and the programs they start: no test writes into
the user's cache."""

import importlib
import os
import sys
import tempfile
from pathlib import Path

# Both must be set before jax (or keras) is imported anywhere.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ['KERAS_BACKEND'] = 'jax'
os.environ['FINEFLAX_CACHE'] = tempfile.mkdtemp(prefix='fineflax-cache-')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='fineflax-xla-'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


@pytest.fixture(scope='session')
def keras():
  """Keras 3 on the JAX backend: the reference the Keras-layout models are checked against."""
  import keras as keras_module  # pylint: disable=g-import-not-at-top
  assert keras_module.backend.backend() == 'jax'
  return keras_module


@pytest.fixture(scope='session')
def demo_run(tmp_path_factory):
  """A finished run of the demo smoke config (two phases of one epoch; checkpoints at
  steps 2 and 4 in latest/, one in best/ by val_loss), trained once for the session on
  one device (it compiles faster than on eight). Tests read it; to change it, copy it."""
  from fineflax import train  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  config = importlib.import_module('configs.demo').get_config('smoke')
  assert config.data.val_split and config.data.test_split
  workdir = tmp_path_factory.mktemp('demo_smoke')
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir


# The fast tier (`pytest -m "not slow"`, under 2 minutes on two workers) leaves out the
# files that train runs, start programs or compare with Keras and torch; the full suite
# (the README's command) runs everything.
SLOW_FILES = frozenset({
    'test_bad_input', 'test_benchmark', 'test_checkpoint_layout', 'test_evaluate_cli',
    'test_failures', 'test_features', 'test_load_run', 'test_models', 'test_multihost',
    'test_multiprocess', 'test_optimizers', 'test_predict', 'test_researcher_path',
    'test_runtime', 'test_step', 'test_train', 'test_unreadable_images', 'test_weights',
    'test_data_order', 'test_configs', 'test_streaming', 'test_run_claims',
    'test_invariance_and_mutations', 'test_streaming_multiprocess', 'test_step_records',
    'test_streaming_memory', 'test_download_multiprocess', 'test_discriminative',
    'test_streaming_tfds', 'test_gcs_run_folder'})


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.module.__name__.rpartition('.')[2] in SLOW_FILES:
      item.add_marker(pytest.mark.slow)
