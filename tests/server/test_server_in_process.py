"""The server's parts in-process: RolloutQueue with a fake clock, request coalescing, and model failures."""

from __future__ import annotations

import threading
import time

import pytest
import requests
import torch
from conftest import TINY_VOCAB
from helpers import LoopbackServer

from grpo_split.config.server import ServerConfig
from grpo_split.contract.batch import Batch, decode_batch, encode_batch
from grpo_split.modeling import frozen_logps
from grpo_split.server.app import ReferenceServerApp
from grpo_split.server.queue import QueueFull, RolloutQueue, UnknownBatch
from grpo_split.server.scorer import ReferenceScorer


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def admit_and_score(queue: RolloutQueue, name: str) -> str:
    batch_id, _, _ = queue.admit(name, tokens=1)
    entry = queue.next_to_score(timeout=0)
    queue.scored(entry, name.encode())
    return batch_id


def test_fifo_bound_and_lease_expiry():
    clock = FakeClock()
    queue = RolloutQueue(max_queue=3, clock=clock)
    ids = [admit_and_score(queue, name) for name in ("a", "b", "c")]
    with pytest.raises(QueueFull):
        queue.admit("d", tokens=1)
    first = queue.take(lease_seconds=10)
    assert first.payload == b"a" and first.batch_id == ids[0]
    assert queue.take(lease_seconds=10).payload == b"b"
    with pytest.raises(QueueFull):
        queue.admit("d", tokens=1)  # leased batches still await settlement: they count toward max_queue
    assert queue.depths() == {"pending": 0, "ready": 1, "leased": 2}
    clock.now = 11  # both leases ran out: they come back ahead of "c", oldest first
    taken = [queue.take(10) for _ in range(3)]
    assert [entry.payload for entry in taken] == [b"a", b"b", b"c"]
    assert queue.lease_expirations == 2
    assert queue.ack(ids[0], taken[0].lease) and not queue.ack(ids[0], taken[0].lease)  # repeated: harmless
    with pytest.raises(UnknownBatch):
        queue.ack("unknown", "lease")
    queue.admit("d", tokens=1)  # the ack made room


def test_late_ack_after_expiry_settles_the_requeued_batch():
    clock = FakeClock()
    queue = RolloutQueue(max_queue=4, clock=clock)
    batch_id = admit_and_score(queue, "a")
    lease = queue.take(lease_seconds=1).lease
    clock.now = 2
    assert queue.depths()["ready"] == 1  # expired and back
    assert queue.ack(batch_id, lease)  # the slow trainer finished after all: nobody else took it since
    assert queue.take(1) is None


def as_rollout(batch: Batch, num_generations: int = 2, policy_version: int = 0) -> Batch:
    """`batch` with every field a trainer needs of an upload."""
    rows, completion = batch.batch_size, batch.completion_length
    batch.rewards, batch.advantages = torch.zeros(rows), torch.zeros(rows)
    batch.old_logps = -torch.ones(rows, completion)
    batch.completion_mask = torch.ones(rows, completion, dtype=torch.int64)
    batch.policy_version, batch.num_generations = policy_version, num_generations
    return batch


def make(batch_size, prompt_length, completion_length, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY_VOCAB, (batch_size, prompt_length + completion_length), generator=gen)
    return Batch(input_ids=ids, prompt_length=prompt_length)


