"""Reference log-probs requested from the server while the update starts.

The request goes out as soon as a step's rollouts exist, on a background thread, and the update
asks for the answer only where the loss first needs it: after the first micro-batch's policy
forward (or, with `num_iterations` > 1, after the old-log-prob pass). With the server on its own
device, the reference time disappears from the step; on one shared CPU the two still compete for
the same cores, and the step costs about what it did. The HTTP call is the blocking part, and it
releases the GIL while it waits.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from grpo_split.contract.batch import Batch
from grpo_split.contract.client import RefServerClient


class PendingReference:
    """`client.logps(batch)` running on its own thread; `result()` waits for it (and re-raises its error)."""

    def __init__(self, client: RefServerClient, batch: Batch):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-logps")
        self._future: Future = self._pool.submit(client.logps, batch)
        self._pool.shutdown(wait=False)  # the one task runs on; the thread ends with it
        self.waited = 0.0  # seconds result() blocked: the part of the reference time the update did not hide

    def result(self) -> torch.Tensor:
        """(B, C) reference log-probs; blocks until the server has answered."""
        if not self._future.done():
            started = time.perf_counter()
            try:
                return self._future.result()
            finally:
                self.waited += time.perf_counter() - started
        return self._future.result()


class ReadyReference:
    """Reference log-probs that are already known (the batch carried them): `result()` returns them."""

    def __init__(self, ref_logps: torch.Tensor | None):
        self._ref_logps = ref_logps
        self.waited = 0.0

    def result(self) -> torch.Tensor | None:
        return self._ref_logps
