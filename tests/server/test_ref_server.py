"""The reference server as a real process on a free loopback port, driven through the client and raw HTTP."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from conftest import TINY_VOCAB, ServerProcess
from helpers import malformed_bodies

from grpo_split.contract.batch import FORMAT_VERSION, Batch, decode_batch, encode_batch
from grpo_split.contract.client import RefServerClient, RefServerError
from grpo_split.modeling import frozen_logps


def make_batch(batch_size=3, prompt_length=5, completion_length=7, seed=0, left_pad=(), **fields) -> Batch:
    """Random ids; rows listed in `left_pad` get 2 masked pad tokens at the start of the prompt."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY_VOCAB, (batch_size, prompt_length + completion_length), generator=gen)
    mask = torch.ones_like(ids)
    for row in left_pad:
        mask[row, :2] = 0
        ids[row, :2] = 0
    return Batch(input_ids=ids, prompt_length=prompt_length, attention_mask=mask, **fields)


def rollout(producer: int, number: int) -> Batch:
    """A small uploaded batch that says who sent it and in which order (in its rewards)."""
    return make_batch(batch_size=2, prompt_length=3, completion_length=4, seed=producer * 1000 + number,
                      rewards=torch.tensor([float(producer), float(number)]), advantages=torch.zeros(2),
                      old_logps=-torch.ones(2, 4), completion_mask=torch.ones(2, 4, dtype=torch.int64),
                      policy_version=0, num_generations=2)


@pytest.fixture(scope="module")
def client(ref_server):
    with RefServerClient(ref_server.url, timeout=60, max_retries=3, backoff=0.1) as c:
        yield c


def test_health_reports_model_and_format(client, ref_server, tiny_model_dir):
    health = client.health()
    assert health["status"] == "ok" and health["format"] == FORMAT_VERSION
    assert health["vocab_size"] == TINY_VOCAB and health["device"] == "cpu" and health["dtype"] == "float32"
    assert health["model"] == str(tiny_model_dir)


def test_logps_equal_in_process_computation(client, tiny_model):
    batch = make_batch(batch_size=4, left_pad=(1, 3), temperature=0.7)
    served = client.logps(batch)
    local = frozen_logps(tiny_model, batch.input_ids, batch.attention_mask, batch.prompt_length, 0.7)
    assert served.shape == (4, 7) and served.dtype == torch.float32
    torch.testing.assert_close(served, local, atol=1e-5, rtol=0)


def test_left_padding_does_not_change_ref_logps(client):
    padded = make_batch(batch_size=2, prompt_length=6, completion_length=5, seed=3, left_pad=(0,))
    alone = Batch(input_ids=padded.input_ids[:1, 2:], prompt_length=4)  # row 0 without its 2 pad tokens
    torch.testing.assert_close(client.logps(padded)[0], client.logps(alone)[0], atol=1e-5, rtol=0)


