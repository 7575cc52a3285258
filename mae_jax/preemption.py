"""Stop cleanly when the job is told to go: SIGTERM (preemption, scancel, kill) or SIGINT (Ctrl-C).

While training, a signal only sets a flag that the loop reads after each step: the current step is saved
and the run ends with `Interrupted` (exit 0 for SIGTERM, 130 for Ctrl-C). Outside the loop (start-up, the
final evaluation) there is no unsaved work, so the signal ends the run at once, with one line. A second
Ctrl-C exits at once. Several processes: JAX's coordination service (through orbax's `reached_preemption`)
makes every host stop at the same step on SIGTERM, so they all write the same checkpoint; Ctrl-C is left
to its default there (hosts would see it at different steps).
"""
import os
import signal
import sys
import threading

import jax

TITLES = {'SIGTERM': 'Preempted (SIGTERM)', 'SIGINT': 'Interrupted (SIGINT)'}
EXIT_CODES = {'SIGTERM': 0, 'SIGINT': 130}


class Interrupted(BaseException):
  """The run stopped on a signal; `message` is its one line. A BaseException: no `except Exception` (the
  warnings around logging) swallows it."""

  def __init__(self, message, exit_code):
    super().__init__(message)
    self.message, self.exit_code = message, exit_code


class PreemptionWatch:
  """Installed for the whole run; `start_training(manager)` and `end_training()` mark the loop, where
  signals are deferred to a step boundary. `on_abort` runs before a Ctrl-C after a first signal exits."""

  def __init__(self, on_abort=None):
    self.manager, self.on_abort = None, on_abort
    self.signal, self.training = None, False
    self.where = 'during start-up, before any step: nothing to save; rerun the same command to resume.'
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      names = ('SIGTERM', 'SIGINT') if jax.process_count() == 1 else ()
      for name in names:
        self._previous[name] = signal.signal(getattr(signal, name), self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal and name == 'SIGINT':
      if self.on_abort:
        self.on_abort()
      print('Interrupted (SIGINT) again: exiting at once, without saving; the last checkpoint is intact.',
            file=sys.stderr, flush=True)
      os._exit(130)
    self.signal = self.signal or name
    if not self.training:
      raise self.interrupted(self.where)

  def interrupted(self, what):
    return Interrupted(f'{TITLES[self.signal]} {what}', EXIT_CODES[self.signal])

  def start_training(self, manager):
    self.manager, self.training = manager, True

  def end_training(self, where):
    """After the last save has finished: from now on a signal ends the run at once, with `where` said."""
    self.training, self.where = False, where

  def reached(self, step):
    if jax.process_count() > 1 and self.manager.reached_preemption(step):
      self.signal = 'SIGTERM'
    return self.signal is not None

  def close(self):
    for name, previous in self._previous.items():
      signal.signal(getattr(signal, name), previous)
    self._previous = {}
