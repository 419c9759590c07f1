"""The weight cache and downloads, against an HTTP server on 127.0.0.1."""

import hashlib
import socket
import threading
import time

import pytest

from fineflax import weights
from fineflax.weights import download
from tests import local_server


@pytest.fixture
def server(tmp_path):
  """Serves tmp_path/'served' on 127.0.0.1; yields (base URL, served dir, request log)."""
  served = tmp_path / 'served'
  served.mkdir()
  with local_server.serve(served) as (url, requests):
    yield url, served, requests


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv('FINEFLAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.delenv('FINEFLAX_WEIGHTS_MIRROR', raising=False)
  return tmp_path / 'cache' / 'weights'


def test_download_verifies_caches_and_is_not_repeated(server, cache, capfd):
  base, served, requests = server
  content = bytes(range(256)) * 5000
  (served / 'w_notop.h5').write_bytes(content)
  file = weights.WeightFile(f'{base}/w_notop.h5', md5=hashlib.md5(content).hexdigest())
  path = download.fetch(file)
  assert path == cache / 'w_notop.h5' and path.read_bytes() == content
  assert '100.0%' in capfd.readouterr().err  # the progress bar
  assert download.fetch(file) == path
  assert requests == ['/w_notop.h5']  # the second call found it in the cache
  assert [p.name for p in cache.iterdir()] == ['w_notop.h5']


@pytest.mark.parametrize('kind', ['sha256', 'sha256_prefix'])
def test_sha256_checksums_are_checked(server, cache, kind):
  base, served, _ = server
  (served / 'w.pth').write_bytes(b'weights')
  sha = hashlib.sha256(b'weights').hexdigest()
  good = sha if kind == 'sha256' else sha[:8]
  bad = ('0' * 64) if kind == 'sha256' else '00000000'
  with pytest.raises(weights.ChecksumError, match='checksum mismatch'):
    download.fetch(weights.WeightFile(f'{base}/w.pth', **{kind: bad}))
  assert not cache.exists() or list(cache.iterdir()) == []
  path = download.fetch(weights.WeightFile(f'{base}/w.pth', **{kind: good}))
  assert path.read_bytes() == b'weights'


def test_wrong_checksum_is_refused_and_leaves_nothing(server, cache):
  base, served, _ = server
  (served / 'w.h5').write_bytes(b'not the weights')
  file = weights.WeightFile(f'{base}/w.h5', md5='0' * 32)
  with pytest.raises(weights.ChecksumError) as error:
    download.fetch(file)
  message = str(error.value)
  assert message.startswith(f'{cache / "w.h5"}: checksum mismatch')
  assert 'expected md5 ' + '0' * 32 in message and f'{base}/w.h5' in message
  assert not cache.exists() or list(cache.iterdir()) == []


def test_a_file_without_checksum_is_not_a_source():
  with pytest.raises(ValueError, match='needs a checksum'):
    weights.WeightFile('https://example.org/w.h5')


def test_a_mirror_that_is_no_url_and_an_unwritable_cache_are_clear_errors(tmp_path, monkeypatch):
  file = weights.WeightFile('https://example.org/w.h5', md5='a' * 32)
  monkeypatch.setenv('FINEFLAX_WEIGHTS_MIRROR', str(tmp_path))  # a folder, not a URL
  with pytest.raises(weights.WeightsUnavailableError, match='cannot download'):
    download.fetch(file)
  blocker = tmp_path / 'not-a-dir'
  blocker.write_text('')
  monkeypatch.setenv('FINEFLAX_CACHE', str(blocker))
  with pytest.raises(weights.WeightFileError, match='set FINEFLAX_CACHE to a writable'):
    download.fetch(file)


def test_a_corrupt_cached_file_is_refused_not_loaded(cache):
  cache.mkdir(parents=True)
  (cache / 'w.h5').write_bytes(b'truncated')
  file = weights.WeightFile('http://127.0.0.1:9/w.h5', md5='0' * 32)
  with pytest.raises(weights.ChecksumError, match='is refused'):
    download.fetch(file)


def test_unreachable_server_fails_fast_naming_the_path(cache):
  with socket.socket() as s:  # a port nothing listens on
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  file = weights.WeightFile(f'http://127.0.0.1:{port}/resnet50_notop.h5', md5='a' * 32)
  start = time.perf_counter()
  with pytest.raises(weights.WeightsUnavailableError) as error:
    download.fetch(file)
  assert time.perf_counter() - start < 10
  message = str(error.value)
  assert f'http://127.0.0.1:{port}/resnet50_notop.h5' in message
  assert str(cache / 'resnet50_notop.h5') in message and 'md5 ' + 'a' * 32 in message
  assert not cache.exists() or list(cache.iterdir()) == []


def test_a_host_that_accepts_but_never_answers_gives_up_within_the_timeout(cache, monkeypatch):
  """The slow offline case (a firewall that drops packets, a proxy that hangs): a socket
  that accepts the connection (the kernel does, from its backlog) and never sends a
  byte. The download gives up after the module's per-operation timeout, not later, with
  the one-line error naming the URL and where to put the file."""
  monkeypatch.setattr(download, 'TIMEOUT_S', 1.0)  # the real 10 s would slow the suite
  silent = socket.socket()
  silent.bind(('127.0.0.1', 0))
  silent.listen(8)  # never accept()ed, never answered
  port = silent.getsockname()[1]
  file = weights.WeightFile(f'http://127.0.0.1:{port}/xception_notop.h5', md5='b' * 32)
  outcome = {}

  def attempt():
    try:
      download.fetch(file)
    except Exception as e:  # pylint: disable=broad-except
      outcome['error'] = e
    outcome['seconds'] = time.perf_counter() - start

  start = time.perf_counter()
  worker = threading.Thread(target=attempt, daemon=True)
  worker.start()
  worker.join(download.TIMEOUT_S + 5)  # margin for a loaded machine
  hung = worker.is_alive()
  silent.close()  # lets a download that hangs end (a reset), so the thread ends too
  worker.join(5)
  assert not hung, f'still waiting after {download.TIMEOUT_S + 5} s'
  assert outcome['seconds'] >= download.TIMEOUT_S * 0.9  # it did wait for the host
  error = outcome['error']
  assert isinstance(error, weights.WeightsUnavailableError), repr(error)
  message = str(error)
  assert '\n' not in message
  assert message.startswith(f'cannot download http://127.0.0.1:{port}/xception_notop.h5 (')
  assert 'timed out' in message
  assert str(cache / 'xception_notop.h5') in message and 'md5 ' + 'b' * 32 in message
  assert not cache.exists() or list(cache.iterdir()) == []


def test_named_source_through_a_mirror(server, cache, monkeypatch):
  """'keras:imagenet' asks the mirror for Keras' file name, and refuses a file that is not
  the published one."""
  base, served, requests = server
  monkeypatch.setenv('FINEFLAX_WEIGHTS_MIRROR', base)
  name = 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5'
  (served / name).write_bytes(b'an impostor')
  with pytest.raises(weights.ChecksumError, match='4d473c1dd8becc155b73f8504c6f6626'):
    weights.resolve('keras:imagenet', 'resnet50', include_top=False)
  assert requests == [f'/{name}']
