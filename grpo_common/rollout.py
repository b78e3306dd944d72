"""Rollouts: chat-formatted prompts -> sampled completions -> rewards -> group advantages -> a wire `Batch`.

Shared by the trainer (`rollout_source: local`) and generation workers (`--mode generate`), so
a batch a worker uploads is built exactly like one the trainer makes for itself.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from stable_ops import completion_mask, group_advantages

from .modeling import row_chunks
from .rewards import score_completions
from .wire import Batch


def format_prompt(tokenizer, prompt: str, system_prompt: str | None) -> str:
    """The prompt as the model sees it: the tokenizer's chat template with the assistant turn opened."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, prompts: Sequence[str], system_prompt: str | None) -> list[list[int]]:
    """Token ids of each chat-formatted prompt (the template already holds any special tokens)."""
    texts = [format_prompt(tokenizer, prompt, system_prompt) for prompt in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every id that ends a completion: the generation config's EOS ids (chat models often have
    several, e.g. Qwen2.5's <|im_end|> and <|endoftext|>) plus the tokenizer's EOS."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in ([configured] if isinstance(configured, int) else list(configured or [])):
        ids.append(int(value))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the model has no EOS token (generation_config.eos_token_id and tokenizer.eos_token are "
                         "both unset): completions could never end; set eos_token in the tokenizer config")
    return sorted(set(ids))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (B, P) ids left-padded to the longest, and the (B, P) 0/1 attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


@dataclass
class SamplingSettings:
    num_generations: int
    max_completion_length: int
    temperature: float
    top_p: float


# Fields of a model's generation_config.json that reshape the sampling distribution (penalties,
# truncations, forced or suppressed tokens) or the stopping rule. Instruct models ship some of them
# (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20, top_p 0.8, temperature 0.7). None of them is
# applied here: the loss's ratio, KL and "on-policy" all assume softmax(logits / temperature) with
# top_p, so `sampling_config` sets every one to neutral and this list only serves to tell the user.
_DISTRIBUTION_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
    "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "sequence_bias", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
    "min_length", "min_new_tokens", "exponential_decay_length_penalty", "renormalize_logits", "guidance_scale",
    "diversity_penalty", "num_beams", "num_beam_groups", "penalty_alpha", "watermarking_config", "do_sample",
    "top_h", "length_penalty", "low_memory", "dola_layers",
)


def sampling_config(settings: SamplingSettings, eos_ids: list[int], pad_id: int):
    """The GenerationConfig of a rollout: plain multinomial sampling from softmax(logits / T), top-p.

    Every field that could reshape the distribution is given its neutral value explicitly, and
    `pure_sampling` removes the model's own defaults for the call, so nothing from the model's
    generation_config.json is merged in (transformers fills each unset field from it).
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0, min_p=None,
        typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, bad_words_ids=None, min_length=0, min_new_tokens=None,
        num_beams=1, renormalize_logits=False,
        max_new_tokens=settings.max_completion_length, num_return_sequences=settings.num_generations,
        eos_token_id=eos_ids, pad_token_id=pad_id,
    )


def overridden_generation_defaults(model, settings: SamplingSettings) -> dict:
    """What the model's generation_config.json sets that rollouts do not use: {field: model's value}.

    Printed once at start-up, so a user of an instruct model learns that its recommended
    penalties are not applied (and why: see `_DISTRIBUTION_FIELDS`).
    """
    shipped = getattr(model, "generation_config", None)
    if shipped is None:
        return {}
    ours = {"temperature": settings.temperature, "top_p": settings.top_p, "do_sample": True}
    diff = shipped.to_diff_dict()  # only what differs from transformers' defaults
    return {key: diff[key] for key in _DISTRIBUTION_FIELDS if key in diff and diff[key] != ours.get(key, object())}


@contextlib.contextmanager
def pure_sampling(model):
    """For the duration of one `generate`: the model's own generation defaults are a blank config,
    so none of them is merged into `sampling_config`'s (see there)."""
    from transformers import GenerationConfig

    shipped = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = shipped


@torch.no_grad()
def sample_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, settings: SamplingSettings,
                       eos_ids: list[int], pad_id: int, return_sampler_logps: bool = False):
    """(B, P) left-padded prompts -> (B * G, C) completion ids, G consecutive rows per prompt.

    Sampling is exactly softmax(logits / temperature) with top-p, whatever the model's own
    generation_config.json says (see `sampling_config`). With `return_sampler_logps`, also the
    (B * G, C) log-probs of each sampled token under the distribution `generate` sampled from (its
    processed scores), which is how tests check that sampler and loss agree.
    """
    config = sampling_config(settings, eos_ids, pad_id)
    device = next(model.parameters()).device
    with pure_sampling(model):
        output = model.generate(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device),
                                generation_config=config, return_dict_in_generate=True,
                                output_scores=return_sampler_logps)
    completions = output.sequences[:, prompt_ids.shape[1] :].cpu()  # (B * G, C)
    if not return_sampler_logps:
        return completions
    scores = torch.stack(output.scores, dim=1).float().log_softmax(-1)  # (B * G, C, V)
    return completions, scores.gather(-1, completions[..., None].to(scores.device)).squeeze(-1).cpu()


