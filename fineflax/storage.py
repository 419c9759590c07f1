"""Where a run folder lives: a local folder or a Cloud Storage URL (gs://bucket/run).

Paths are `etils.epath` paths, as Orbax's: `gs://` goes through TensorFlow's gfile when
TensorFlow is installed and through gcsfs otherwise (`pip install 'fineflax[gcs]'`).

Object stores have no rename (it is a copy and a delete) and no append, but writing one
object is atomic: it appears whole or not at all. So a file that must never be seen half
written is written to a temporary name and renamed on a local disk, and written in one
go to an object store.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import socket
import tempfile
import urllib.parse
from typing import Any

from etils import epath

from fineflax.errors import ConfigError

# Seconds to wait for Cloud Storage to answer before saying that it cannot be reached:
# gcsfs would otherwise retry for most of a minute.
CONNECT_TIMEOUT_S = 10
# The URL schemes a run folder may have: those Orbax's checkpoints support end to end
# (tensorstore's gcs driver for the arrays, epath for the rest).
SCHEMES = ('gs',)
_URL = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*)://')


def scheme(path: Any) -> str | None:
  """The URL scheme of `path` ('gs'), or None for a local path."""
  match = _URL.match(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
  return match.group(1).lower() if match else None


def is_local(path: Any) -> bool:
  """Whether `path` is on a local (or mounted) file system."""
  return scheme(path) is None


def as_path(path: str | os.PathLike, what: str = 'run folder') -> epath.Path:
  """`path` as an epath.Path.

  Raises:
    ConfigError: a URL whose scheme is not supported, or gs:// without a library that
      reads it, in one line naming the URL.
  """
  kind = scheme(path)
  text = os.fspath(path)
  if kind is None:
    return epath.Path(text)
  if kind not in SCHEMES:
    # Without this, pathlib would turn 's3://b/r' into the local folder 's3:/b/r'.
    raise ConfigError(
        f'{text}: {kind}:// {what}s are not supported; use a local folder, '
        'gs://BUCKET/PATH or a mounted bucket'
    )
  if not (importlib.util.find_spec('tensorflow') or importlib.util.find_spec('gcsfs')):
    raise ConfigError(
        f"{text}: reading gs:// needs gcsfs (pip install 'fineflax[gcs]') " 'or TensorFlow'
    )
  problem = _unreachable(storage_endpoint())
  if problem:
    raise ConfigError(f'{text}: {problem}')
  _fresh_listings()
  return epath.Path(text)


@functools.cache
def _fresh_listings() -> None:
  """Turns off gcsfs' cache of folder listings (before its first use): a run folder is
  also written by other processes and by tensorstore, which that cache does not see, and
  a stale listing would resume from, or open, a step that is gone."""
  if importlib.util.find_spec('fsspec'):
    import fsspec.config  # pylint: disable=g-import-not-at-top

    fsspec.config.conf.setdefault('gs', {}).setdefault('use_listings_cache', False)


def storage_endpoint() -> tuple[str, int]:
  """(host, port) of Cloud Storage: $STORAGE_EMULATOR_HOST (gcsfs' and Google's clients'
  setting for an emulator) when set."""
  emulator = os.environ.get('STORAGE_EMULATOR_HOST')
  if not emulator:
    return 'storage.googleapis.com', 443
  url = urllib.parse.urlsplit(emulator if '://' in emulator else f'http://{emulator}')
  return url.hostname or 'localhost', url.port or (443 if url.scheme == 'https' else 80)


@functools.cache
def _unreachable(endpoint: tuple[str, int]) -> str | None:
  """Why `endpoint` cannot be reached, or None; asked once a process."""
  try:
    socket.create_connection(endpoint, timeout=CONNECT_TIMEOUT_S).close()
  except OSError as e:
    return (
        f'cannot reach Cloud Storage at {endpoint[0]}:{endpoint[1]} '
        f'({e.strerror or type(e).__name__}); a gs:// folder needs the network'
    )
  return None


def absolute(path: str | os.PathLike, what: str = 'run folder') -> epath.Path:
  """`as_path(path)`, made absolute when local (through a relative path Orbax finds no
  tree metadata)."""
  path = as_path(path, what)
  return epath.Path(os.path.abspath(os.fspath(path))) if is_local(path) else path


def write_atomic(path: epath.Path, data: bytes | str) -> None:
  """Writes `data` to `path` so that no reader ever sees part of it."""
  raw = data.encode('utf-8') if isinstance(data, str) else data
  if not is_local(path):
    path.write_bytes(raw)  # one object: atomic on an object store
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.fspath(path.parent), prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(raw)
    os.replace(tmp, os.fspath(path))
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def local_cache_folder(path: epath.Path, role: str) -> epath.Path:
  """`path` itself when it is local; else a local folder standing in for it (for files
  that must be on a local disk, such as memory-mapped arrays), under the system's
  temporary folder and named after the URL."""
  if is_local(path):
    return path
  name = re.sub(r'[^A-Za-z0-9_.-]+', '_', os.fspath(path)).strip('_')
  return epath.Path(tempfile.gettempdir()) / 'fineflax' / role / name
