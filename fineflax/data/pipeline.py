"""`config.data.pipeline`: whether a source's splits are decoded into memory or streamed.

In memory, a split is decoded once, before training, and batches are gathered from it (or
on the devices, when it fits there): fast and exact, for data that fits. Streamed
(`fineflax.data.stream`), a split is decoded batch by batch while training runs, with
memory that does not grow with the dataset. 'auto' streams when the decoded splits would
exceed `config.data.memory_max_mb`, or when the augmentation needs the original images.
"""

from __future__ import annotations

import logging
from typing import Any

import jax

from fineflax.errors import ConfigError

logger = logging.getLogger('fineflax.data')

RANDOM_RESIZED = 'random_resized'
PIPELINES = ('auto', 'memory', 'stream')


def streams(
    data_config: Any,
    decoded_bytes: int,
    cannot_stream: str | None = None,
    only_stream: str | None = None,
) -> bool:
  """Whether to stream the splits of `data_config.source`, whose decoded size is
  `decoded_bytes` in all (this process holds its share of it in memory); logs the choice
  and why. `cannot_stream`: why this source can only be read into memory, if so;
  `only_stream`: why it can only be streamed, if so.

  Raises:
    ConfigError: the pipeline asked for cannot read this source or do its crop.
  """
  spec, mode = data_config.source, data_config.pipeline
  random_resized = data_config.augment.crop == RANDOM_RESIZED
  share_mb = decoded_bytes / jax.process_count() / 2**20
  limit = data_config.memory_max_mb
  if cannot_stream:
    if mode == 'stream' or random_resized:
      why = (
          "config.data.pipeline='stream'"
          if mode == 'stream'
          else f'config.data.augment.crop={RANDOM_RESIZED!r} (it crops streamed images)'
      )
      raise ConfigError(f'{why}: config.data.source={spec!r}: {cannot_stream}')
    reason = cannot_stream
  elif mode == 'memory':
    if only_stream:
      raise ConfigError(
          f"config.data.pipeline='memory': config.data.source={spec!r}: "
          f"{only_stream}: set config.data.pipeline='stream' or 'auto'"
      )
    if random_resized:
      raise ConfigError(
          f'config.data.augment.crop={RANDOM_RESIZED!r} crops the original '
          "images as they are streamed: set config.data.pipeline='stream' or "
          "'auto'"
      )
    reason = "config.data.pipeline='memory'"
  elif mode == 'stream':
    reason = "config.data.pipeline='stream'"
  elif only_stream:
    reason = only_stream
  elif random_resized:
    reason = f'config.data.augment.crop={RANDOM_RESIZED!r} crops the original images'
  elif share_mb > limit:
    reason = f'{share_mb:.0f} MB decoded > config.data.memory_max_mb={limit}'
  else:
    reason = f'{share_mb:.1f} MB decoded <= config.data.memory_max_mb={limit}'
  stream = not cannot_stream and (
      mode == 'stream'
      or (mode == 'auto' and (bool(only_stream) or random_resized or share_mb > limit))
  )
  logger.info('data pipeline: %s (%s)', 'stream' if stream else 'memory', reason)
  return stream


def stream_load_size(data_config: Any, stream_size: int | None) -> int:
  """The side streamed images are delivered at: `config.data.load_size`, else
  `stream_size` (logged); a ConfigError when neither is set."""
  if data_config.load_size is not None:
    return data_config.load_size
  if stream_size is None:
    raise ConfigError(
        f'config.data.source={data_config.source!r} is streamed (see the line '
        'above): set config.data.load_size, the side images are delivered at'
    )
  logger.info(
      'config.data.load_size is None: streamed images are delivered at %d px, the '
      "model's input size",
      stream_size,
  )
  return stream_size