def policy_logps(model, batch: Batch, micro_rows: int | None = None, grad: bool = False) -> torch.Tensor:
    """Completion log-probs of `batch` under `model`, (B, C) float32, in row chunks of `micro_rows`."""
    from .modeling import completion_logps

    device = next(model.parameters()).device
    rows = batch.batch_size if micro_rows is None else micro_rows
    outputs = []
    with torch.set_grad_enabled(grad):
        for chunk in row_chunks(batch.batch_size, 1, rows):
            out = completion_logps(model, batch.input_ids[chunk].to(device), batch.attention_mask[chunk].to(device),
                                   batch.prompt_length, batch.temperature)
            outputs.append(out.float())
    return torch.cat(outputs)


@dataclass
class Rollouts:
    """One rank's rollouts: the wire batch plus what the metrics need."""

    batch: Batch  # rewards (NaN -> 0), scored, advantages, completion_mask, attention_mask, policy_version
    rewards: torch.Tensor  # (N,) float32 with NaN where no reward function could score
    per_func: torch.Tensor  # (N, F) float32, NaN where a function returned None
    lengths: torch.Tensor  # (N,) completion tokens up to and including EOS
    truncated: torch.Tensor  # (N,) bool: hit max_completion_length without EOS


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
    completion_ids = sample_completions(model, prompt_ids, prompt_mask, settings, eos_ids, pad_id)  # (N, C)
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
        advantages=advantages.float(),
        completion_mask=loss_mask.long(),
        policy_version=policy_version,
        num_generations=G,
        temperature=settings.temperature,
    )
    return Rollouts(batch=batch, rewards=rewards.float(), per_func=per_func, lengths=attend.sum(1),
                    truncated=truncated)


def ended_without_eos(completion_ids: torch.Tensor, attend: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """(N, C) ids and their (N, C) attention -> (N,) bool: the completion has no EOS among its tokens,
    i.e. generation stopped at max_completion_length (whatever the longest completion's length)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    return ~(is_eos & attend.bool()).any(dim=1)


def batch_rollout_view(batch: Batch, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards (NaN where unscored), completion lengths and truncation flags of a batch from the wire."""
    completion_ids = batch.input_ids[:, batch.prompt_length :]  # (B, C)
    attend = batch.attention_mask[:, batch.prompt_length :]  # (B, C)
    rewards = batch.rewards.float().clone()
    if batch.scored is not None:
        rewards[~batch.scored.bool()] = math.nan
    return rewards, attend.sum(1), ended_without_eos(completion_ids, attend, eos_ids)


def nan_stats(values: torch.Tensor) -> tuple[float, float]:
    """Mean and sample std over the non-NaN entries; NaN when there are none (std: fewer than two)."""
    kept = values[~torch.isnan(values)].double()
    if kept.numel() == 0:
        return math.nan, math.nan
    std = kept.std().item() if kept.numel() > 1 else math.nan
    return kept.mean().item(), std


def rollout_metrics(rewards: torch.Tensor, per_func: torch.Tensor, func_names: list[str], lengths: torch.Tensor,
                    truncated: torch.Tensor, num_generations: int) -> dict[str, float]:
    """TRL-named rollout metrics of the whole step's rollouts (gathered from every rank)."""
    metrics: dict[str, float] = {}
    metrics["reward"], metrics["reward_std"] = nan_stats(rewards)
    for j, name in enumerate(func_names):
        metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = nan_stats(per_func[:, j])
    grouped = rewards.view(-1, num_generations)  # (N/G, G)
    scored = ~torch.isnan(grouped)
    spread = (torch.where(scored, grouped, -torch.inf).amax(1) - torch.where(scored, grouped, torch.inf).amin(1))
    # Groups that carry no learning signal: their scored rewards are all equal, or fewer than two
    # were scored (group_advantages gives all of them advantage 0).
    no_signal = (scored.sum(1) < 2) | (spread == 0)
    metrics["frac_reward_zero_std"] = no_signal.float().mean().item()
    lengths = lengths.float()
    metrics["completions/mean_length"] = lengths.mean().item()
    metrics["completions/min_length"] = lengths.min().item()
    metrics["completions/max_length"] = lengths.max().item()
    metrics["completions/clipped_ratio"] = truncated.float().mean().item()
    return metrics


__all__ = [
    "Rollouts", "SamplingSettings", "batch_rollout_view", "encode_prompts", "ended_without_eos", "eos_token_ids",
    "format_prompt", "left_pad", "make_rollouts", "nan_stats", "overridden_generation_defaults", "policy_logps",
    "pure_sampling", "reward_columns", "rollout_metrics", "sample_completions", "sampling_config",
]
