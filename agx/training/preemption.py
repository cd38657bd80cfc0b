"""SIGTERM (PBS before walltime, SLURM, Kubernetes) and SIGUSR1 ask the trainer to finish the step
it is on, save a checkpoint and exit 0, rather than die and lose the steps since the last save."""

from __future__ import annotations

import signal
import threading

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

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
