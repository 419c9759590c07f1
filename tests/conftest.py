"""Test setup: 8 virtual CPU devices for the data-parallel tests, Keras on JAX, and an
on-disk compilation cache so that steps compiled by several tests compile once."""

import os
import tempfile

# Both must be set before jax (or keras) is imported anywhere.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ['KERAS_BACKEND'] = 'jax'

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
