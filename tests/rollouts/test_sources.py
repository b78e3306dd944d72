"""The rollout sources (grpo_split.rollouts.sources): each rank's share of a step."""

from __future__ import annotations

from conftest import toy_config

from grpo_split.config.trainer import parse_run_config
from grpo_split.modeling import load_tokenizer
from grpo_split.rollouts import sources


def test_local_rollouts_of_several_ranks_scale_batch_advantages_by_the_whole_step(tmp_path, toy_model_dir,
                                                                                   toy_dataset_path, monkeypatch):
    """Each rank scores only its groups; with scale_rewards: batch it must divide by the std of the
    whole step (an all-reduce, tested on two processes in test_distributed.py), not its own."""
    from transformers import AutoModelForCausalLM

    config = parse_run_config(toy_config(tmp_path, toy_model_dir, toy_dataset_path, scale_rewards="batch",
                                                 prompts_per_step=4))
    tokenizer = load_tokenizer(str(toy_model_dir))
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    seen: dict = {}
    def record(model, tokenizer, rows, **kwargs):
        seen.update(kwargs, rows=rows)

    monkeypatch.setattr(sources, "make_rollouts", record)
    for world_size, expected in ((2, sources.step_reward_std), (1, None)):
        source = sources.LocalRollouts(config, tokenizer, model, rank=world_size - 1, world_size=world_size)
        source.generate(model, policy_version=0)
        assert seen["step_reward_std"] is expected
        assert len(seen["rows"]) == 4 // world_size


# ---- ServerRollouts: batches a trainer cannot use are dead-lettered, never crash-loop it ---------------


class FakeQueue:
    """Stands in for the RefServerClient on rank 0: hands out `batches` in order, records settlements."""

    def __init__(self, batches, ack_status: int | None = None):
        self.batches = list(batches)
        self.acked: list[tuple[str, str]] = []
        self.dead: list[tuple[str, str, str]] = []
        self.ack_status = ack_status  # answer acks with this error status (a restarted server)

    def get(self, lease_seconds: float):
        if not self.batches:
            return None
        batch = self.batches.pop(0)
        batch.lease = f"lease-{batch.batch_id}"
        return batch

    def ack(self, batch_id: str, lease: str) -> None:
        if self.ack_status is not None:
            from grpo_split.contract.client import RefServerError

            raise RefServerError(self.ack_status, "no such lease (server restarted)")
        self.acked.append((batch_id, lease))

    def dead_letter(self, batch_id: str, lease: str, reason: str) -> None:
        self.dead.append((batch_id, lease, reason))


def worker_batch(batch_id: str, rows: int = 8, generations: int = 4, funcs: int = 2, **missing):
    import torch

    from grpo_split.contract.batch import Batch

    prompt, completion = 3, 4
    batch = Batch(
        input_ids=torch.randint(0, 50, (rows, prompt + completion)), prompt_length=prompt,
        rewards=torch.rand(rows), advantages=torch.randn(rows), old_logps=-torch.rand(rows, completion),
        completion_mask=torch.ones(rows, completion, dtype=torch.int64), ref_logps=-torch.rand(rows, completion),
        policy_version=0, num_generations=generations, batch_id=batch_id,
        reward_per_func=torch.rand(rows, funcs),
    )
    for name in missing:
        setattr(batch, name, None)
    return batch


def server_source(tmp_path, toy_model_dir, toy_dataset_path, queue):
    config = parse_run_config(toy_config(tmp_path, toy_model_dir, toy_dataset_path, rollout_source="server"))
    return sources.ServerRollouts(config, queue, rank=0, world_size=1, eos_ids=[0])


def test_a_batch_the_trainer_cannot_use_is_dead_lettered_and_the_next_one_trained(tmp_path, toy_model_dir,
                                                                                 toy_dataset_path, capsys):
    """Before: ValueError/ConfigError, the batch stayed leased and crash-looped the restarted trainer."""
    queue = FakeQueue([
        worker_batch("no-old-logps", old_logps=None),
        worker_batch("wrong-shape", rows=6, generations=3),  # a misconfigured worker
        worker_batch("wrong-funcs", funcs=3),
        worker_batch("good"),
    ])
    source = server_source(tmp_path, toy_model_dir, toy_dataset_path, queue)
    share = source.next_batch(policy_version=0)
    assert share.batch_id == "good"
    assert [(batch_id, lease) for batch_id, lease, _ in queue.dead] == [
        ("no-old-logps", "lease-no-old-logps"), ("wrong-shape", "lease-wrong-shape"),
        ("wrong-funcs", "lease-wrong-funcs"),
    ]
    reasons = [reason for _, _, reason in queue.dead]
    assert "old_logps" in reasons[0] and "num_generations" in reasons[1] and "reward_funcs" in reasons[2]
    out = capsys.readouterr().out
    assert out.count("WARNING: dead-lettering batch") == 3 and "rows in groups of 3" in out
    assert source.metrics()["dead_lettered_batches"] == 3.0
    assert source.state_dict()["dead_lettered_batches"] == 3
    source.ack_all()
    assert queue.acked == [("good", "lease-good")]


def test_an_ack_the_restarted_server_refuses_does_not_stop_training(tmp_path, toy_model_dir, toy_dataset_path,
                                                                     capsys):
    for status in (404, 409):
        queue = FakeQueue([worker_batch("b")], ack_status=status)
        source = server_source(tmp_path, toy_model_dir, toy_dataset_path, queue)
        source.next_batch(policy_version=0)
        source.ack_all()  # must not raise
        assert source.leased == [] and f"HTTP {status}" in capsys.readouterr().out


def test_a_restarting_server_is_waited_for_at_get_and_at_ack(tmp_path, toy_model_dir, toy_dataset_path, capsys):
    """A server that is down for a moment (a restart with --queue_dir loses nothing) does not end the run."""

    class Restarting(FakeQueue):
        def __init__(self, batches, outages: int):
            super().__init__(batches)
            self.outages = {"get": outages, "ack": outages}

        def _maybe_down(self, call: str):
            if self.outages[call] > 0:
                self.outages[call] -= 1
                raise ConnectionError("no reference server at http://127.0.0.1:1")

        def get(self, lease_seconds: float):
            self._maybe_down("get")
            return super().get(lease_seconds)

        def ack(self, batch_id: str, lease: str) -> None:
            self._maybe_down("ack")
            super().ack(batch_id, lease)

    queue = Restarting([worker_batch("b")], outages=2)
    source = server_source(tmp_path, toy_model_dir, toy_dataset_path, queue)
    assert source.next_batch(policy_version=0).batch_id == "b"
    source.ack_all()
    assert queue.acked == [("b", "lease-b")]
    assert capsys.readouterr().out.count("no reference server") == 4
