"""SIGTERM (pod preemption, ``kill``) as a flag the training loop checks once per step.

``train.py`` calls :func:`watch` before its heavy imports, so a SIGTERM during start-up
(imports, data, compilation) is caught too: the run stops cleanly with status 0 instead of
dying with 143. This module imports nothing heavy.

Several processes: ``jax.distributed.initialize`` starts JAX's preemption sync manager,
whose C++ SIGTERM handler takes the signal from then on (Python's handler no longer runs,
though ``signal.getsignal`` still names it), and tells every process; Orbax's
``CheckpointManager.reached_preemption(step)`` is then True on all of them at the same
step. :meth:`Preemption.reached` asks both.
"""

import logging
import signal

_watcher: "Preemption | None" = None


class Preemption:
    """Records SIGTERM in ``requested`` instead of dying; :meth:`restore` undoes it."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del frame
        logging.getLogger(__name__).warning(
            "Signal %d received: stopping at the next safe point (saving a checkpoint if "
            "training has started).",
            signum,
        )
        self.requested = True

    def reached(self, step: int, manager) -> bool:
        """Whether to save ``step`` and stop: a SIGTERM seen by this process's handler (one
        process, or before ``jax.distributed`` started), or the step that every process
        agreed on (``manager``: an Orbax ``CheckpointManager``; its ``reached_preemption``
        is False in a single process). Call it at every step on every process."""
        return self.requested or manager.reached_preemption(step)

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def watch() -> Preemption:
    """The process's SIGTERM watcher, installed by the first call."""
    global _watcher
    if _watcher is None:
        _watcher = Preemption()
    return _watcher


def stop_watching() -> None:
    """Restores the SIGTERM handler that was there before :func:`watch`."""
    global _watcher
    if _watcher is not None:
        _watcher.restore()
        _watcher = None