def test_concurrent_requests_of_different_shapes_are_each_answered_correctly(client, tiny_model):
    batches = [make_batch(batch_size=1 + i % 3, prompt_length=3 + i, completion_length=9 - i, seed=10 + i,
                          left_pad=(0,)) for i in range(6)]
    results: dict[int, torch.Tensor] = {}

    def send(i):
        results[i] = client.logps(batches[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, b in enumerate(batches):
        local = frozen_logps(tiny_model, b.input_ids, b.attention_mask, b.prompt_length)
        torch.testing.assert_close(results[i], local, atol=1e-5, rtol=0)


def test_upload_get_ack_load_every_batch_exactly_once_fifo_per_producer(client):
    producers, per_producer = 4, 50
    total = producers * per_producer
    received: dict[int, list[tuple[int, int, str]]] = {0: [], 1: []}  # consumer -> (producer, number, id)
    done = threading.Event()
    failures: list[BaseException] = []

    def produce(p):
        try:
            with RefServerClient(client.urls, max_retries=3, backoff=0.05) as c:
                for n in range(per_producer):
                    c.upload(rollout(p, n), max_wait=120)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    def consume(k):
        try:
            with RefServerClient(client.urls, max_retries=3, backoff=0.05) as c:
                while not done.is_set():
                    batch = c.get(lease_seconds=120)
                    if batch is None:
                        time.sleep(0.01)
                        continue
                    assert batch.ref_logps is not None and batch.ref_logps.shape == (2, 4)
                    received[k].append((int(batch.rewards[0]), int(batch.rewards[1]), batch.batch_id))
                    c.ack(batch.batch_id, batch.lease)
                    if sum(map(len, received.values())) >= total:
                        done.set()
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)
            done.set()

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    threads += [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    done.wait(timeout=240)
    for t in threads:
        t.join(timeout=30)
    assert not failures, failures
    everything = received[0] + received[1]
    assert len(everything) == total
    assert len({batch_id for _, _, batch_id in everything}) == total  # each delivered once
    assert sorted((p, n) for p, n, _ in everything) == [(p, n) for p in range(producers) for n in range(per_producer)]
    # FIFO: ids carry the admission order; each producer's batches were admitted in its order,
    # and each consumer received batches oldest first.
    by_admission = sorted(everything, key=lambda item: item[2])
    for p in range(producers):
        assert [n for q, n, _ in by_admission if q == p] == list(range(per_producer))
    for k in received:
        ids = [batch_id for _, _, batch_id in received[k]]
        assert ids == sorted(ids)
    assert client.get() is None  # nothing left over


def test_unacknowledged_batch_is_delivered_again_after_its_lease(client):
    client.upload(rollout(9, 0))
    deadline = time.time() + 30
    first = None
    while first is None and time.time() < deadline:
        first = client.get(lease_seconds=0.5)
    assert first is not None
    assert client.get(lease_seconds=0.5) is None  # leased, not visible
    time.sleep(0.8)
    again = client.get(lease_seconds=30)
    assert again is not None and again.batch_id == first.batch_id
    torch.testing.assert_close(again.ref_logps, first.ref_logps)
    assert again.lease != first.lease  # a new delivery, a new lease
    with pytest.raises(RefServerError) as info:
        client.ack(first.batch_id, first.lease)  # the first lease ran out and the batch went out again
    assert info.value.status == 409 and "another lease" in info.value.message
    client.ack(again.batch_id, again.lease)
    assert client.get() is None
    client.ack(again.batch_id, again.lease)  # a repeated ack (a retry whose answer was lost) is harmless
    with pytest.raises(RefServerError) as info:
        client.ack("0000000999-nothere", "some-lease")
    assert info.value.status == 404


def test_malformed_bodies_get_4xx_with_a_message_and_leave_the_server_working(ref_server, client, tiny_model,
                                                                                tmp_path: Path):
    marker = tmp_path / "unpickled"
    valid = encode_batch(rollout(0, 0))
    bodies = list(malformed_bodies(valid, marker, vocab_size=TINY_VOCAB))
    assert len(bodies) >= 300
    session = requests.Session()
    for i, body in enumerate(bodies):
        for endpoint in ("/logps", "/upload"):  # every body to each POST endpoint that takes a batch
            response = session.post(ref_server.url + endpoint, data=body, timeout=30)
            assert 400 <= response.status_code < 500, (i, endpoint, response.status_code, response.text[:200])
            assert response.json()["error"], (i, endpoint)
    assert not marker.exists()
    stats = client.stats()
    assert sum(stats["errors"].values()) >= 2 * len(bodies)
    batch = make_batch(seed=42)
    local = frozen_logps(tiny_model, batch.input_ids, batch.attention_mask, batch.prompt_length)
    torch.testing.assert_close(client.logps(batch), local, atol=1e-5, rtol=0)


def test_error_statuses_are_json(ref_server):
    assert requests.get(ref_server.url + "/nowhere", timeout=10).status_code == 404
    assert "error" in requests.get(ref_server.url + "/nowhere", timeout=10).json()
    bad_lease = requests.get(ref_server.url + "/get", params={"lease": "soon"}, timeout=10)
    assert bad_lease.status_code == 400 and "lease" in bad_lease.json()["error"]
    too_long = encode_batch(make_batch(batch_size=1, prompt_length=1500, completion_length=600))
    response = requests.post(ref_server.url + "/logps", data=too_long, timeout=30)
    assert response.status_code == 413 and "max_batch_tokens" in response.json()["error"]


def test_stats_count_work(client):
    stats = client.stats()
    assert stats["batches_processed"] > 0 and stats["tokens_processed"] > 0 and stats["tokens_per_second"] > 0
    assert set(stats["queue"]) == {"pending", "ready", "leased"}


def test_queue_full_answers_503_with_retry_after(tiny_model_dir):
    server = ServerProcess(tiny_model_dir, "--max_queue", "2", "--retry_after_seconds", "3")
    try:
        for n in range(2):
            response = requests.post(server.url + "/upload", data=encode_batch(rollout(0, n)), timeout=30)
            assert response.status_code == 202
        response = requests.post(server.url + "/upload", data=encode_batch(rollout(0, 2)), timeout=30)
        assert response.status_code == 503 and response.headers["Retry-After"] == "3"
        assert "queue full" in response.json()["error"]
        with RefServerClient(server.url) as c:
            first = None
            while first is None:
                first = c.get()
            c.ack(first.batch_id, first.lease)  # room again: the leased batch counted toward max_queue
        assert requests.post(server.url + "/upload", data=encode_batch(rollout(0, 3)), timeout=30).status_code == 202
    finally:
        assert server.stop() == 0


def test_auth_token_required_except_for_health(tiny_model_dir):
    server = ServerProcess(tiny_model_dir, env={"REF_SERVER_TOKEN": "s3cret"})
    try:
        body = encode_batch(make_batch())
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
        assert requests.post(server.url + "/logps", data=body, timeout=10).status_code == 401
        wrong = requests.post(server.url + "/logps", data=body, headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401 and "token" in wrong.json()["error"]
        assert requests.get(server.url + "/stats", timeout=10).status_code == 401
        right = requests.post(server.url + "/logps", data=body, headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert right.status_code == 200 and decode_batch(right.content).ref_logps is not None
        with RefServerClient(server.url, token="s3cret") as c:
            assert c.logps(make_batch()).shape == (3, 7)
    finally:
        assert server.stop() == 0


def test_sigterm_while_busy_exits_cleanly(tiny_model_dir):
    # Requests in flight and uploads being scored when SIGTERM arrives: the server must finish
    # them and exit 0. (Before the shutdown was ordered, worker threads still inside torch at
    # interpreter exit aborted the process about one time in three.)
    for _ in range(2):
        server = ServerProcess(tiny_model_dir, "--max_queue", "8")
        for n in range(6):
            requests.post(server.url + "/upload", data=encode_batch(rollout(0, n)), timeout=30)

        def keep_busy(url=server.url):
            try:
                for _ in range(50):
                    requests.post(url + "/logps", data=encode_batch(make_batch(batch_size=4)), timeout=30)
            except requests.RequestException:
                return  # the server went away, as intended

        busy = threading.Thread(target=keep_busy)
        busy.start()
        assert server.stop() == 0, "".join(server.stderr_lines[-20:])
        busy.join(timeout=60)
