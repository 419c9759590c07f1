"""Random access by index to a tfds split prepared as tfrecord files (tfds' default).

tfds reads by index (`tfds.data_source`) only datasets prepared as array_record (or
parquet) files, and tf.data reads a tfrecord file in order only: neither gives the
streaming path (`fineflax.data.stream`) what it is built on, one global permutation of
the split every epoch, each process reading its rows of it, and an O(1) resume at any
batch. A tfrecord file is a plain sequence of records,

  uint64 length | uint32 masked CRC-32C of length | data[length] | uint32 masked CRC of data

(little-endian), so an index of where each record starts is built once by reading only
the 12-byte headers and seeking past the data (`shard_index`); then record i is one
`pread` and tfds' own `deserialize_example_np` (what its array_record data source
decodes with).

The index costs one small read per record of the split at start-up (docs/data.md gives
the figures), on every process; the files must be on a local (or mounted) file system.
"""

from __future__ import annotations

import io
import os
import struct
import threading
from typing import Any, Sequence

import google_crc32c
import numpy as np

from fineflax.errors import ConfigError, DataError

_HEADER = 12  # uint64 length, uint32 masked CRC of the length
_FOOTER = 4  # uint32 masked CRC of the data
# Bytes read at a time while indexing: a page holds the next header of a large record
# (one read per record, as the disk reads no less) and several of small ones.
_WINDOW = 16 * 1024
_MASK_DELTA = 0xA282EAD8
# Files a reading thread keeps open (ImageNet has 1024 shards; grain runs up to 16
# threads, and the usual limit is 1024 descriptors a process).
_OPEN_FILES = 32


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`, as tfrecord files use it."""
  return google_crc32c.value(data)


def masked_crc(data: bytes) -> int:
  """The CRC as tfrecord files store it: rotated and offset, because a CRC of data that
  itself holds CRCs is weak."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _local(path: str) -> str:
  if '://' in path:
    raise ConfigError(
        f'{path}: streaming a tfds dataset prepared as tfrecord files reads '
        'them by offset and needs them on a local or mounted file system'
    )
  return path


def shard_index(path: str, count: int, whole: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(offsets, lengths) of the first `count` records of the tfrecord file `path`: where
  each record's header starts and its data's length. `whole`: `count` is the number of
  records the file holds, and a file holding more is an error too.

  Raises:
    DataError: the file ends early, or a header is not a tfrecord header (its CRC).
  """
  offsets = np.empty(count, np.int64)
  lengths = np.empty(count, np.int64)
  try:
    with open(_local(path), 'rb', buffering=0) as f:
      fd = f.fileno()
      size = os.fstat(fd).st_size
      window, start, pos = b'', 0, 0
      for k in range(count):
        at = pos - start
        if at + _HEADER > len(window):
          window, start, at = os.pread(fd, _WINDOW, pos), pos, 0
          if len(window) < _HEADER:
            raise DataError(
                f'{path}: truncated: it ends at byte {size} after {k} records, '
                f'fewer than the {count} tfds lists'
            )
        length, crc = struct.unpack_from('<QI', window, at)
        if masked_crc(window[at : at + 8]) != crc:
          raise DataError(
              f'{path}: not a tfrecord file, or corrupted: the header of '
              f'record {k} at byte {pos} fails its CRC'
          )
        end = pos + _HEADER + length + _FOOTER
        if end > size:
          raise DataError(
              f'{path}: truncated: record {k} at byte {pos} ends at byte {end}, '
              f'past the end of the file ({size} bytes)'
          )
        offsets[k], lengths[k] = pos, length
        pos = end
  except OSError as e:
    raise DataError(f'{path}: {e.strerror or e}') from None
  if whole and pos != size:
    raise DataError(
        f'{path}: holds more than the {count} records tfds lists (they end at '
        f'byte {pos} of {size})'
    )
  return offsets, lengths


class TfrecordSource:
  """A tfds split prepared as tfrecord files, by index: `source[i]` -> the example's
  features as NumPy (`builder.info.features.deserialize_example_np`), as a
  `tfds.data_source` gives them.

  Picklable for grain's worker processes: each opens the files it reads itself, on first
  use (open files are not pickled). Each thread keeps its own `_OPEN_FILES` most recently
  read files open, so that no thread closes a file another is reading.
  """

  def __init__(
      self,
      files: Sequence[str],
      shard_ends: np.ndarray,
      offsets: np.ndarray,
      lengths: np.ndarray,
      features: Any,
  ):
    self.files = tuple(files)
    self.shard_ends = shard_ends  # the index one past each file's last example
    self.offsets = offsets
    self.lengths = lengths
    self.features = features
    self._open = threading.local()  # .files: {shard: io.FileIO}, least recently read first

  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k != '_open'}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state, _open=threading.local())

  def _file(self, shard: int) -> io.FileIO:
    """Shard `shard` opened for this thread (closed when evicted or collected)."""
    files = getattr(self._open, 'files', None)
    if files is None:
      files = self._open.files = {}
    file = files.pop(shard, None)
    if file is None:
      if len(files) >= _OPEN_FILES:
        files.pop(next(iter(files))).close()
      file = io.FileIO(self.files[shard], 'r')
    files[shard] = file
    return file

  def __len__(self) -> int:
    return len(self.offsets)

  def record(self, index: int) -> bytes:
    """The serialized example `index` (its tf.train.Example bytes)."""
    if not 0 <= index < len(self.offsets):
      raise IndexError(f'record {index} of {len(self.offsets)}')
    shard = int(np.searchsorted(self.shard_ends, index, side='right'))
    path = self.files[shard]
    offset, length = int(self.offsets[index]), int(self.lengths[index])
    try:
      raw = os.pread(self._file(shard).fileno(), _HEADER + length + _FOOTER, offset)
    except OSError as e:
      raise DataError(f'{path}: {e.strerror or e}') from None
    (stored,) = struct.unpack_from('<Q', raw) if len(raw) >= 8 else (None,)
    if len(raw) != _HEADER + length + _FOOTER or stored != length:
      raise DataError(f'{path}: the record at byte {offset} changed since it was indexed')
    data = raw[_HEADER : _HEADER + length]
    if masked_crc(data) != struct.unpack_from('<I', raw, _HEADER + length)[0]:
      raise DataError(f'{path}: the record at byte {offset} fails its CRC (corrupted)')
    return data

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.features.deserialize_example_np(self.record(int(index)))


def index_split(
    file_instructions: Sequence[Any], features: Any, limit: int | None = None
) -> TfrecordSource:
  """The split tfds describes by `file_instructions` (`builder.info.splits[split]
  .file_instructions`: each file's `skip` records left out, then `take` read) as a
  `TfrecordSource`, indexing only the records up to its first `limit` examples."""
  files, ends, offsets, lengths = [], [], [], []
  total = 0
  for instruction in file_instructions:
    if limit is not None and total >= limit:
      break
    take = instruction.take if limit is None else min(instruction.take, limit - total)
    if take <= 0:
      continue
    count = instruction.skip + take
    shard_offsets, shard_lengths = shard_index(
        str(instruction.filename), count, whole=count == instruction.examples_in_shard
    )
    files.append(str(instruction.filename))
    offsets.append(shard_offsets[instruction.skip :])
    lengths.append(shard_lengths[instruction.skip :])
    total += take
    ends.append(total)
  return TfrecordSource(
      files,
      np.asarray(ends, np.int64),
      np.concatenate(offsets) if offsets else np.zeros(0, np.int64),
      np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
      features,
  )
