"""Sampling completions: chat-formatted prompts, left padding, EOS ids, and `generate` configured so
that completions are drawn from exactly the distribution the loss assumes, softmax(logits / T)
with top-p, whatever the model's own generation_config.json ships; each group's prompt prefilled once."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from grpo_split.modeling import PrefixPlan, shared_prefix_cache


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
                       eos_ids: list[int], pad_id: int, return_sampler_logps: bool = False,
                       prefix: PrefixPlan | None = None):
    """(B, P) left-padded prompts -> (B * G, C) completion ids, G consecutive rows per prompt.

    Sampling is exactly softmax(logits / temperature) with top-p, whatever the model's own
    generation_config.json says (see `sampling_config`). Each distinct prompt is prefilled once
    (`shared_prefix_cache`) where `prefix` (default: the model's `prefix_plan`) allows, rather than
    G times; `UNSHARED` forces the plain `generate`, which repeats every prompt G times. With
    `return_sampler_logps`, also the (B * G, C) log-probs of each sampled token under the
    distribution `generate` sampled from (its processed scores), which is how tests check that
    sampler and loss agree.
    """
    config = sampling_config(settings, eos_ids, pad_id)
    device = next(model.parameters()).device
    inputs = _generate_inputs(model, prompt_ids.to(device), prompt_mask.to(device), config, prefix)
    with pure_sampling(model):
        output = model.generate(**inputs, generation_config=config, return_dict_in_generate=True,
                                output_scores=return_sampler_logps)
    completions = output.sequences[:, prompt_ids.shape[1] :].cpu()  # (B * G, C)
    if not return_sampler_logps:
        return completions
    scores = torch.stack(output.scores, dim=1).float().log_softmax(-1)  # (B * G, C, V)
    return completions, scores.gather(-1, completions[..., None].to(scores.device)).squeeze(-1).cpu()


def _generate_inputs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, config, prefix) -> dict:
    """`generate`'s prompt inputs. Shared: the first P - 1 tokens of each distinct prompt forwarded once,
    their cache expanded to the prompt's G consecutive rows, and the rows repeated to match, so that
    `generate` forwards only each row's last prompt token before it samples (the rows and the
    sampling are those of the plain call). Else the B prompts, for `generate` to repeat G times."""
    G = config.num_return_sequences
    ids = prompt_ids.repeat_interleave(G, dim=0)  # (B * G, P): the rows generate would expand the prompts to
    mask = prompt_mask.repeat_interleave(G, dim=0)
    shared = shared_prefix_cache(model, ids, mask, prompt_ids.shape[1] - 1, prefix)
    if shared is None:
        return {"input_ids": prompt_ids, "attention_mask": prompt_mask}
    config.num_return_sequences = 1  # the rows are repeated already
    return {"input_ids": ids, "attention_mask": mask, **shared}
