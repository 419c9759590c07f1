"""An HTTP server on 127.0.0.1 for the download tests: it serves a folder and logs the
paths asked for."""

import contextlib
import functools
import http.server
import threading
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def serve(directory: Path, delay_s: float = 0.0) -> Iterator[tuple[str, list[str]]]:
  """Serves `directory`, answering each request after `delay_s`; yields (base URL, the
  list the requested paths are appended to)."""
  requests: list[str] = []

  class Handler(http.server.SimpleHTTPRequestHandler):

    def do_GET(self):
      requests.append(self.path)
      time.sleep(delay_s)
      super().do_GET()

    def log_message(self, *args):
      pass

  httpd = http.server.ThreadingHTTPServer(
      ('127.0.0.1', 0), functools.partial(Handler, directory=str(directory))
  )
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{httpd.server_address[1]}', requests
  finally:
    httpd.shutdown()
    httpd.server_close()
