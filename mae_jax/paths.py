"""Every file the project reads or writes, on a local disk or in a Cloud Storage bucket (`gs://`).

Local paths go through `os` exactly as before; URLs through `etils.epath` on fsspec + gcsfs (its backend
without TensorFlow, chosen here even where TensorFlow is installed: one client, the one tested against a
GCS emulator). Orbax's array data goes through TensorStore, which reads `gs://` itself. An object store
has no directories (a "folder" is a name prefix, there as long as an object has it), no appends and no
atomic create-if-absent through fsspec: the workdir lock and `metrics.jsonl` handle that (docs/gcs.md).
"""
import os

# Both read when gcsfs / etils are first imported. gcsfs's experimental zonal-bucket probe asks a control-plane
# API about every bucket (and logs a warning per call where it cannot); tf.io.gfile would be a second client.
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
os.environ.setdefault('EPATH_USE_TF', 'false')

import fsspec.config  # pylint: disable=wrong-import-position
from etils import epath  # pylint: disable=wrong-import-position

# gcsfs caches listings, but TensorStore (and every other host) writes checkpoint files behind its back.
fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)

from mae_jax.config import ConfigError  # pylint: disable=wrong-import-position

CHECK_TIMEOUT_S = 15  # the bucket check's one request: a network that drops packets fails in seconds, not minutes


class PathError(ConfigError):
  """A bucket that does not exist, or that this machine cannot reach or read."""


def is_remote(path):
  return '://' in str(path)


def absolute(path):
  """A local path made absolute (as the messages show it); a URL as it is, less a trailing slash."""
  return str(path).rstrip('/') if is_remote(path) else os.path.abspath(path)


def join(path, *names):
  return '/'.join([str(path).rstrip('/'), *names]) if is_remote(path) else os.path.join(path, *names)


def dirname(path):
  return str(path).rstrip('/').rsplit('/', 1)[0] if is_remote(path) else os.path.dirname(path)


def basename(path):
  return str(path).rstrip('/').rsplit('/', 1)[-1] if is_remote(path) else os.path.basename(path)


def exists(path):
  return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path):
  return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path):
  return epath.Path(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path):
  return [p.name for p in epath.Path(path).iterdir()] if is_remote(path) else os.listdir(path)


def subdirs(path):
  """The names of the folders directly in `path` (on an object store: the prefixes one level down)."""
  if is_remote(path):
    return [info['name'].rstrip('/').rsplit('/', 1)[-1] for info in _gcsfs().ls(_strip(path), detail=True)
            if info['type'] == 'directory']
  return [e.name for e in os.scandir(path) if e.is_dir()]


def makedirs(path):
  """A no-op on an object store: a prefix exists once an object has it."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def open_file(path, mode='r'):
  """`open()` for both; on an object store 'w' uploads the whole object at close (readers see the old or the
  new one, never a part) and 'a' is refused (gcsfs would silently overwrite)."""
  if not is_remote(path):
    return open(path, mode)  # pylint: disable=unspecified-encoding
  if 'a' in mode:
    raise ValueError(f'{path}: an object store cannot append ({mode!r})')
  return epath.Path(path).open(mode)


def read_bytes(path):
  with open_file(path, 'rb') as f:
    return f.read()


def rename(source, target):
  """Atomic locally; on an object store a copy then a delete of every object under `source`."""
  if is_remote(source):
    _gcsfs().mv(_strip(source), _strip(target), recursive=True)
  else:
    os.rename(source, target)


def remove(path):
  if is_remote(path):
    epath.Path(path).unlink()
  else:
    os.remove(path)


def walk_files(folder):
  """(path, size) of every file under `folder`, sorted; on an object store one listing of the prefix."""
  if is_remote(folder):
    fs = _gcsfs()
    found = fs.find(_strip(folder), detail=True)
    return sorted((f'gs://{name}', int(info['size'])) for name, info in found.items() if info['type'] == 'file')
  return sorted((os.path.join(root, name), os.path.getsize(os.path.join(root, name)))
                for root, _, files in os.walk(folder) for name in files)


def _strip(url):
  return str(url).split('://', 1)[1].rstrip('/')


def _gcsfs():
  import fsspec  # pylint: disable=import-outside-toplevel
  return fsspec.filesystem('gcs')


def storage_client():
  """A google-cloud-storage client: the emulator's (STORAGE_EMULATOR_HOST) or one with this machine's default
  credentials (a TPU VM's service account, `gcloud auth application-default login`, GOOGLE_APPLICATION_CREDENTIALS).
  Raises PathError when there are none."""
  import google.auth  # pylint: disable=import-outside-toplevel
  from google.auth import credentials as auth_credentials  # pylint: disable=import-outside-toplevel
  from google.cloud import storage  # pylint: disable=import-outside-toplevel
  if os.environ.get('STORAGE_EMULATOR_HOST'):
    return storage.Client(project='emulator', credentials=auth_credentials.AnonymousCredentials())
  try:
    # On a machine outside Google Cloud, the metadata-server probe is bounded by GCE_METADATA_TIMEOUT (3 s a try).
    credentials, project = google.auth.default(scopes=['https://www.googleapis.com/auth/devstorage.read_write'])
  except google.auth.exceptions.DefaultCredentialsError:
    raise PathError('no Google Cloud credentials on this machine (a TPU VM has its service account\'s; elsewhere run '
                    '`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS)') from None
  return storage.Client(project=project or 'none', credentials=credentials)


def bucket_and_name(url):
  bucket, _, name = _strip(url).partition('/')
  return bucket, name


def check_remote(url, what):
  """Raises PathError, one line starting with `what` (the flag or field), unless `url`'s bucket exists and this
  machine may list it: called before anything is built or compiled, so a typo'd bucket or missing credentials
  is not found at the first checkpoint. One request, no retries."""
  if not str(url).startswith('gs://'):
    raise PathError(f'{what}: only gs:// URLs are supported, or a local path (a shared filesystem is a local path)')
  from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
  bucket, name = bucket_and_name(url)
  try:
    client = storage_client()
    next(iter(client.list_blobs(bucket, prefix=name, max_results=1, timeout=CHECK_TIMEOUT_S, retry=None)), None)
  except PathError as e:
    raise PathError(f'{what}: {e}') from None
  except exceptions.NotFound:
    raise PathError(f'{what}: the bucket gs://{bucket} does not exist (create it with `gcloud storage buckets '
                    f'create gs://{bucket}`)') from None
  except exceptions.Forbidden as e:
    raise PathError(f'{what}: no permission to list gs://{bucket} with this machine\'s credentials '
                    f'({_first_line(e.message)}); it needs roles/storage.objectUser on the bucket') from None
  except Exception as e:  # pylint: disable=broad-except  # refused tokens, DNS, timeouts: all one answer
    raise PathError(f'{what}: cannot reach gs://{bucket} ({type(e).__name__}: {_first_line(e)})') from None


def _first_line(error):
  return str(error).strip().splitlines()[0][:300] if str(error).strip() else ''
