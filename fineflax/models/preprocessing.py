"""Input normalisation of each weight family, applied on the device to uint8 images."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Keras `imagenet_utils.preprocess_input(mode='caffe')`: RGB->BGR, minus the BGR means.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# torchvision / timm ImageNet statistics, on [0, 1] RGB.
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


def caffe(x: jax.Array) -> jax.Array:
  """Keras ResNet / VGG: BGR, ImageNet means subtracted, no scaling."""
  return x[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR, x.dtype)


def tf(x: jax.Array) -> jax.Array:
  """Keras Xception / Inception: scaled to [-1, 1]."""
  return x / 127.5 - 1.0


def torch(x: jax.Array) -> jax.Array:
  """torchvision / timm: [0, 1], then ImageNet mean / std."""
  return (x / 255.0 - jnp.asarray(TORCH_MEAN, x.dtype)) / jnp.asarray(TORCH_STD, x.dtype)


def raw(x: jax.Array) -> jax.Array:
  """Keras ConvNeXt, EfficientNet and EfficientNetV2: [0, 255] as they are; the network
  rescales and normalises them itself (its Rescaling and Normalization layers)."""
  return x


PREPROCESSORS = {'caffe': caffe, 'tf': tf, 'torch': torch, 'raw': raw}


def preprocess(images: jax.Array, mode: str) -> jax.Array:
  """Maps [0, 255] RGB images (any dtype) to the model's float32 input."""
  try:
    fn = PREPROCESSORS[mode]
  except KeyError:
    raise ValueError(f'preprocessing {mode!r}: expected one of {sorted(PREPROCESSORS)}') from None
  return fn(images.astype(jnp.float32))


def resize(images: jax.Array, size: int | None) -> jax.Array:
  """Bilinear resize to size x size (Keras `Resizing` default: no antialiasing)."""
  if size is None or images.shape[1:3] == (size, size):
    return images
  shape = (images.shape[0], size, size, images.shape[3])
  return jax.image.resize(images.astype(jnp.float32), shape, method='bilinear', antialias=False)
