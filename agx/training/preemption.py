"""SIGTERM (PBS before walltime, SLURM, Kubernetes) and SIGUSR1 ask the trainer to finish the step
it is on, save a checkpoint and exit 0, rather than die and lose the steps since the last save.

Across processes the signal lands at slightly different moments; a process that stopped a step
early would leave the others waiting in a collective. So after each step the processes share
what they received and all stop after the same step."""

from __future__ import annotations

import signal
import threading

import numpy as np

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records the first stop signal from `install()` until `uninstall()` puts the old handlers back."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def agreed(self) -> str | None:
        """The first stop signal any process received; every process calls this after each step."""
        import jax

        if jax.process_count() == 1:
            return self.signal_name
        from jax.experimental import multihost_utils

        received = self.signal_name and signal.Signals[self.signal_name].value
        everyone = multihost_utils.process_allgather(np.int32(received or 0))
        first = next((int(s) for s in np.ravel(everyone) if s), 0)
        return signal.Signals(first).name if first else None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
