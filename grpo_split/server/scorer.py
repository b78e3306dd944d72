"""The reference server's model side: one thread runs every forward, coalescing concurrent requests.

HTTP threads call `ReferenceScorer.score` and wait; the model thread packs the requests waiting at
that moment (same temperature, padded total within `max_batch_tokens`) into one padded forward, so
many small requests cost about one forward instead of one each, and the model is never run from
two threads at once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from grpo_split.contract.batch import Batch
from grpo_split.modeling import frozen_logps, lm_head_plan

# The server's log lines keep the name they have always had, whichever module writes them.
log = logging.getLogger("ref_server")

# How long `stop` waits for the forward in progress. A micro-batch forward takes well under this
# on any device the server is meant for; past it the daemon thread is abandoned rather than
# holding up shutdown forever.
STOP_JOIN_SECONDS = 30.0


@dataclass(frozen=True)
class ScorerStats:
    """The scorer's counters at one moment (a consistent snapshot: all four from the same instant)."""

    tokens: int = 0  # rows x sequence length of every answered request
    batches: int = 0  # answered requests
    forwards: int = 0  # model forwards (one per coalesced group)
    busy_seconds: float = 0.0  # time spent in forwards, the denominator of tokens_per_second

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.busy_seconds if self.busy_seconds > 0 else 0.0


@dataclass
class _Request:
    batch: Batch
    future: Future
    tokens: int


def _pad_and_concat(batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack batches of different prompt/completion lengths into one: prompts left-padded to the
    longest prompt, completions right-padded to the longest completion, padding masked out.

    Left padding with position ids counted from the mask, and right padding behind a causal
    mask, leave every real token's log-prob unchanged (up to float rounding).
    """
    prompt_len = max(b.prompt_length for b in batches)
    completion_len = max(b.completion_length for b in batches)
    ids, masks = [], []
    for b in batches:
        mask = b.attention_mask if b.attention_mask is not None else torch.ones_like(b.input_ids)
        pad_left = prompt_len - b.prompt_length
        pad_right = completion_len - b.completion_length
        ids.append(torch.nn.functional.pad(b.input_ids, (pad_left, pad_right)))
        masks.append(torch.nn.functional.pad(mask.long(), (pad_left, pad_right)))
    return torch.cat(ids), torch.cat(masks), prompt_len  # (sum B, P + C) twice


class ReferenceScorer:
    """Owns the frozen model. `score` may be called from any thread; one worker thread runs the
    forwards, packing waiting requests into micro-batches of at most `max_batch_tokens`.

    `compute(ids, mask, prompt_length, temperature)` replaces the model's forward in tests.
    """

    def __init__(self, model, max_batch_tokens: int, compute=None):
        if compute is None:
            lm_head_plan(model)  # checked (and cached) here, not in the worker while the first requests wait
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self._compute = compute or (
            lambda ids, mask, p, temp: frozen_logps(self.model, ids, mask, p, temp, max_batch_tokens)
        )
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._stopped = False
        # /stats reads the counters from HTTP threads while the model thread updates them.
        self._stats_lock = threading.Lock()
        self._stats = ScorerStats()
        self._thread = threading.Thread(target=self._run, name="reference-forward", daemon=True)
        self._thread.start()

    def score(self, batch: Batch) -> torch.Tensor:
        """Reference log-probs (B, T-P) of `batch`; raises what the model raised."""
        request = _Request(batch, Future(), batch.batch_size * batch.seq_len)
        with self._cond:
            if self._stopped:
                raise RuntimeError("the reference server is shutting down")
            self._waiting.append(request)
            self._cond.notify()
        return request.future.result()

    def stats(self) -> ScorerStats:
        with self._stats_lock:
            return self._stats

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=STOP_JOIN_SECONDS)

    def _next_group(self) -> list[_Request] | None:
        with self._cond:
            while not self._waiting and not self._stopped:
                self._cond.wait()
            if self._stopped and not self._waiting:
                return None
            group = [self._waiting.popleft()]
            # Pack more waiting requests (same temperature) while the padded total fits the budget.
            while self._waiting:
                candidate = self._waiting[0]
                if candidate.batch.temperature != group[0].batch.temperature:
                    break
                members = [r.batch for r in group] + [candidate.batch]
                padded_len = max(b.prompt_length for b in members) + max(b.completion_length for b in members)
                if sum(b.batch_size for b in members) * padded_len > self.max_batch_tokens:
                    break
                group.append(self._waiting.popleft())
            return group

    def _run(self) -> None:
        while (group := self._next_group()) is not None:
            self._score_group(group)

    def _score_group(self, group: list[_Request]) -> None:
        batches = [r.batch for r in group]
        start = time.perf_counter()
        try:
            ids, mask, prompt_len = _pad_and_concat(batches)
            logps = self._compute(ids, mask, prompt_len, batches[0].temperature)  # (sum B, C_max)
        except Exception as exc:  # noqa: BLE001 - any model failure goes back to its callers as a 500
            log.exception("reference forward failed for %d request(s)", len(group))
            for r in group:
                r.future.set_exception(exc)
            return
        self._record(group, time.perf_counter() - start)
        row = 0
        for r in group:
            b = r.batch
            r.future.set_result(logps[row : row + b.batch_size, : b.completion_length].contiguous())
            row += b.batch_size

    def _record(self, group: list[_Request], seconds: float) -> None:
        # Before the answers go out, so a caller's next /stats already counts its request.
        with self._stats_lock:
            s = self._stats
            self._stats = ScorerStats(
                tokens=s.tokens + sum(r.tokens for r in group),
                batches=s.batches + len(group),
                forwards=s.forwards + 1,
                busy_seconds=s.busy_seconds + seconds,
            )
