"""Where a step's time goes: wall seconds and tokens of each phase, logged as `timing/<phase>` and
`tokens_per_second/<phase>` in every step's metrics (and shown in the progress bar and the plot).

The phases of one step, in the order the trainer runs them:
  generate    sampling the completions (local rollouts), or waiting for the server's queue (server rollouts)
  rewards     the reward functions and group advantages
  reference   waiting for the reference log-probs; the request is sent as soon as the rollouts exist and
              runs while the update's first forwards do, so this is only the part not hidden behind them
  update      the optimizer passes: forwards, backwards, steps (the old log-probs pass too)
  other       the rest of the step: metrics collectives, acknowledgements, policy snapshots, checkpoints

Times are this rank's (rank 0's in the logged metrics); tokens are summed over all ranks, so
`tokens_per_second/<phase>` is the whole run's throughput in that phase.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

PHASES = ("generate", "rewards", "reference", "update")


def _synchronize() -> None:
    # Kernels are asynchronous on a GPU: without waiting for them, a phase's time would land in the
    # next phase that happens to block.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseTimer:
    """Accumulates seconds and token counts per phase over one step; `reset()` between steps."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.tokens: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds.clear()
        self.tokens.clear()

    @contextlib.contextmanager
    def phase(self, name: str, tokens: float = 0.0) -> Iterator[None]:
        """Time the block as phase `name`, which processed `tokens` tokens (may be added later with `count`)."""
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.count(name, tokens)

    def count(self, name: str, tokens: float) -> None:
        self.tokens[name] = self.tokens.get(name, 0.0) + float(tokens)

    def merge(self, other: dict[str, float]) -> None:
        """Add seconds measured elsewhere (e.g. `Rollouts.timings`, measured where the rollouts were built)."""
        for name, seconds in other.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def timing_metrics(seconds: dict[str, float], global_tokens: dict[str, float], step_time: float) -> dict[str, float]:
    """`timing/<phase>` for every phase (0 when it did not run), `timing/other`, and
    `tokens_per_second/<phase>` for the phases that processed tokens."""
    metrics = {f"timing/{name}": seconds.get(name, 0.0) for name in PHASES}
    metrics["timing/other"] = max(0.0, step_time - sum(seconds.get(name, 0.0) for name in PHASES))
    for name in PHASES:
        if global_tokens.get(name, 0.0) > 0 and seconds.get(name, 0.0) > 0:
            metrics[f"tokens_per_second/{name}"] = global_tokens[name] / seconds[name]
    return metrics
