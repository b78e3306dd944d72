"""A rank's rollouts: sampled completions -> rewards -> group advantages -> the wire `Batch`, plus what
the step's metrics need. Built here from local generation (`make_rollouts`, the trainer's local
source and generation workers alike), or read back from a batch that came over the wire
(`rollouts_from_batch`, the server queue's source), so both sources yield the same `Rollouts`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from grpo_split.contract.batch import Batch
from grpo_split.rollouts.rewards import score_completions
from grpo_split.rollouts.sampling import SamplingSettings, encode_prompts, left_pad, sample_completions
from stable_ops import completion_mask, group_advantages


@dataclass
class Rollouts:
    """One rank's rollouts: the wire batch plus what the metrics need."""

    batch: Batch  # rewards (NaN -> 0), scored, advantages, completion_mask, attention_mask, policy_version
    rewards: torch.Tensor  # (N,) float32 with NaN where no reward function could score
    per_func: torch.Tensor  # (N, F) float32, NaN where a function returned None
    lengths: torch.Tensor  # (N,) completion tokens up to and including EOS
    truncated: torch.Tensor  # (N,) bool: hit max_completion_length without EOS
    # Seconds spent building them, by phase ("generate", "rewards"); empty for a batch from the wire.
    timings: dict[str, float] = field(default_factory=dict)


def reward_columns(rows: list[dict], prompt_column: str, answer_column: str | None, repeat: int) -> dict[str, list]:
    """The keyword columns reward functions receive, each value repeated for the G completions of its row.

    The configured `answer_column` is passed as `answer=` (what the built-in `accuracy` reads), whatever
    its name in the dataset; with no answer column, nothing is passed as `answer`, even if the
    dataset has a column of that name. Every other column is passed under its own name.
    """
    names = [key for key in rows[0] if key not in (prompt_column, answer_column, "answer")]
    columns = {key: [row[key] for row in rows for _ in range(repeat)] for key in names}
    if answer_column is not None:
        columns["answer"] = [row[answer_column] for row in rows for _ in range(repeat)]
    return columns


def make_rollouts(
    model,
    tokenizer,
    rows: list[dict],
    *,
    prompt_column: str,
    answer_column: str | None,
    system_prompt: str | None,
    settings: SamplingSettings,
    reward_funcs: list[tuple[str, Callable]],
    reward_weights: list[float] | None,
    scale_rewards: str,
    mask_truncated: bool,
    policy_version: int,
    eos_ids: list[int],
    pad_id: int,
    step_reward_std: Callable[[torch.Tensor], float] | None = None,
) -> Rollouts:
    """Generate G completions for each dataset row, score them, and build the wire batch.

    `step_reward_std(rewards)`: the std of the whole step's rewards for `scale_rewards="batch"`,
    when these rows are only one rank's share of the step (the trainer passes an all-reduce).
    """
    prompts = [row[prompt_column] for row in rows]
    prompt_ids, prompt_mask = left_pad(encode_prompts(tokenizer, prompts, system_prompt), pad_id)  # (B, P)
    started = time.perf_counter()
    completion_ids = sample_completions(model, prompt_ids, prompt_mask, settings, eos_ids, pad_id)  # (N, C)
    sampled = time.perf_counter()  # the ids are on the CPU: generation has finished, on any device
    G = settings.num_generations
    attend = completion_mask(completion_ids, eos_ids)  # (N, C): up to and including the first EOS
    truncated = ended_without_eos(completion_ids, attend, eos_ids)  # (N,)
    loss_mask = attend * (~truncated).to(attend.dtype).unsqueeze(1) if mask_truncated else attend

    texts = tokenizer.batch_decode(
        [ids[: int(n)] for ids, n in zip(completion_ids, attend.sum(1), strict=True)], skip_special_tokens=True
    )
    repeated = [prompt for prompt in prompts for _ in range(G)]
    columns = reward_columns(rows, prompt_column, answer_column, G)
    rewards, per_func = score_completions(reward_funcs, reward_weights, repeated, texts, columns)  # (N,), (N, F)
    batch_std = step_reward_std(rewards) if scale_rewards == "batch" and step_reward_std is not None else None
    advantages = group_advantages(rewards, G, scale=scale_rewards, batch_std=batch_std)  # (N,); 0 where NaN

    batch = Batch(
        input_ids=torch.cat([prompt_ids.repeat_interleave(G, dim=0), completion_ids], dim=1),  # (N, P + C)
        prompt_length=prompt_ids.shape[1],
        attention_mask=torch.cat([prompt_mask.repeat_interleave(G, dim=0), attend.long()], dim=1),
        # The wire carries finite rewards only: an unscored completion travels as 0 with advantage 0,
        # and `scored` = 0 tells the receiver to leave it out of reward statistics.
        rewards=torch.nan_to_num(rewards, nan=0.0).float(),
        scored=(~torch.isnan(rewards)).long(),
        reward_per_func=per_func.float(),
        advantages=advantages.float(),
        completion_mask=loss_mask.long(),
        policy_version=policy_version,
        num_generations=G,
        temperature=settings.temperature,
    )
    timings = {"generate": sampled - started, "rewards": time.perf_counter() - sampled}
    return Rollouts(batch=batch, rewards=rewards.float(), per_func=per_func, lengths=attend.sum(1),
                    truncated=truncated, timings=timings)


def ended_without_eos(completion_ids: torch.Tensor, attend: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """(N, C) ids and their (N, C) attention -> (N,) bool: the completion has no EOS among its tokens,
    i.e. generation stopped at max_completion_length (whatever the longest completion's length)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    return ~(is_eos & attend.bool()).any(dim=1)


def rollouts_from_batch(batch: Batch, eos_ids: list[int], num_reward_funcs: int) -> Rollouts:
    """The `Rollouts` of a batch that came over the wire (a generation worker's): rewards with NaN
    where unscored, per-function rewards (NaN columns when the sender sent none), completion
    lengths and truncation flags from the tokens themselves."""
    completion_ids = batch.input_ids[:, batch.prompt_length :]  # (B, C)
    attend = batch.attention_mask[:, batch.prompt_length :]  # (B, C)
    rewards = batch.rewards.float().clone()
    if batch.scored is not None:
        rewards[~batch.scored.bool()] = math.nan
    per_func = batch.reward_per_func
    if per_func is None:  # a sender from before the field: per-function rewards unknown, not 0
        per_func = torch.full((batch.batch_size, num_reward_funcs), math.nan)
    elif per_func.shape[1] != num_reward_funcs:
        raise ValueError(f"batch {batch.batch_id} carries {per_func.shape[1]} per-function rewards; this run has "
                         f"{num_reward_funcs} reward functions")
    return Rollouts(batch=batch, rewards=rewards, per_func=per_func.float(), lengths=attend.sum(1),
                    truncated=ended_without_eos(completion_ids, attend, eos_ids))
