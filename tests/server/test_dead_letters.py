"""Leases and dead letters over HTTP (ReferenceServerApp in-process on waitress, a real tiny model):
uploads a trainer could not use are refused, stale acks change nothing, HEAD /get leases nothing,
leased batches count toward max_queue, and no batch is delivered forever."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import requests
import safetensors.torch
import torch
from conftest import TINY_VOCAB
from helpers import LoopbackServer

from grpo_split.config.server import ServerConfig
from grpo_split.contract.batch import Batch, encode_batch
from grpo_split.contract.client import RefServerClient, RefServerError
from grpo_split.server.app import ReferenceServerApp
from grpo_split.server.queue import RolloutQueue, StaleLease
from grpo_split.server.scorer import ReferenceScorer


def rollout(seed: int = 0, temperature: float = 1.0, **missing) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    rows, prompt, completion = 2, 3, 4
    batch = Batch(
        input_ids=torch.randint(0, TINY_VOCAB, (rows, prompt + completion), generator=gen), prompt_length=prompt,
        rewards=torch.tensor([float(seed), 0.0]), advantages=torch.zeros(rows), old_logps=-torch.ones(rows, completion),
        completion_mask=torch.ones(rows, completion, dtype=torch.int64), policy_version=0, num_generations=2,
        temperature=temperature,
    )
    for name in missing:
        setattr(batch, name, None)
    return batch


@contextlib.contextmanager
def serving(tiny_model, **config):
    scorer = ReferenceScorer(tiny_model, max_batch_tokens=1000)
    server_app = ReferenceServerApp(scorer, ServerConfig(model_name_or_path="tiny", **config),
                                    model_info={"model": "tiny", "vocab_size": TINY_VOCAB, "device": "cpu",
                                                "dtype": "float32"})
    stop = threading.Event()
    server_app.start_upload_worker(stop)
    server = LoopbackServer(server_app.app)
    client = RefServerClient(server.url, timeout=30, max_retries=2, backoff=0.01)
    try:
        yield server.url, client
    finally:
        client.close()
        stop.set()
        server.close()
        scorer.stop()


def get_within(client: RefServerClient, lease_seconds: float = 30, timeout: float = 20) -> Batch:
    """The next batch, once the upload worker has scored it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.get(lease_seconds=lease_seconds)
        if batch is not None:
            return batch
        time.sleep(0.02)
    raise AssertionError("no batch became ready")


def safe_open_metadata(body: bytes) -> dict[str, str]:
    import json

    return json.loads(body[8 : 8 + int.from_bytes(body[:8], "little")])["__metadata__"]


@pytest.mark.parametrize("name", ["old_logps", "advantages", "completion_mask", "rewards"])
def test_upload_without_a_field_the_trainer_needs_is_400_naming_it(tiny_model, name):
    with serving(tiny_model) as (url, client):
        answer = requests.post(url + "/upload", data=encode_batch(rollout(**{name: None})), timeout=30)
        assert answer.status_code == 400 and answer.json()["error"].startswith(f"{name}: required")
        assert client.stats()["queue"] == {"pending": 0, "ready": 0, "leased": 0}


def test_tiny_temperature_is_400_at_logps_and_upload(tiny_model):
    """Before: 1e-39 passed, logits / T overflowed to NaN: 500 at /logps, a silently dropped upload."""
    with serving(tiny_model) as (url, _):
        for endpoint in ("/logps", "/upload"):
            body = encode_batch(rollout())
            metadata = safe_open_metadata(body)
            body = safetensors.torch.save(safetensors.torch.load(body), metadata={**metadata, "temperature": "1e-39"})
            answer = requests.post(url + endpoint, data=body, timeout=30)
            assert answer.status_code == 400 and "temperature: must lie in" in answer.json()["error"], endpoint


def test_head_get_leases_nothing(tiny_model):
    with serving(tiny_model) as (url, client):
        assert requests.head(url + "/get", timeout=10).status_code == 204
        client.upload(rollout())
        deadline = time.monotonic() + 20
        while requests.head(url + "/get", timeout=10).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        head = requests.head(url + "/get", timeout=10)
        assert head.status_code == 200 and "X-Lease-Id" not in head.headers
        assert client.stats()["queue"] == {"pending": 0, "ready": 1, "leased": 0}
        assert client.stats()["delivered"] == 0
        assert get_within(client) is not None  # still there for a real GET


def test_leased_batches_count_toward_max_queue(tiny_model):
    with serving(tiny_model, max_queue=1) as (url, client):
        client.upload(rollout(1))
        batch = get_within(client)
        full = requests.post(url + "/upload", data=encode_batch(rollout(2)), timeout=30)
        assert full.status_code == 503 and full.headers["Retry-After"]  # the leased one still awaits settlement
        client.ack(batch.batch_id, batch.lease)
        assert requests.post(url + "/upload", data=encode_batch(rollout(2)), timeout=30).status_code == 202


