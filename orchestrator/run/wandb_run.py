"""A W&B run started in the background: importing wandb and `wandb.init` (which starts W&B's own
service process and waits for it) take 1.5-3 s, which would otherwise delay the model build and
the first step. `WandbRun` starts both in a thread and keeps what is logged before the run is up
(in order); it is sent as soon as a later call finds the run ready, or at `wait`/`finish`.

Only `wandb.init` runs in the thread (wandb supports that: with `console="off"` it installs no
signal handler, and its service runs in its own process); every other wandb call is made from
the caller's thread. An error of `wandb.init` (say, no network in online mode) is raised from the
first call after it (and every later one), on the caller's thread.
"""

from __future__ import annotations

import threading
from typing import Any


class WandbRun:
    def __init__(self, init_kwargs: dict[str, Any]) -> None:
        self.run: Any = None
        self._error: BaseException | None = None
        self._records: list[tuple[dict[str, Any], int]] = []
        self._summary: dict[str, Any] = {}
        self._flushed = False
        self._thread = threading.Thread(target=self._start, args=(init_kwargs,),
                                        name="wandb-init", daemon=True)
        self._thread.start()

    def _start(self, init_kwargs: dict[str, Any]) -> None:
        try:
            import wandb

            self.run = wandb.init(**init_kwargs, settings=wandb.Settings(console="off"))
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            self._error = e

    def ready(self) -> bool:
        """Whether the run is up (never waits); when it has just come up, what was kept is
        sent now. Raises `wandb.init`'s error."""
        if self._thread.is_alive():
            return False
        if self._error is not None:  # on every call: there is no run to send to
            raise self._error
        if not self._flushed:
            self._flushed = True
            for metrics, step in self._records:
                self.run.log(metrics, step=step)
            if self._summary:
                self.run.summary.update(self._summary)
            self._records, self._summary = [], {}
        return True

    def wait(self) -> Any:
        """The run, once it is up (waits for `wandb.init`)."""
        self._thread.join()
        self.ready()
        return self.run

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.ready():
            self.run.log(metrics, step=step)
        else:
            self._records.append((dict(metrics), step))

    def update_summary(self, values: dict[str, Any]) -> None:
        if self.ready():
            self.run.summary.update(values)
        else:
            self._summary.update(values)

    def finish(self, exit_code: int, preempting: bool) -> None:
        """Send what is kept and finish the run (W&B shows `preempting` runs as preempted)."""
        run = self.wait()
        if preempting:
            run.mark_preempting()
        run.finish(exit_code=exit_code)
