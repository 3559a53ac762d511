"""SIGTERM (pod preemption, ``kill``) and SIGINT (Ctrl-C) as a flag the training loop checks
once per step.

``train.py`` calls :func:`watch` with ``stop_at_once=True`` before its heavy imports. Until
the first step of the run completes (imports, data, compilation: nothing new to save) a
signal then ends the process within a second, even in the middle of an XLA compilation that
holds the main thread for minutes: Python's C-level handler writes the signal number to a
pipe (``signal.set_wakeup_fd``) and a watcher thread, which runs while XLA compiles, calls
the registered cleanups (the workdir lock) and exits: status 0 for SIGTERM (a preempted job
is not a failed one), 130 for SIGINT (a shell sees the interrupt). After
:meth:`Preemption.training_started`, a signal stops the run at the next step with a
checkpoint, and a second Ctrl-C stops at once without saving (the last checkpoint stays).
This module imports nothing heavy.

Several processes: ``jax.distributed.initialize`` starts JAX's preemption sync manager,
whose C++ SIGTERM handler takes the signal from then on (Python's handler no longer runs,
though ``signal.getsignal`` still names it), and tells every process; Orbax's
``CheckpointManager.reached_preemption(step)`` is then True on all of them at the same
step. :meth:`Preemption.reached` asks both.
"""

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

_watcher: "Preemption | None" = None
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_EXIT_STATUS = {signal.SIGTERM: 0, signal.SIGINT: 130}


class Preemption:
    """Records SIGTERM / SIGINT in ``requested`` instead of dying; :meth:`restore` undoes it.

    Args:
      stop_at_once: exit at once on a signal until :meth:`training_started` (the process
        has nothing new to save), running the callbacks of :meth:`on_stop_at_once` first.
    """

    def __init__(self, stop_at_once: bool = False):
        self.requested = False
        self._stop_at_once = stop_at_once
        self._interrupts = 0
        self._cleanups: list[Callable[[], None]] = []
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._pipe = (read, write)
        self._previous_wakeup_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="signal-watcher", daemon=True)
        self._thread.start()

    def _handle(self, signum, frame):
        """Python's handler (main thread, between bytecodes; late during a compilation): the
        flag; the watcher thread, which hears the signal at once, does the rest."""
        del signum, frame
        self.requested = True

    def _watch(self) -> None:
        """Reads the signals Python's C-level handler writes to the pipe, as they arrive."""
        while data := os.read(self._pipe[0], 64):
            for signum in data:
                self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        if signum not in SIGNALS:
            return  # another handler's signal: the wakeup pipe carries every one
        log = logging.getLogger(__name__)
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._interrupts += 1
        if self._stop_at_once or self._interrupts > 1:
            what = (
                "during start-up: nothing new to save"
                if self._stop_at_once
                else "a second time: stopping without saving; the last checkpoint stays"
            )
            print(f"{name} {what}. Rerun the same command to resume.", file=sys.stderr)
            self._exit(_EXIT_STATUS.get(signum, 1))
        self.requested = True
        hint = " (Ctrl-C again to stop at once, without saving)" if signum == signal.SIGINT else ""
        log.warning("%s received: stopping after this step with a checkpoint%s.", name, hint)

    def _exit(self, status: int) -> None:
        for cleanup in self._cleanups:
            try:
                cleanup()
            except Exception as e:  # noqa: BLE001 - exiting anyway; say what was left
                print(f"while stopping: {type(e).__name__}: {e}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(status)

    def on_stop_at_once(self, cleanup: Callable[[], None]) -> None:
        """Runs ``cleanup`` (e.g. releasing the workdir lock) before a stop at once."""
        self._cleanups.append(cleanup)

    def training_started(self) -> None:
        """From now on a signal stops at the next step with a checkpoint."""
        self._stop_at_once = False

    def reached(self, step: int, manager) -> bool:
        """Whether to save ``step`` and stop: a signal seen by this process's handler (one
        process, or before ``jax.distributed`` started), or the step that every process
        agreed on (``manager``: an Orbax ``CheckpointManager``; its ``reached_preemption``
        is False in a single process). Call it at every step on every process."""
        return self.requested or manager.reached_preemption(step)

    def restore(self) -> None:
        """Puts back the handlers and wakeup fd of before, and ends the watcher thread."""
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        os.close(self._pipe[1])  # the watcher's read returns b"": it ends
        self._thread.join(timeout=5)
        os.close(self._pipe[0])


def watch(*, stop_at_once: bool = False) -> Preemption:
    """The process's signal watcher, installed by the first call (``stop_at_once``: see
    :class:`Preemption`)."""
    global _watcher
    if _watcher is None:
        _watcher = Preemption(stop_at_once)
    return _watcher


def stop_watching() -> None:
    """Restores the signal handling that was there before :func:`watch`."""
    global _watcher
    if _watcher is not None:
        _watcher.restore()
        _watcher = None
