"""A Cloud Storage emulator on 127.0.0.1 for the gs:// run-folder tests.

It runs gcp-storage-emulator (PyPI) in a process of its own, keeping objects in memory,
with one bucket, and one addition: downloads carry the object's generation in
`x-goog-generation`, as Cloud Storage's do (tensorstore reads Orbax's OCDBT manifest
through it and refuses a download without one). `client_env` points every client
fineflax uses at it: etils.epath through gcsfs (EPATH_USE_TF=false; TensorFlow's gfile
cannot be pointed at an emulator), gcsfs and Google's clients through
STORAGE_EMULATOR_HOST, and tensorstore (which writes Orbax's arrays) through
TENSORSTORE_GCS_HTTP_URL with a fixed test token.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

BUCKET = 'fineflax-test'


def client_env(url: str) -> dict[str, str]:
  """The variables that point fineflax's storage clients at the emulator at `url`."""
  return {
      'STORAGE_EMULATOR_HOST': url,
      'TENSORSTORE_GCS_HTTP_URL': url,
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
      'EPATH_USE_TF': 'false',
      'FSSPEC_GCS_TOKEN': 'anon',
      # The emulator has no storage-control API for gcsfs' bucket-type lookup.
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
  }


@contextlib.contextmanager
def running(log: Path) -> Iterator[dict[str, str]]:
  """Starts the emulator (its output goes to `log`); yields the client variables."""
  # Imported here: the emulator's own process (_serve) needs neither it nor what it imports.
  from tests import helpers  # pylint: disable=g-import-not-at-top

  port = helpers.free_port()
  with open(log, 'wb') as out:
    process = subprocess.Popen(
        [sys.executable, __file__, str(port)], stdout=out, stderr=subprocess.STDOUT
    )
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        break
      except OSError:
        if process.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f'the storage emulator did not start: {log.read_text()[-2000:]}')
        time.sleep(0.1)
    yield client_env(f'http://127.0.0.1:{port}')
  finally:
    process.terminate()
    process.wait(10)


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
  """`env` set in this process for the block (for in-process clients)."""
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top

  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  # epath caches its choice of backend (EPATH_USE_TF) at the first gs:// path a process
  # makes, which in a test run may come before this block.
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access


def _serve(port: int) -> None:
  """Runs the emulator on `port` until terminated."""
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    except Exception:  # pylint: disable=broad-exception-caught  (not found: answered)
      return
    response['x-goog-generation'] = obj['generation']
    response['x-goog-metageneration'] = obj['metageneration']

  # Before the server module builds its routes from the handlers.
  objects.download = download_with_generation
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top

  server.create_server('127.0.0.1', port, in_memory=True, default_bucket=BUCKET).run()


if __name__ == '__main__':
  _serve(int(sys.argv[1]))
