"""Stopping a run cleanly: a signal becomes a request to stop after the current step (the loop then saves a
checkpoint), not an interrupt in the middle of an update."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Turns SIGTERM and the first Ctrl-C into a request to stop after the current step (a second Ctrl-C
    interrupts at once)."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing this step, then saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
