"""Test setup: 8 virtual CPU devices for the data-parallel tests, Keras on JAX, one on-disk
compilation cache for the session (both xdist workers and every program the tests start;
every compilation kept) so that steps compiled by several tests and programs compile
once, and a temporary $FINEFLAX_CACHE for every test and the programs they start: no test
writes into the user's caches."""

import importlib
import os
import sys
import tempfile

# Compilation is most of the suite's time, and the suite tests fineflax, not LLVM's
# optimiser: JAX's own switch compiles with XLA's backend at level 0 and without LLVM's
# expensive passes. On the 2-core CPU, four compile-bound files (the EfficientNet,
# ConvNeXt, ViT and step tests) took 209 -> 171 s at level 0. The few tests bound by
# execution instead (the demo's 16-epoch runs: 34 s at XLA's defaults, 66 s at level 0)
# switch it off for their training (tests/helpers.py: optimized_compilation): the two
# demo tests took 149 s with it on, 86 s with it off. Results stay within every
# tolerance; test_streaming_multiprocess's, which bounds the rounding between one process
# and two, was widened for it (measured 6.4e-5). The programs the tests start inherit the
# variable, so that a program and this process compile the same code and share the
# compilation cache. JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite at XLA's defaults.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# Both must be set before jax (or keras) is imported anywhere.
os.environ['XLA_FLAGS'] = ' '.join(
    filter(None, (os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8'))
)
os.environ['KERAS_BACKEND'] = 'jax'
os.environ['FINEFLAX_CACHE'] = tempfile.mkdtemp(prefix='fineflax-cache-')
# The xdist workers start with the controller's environment, which loaded this file
# first: they and every program the tests start share its folder. Programs whose test
# sets its own (a user's JAX_COMPILATION_CACHE_DIR) or unsets it keep theirs.
os.environ.setdefault('FINEFLAX_TEST_XLA_CACHE', tempfile.mkdtemp(prefix='fineflax-xla-'))
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ['FINEFLAX_TEST_XLA_CACHE']
# JAX keeps only compilations of 1 s or more by default; the many shorter ones (eval,
# metrics, the small models' steps) were compiled again by every run and program.
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'

# Loaded after TensorFlow (the export tests run SavedModels and LiteRT in this process),
# triton, which torch imports for the torchvision references, crashes the process on
# import (a segmentation fault: both carry LLVM); loaded first, both work.
try:
  import triton  # noqa: E402, F401
except ImportError:  # torch without triton
  pass

import jax  # noqa: E402
import pytest  # noqa: E402


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
  from tests.helpers import ROOT  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, str(ROOT))
  config = importlib.import_module('configs.demo').get_config('smoke')
  assert config.data.val_split and config.data.test_split
  workdir = tmp_path_factory.mktemp('demo_smoke')
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir


# xdist hands whole files to its workers in the order collected: the longest files go
# first (about 2-7 minutes each on the 2-core machine), so that neither worker is still in
# one of them when the other has run out of files. The other files keep their order.
LONGEST_FILES = (
    'test_configs.py',
    'test_train.py',
    'test_multihost.py',
    'test_streaming.py',
    'test_export.py',
    'test_efficientnet.py',
    'test_gcs_run_folder.py',
    'test_weights.py',
    'test_convnext.py',
    'test_benchmark.py',
    'test_streaming_memory.py',
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
