"""Stopping on request: Ctrl-C or SIGTERM lets the current step finish (trainer) or the current
batch upload (generation worker), then the process saves and exits."""

from __future__ import annotations

import signal
import sys


class StopRequested:
    """Ctrl-C or SIGTERM sets a flag; the loop finishes its step, saves, and exits (ranks agree first)."""

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        """Put back the handlers that were there before (the trainer may run inside a larger program)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then exiting "
              "(send it again to stop at once)", file=sys.stderr, flush=True)