def test_a_stale_ack_gets_409_and_changes_nothing(tiny_model):
    with serving(tiny_model) as (url, client):
        client.upload(rollout())
        first = get_within(client, lease_seconds=0.2)
        time.sleep(0.3)
        second = get_within(client, lease_seconds=30)  # the first lease ran out: a second consumer has it
        assert second.batch_id == first.batch_id and second.lease != first.lease
        before = client.stats()
        for path, kwargs in (("/ack/", {"params": {"lease": first.lease}}),
                             ("/dead/", {"json": {"lease": first.lease, "reason": "late"}})):
            late = requests.post(url + path + first.batch_id, timeout=10, **kwargs)
            assert late.status_code == 409 and "another lease" in late.json()["error"]
        after = client.stats()
        assert after["queue"] == before["queue"] == {"pending": 0, "ready": 0, "leased": 1}
        assert after["acknowledged"] == 0 and after["dead_lettered"] == 0
        no_lease = requests.post(url + "/ack/" + first.batch_id, timeout=10)
        assert no_lease.status_code == 400 and "lease" in no_lease.json()["error"]
        client.ack(second.batch_id, second.lease)  # the holder's ack still works
        assert client.stats()["acknowledged"] == 1


def test_a_batch_delivered_max_deliveries_times_without_ack_is_dead_lettered(tiny_model):
    with serving(tiny_model, max_deliveries=2) as (url, client):
        client.upload(rollout())
        first = get_within(client, lease_seconds=0.1)
        time.sleep(0.15)
        assert get_within(client, lease_seconds=0.1).batch_id == first.batch_id
        time.sleep(0.15)
        assert client.get() is None  # never a third time
        stats = client.stats()
        assert stats["dead_lettered"] == 1 and stats["queue"] == {"pending": 0, "ready": 0, "leased": 0}
        assert stats["recent_dead_letters"] == [
            {"batch_id": first.batch_id, "reason": "delivered 2 times without acknowledgement"}]


def test_a_consumer_dead_letters_a_batch_it_cannot_use(tiny_model):
    with serving(tiny_model) as (url, client):
        client.upload(rollout())
        batch = get_within(client)
        bad = requests.post(url + "/dead/" + batch.batch_id, data=b"{not json", timeout=10)
        assert bad.status_code == 400 and "lease" in bad.json()["error"]
        client.dead_letter(batch.batch_id, batch.lease, "wrong shape for this trainer")
        stats = client.stats()
        assert stats["dead_lettered"] == 1 and stats["queue"]["leased"] == 0
        assert stats["recent_dead_letters"][-1]["reason"] == "consumer: wrong shape for this trainer"
        with pytest.raises(RefServerError) as info:
            client.ack(batch.batch_id, batch.lease)  # settled: it cannot be acknowledged any more
        assert info.value.status == 409 and "dead-lettered" in info.value.message
        client.upload(rollout(1))
        assert get_within(client).batch_id != batch.batch_id  # never delivered again


def test_queue_settlement_rules_in_memory():
    clock = [0.0]
    queue = RolloutQueue(max_queue=4, clock=lambda: clock[0], max_deliveries=3)
    batch_id, _, _ = queue.admit("a", tokens=1)
    with pytest.raises(StaleLease, match="not been delivered"):
        queue.ack(batch_id, "any")
    queue.scored(queue.next_to_score(timeout=0), b"a")
    first = queue.take(lease_seconds=1).lease
    clock[0] = 2
    second = queue.take(lease_seconds=1).lease
    with pytest.raises(StaleLease):
        queue.ack(batch_id, first)
    assert queue.ack(batch_id, second) and not queue.ack(batch_id, second)
    with pytest.raises(StaleLease, match="already acknowledged"):
        queue.dead_letter(batch_id, second, "too late")


def test_an_upload_sent_again_with_its_upload_id_is_queued_once(tiny_model):
    with serving(tiny_model) as (url, client):
        body = encode_batch(rollout())
        first = requests.post(url + "/upload", params={"upload_id": "w1-17"}, data=body, timeout=30)
        again = requests.post(url + "/upload", params={"upload_id": "w1-17"}, data=body, timeout=30)
        assert first.status_code == again.status_code == 202
        assert again.json()["batch_id"] == first.json()["batch_id"] and again.json()["duplicate"] is True
        assert "duplicate" not in first.json()
        bad = requests.post(url + "/upload", params={"upload_id": "no spaces"}, data=body, timeout=30)
        assert bad.status_code == 400 and "upload_id" in bad.json()["error"]
        get_within(client)
        assert client.get() is None  # one batch, not two
