"""The durable queue (`ref_server.py --queue_dir`): every accepted upload survives the server, and a
restarted server delivers each unacknowledged batch exactly once, in upload order, while
acknowledged and dead-lettered batches never come back."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from conftest import TINY_VOCAB, ServerProcess

from grpo_split.contract.batch import Batch, decode_batch, encode_batch
from grpo_split.contract.client import RefServerClient
from grpo_split.server.queue import RolloutQueue, StaleLease
from grpo_split.server.store import QueueDirBusy, SqliteQueueStore


def rollout(number: int) -> Batch:
    """A small upload that carries its upload number in its first reward."""
    gen = torch.Generator().manual_seed(number)
    rows, prompt, completion = 2, 3, 4
    return Batch(
        input_ids=torch.randint(0, TINY_VOCAB, (rows, prompt + completion), generator=gen), prompt_length=prompt,
        rewards=torch.tensor([float(number), 0.0]), advantages=torch.zeros(rows),
        old_logps=-torch.ones(rows, completion), completion_mask=torch.ones(rows, completion, dtype=torch.int64),
        policy_version=0, num_generations=2,
    )


def number(batch: Batch) -> int:
    return int(batch.rewards[0])


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def durable_queue(directory, clock, **kwargs) -> RolloutQueue:
    return RolloutQueue(max_queue=16, clock=clock, wall_clock=clock, store=SqliteQueueStore(directory), **kwargs)


def score_next(queue: RolloutQueue) -> None:
    entry = queue.next_to_score(timeout=0)
    batch = entry.item
    batch.batch_id, batch.ref_logps = entry.batch_id, torch.zeros(batch.batch_size, batch.completion_length)
    queue.scored(entry, encode_batch(batch))


def test_a_new_queue_on_the_same_store_continues_where_the_old_one_stopped(tmp_path):
    clock = FakeClock()
    queue = durable_queue(tmp_path, clock, max_deliveries=2)
    ids = [queue.admit(rollout(n), tokens=14, payload=encode_batch(rollout(n)))[0] for n in range(7)]
    for _ in range(5):
        score_next(queue)  # 0..4 ready, 5 and 6 still pending (never scored)
    acked = queue.take(lease_seconds=60)  # 0: acknowledged
    assert queue.ack(acked.batch_id, acked.lease)
    held = queue.take(lease_seconds=60)  # 1: leased, its trainer is mid-step
    lapsed = queue.take(lease_seconds=5)  # 2: leased, the trainer died
    assert lapsed.batch_id == ids[2]
    dead = queue.take(lease_seconds=60)  # 3: a consumer could not use it
    queue.dead_letter(dead.batch_id, dead.lease, "wrong shape")
    queue.store.close()  # what kill -9 leaves: the file (every call above committed), no process

    clock.now += 10  # the lapsed lease ran out while the server was down; the held one did not
    again = durable_queue(tmp_path, clock, max_deliveries=2)
    assert again.recovered == 5 and again.dead_lettered == 1
    assert again.depths() == {"pending": 2, "ready": 2, "leased": 1}
    # The held lease survived the restart: its trainer's ack still settles the batch, so nothing is trained twice.
    assert again.ack(held.batch_id, held.lease)
    assert not again.ack(acked.batch_id, acked.lease)  # a repeated ack of a batch settled before the restart
    with pytest.raises(StaleLease, match="dead-lettered"):
        again.ack(dead.batch_id, dead.lease)
    score_next(again)
    score_next(again)  # the pending uploads are scored again
    delivered = []
    while (entry := again.take(lease_seconds=60)) is not None:
        delivered.append(entry)
        again.ack(entry.batch_id, entry.lease)
    assert [entry.batch_id for entry in delivered] == [ids[2], ids[4], ids[5], ids[6]]  # upload order, once each
    assert [number(decode_batch(entry.payload)) for entry in delivered] == [2, 4, 5, 6]
    assert delivered[0].deliveries == 2  # the delivery count survived too
    next_id, _, _ = again.admit(rollout(7), tokens=14, payload=encode_batch(rollout(7)))
    assert next_id > ids[-1]  # ids keep growing: never one of a batch settled before
    again.store.close()


def test_an_upload_whose_scoring_kills_the_server_every_time_is_dead_lettered(tmp_path):
    clock = FakeClock()
    queue = durable_queue(tmp_path, clock, max_deliveries=2)
    poison, _, _ = queue.admit(rollout(0), tokens=14, payload=encode_batch(rollout(0)))
    queue.admit(rollout(1), tokens=14, payload=encode_batch(rollout(1)))
    for _ in range(2):  # the server dies while scoring it, twice
        assert queue.next_to_score(timeout=0).batch_id == poison
        queue.store.close()
        queue = durable_queue(tmp_path, clock, max_deliveries=2)
    assert queue.stats()["recent_dead_letters"] == [{"batch_id": poison, "reason": (
        "scoring was begun 2 times and the server stopped during each (did this batch crash it?)")}]
    score_next(queue)  # the next upload is not stuck behind it
    assert number(decode_batch(queue.take(lease_seconds=5).payload)) == 1
    queue.store.close()


def test_one_server_per_queue_dir(tmp_path):
    store = SqliteQueueStore(tmp_path)
    with pytest.raises(QueueDirBusy, match="in use by another ref_server"):
        SqliteQueueStore(tmp_path)
    store.close()
    SqliteQueueStore(tmp_path).close()


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_kill_9_loses_no_accepted_upload_and_delivers_each_once_in_order(tiny_model_dir, tmp_path):
    """Before: the queue lived in memory; after kill -9 every 202'd batch was gone and the trainer's ack got 404."""
    queue_dir = tmp_path / "queue"
    server = ServerProcess(tiny_model_dir, "--queue_dir", str(queue_dir))
    try:
        with RefServerClient(server.url, timeout=30, max_retries=2, backoff=0.05) as client:
            uploaded = [client.upload(rollout(n), upload_id=f"up-{n}")["batch_id"] for n in range(6)]
            wait_for(lambda: client.stats()["queue"]["ready"] == 6)
            acked = client.get(lease_seconds=60)
            client.ack(acked.batch_id, acked.lease)
            held = client.get(lease_seconds=120)  # a trainer mid-step when the server dies
            lapsed = client.get(lease_seconds=1)  # a trainer that died with the server
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=30)
    finally:
        server.stop()
    assert [acked.batch_id, held.batch_id, lapsed.batch_id] == uploaded[:3]

    restarted = ServerProcess(tiny_model_dir, "--queue_dir", str(queue_dir))
    try:
        wait_for(lambda: any("5 unsettled batches recovered" in line for line in restarted.stderr_lines), 10)
        with RefServerClient(restarted.url, timeout=30, max_retries=2, backoff=0.05) as client:
            client.ack(held.batch_id, held.lease)  # the lease survived the restart: no 404, nothing trained twice
            # A worker that never saw its 202 before the kill sends the batch again: recognised, not queued twice.
            resent = client.upload(rollout(5), upload_id="up-5")
            assert resent["batch_id"] == uploaded[5] and resent["duplicate"] is True
            time.sleep(1.1)  # past the lapsed lease: its batch is due again, at its place in upload order
            delivered = []
            while (batch := client.get(lease_seconds=60)) is not None:
                delivered.append(batch)
                client.ack(batch.batch_id, batch.lease)
            stats = client.stats()
        assert [batch.batch_id for batch in delivered] == uploaded[2:]
        assert [number(batch) for batch in delivered] == [2, 3, 4, 5]
        assert stats["durable"] and stats["queue"] == {"pending": 0, "ready": 0, "leased": 0}
        assert stats["acknowledged"] == 5 and stats["dead_lettered"] == 0
    finally:
        assert restarted.stop() == 0, "".join(restarted.stderr_lines[-40:])



def test_the_server_says_where_its_queue_lives(tmp_path, caplog):
    import ref_server
    from grpo_split.config.server import ServerConfig

    with caplog.at_level("INFO", logger="ref_server"):
        ref_server.make_queue(ServerConfig(model_name_or_path="m"))
        ref_server.make_queue(ServerConfig(model_name_or_path="m", queue_dir=str(tmp_path))).store.close()
    assert "upload queue in memory: queued and leased batches are lost" in caplog.text
    assert f"upload queue on disk in {tmp_path}: 0 unsettled batches recovered" in caplog.text
