"""Stop cleanly at a step boundary when the job is told to go (SIGTERM: preemption, scancel, kill).

One process: a SIGTERM handler sets a flag that the loop reads after each step. Several processes: JAX's
coordination service (through orbax's `reached_preemption`) makes every host stop at the same step, so
they all write the same checkpoint.
"""
import signal
import threading

import jax


class PreemptionWatch:

  def __init__(self, manager):
    self.manager = manager
    self.requested = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step):
    if jax.process_count() > 1:
      return self.manager.reached_preemption(step)
    return self.requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
