"""Loading causal LMs and computing per-token log-probs of completions with `stable_ops`.

Shared by the reference server (frozen reference model) and the trainer (old and current
policy log-probs), so both sides compute log-probs the same way.
"""

from __future__ import annotations

import torch

from stable_ops import linear_logps, per_token_logps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when present, else cpu; an explicit device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on a GPU that supports it, else float32 (CPU half-precision matmuls are slow)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def load_frozen_model(path: str, device: torch.device, dtype: torch.dtype):
    """A causal LM in eval mode with gradients off, loaded through `from_pretrained` like any model."""
    from transformers import AutoModelForCausalLM  # heavy import, kept out of module import time

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise FileNotFoundError(
            f"cannot load a model from {path!r}: {exc}. Pass a local model directory (config.json + weights) "
            "or a hub name this machine can download"
        ) from exc
    model.to(device).eval().requires_grad_(False)
    return model


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, T) positions counting only attended tokens.

    With left padding, the first real token gets position 0, exactly as in the unpadded row, so
    a padded row gets the same log-probs as the row alone.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _has_plain_lm_head(model) -> bool:
    """True when logits are exactly `hidden @ lm_head.weight.T`: no bias, softcapping or logit scale."""
    head = model.get_output_embeddings()
    config = model.config
    return (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) in (None, 1.0)
    )


def completion_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_length: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(B, T) prompt + completion ids -> (B, T - P) log-probs of the completion tokens, float32.

    Uses the fused LM head (`stable_ops.linear_logps`) on the final hidden states when the model
    has a plain linear head, so a 152k vocabulary never needs B x T x V memory; other heads go
    through the full logits and `stable_ops.per_token_logps`. Gradients flow when the caller has
    them enabled.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    labels = input_ids[:, prompt_length:]  # (B, C)
    position_ids = position_ids_from_mask(attention_mask)
    if _has_plain_lm_head(model):
        hidden = model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
        # The state at position t predicts token t + 1: completion tokens P..T-1 come from P-1..T-2.
        hidden = hidden[:, prompt_length - 1 : -1]  # (B, C, H)
        return _head_logps(model.get_output_embeddings(), hidden, labels, temperature)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).logits  # (B, T, V)
    return per_token_logps(logits[:, prompt_length - 1 : -1], labels, temperature)


def _head_logps(head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor, temperature: float):
    """`linear_logps` with the head's weight; (B, C, H) -> (B, C).

    Under DeepSpeed ZeRO-3 the weight is a partitioned placeholder except while its own module runs
    (ZeRO-3 gathers a module's parameters in its forward hooks and again before its backward), so the
    fused computation is run *as* the head's forward: the hooks gather the full weight for it and for
    its backward, exactly as they would for the plain Linear, and the logits are still never built.
    Tied embeddings need nothing special: the head's weight is the embedding's parameter.
    """

    def fused_forward(states: torch.Tensor) -> torch.Tensor:
        return linear_logps(states.to(head.weight.dtype), head.weight, labels, temperature)

    if not hasattr(head.weight, "ds_id"):  # not partitioned: call directly, no hook machinery
        return fused_forward(hidden)
    head.forward = fused_forward
    try:
        return head(hidden)
    finally:
        del head.forward  # back to the class's Linear.forward


def row_chunks(num_rows: int, row_length: int, max_tokens: int) -> list[slice]:
    """Split rows into consecutive slices of at most `max_tokens` tokens each (at least one row each)."""
    rows = max(1, max_tokens // max(row_length, 1))
    return [slice(i, min(i + rows, num_rows)) for i in range(0, num_rows, rows)]


@torch.inference_mode()
def reference_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_length: int,
    temperature: float = 1.0,
    max_batch_tokens: int = 1 << 16,
) -> torch.Tensor:
    """Frozen-model completion log-probs, (B, T - P) float32 on the CPU, in micro-batches of `max_batch_tokens`."""
    device = next(model.parameters()).device
    outputs = []
    for rows in row_chunks(input_ids.shape[0], input_ids.shape[1], max_batch_tokens):
        mask = None if attention_mask is None else attention_mask[rows].to(device)
        out = completion_logps(model, input_ids[rows].to(device), mask, prompt_length, temperature)
        outputs.append(out.float().cpu())
    return torch.cat(outputs)  # (B, C)
