"""Sampling completions: chat-formatted prompts, left padding, EOS ids, and a decoding loop that draws
from exactly the distribution the loss assumes, softmax(logits / T) with top-p, whatever the model's
own generation_config.json ships; each group's prompt prefilled once."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from grpo_split.modeling import (
    PrefixPlan,
    cache_keyword,
    position_ids_from_mask,
    returned_cache,
    shared_prefix_cache,
)
from stable_ops.sampling import sample_rows, top_p_log_probs


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
# top_p, and `decode` computes that from the logits itself; this list only serves to tell the user.
_DISTRIBUTION_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
    "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "sequence_bias", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
    "min_length", "min_new_tokens", "exponential_decay_length_penalty", "renormalize_logits", "guidance_scale",
    "diversity_penalty", "num_beams", "num_beam_groups", "penalty_alpha", "watermarking_config", "do_sample",
    "top_h", "length_penalty", "low_memory", "dola_layers",
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


@torch.no_grad()
def sample_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, settings: SamplingSettings,
                       eos_ids: list[int], pad_id: int, return_sampler_logps: bool = False,
                       prefix: PrefixPlan | None = None):
    """(B, P) left-padded prompts -> (B * G, C) completion ids, G consecutive rows per prompt.

    Sampling is exactly softmax(logits / temperature) with top-p, computed here from the model's
    logits (`decode`): the model's own generation_config.json (penalties, top_k, its temperature)
    never enters, and no `generate` call merges it in. Each distinct prompt is prefilled once
    (`shared_prefix_cache`) where `prefix` (default: the model's `prefix_plan`) allows, rather than
    G times; `UNSHARED` forces every row to prefill its own prompt. With `return_sampler_logps`,
    also the (B * G, C) log-probs of each sampled token under the distribution it was drawn from
    (NaN after a row's EOS), which is how tests check that sampler and loss agree.
    """
    device = next(model.parameters()).device
    G = settings.num_generations
    ids = prompt_ids.repeat_interleave(G, dim=0).to(device)  # (N, P), N = B * G
    mask = prompt_mask.repeat_interleave(G, dim=0).to(device)
    positions = position_ids_from_mask(mask)  # (N, P)
    shared = shared_prefix_cache(model, ids, mask, ids.shape[1] - 1, prefix)
    if shared is None:  # every row prefills its whole prompt
        first = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    else:  # the cache holds each row's first P - 1 tokens; the last one opens the decoding
        first = {"input_ids": ids[:, -1:], "attention_mask": mask, "position_ids": positions[:, -1:], **shared}
    completions, logps = decode(model, first, settings, eos_ids, pad_id)
    completions = completions.cpu()
    return (completions, logps.cpu()) if return_sampler_logps else completions


def decode(model, first: dict, settings: SamplingSettings, eos_ids: list[int], pad_id: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestral sampling from `first` (the forward inputs that end with each row's last prompt token):
    -> (N, C) ids (`pad_id` after a row's EOS) and (N, C) float32 log-probs of each drawn token (NaN after EOS).

    Each step is one forward of the new tokens with the KV cache, softmax(logits / T) in float32,
    top-p, and `stable_ops.sample_rows` (inverse-CDF; `torch.multinomial` cost 56-560 ms per step at
    64 rows, see stable_ops/sampling.py). Stops when every row has drawn an EOS, or at max_completion_length.
    """
    cache_key = cache_keyword(model)
    if cache_key is None:
        raise ValueError(f"{type(model).__name__}.forward takes no KV cache (neither `cache` nor `past_key_values`), "
                         "which decoding needs; use a causal LM from transformers")
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    eos = torch.tensor(eos_ids, device=first["input_ids"].device)
    inputs = first
    mask, position = first["attention_mask"], first["position_ids"][:, -1:]  # (N, L), (N, 1)
    finished = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    tokens, logps = [], []
    for _ in range(settings.max_completion_length):
        out = model(**inputs, use_cache=True, **keep_last)
        log_probs = torch.log_softmax(out.logits[:, -1].float() / settings.temperature, dim=-1)  # (N, V)
        log_probs = top_p_log_probs(log_probs, settings.top_p)
        token = sample_rows(log_probs.exp())  # (N,)
        drawn = log_probs.gather(1, token[:, None]).squeeze(1)
        tokens.append(torch.where(finished, pad_id, token))
        logps.append(torch.where(finished, torch.nan, drawn))
        finished = finished | torch.isin(token, eos)
        if bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (N, L + 1)
        position = position + 1
        inputs = {"input_ids": tokens[-1][:, None], "attention_mask": mask, "position_ids": position,
                  cache_key: returned_cache(out)}
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)  # (N, C), (N, C)
