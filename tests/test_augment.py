"""On-device augmentation against Keras' own layers, reproducibility, and evaluation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineflax.data import augment as A

SIDE = 24
# Single-sample warps equal Keras' layers up to float32 rounding on a [0, 255] scale.
TOLERANCE = 1e-3


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).uniform(0, 255, (2, SIDE, SIDE, 3)).astype(np.float32)


def _warp(images, matrix, mode='reflect'):
  return np.asarray(A.warp(jnp.asarray(images), jnp.broadcast_to(matrix, (2, 3, 3)), SIDE, mode))


@pytest.mark.parametrize(
    'make_layer, matrix_kwargs',
    [
        (lambda k: k.layers.RandomRotation((0.25, 0.25)), dict(angle=math.pi / 2)),
        (lambda k: k.layers.RandomRotation((-30 / 360, -30 / 360)), dict(angle=-math.pi / 6)),
        (lambda k: k.layers.RandomZoom((0.5, 0.5)), dict(zoom=1.5)),
        (lambda k: k.layers.RandomZoom((-0.3, -0.3)), dict(zoom=0.7)),
        (
            lambda k: k.layers.RandomTranslation((0.1, 0.1), (-0.2, -0.2)),
            dict(dx=-0.2 * SIDE, dy=0.1 * SIDE),
        ),
        (
            lambda k: k.layers.RandomRotation((0.1, 0.1), fill_mode='constant'),
            dict(angle=0.2 * math.pi),
        ),
        (lambda k: k.layers.RandomZoom((0.4, 0.4), fill_mode='wrap'), dict(zoom=1.4)),
        (lambda k: k.layers.RandomZoom((0.4, 0.4), fill_mode='nearest'), dict(zoom=1.4)),
    ],
)
def test_matches_keras_layers_where_they_are_deterministic(
    keras, images, make_layer, matrix_kwargs
):
  """A Keras layer whose random range is a single value is deterministic."""
  layer = make_layer(keras)
  expected = np.asarray(layer(images, training=True))
  got = _warp(images, A.augmentation_matrix(SIDE, **matrix_kwargs), layer.fill_mode)
  assert np.abs(got - expected).max() <= TOLERANCE


def test_flips_are_exact(images):
  np.testing.assert_array_equal(
      _warp(images, A.augmentation_matrix(SIDE, hflip=True)), images[:, :, ::-1]
  )
  np.testing.assert_array_equal(
      _warp(images, A.augmentation_matrix(SIDE, vflip=True)), images[:, ::-1]
  )


@pytest.mark.parametrize('size', [56, 10])
def test_the_resize_is_jax_image_resize(images, size):
  expected = jax.image.resize(images, (2, size, size, 3), 'bilinear', antialias=False)
  got = A.prepare(jnp.asarray(images), None, A.Augment(), size, train=False)
  assert np.abs(np.asarray(got) - np.asarray(expected)).max() <= TOLERANCE


def test_reproducible_for_a_key_and_off_in_evaluation(images):
  aug = A.Augment(flip='horizontal_and_vertical', rotation=0.1, zoom=0.2, translate=0.1)
  keys = jax.random.split(jax.random.key(3), 2)
  first = np.asarray(A.prepare(jnp.asarray(images), keys, aug, 32, train=True))
  again = np.asarray(A.prepare(jnp.asarray(images), keys, aug, 32, train=True))
  other = np.asarray(
      A.prepare(jnp.asarray(images), jax.random.split(jax.random.key(4), 2), aug, 32, train=True)
  )
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).max() > 10
  evaluation = np.asarray(A.prepare(jnp.asarray(images), None, aug, 32, train=False))
  plain = np.asarray(A.prepare(jnp.asarray(images), None, A.Augment(), 32, train=False))
  np.testing.assert_array_equal(evaluation, plain)


def test_random_crop_takes_a_window_and_evaluation_the_centre(images):
  aug = A.Augment(crop=16)
  keys = jax.random.split(jax.random.key(0), 2)
  got = np.asarray(A.prepare(jnp.asarray(images), keys, aug, 16, train=True))
  for image, crop in zip(images, got):
    windows = [
        (y, x)
        for y in range(SIDE - 15)
        for x in range(SIDE - 15)
        if np.allclose(image[y : y + 16, x : x + 16], crop, atol=1e-3)
    ]
    assert len(windows) == 1
  centre = np.asarray(A.prepare(jnp.asarray(images), None, aug, SIDE, train=False))
  np.testing.assert_allclose(centre, images, atol=1e-3)  # square input: the whole image


def test_mixup_draws_do_not_depend_on_how_the_batch_is_split():
  """Partners permute the whole global batch; each example's weight comes from its global
  index: one device's draws for rows 0-7 are eight devices' draws put together."""
  key = jax.random.key(3)
  partner, lam = A.mixup_draws(key, 0.4, 8, jnp.arange(8))
  assert sorted(np.asarray(partner)) == list(range(8))  # a permutation: each once
  pieces = [A.mixup_draws(key, 0.4, 8, jnp.arange(i, i + 1)) for i in range(8)]
  np.testing.assert_array_equal(np.concatenate([p for p, _ in pieces]), partner)
  np.testing.assert_array_equal(np.concatenate([w for _, w in pieces]), lam)
  assert len(set(np.asarray(lam).tolist())) == 8  # one draw per example, not one per batch
  x = jnp.arange(4, dtype=jnp.float32)[:, None, None, None] * jnp.ones((4, 2, 2, 1))
  weights = jnp.array([0.0, 0.25, 0.5, 1.0])
  mixed = A.mix(x, x[::-1], weights)
  # w * own + (1 - w) * partner
  np.testing.assert_allclose(mixed[:, 0, 0, 0], [3.0, 1.75, 1.5, 3.0], rtol=1e-6)


@pytest.mark.parametrize('alpha', [0.4, 2.0])
def test_mixup_partners_and_weights_follow_their_distributions(alpha):
  """Over a global batch of 4000: the partners are a random permutation (each example
  once; not the identity, which mixes nothing, nor a shift or reversal: about one fixed
  point and no correlation with the index, as for a uniform permutation) and the weights
  are Beta(alpha, alpha) draws (Kolmogorov-Smirnov against scipy's Beta; uniform draws,
  or Beta of another alpha, are rejected at this size)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  n = 4000
  partner, lam = A.mixup_draws(jax.random.key(int(alpha * 10)), alpha, n, jnp.arange(n))
  partner, lam = np.asarray(partner), np.asarray(lam, np.float64)
  assert sorted(partner.tolist()) == list(range(n))
  assert np.sum(partner == np.arange(n)) <= 5  # P(more) < 1e-3 for a uniform permutation
  assert abs(np.corrcoef(partner, np.arange(n))[0, 1]) < 0.1  # sd 1 / sqrt(n) = 0.016
  assert stats.kstest(lam, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
  other = 2.0 if alpha < 1 else 0.4
  for wrong in (stats.uniform().cdf, stats.beta(other, other).cdf):
    assert stats.kstest(lam, wrong).pvalue < 1e-6
