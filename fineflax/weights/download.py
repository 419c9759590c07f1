"""The weight cache: look-up, download with a progress bar, checksums.

Look-up order: an explicit path (elsewhere), then `$FINEFLAX_CACHE/weights/<file name>`
(default `~/.cache/fineflax`), then a download from the file's URL, or from
`$FINEFLAX_WEIGHTS_MIRROR/<file name>` when that is set. A download goes into a temporary
file in the cache directory, is checksummed, and only then renamed into place. A file
whose checksum does not match is never loaded; a failed download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

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
  root = os.environ.get('FINEFLAX_CACHE') or Path.home() / '.cache' / 'fineflax'
  return Path(root) / 'weights'


def download_url(file: WeightFile) -> str:
  mirror = os.environ.get('FINEFLAX_WEIGHTS_MIRROR')
  return f'{mirror.rstrip("/")}/{file.filename}' if mirror else file.url


def _hashes(path: Path) -> tuple[str, str]:
  md5, sha256 = hashlib.md5(), hashlib.sha256()
  with path.open('rb') as f:
    for chunk in iter(lambda: f.read(_CHUNK), b''):
      md5.update(chunk)
      sha256.update(chunk)
  return md5.hexdigest(), sha256.hexdigest()


def matches(file: WeightFile, md5: str, sha256: str) -> bool:
  """Whether the hashes agree with every checksum `file` records."""
  return ((file.md5 is None or file.md5 == md5) and
          (file.sha256 is None or file.sha256 == sha256) and
          (file.sha256_prefix is None or sha256.startswith(file.sha256_prefix)))


def verify(path: Path, file: WeightFile) -> None:
  """Raises ChecksumError unless `path` holds `file`'s content."""
  md5, sha256 = _hashes(path)
  if not matches(file, md5, sha256):
    raise ChecksumError(f'{path}: checksum mismatch (md5 {md5}, sha256 {sha256}; expected '
                        f'{file.checksums()}); the file is refused. Replace it with a good '
                        f'copy of {file.url}')


def _progress(done: int, total: int | None, start: float, name: str) -> None:
  rate = done / max(time.perf_counter() - start, 1e-6) / 2**20
  size = f'/{total / 2**20:.1f}' if total else ''
  pct = f' {100 * done / total:5.1f}%' if total else ''
  sys.stderr.write(f'\r{name}:{pct} {done / 2**20:.1f}{size} MiB, {rate:.1f} MiB/s')
  sys.stderr.flush()


def fetch(file: WeightFile) -> Path:
  """The cached path of `file`, downloading it first if it is not in the cache.

  Raises:
    ChecksumError: the cached or downloaded content does not match (a download is
      deleted; a file already in the cache is left for the user to replace).
    WeightsUnavailableError: not cached and not downloadable; the message names the
      URL, the checksum and the exact path to put the file at.
  """
  path = cache_dir() / file.filename
  if path.exists():
    verify(path, file)
    return path
  url = download_url(file)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f'.{file.filename}.', suffix='.part')
  tmp = Path(tmp_name)
  try:
    with os.fdopen(fd, 'wb') as out:
      _download(url, out, file.filename)
    verify(tmp, file)
    os.replace(tmp, path)
  except (urllib.error.URLError, OSError) as e:
    raise WeightsUnavailableError(
        f'cannot download {url} ({getattr(e, "reason", e)}). Offline, put the file at '
        f'{path} (expected {file.checksums()}), or pass its path as config.model.weights'
    ) from None
  finally:
    tmp.unlink(missing_ok=True)
  return path


def _download(url: str, out, name: str) -> None:
  start = time.perf_counter()
  with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
    total = int(response.headers.get('Content-Length') or 0) or None
    done = 0
    for chunk in iter(lambda: response.read(_CHUNK), b''):
      out.write(chunk)
      done += len(chunk)
      _progress(done, total, start, name)
  sys.stderr.write('\n')
