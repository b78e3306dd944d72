"""ReferenceScorer with its real model path: coalescing never mixes temperatures, and each answer equals
the naive reference of its own request at its own temperature.

The scorer packs waiting requests into one padded forward, and a forward has one temperature. The
references here are written out in this file (each row alone, unpadded, through the model's own
`forward`, then `log_softmax(logits / T)` in float64), never through `grpo_split.modeling`.
"""

from __future__ import annotations

import threading
import time

import torch
from conftest import TINY_VOCAB

from grpo_split.contract.batch import Batch
from grpo_split.server.scorer import ReferenceScorer

PAD = 0
MAX_BATCH_TOKENS = 1000  # every group below fits: one group is one model forward
WAIT_SECONDS = 30


def make_request(prompt_lengths, completion_length, temperature, seed):
    """One request: rows whose prompts of `prompt_lengths` are left-padded (masked) to the longest."""
    gen = torch.Generator().manual_seed(seed)
    prompt_len = max(prompt_lengths)
    ids = torch.randint(2, TINY_VOCAB, (len(prompt_lengths), prompt_len + completion_length), generator=gen)
    mask = torch.ones_like(ids)
    for row, length in enumerate(prompt_lengths):
        ids[row, : prompt_len - length] = PAD
        mask[row, : prompt_len - length] = 0
    return Batch(input_ids=ids, prompt_length=prompt_len, attention_mask=mask, temperature=temperature)


def naive_request_logps64(model, batch: Batch) -> torch.Tensor:
    """(B, C) float64: each row without its padding, alone through forward(), at the request's temperature."""
    rows = []
    with torch.no_grad():
        for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
            real = ids[mask.bool()]  # (P_i + C,)
            prompt_len = batch.prompt_length - int((mask[: batch.prompt_length] == 0).sum())
            logits = model(input_ids=real[None]).logits[0].double()  # (P_i + C, V)
            logps = torch.log_softmax(logits[prompt_len - 1 : -1] / batch.temperature, dim=-1)
            rows.append(logps.gather(-1, real[prompt_len:, None]).squeeze(-1))
    return torch.stack(rows)


class HeldForwards:
    """Counts the model's forwards (a hook on its input embeddings, which every forward path runs)
    and holds the first one until `release()`, so that later requests pile up in the queue."""

    def __init__(self, model):
        self.count = 0
        self.entered = threading.Event()
        self._release = threading.Event()
        self._handle = model.get_input_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1
        if self.count == 1:
            self.entered.set()
            if not self._release.wait(timeout=WAIT_SECONDS):
                raise RuntimeError("the test never released the held forward")

    def release(self):
        self._release.set()

    def remove(self):
        self._handle.remove()


def wait_for(condition, what):
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def score_while_held(model, requests):
    """Score requests[0] (held in the model's forward), queue the others behind it in order, release.

    Returns (answers in request order, model forwards, scorer forward passes).
    """
    scorer = ReferenceScorer(model, MAX_BATCH_TOKENS)
    held = HeldForwards(model)
    answers, errors, threads = {}, {}, []

    def send(i):
        try:
            answers[i] = scorer.score(requests[i])
        except Exception as exc:  # noqa: BLE001 - handed to the main thread, which fails the test with it
            errors[i] = exc

    try:
        for i in range(len(requests)):
            threads.append(threading.Thread(target=send, args=(i,), daemon=True))
            threads[-1].start()
            if i == 0:
                assert held.entered.wait(WAIT_SECONDS), "the first request never reached the model"
            else:  # queued one at a time, so the queue's order is the list's
                wait_for(lambda i=i: len(scorer._waiting) == i, f"request {i} to queue")
        held.release()
        for t in threads:
            t.join(timeout=WAIT_SECONDS)
        forwards = held.count
    finally:
        held.release()
        held.remove()
        scorer.stop()
    assert not errors, errors
    return [answers[i] for i in range(len(requests))], forwards, scorer.stats().forwards


def assert_each_answer_is_its_own_reference(model, requests, answers):
    for i, (request, answer) in enumerate(zip(requests, answers, strict=True)):
        assert answer.shape == (request.batch_size, request.completion_length), i
        reference = naive_request_logps64(model, request)
        torch.testing.assert_close(answer.double(), reference, atol=1e-5, rtol=0,
                                   msg=lambda m, i=i, t=request.temperature: f"request {i} (T={t}): {m}")


def test_waiting_requests_of_different_temperatures_are_scored_apart(tiny_model):
    """Queued 0.5, 1.0, 2.0, 2.0, 0.5: only the two neighbours at 2.0 may share a forward."""
    requests = [
        make_request([3], 3, 1.0, seed=0),  # held in the model while the others queue
        make_request([4, 2], 3, 0.5, seed=1),
        make_request([3], 5, 1.0, seed=2),
        make_request([2, 5], 2, 2.0, seed=3),
        make_request([4], 4, 2.0, seed=4),
        make_request([5, 5], 3, 0.5, seed=5),
    ]
    answers, forwards, passes = score_while_held(tiny_model, requests)
    assert_each_answer_is_its_own_reference(tiny_model, requests, answers)
    assert forwards == passes == 5  # held; 0.5; 1.0; 2.0 + 2.0; 0.5


def test_waiting_requests_of_one_temperature_share_one_forward(tiny_model):
    """Different prompt and completion lengths at one temperature: one padded forward, each answer exact."""
    requests = [
        make_request([3], 3, 0.5, seed=10),  # held
        make_request([4, 2], 3, 0.5, seed=11),
        make_request([2], 6, 0.5, seed=12),
        make_request([6, 3, 1], 2, 0.5, seed=13),
    ]
    answers, forwards, passes = score_while_held(tiny_model, requests)
    assert_each_answer_is_its_own_reference(tiny_model, requests, answers)
    assert forwards == passes == 2  # the held one, then the other three together
