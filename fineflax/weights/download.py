"""The weight cache: look-up, download with a progress bar, checksums.

Look-up order: an explicit path (elsewhere), then `$FINEFLAX_CACHE/weights/<file name>`
(default `~/.cache/fineflax`), then a download from the file's URL, or from
`$FINEFLAX_WEIGHTS_MIRROR/<file name>` when that is set. A download goes into a temporary
file in the cache directory, is checksummed, and only then renamed into place. A file
whose checksum does not match is never loaded; a failed download leaves nothing behind.

With several processes, process 0 fetches a file first while the others wait; then they
look it up (in a shared cache they find it and only check it) or, when process 0 failed,
stop with its error (`fineflax.distributed.once.process_zero_first`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import BinaryIO

from fineflax.distributed import runtime
from fineflax.distributed.once import process_zero_first
from fineflax.weights.files import WeightFileError
from fineflax.weights.sources import WeightFile

TIMEOUT_S = 10  # per socket operation: an unreachable host fails fast, no retry loop
_CHUNK = 1 << 20


class WeightsUnavailableError(WeightFileError):
  """The file is not in the cache and cannot be downloaded."""


class ChecksumError(WeightFileError):
  """A file whose content does not hash to the expected checksum."""


def cache_dir() -> Path:
  """Where weight files are kept: `$FINEFLAX_CACHE/weights`."""
  return runtime.cache_root() / 'weights'


def download_url(file: WeightFile) -> str:
  """The file's URL, or its name under `$FINEFLAX_WEIGHTS_MIRROR` when that is set."""
  mirror = os.environ.get('FINEFLAX_WEIGHTS_MIRROR')
  return f'{mirror.rstrip("/")}/{file.filename}' if mirror else file.url


def _hashes(path: Path, file: WeightFile) -> tuple[str | None, str | None]:
  """(md5, sha256) of the content, each only when `file` has a checksum of that kind."""
  md5 = hashlib.md5() if file.md5 else None
  sha256 = hashlib.sha256() if file.sha256 or file.sha256_prefix else None
  with path.open('rb') as f:
    for chunk in iter(lambda: f.read(_CHUNK), b''):
      for h in (md5, sha256):
        if h is not None:
          h.update(chunk)
  return md5 and md5.hexdigest(), sha256 and sha256.hexdigest()


def matches(file: WeightFile, md5: str | None, sha256: str | None) -> bool:
  """Whether the hashes agree with every checksum `file` records."""
  return (
      (file.md5 is None or file.md5 == md5)
      and (file.sha256 is None or file.sha256 == sha256)
      and (file.sha256_prefix is None or (sha256 or '').startswith(file.sha256_prefix))
  )


def verify(path: Path, file: WeightFile, name: Path | None = None, url: str | None = None) -> None:
  """Raises ChecksumError unless `path` holds `file`'s content.

  Args:
    name: the path to name in the message (the cache path of a download under way).
    url: where the content came from.
  """
  md5, sha256 = _hashes(path, file)
  if not matches(file, md5, sha256):
    got = ', '.join(f'{k} {v}' for k, v in [('md5', md5), ('sha256', sha256)] if v)
    raise ChecksumError(
        f'{name or path}: checksum mismatch ({got}; expected '
        f'{file.checksums()}); the file is refused. Put a good copy of '
        f'{url or file.url} there'
    )


def _progress(done: int, total: int | None, start: float, name: str) -> None:
  rate = done / max(time.perf_counter() - start, 1e-6) / 2**20
  size = f'/{total / 2**20:.1f}' if total else ''
  pct = f' {100 * done / total:5.1f}%' if total else ''
  sys.stderr.write(f'\r{name}:{pct} {done / 2**20:.1f}{size} MiB, {rate:.1f} MiB/s')
  sys.stderr.flush()


class _NetworkError(Exception):
  pass


def fetch(file: WeightFile) -> Path:
  """The cached path of `file`, downloading it first if it is not in the cache.

  With several processes, process 0 does it first and the others after it, so that a
  shared cache gets one download (every process must call it for the same files).

  Raises:
    ChecksumError: the cached or downloaded content does not match (a download is
      deleted; a file already in the cache is left for the user to replace).
    WeightsUnavailableError: not cached and not downloadable; the message names the
      URL, the checksum and the exact path to put the file at.
    WeightFileError: the cache directory cannot be written.
    ProcessZeroFailedError: on processes other than 0, when process 0 failed at it.
  """
  return process_zero_first(f'fetching {file.filename}', lambda: _fetch_here(file))


def _fetch_here(file: WeightFile) -> Path:
  """`fetch` in this process alone."""
  path = cache_dir() / file.filename
  if path.exists():
    verify(path, file)
    return path
  url = download_url(file)
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f'.{file.filename}.', suffix='.part')
    tmp = Path(tmp_name)
    with os.fdopen(fd, 'wb') as out:
      _download(url, out, file.filename)
    verify(tmp, file, name=path, url=url)
    os.replace(tmp, path)
  except _NetworkError as e:
    raise WeightsUnavailableError(
        f'cannot download {url} ({e}). Offline, put the file at {path} (expected '
        f'{file.checksums()}), or pass its path as config.model.weights'
    ) from None
  except OSError as e:
    raise WeightFileError(
        f'cannot write {path} ({e}); set FINEFLAX_CACHE to a writable '
        'directory with room for the file'
    ) from None
  finally:
    if tmp is not None:
      tmp.unlink(missing_ok=True)
  return path


def _download(url: str, out: BinaryIO, name: str) -> None:
  """Copies `url` into `out` with a progress bar; network failures are _NetworkError."""
  start = time.perf_counter()
  try:
    response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
  except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
    raise _NetworkError(getattr(e, 'reason', e)) from None
  with response:
    total = int(response.headers.get('Content-Length') or 0) or None
    done = 0
    while True:
      try:
        chunk = response.read(_CHUNK)
      except (OSError, http.client.HTTPException) as e:
        raise _NetworkError(f'the transfer broke off after {done} bytes: {e}') from None
      if not chunk:
        break
      out.write(chunk)
      done += len(chunk)
      _progress(done, total, start, name)
  sys.stderr.write('\n')
  if total is not None and done != total:
    raise _NetworkError(f'got {done} of {total} bytes')