def test_waiting_requests_are_coalesced_into_one_padded_forward(tiny_model):
    release = threading.Event()
    calls = []

    def compute(ids, mask, prompt_length, temperature):
        calls.append((tuple(ids.shape), prompt_length))
        if len(calls) == 1:
            release.wait(timeout=30)  # hold the worker so the next requests pile up
        return frozen_logps(tiny_model, ids, mask, prompt_length, temperature)

    scorer = ReferenceScorer(tiny_model, max_batch_tokens=1000, compute=compute)
    batches = [make(1, 4, 4, 0), make(2, 3, 6, 1), make(3, 5, 2, 2), make(1, 2, 3, 3)]
    results = {}

    def send(i):
        results[i] = scorer.score(batches[i])

    first = threading.Thread(target=send, args=(0,))
    first.start()
    while not calls:
        threading.Event().wait(0.01)
    others = [threading.Thread(target=send, args=(i,)) for i in (1, 2, 3)]
    for t in others:
        t.start()
    while len(scorer._waiting) < 3:
        threading.Event().wait(0.01)
    release.set()
    for t in [first, *others]:
        t.join(timeout=30)
    scorer.stop()

    # One forward for the first request, one for the other three: 6 rows, prompts left-padded to 5
    # and completions right-padded to 6.
    assert calls == [((1, 8), 4), ((6, 11), 5)]
    for i, b in enumerate(batches):
        alone = frozen_logps(tiny_model, b.input_ids, None, b.prompt_length)
        torch.testing.assert_close(results[i], alone, atol=1e-5, rtol=0)


def scorer_failing_on_two_rows(model) -> ReferenceScorer:
    """A scorer whose forward fails, as an out-of-memory would, for any micro-batch of two rows."""

    def compute(ids, mask, prompt_length, temperature):
        if ids.shape[0] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return frozen_logps(model, ids, mask, prompt_length, temperature)

    return ReferenceScorer(model, max_batch_tokens=1000, compute=compute)


def test_a_model_failure_reaches_its_caller_and_the_worker_survives(tiny_model):
    scorer = scorer_failing_on_two_rows(tiny_model)
    with pytest.raises(RuntimeError, match="out of memory"):
        scorer.score(make(2, 3, 3, 0))
    assert scorer.score(make(1, 3, 3, 0)).shape == (1, 3)
    scorer.stop()


def test_http_500_on_model_failure_and_the_server_keeps_serving(tiny_model):
    """ReferenceServerApp in-process on waitress: a failing forward is a JSON 500, the next request is served."""
    scorer = scorer_failing_on_two_rows(tiny_model)
    config = ServerConfig(model_name_or_path="tiny", auth_token="t")
    server_app = ReferenceServerApp(scorer, config, model_info={"model": "tiny", "vocab_size": TINY_VOCAB,
                                                                "device": "cpu", "dtype": "float32"})
    stop = threading.Event()
    server_app.start_upload_worker(stop)
    server = LoopbackServer(server_app.app)
    url = server.url
    auth = {"Authorization": "Bearer t"}
    try:
        failing = requests.post(url + "/logps", data=encode_batch(make(2, 3, 3, 0)), headers=auth, timeout=30)
        assert failing.status_code == 500 and "out of memory" in failing.json()["error"]
        ok = requests.post(url + "/logps", data=encode_batch(make(1, 3, 3, 0)), headers=auth, timeout=30)
        assert ok.status_code == 200 and decode_batch(ok.content).ref_logps.shape == (1, 3)
        # An uploaded batch the model cannot score is dead-lettered with its reason; the worker goes on.
        bad = as_rollout(make(2, 3, 3, 1))
        answer = requests.post(url + "/upload", data=encode_batch(bad), headers=auth, timeout=30)
        assert answer.status_code == 202
        good = as_rollout(make(1, 3, 3, 2), num_generations=1)
        assert requests.post(url + "/upload", data=encode_batch(good), headers=auth, timeout=30).status_code == 202
        deadline = time.time() + 30
        while time.time() < deadline:
            got = requests.get(url + "/get", headers=auth, timeout=30)
            if got.status_code == 200:
                break
            time.sleep(0.05)
        assert got.status_code == 200 and decode_batch(got.content).batch_size == 1
        stats = requests.get(url + "/stats", headers=auth, timeout=30).json()
        assert stats["upload_failures"] == 1 and stats["errors"]["model_error"] == 1
        assert stats["dead_lettered"] == 1
        [dead] = stats["recent_dead_letters"]
        assert dead["batch_id"] == answer.json()["batch_id"] and "out of memory" in dead["reason"]
    finally:
        stop.set()
        server.close()
        scorer.stop()
