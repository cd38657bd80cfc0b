"""`train.profile_steps=[a,b]`: a JAX profiler trace of steps a..b in WORKDIR/profile, for
TensorBoard's profile plugin or Perfetto."""

from __future__ import annotations

from pathlib import Path

import jax


class Profile:
    def __init__(self, steps: list[int] | None, directory: Path, log=print):
        self.steps, self.directory, self.log = steps, directory, log
        self.running = False

    def __enter__(self) -> Profile:
        return self

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(str(self.directory))
            self.running = True

    def after(self, step: int) -> None:
        if self.running and step == self.steps[1]:
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.running = False
        self.log(f"agx: profiler trace of steps {self.steps[0]}-{self.steps[1]} in {self.directory}")

    def __exit__(self, *exc) -> None:
        if self.running:  # the run ended inside the window: keep what was traced
            self._stop()
