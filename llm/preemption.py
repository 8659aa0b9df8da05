"""Stopping a run cleanly: on a signal (preemption, Ctrl-C, a scheduler's warning) or
before a wall-clock limit, finish the current step, save, and exit with a message.

The handler only raises a flag; the trainer reads it between steps, so a checkpoint is
never written from inside a signal handler or halfway through an update. A second
signal means "now": the process exits at once with 128 + the signal number, as a shell
reports a process killed by that signal. One event often arrives twice within
milliseconds (SLURM signals every process of a job, and torchrun then forwards its own
copy to its workers), so a repeat within REPEAT_WINDOW_S counts as the same signal.
Ranks may receive the signal at different times (or only some of them), so the trainer
agrees on stopping with one all-reduce.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")
REPEAT_WINDOW_S = 1.0


class GracefulStop:
    """Install with `with GracefulStop(names, time_limit) as stop:`; poll `stop.reason()` between steps."""

    def __init__(self, signal_names: list[str], time_limit: float, started: float):
        self.signals = [getattr(signal, name) for name in signal_names]
        self.time_limit = time_limit  # seconds since `started` (0 = none)
        self.started = started
        self.received: Optional[str] = None
        self._received_at = 0.0
        self._previous: dict[int, object] = {}
        self._step_s = 0.0  # longest step so far, to stop one step before the limit
        self._save_s = 0.0  # longest save so far, to leave room for the final one

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; a run in a thread keeps the defaults
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and time.monotonic() - self._received_at < REPEAT_WINDOW_S:
            return
        if self.received is not None:
            print(f"{name} again: exiting now without saving (the last checkpoint is kept)", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.received, self._received_at = name, time.monotonic()
        if os.environ.get("RANK", "0") == "0":
                print(f"{name} received: finishing this step, saving a checkpoint and stopping "
                  f"(send it again to exit at once)", file=sys.stderr, flush=True)

    def timed_step(self, seconds: float) -> None:
        self._step_s = max(self._step_s, seconds)

    def timed_save(self, seconds: float) -> None:
        self._save_s = max(self._save_s, seconds)

    def reason(self) -> Optional[str]:
        """Why this rank wants to stop before the next step (None: carry on)."""
        if self.received is not None:
            return self.received
        if self.time_limit:
            left = self.time_limit - (time.monotonic() - self.started)
            if left < 2 * self._step_s + self._save_s:
                return f"train.time_limit={self.time_limit:g}s"
        return None
