"""The trainer's collectives on two real processes (gloo on loopback): the step-wide reward std of
`scale_rewards: batch` and the broadcast that hands a worker batch from rank 0 to every rank."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stable_ops import group_advantages

G = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, rewards: torch.Tensor, out_dir: str) -> None:
    import json
    from pathlib import Path

    from grpo_split.rollouts.sources import step_reward_std
    from grpo_split.training import distributed as dist_utils

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        share = rewards.view(world_size, -1)[rank]  # this rank's groups
        std = step_reward_std(share)
        advantages = group_advantages(share, G, "batch", batch_std=std)
        received = dist_utils.broadcast_bytes(b"a worker batch" if rank == 0 else None)
        failed = dist_utils.broadcast_bytes(None)  # rank 0 had nothing: everyone sees None
        result = {"std": std, "advantages": advantages.tolist(), "received": received.decode(), "failed": failed}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_batch_scaled_advantages_use_the_std_of_the_whole_step_on_every_rank(tmp_path):
    import json

    torch.manual_seed(0)
    # The two ranks' rewards differ in spread on purpose: rank 0's are small, rank 1's large.
    rewards = torch.cat([torch.rand(8) * 0.1, torch.rand(8) * 10])
    rewards[3] = float("nan")  # an unscored completion is left out of the std, as on one rank
    mp.start_processes(_rank_main, args=(2, _free_port(), rewards, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    expected_std = rewards[~rewards.isnan()].double().std().item()
    whole = group_advantages(rewards, G, "batch")  # one process holding the whole step
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert abs(result["std"] - expected_std) <= 1e-9 * expected_std
        torch.testing.assert_close(torch.tensor(result["advantages"]), whole.view(2, -1)[rank])
        assert result["received"] == "a worker batch" and result["failed"] is None


class _EmptyQueue:
    def get(self, lease_seconds: float):
        return None


def _lease_failure_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from pathlib import Path

    from grpo_split.config.trainer import (
        DataConfig,
        LossConfig,
        ModelConfig,
        RolloutConfig,
        RunConfig,
        ServerLinkConfig,
        TrainingConfig,
    )
    from grpo_split.rollouts.sources import ServerRollouts
    from grpo_split.training.distributed import PeerRankFailed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    config = RunConfig(ModelConfig(model_name_or_path="unused"), DataConfig(), RolloutConfig(prompts_per_step=2),
                       LossConfig(), TrainingConfig(),
                       ServerLinkConfig(rollout_source="server", rollout_wait=0.2))
    source = ServerRollouts(config, _EmptyQueue() if rank == 0 else None, rank, world_size, eos_ids=[0])
    try:
        source.next_batch(policy_version=0)
        outcome = "returned"
    except (TimeoutError, PeerRankFailed) as exc:
        outcome = type(exc).__name__
    finally:
        dist.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.txt").write_text(outcome)


def test_when_rank_0_gets_no_worker_batch_every_rank_stops_instead_of_waiting(tmp_path):
    """Rank 0 leases the step's batch for all ranks: its failure must release the others (which wait
    in the broadcast) with an error that main() reports, never leave them waiting forever."""
    mp.start_processes(_lease_failure_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    assert (tmp_path / "rank0.txt").read_text() == "TimeoutError"
    assert (tmp_path / "rank1.txt").read_text() == "PeerRankFailed"
