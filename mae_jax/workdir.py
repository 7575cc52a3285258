"""One run per workdir: a lock file that process 0 holds for the whole run.

Two runs on one workdir would both resume the same checkpoint and write the same steps, so the second is
refused. The lock is created atomically (O_CREAT | O_EXCL) and holds the pid, host and start time; it is
removed when the run ends, however it ends short of SIGKILL. A lock left by a killed process on this host
(its pid is gone) is taken over with a message; one from another host cannot be checked and is reported.

In a bucket (`gs://`) the lock is an object created with Cloud Storage's precondition "only if absent"
(`ifGenerationMatch=0`), so of two runs starting at once exactly one gets it. Its holder rewrites it every
`REFRESH_S` (same precondition on its own generation); a lock not rewritten for `STALE_S` is a run that is
gone (SIGKILL, a preempted VM, whose hostname may come back on another machine) and is taken over, as is one
of a dead pid on this host. Not guaranteed: a live run that cannot reach the bucket for `STALE_S` loses its
lock to a newcomer (a warning at its next refresh says so; orbax's commit keeps each checkpoint whole, but
the two runs then write the same steps); staleness uses this host's clock against the bucket's, which NTP keeps within
seconds on Cloud machines.
"""
import datetime
import json
import os
import socket
import threading
import time

from mae_jax import paths
from mae_jax.config import ConfigError

LOCK_NAME = 'mae_jax.lock'


REFRESH_S, STALE_S = 30, 180  # a pod re-created after a preemption waits at most 3 minutes


class WorkdirBusy(ConfigError):
  """Another run holds the workdir."""


def check(workdir):
  """A local workdir is created (its parent must exist) and must be writable; a bucket's must be reachable."""
  if paths.is_remote(workdir):
    paths.check_remote(workdir, f'--workdir={workdir}')
    return
  parent = os.path.dirname(os.path.abspath(workdir))
  if not os.path.isdir(parent):
    raise ConfigError(f'--workdir={workdir}: the parent directory {parent} does not exist')
  os.makedirs(workdir, exist_ok=True)
  if not os.access(workdir, os.W_OK):
    raise ConfigError(f'--workdir={workdir} is not writable')


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _read(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def describe(holder):
  return f"pid {holder['pid']} on host {holder['host']} since {holder['since']}"


def _me():
  return {'pid': os.getpid(), 'host': socket.gethostname(),
          'since': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}


def Lock(workdir, enabled=True):  # pylint: disable=invalid-name
  """`with Lock(workdir):` holds the workdir; `enabled=False` (processes other than 0) does nothing."""
  return (BucketLock if paths.is_remote(workdir) else FileLock)(workdir, enabled)


class FileLock:
  """The lock of a local (or shared-filesystem) workdir: a file created with O_CREAT | O_EXCL."""

  def __init__(self, workdir, enabled=True):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self.enabled, self.held = enabled, None

  def __enter__(self):
    if self.enabled:
      self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def acquire(self):
    me = _me()
    for _ in range(2):  # the second try follows the takeover of a stale lock
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = _read(self.path)
        if holder is None:
          raise WorkdirBusy(f'{self.path} exists but is unreadable; if no run uses this workdir, delete it') from None
        if holder['host'] != me['host'] or _alive(holder['pid']) or not self._take_over(holder):
          raise WorkdirBusy(f'{os.path.dirname(self.path)} is in use by another run: {describe(holder)} (lock file '
                            f'{self.path}). Wait for it to end, or use another --workdir') from None
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self.held = me
      return
    raise WorkdirBusy(f'{os.path.dirname(self.path)} is in use by another run (lock file {self.path})')

  def _take_over(self, stale):
    """Moves a dead process's lock aside; False if another run took it over first."""
    aside = f'{self.path}.stale-{os.getpid()}'
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return True  # gone already: retry the creation
    if _read(aside) != stale:  # a live run's fresh lock, renamed between our read and rename: give it back
      os.rename(aside, self.path)
      return False
    os.remove(aside)
    print(f'Taking over the lock of a run that is gone ({describe(stale)}) in {os.path.dirname(self.path)}',
          flush=True)
    return True

  def release(self):
    if self.held is not None and _read(self.path) == self.held:
      os.remove(self.path)
    self.held = None


class BucketLock:
  """The lock of a `gs://` workdir: an object created only if absent, refreshed by a thread (see the top)."""

  def __init__(self, workdir, enabled=True):
    self.path = paths.join(paths.absolute(workdir), LOCK_NAME)
    self.enabled, self.held, self._generation = enabled, None, None
    self._stop = threading.Event()
    self._thread = None

  __enter__, __exit__ = FileLock.__enter__, FileLock.__exit__

  def _blob(self):
    bucket, name = paths.bucket_and_name(self.path)
    return paths.storage_client().bucket(bucket).blob(name)

  def acquire(self):
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    me, blob = _me(), self._blob()
    for _ in range(2):  # the second try follows the takeover of a stale lock
      try:
        blob.upload_from_string(json.dumps(me), if_generation_match=0)
      except exceptions.PreconditionFailed:
        found = blob.bucket.get_blob(blob.name)
        if found is None:
          continue  # released between our two requests
        try:
          holder = json.loads(found.download_as_bytes(if_generation_match=found.generation))
        except (exceptions.NotFound, exceptions.PreconditionFailed):
          continue  # released or refreshed meanwhile: look again
        except ValueError:
          holder = {'pid': '?', 'host': '?', 'since': '?'}
        age = time.time() - found.updated.timestamp()
        gone = age > STALE_S or (holder.get('host') == me['host'] and isinstance(holder.get('pid'), int)
                                 and not _alive(holder['pid']))
        if not gone:
          raise WorkdirBusy(f'{paths.dirname(self.path)} is in use by another run: {describe(holder)}, its lock '
                            f'refreshed {age:.0f}s ago (lock object {self.path}; a lock not refreshed for '
                            f'{STALE_S}s is taken over). Wait for it to end, or use another --workdir') from None
        try:
          found.delete(if_generation_match=found.generation)  # only the lock we judged: a racing taker loses
        except (exceptions.NotFound, exceptions.PreconditionFailed):
          continue
        print(f'Taking over the lock of a run that is gone ({describe(holder)}, last refreshed {age:.0f}s ago) in '
              f'{paths.dirname(self.path)}', flush=True)
        continue
      self.held, self._generation = me, blob.generation
      self._thread = threading.Thread(target=self._refresh, args=(blob,), daemon=True)
      self._thread.start()
      return
    raise WorkdirBusy(f'{paths.dirname(self.path)} is in use by another run (lock object {self.path})')

  def _refresh(self, blob):
    """Rewrites the lock every REFRESH_S while held; a lock taken over meanwhile is reported, not fought for."""
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    while not self._stop.wait(REFRESH_S):
      try:
        blob.upload_from_string(json.dumps(self.held), if_generation_match=self._generation)
        self._generation = blob.generation
      except exceptions.PreconditionFailed:
        print(f'WARNING: the lock {self.path} was taken over by another run; this run no longer holds its workdir',
              flush=True)
        self.held = None
        return
      except Exception as e:  # pylint: disable=broad-except  # a network blip: the next refresh tries again
        print(f'WARNING: refreshing the lock {self.path} failed ({type(e).__name__}); retrying in {REFRESH_S}s',
              flush=True)

  def release(self):
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self.held is not None:
      try:
        self._blob().delete(if_generation_match=self._generation)  # not a lock taken over from us
      except (exceptions.NotFound, exceptions.PreconditionFailed):
        pass
    self.held = None
