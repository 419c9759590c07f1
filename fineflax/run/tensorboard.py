"""TensorBoard scalar summaries written without TensorFlow.

An event file is a TFRecord file of serialized `tensorflow.Event` protobufs. Both formats
are small and stable, so they are encoded here by hand: importing TensorFlow (seconds,
and gigabytes of address space) only to log a few scalars per epoch is not worth it.

TFRecord framing of each record:

    uint64 length | uint32 masked_crc(length) | data | uint32 masked_crc(data)

(all little-endian). The protobuf fields used (from tensorflow/core/util/event.proto and
tensorflow/core/framework/summary.proto):

    Event:         double wall_time = 1; int64 step = 2; string file_version = 3;
                   Summary summary = 5;
    Summary:       repeated Value value = 1;
    Summary.Value: string tag = 1; float simple_value = 2;
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Mapping

import jax
from etils import epath

from fineflax import storage
from fineflax.data.tfrecord_index import masked_crc

FILE_VERSION = 'brain.Event:2'


def tfrecord(data: bytes) -> bytes:
  """`data` framed as one TFRecord."""
  length = struct.pack('<Q', len(data))
  return length + struct.pack('<I', masked_crc(length)) + data + struct.pack('<I', masked_crc(data))


def _varint(value: int) -> bytes:
  # Negative int64 values are encoded as their 64-bit two's complement (10 bytes).
  value &= (1 << 64) - 1
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _key(field, 2) + _varint(len(payload)) + payload


def _summary_value(tag: str, value: float) -> bytes:
  return _length_delimited(1, tag.encode('utf-8')) + _key(2, 5) + struct.pack('<f', value)


def encode_event(
    wall_time: float,
    step: int = 0,
    file_version: str | None = None,
    scalars: Mapping[str, float] | None = None,
) -> bytes:
  """A serialized `Event` with either a file version or a summary of scalars."""
  out = _key(1, 1) + struct.pack('<d', wall_time)
  if step:  # proto3 leaves default values out
    out += _key(2, 0) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode('utf-8'))
  if scalars:
    summary = b''.join(
        _length_delimited(1, _summary_value(tag, value)) for tag, value in scalars.items()
    )
    out += _length_delimited(5, summary)
  return out


def _new_event_path(logdir: epath.Path) -> epath.Path:
  """`events.out.tfevents.<unix time>.<hostname>`, with a suffix when a run restarted
  within the same second already took that name (TensorBoard reads any file whose name
  holds 'tfevents')."""
  base = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}'
  path, n = logdir / base, 0
  while path.exists():
    n += 1
    path = logdir / f'{base}.{n}'
  return path


class _WholeObject:
  """A file-like writer of an object-store object: keeps every byte written, and writes
  them all at each flush."""

  def __init__(self, path: epath.Path):
    self._path, self._data = path, bytearray()

  def write(self, data: bytes) -> None:
    self._data += data

  def flush(self) -> None:
    storage.write_atomic(self._path, bytes(self._data))

  def close(self) -> None:
    self.flush()


class SummaryWriter:
  """Writes scalars to a new event file in `logdir`; a no-op on processes other than 0.

  Records are buffered until `flush` (the train loop flushes once per epoch), so a run
  that crashes keeps what was flushed. Every writer opens a new file, and TensorBoard
  merges the files of a directory, so a resumed run adds to the same curves. On an object
  store, which cannot append, each flush writes the whole file again (as TensorFlow's
  own writer does there); event files of scalars stay small.
  """

  def __init__(self, logdir: str | os.PathLike):
    self.path: epath.Path | None = None
    self._file = None
    if jax.process_index() != 0:
      return
    logdir = storage.as_path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    self.path = _new_event_path(logdir)
    if storage.is_local(self.path):
      # 'xb': two writers racing for one name must not share a file.
      self._file = open(self.path, 'xb')  # pylint: disable=consider-using-with
    else:
      self._file = _WholeObject(self.path)
    self._file.write(tfrecord(encode_event(time.time(), file_version=FILE_VERSION)))
    self.flush()

  def scalar(self, tag: str, value: float, step: int) -> None:
    """Records one scalar at `step`."""
    self.scalars({tag: value}, step)

  def scalars(self, values: Mapping[str, float | None], step: int, prefix: str = '') -> None:
    """Records every value that is not None at `step`, in one event; tags are
    `prefix/key` (just `key` without a prefix)."""
    if self._file is None:
      return
    prefix = prefix.rstrip('/')
    tagged = {
        f'{prefix}/{key}' if prefix else key: float(value)
        for key, value in values.items()
        if value is not None
    }
    if tagged:
      self._file.write(tfrecord(encode_event(time.time(), int(step), scalars=tagged)))

  def flush(self) -> None:
    """Hands what was written to the OS, so it survives a crash of this process."""
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    """Flushes and closes the file; the writer then ignores further calls."""
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> SummaryWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
