"""One run per workdir: a lock file that process 0 holds for the whole run.

Two runs on one workdir would both resume the same checkpoint and write the same steps, so the second is
refused. The lock is created atomically (O_CREAT | O_EXCL) and holds the pid, host and start time; it is
removed when the run ends, however it ends short of SIGKILL. A lock left by a killed process on this host
(its pid is gone) is taken over with a message; one from another host cannot be checked and is reported.
"""
import datetime
import json
import os
import socket

from mae_jax.config import ConfigError

LOCK_NAME = 'mae_jax.lock'


class WorkdirBusy(ConfigError):
  """Another run holds the workdir."""


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


class Lock:
  """`with Lock(workdir):` holds the workdir; `enabled=False` (processes other than 0) does nothing."""

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
    me = {'pid': os.getpid(), 'host': socket.gethostname(),
          'since': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}
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
