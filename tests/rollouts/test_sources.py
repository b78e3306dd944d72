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
