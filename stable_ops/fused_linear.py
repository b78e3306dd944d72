"""Fused LM head: per-token log-probs from final hidden states without (B, T, V) logits.

At the Qwen2.5 vocabulary (V = 151,936) the logits of 8 completions of 1,024 tokens are 5 GB in
float32, and their gradient another 5 GB. `linear_logps` computes the same per-token
log-probabilities one tile of tokens at a time and recomputes each tile's logits in backward, so
what it holds beyond its inputs and their gradients is one tile of chunk_size x V values, plus
a (B, T) log-sum-exp. The cost is one extra matmul of the LM head in backward.
"""

from __future__ import annotations

import torch

from .logprobs import (
    accumulation_dtype,
    check_labels,
    check_temperature,
    log_sum_exp_shifted_,
    subtract_row_max_,
)

# Tokens per tile. At V = 151,936 one float32 tile is 311 MB: small next to the logits of a
# training batch, and large enough that the (V, H) weight is streamed from memory only once per
# 512 tokens in each of the three matmuls.
DEFAULT_CHUNK_SIZE = 512


def _logits_into(a: torch.Tensor, b: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """Write `a @ b / temperature` into the accumulation-dtype buffer `out` and return it.

    Used for a tile of logits, `hidden_tile @ weight.T`, and for a transposed vocabulary slice,
    `weight_slice @ hidden.T`.
    """
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)  # no temporary: the matmul writes the buffer
    else:
        # Half-precision weights: the product is taken in their dtype, as the model's own
        # lm_head would, then upcast for the softmax arithmetic.
        out.copy_(a @ b)
    if temperature != 1.0:
        out.div_(temperature)
    return out


class _LinearLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size):
        num_tokens = hidden.shape[0]  # hidden is (N, H), labels (N,)
        acc = accumulation_dtype(weight.dtype)
        out = hidden.new_empty(num_tokens, dtype=acc)
        # log-sum-exp = shift + log_sum, kept apart so backward can form `logit - shift` exactly.
        shift = hidden.new_empty(num_tokens, dtype=acc)
        log_sum = hidden.new_empty(num_tokens, dtype=acc)
        scratch = hidden.new_empty((min(chunk_size, num_tokens), weight.shape[0]), dtype=acc)  # (C, V), reused
        for i0 in range(0, num_tokens, chunk_size):
            i1 = min(i0 + chunk_size, num_tokens)
            logits = _logits_into(hidden[i0:i1], weight.t(), temperature, scratch[: i1 - i0])  # (n, V)
            shift[i0:i1] = subtract_row_max_(logits)
            picked = logits.gather(-1, labels[i0:i1, None]).squeeze(-1)  # (n,) shifted label logits
            log_sum[i0:i1] = log_sum_exp_shifted_(logits)
            out[i0:i1] = picked - log_sum[i0:i1]
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(hidden, weight, labels, shift, log_sum)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, labels, shift, log_sum = ctx.saved_tensors
        temperature = ctx.temperature
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens, vocab = hidden.shape[0], weight.shape[0]
        acc = shift.dtype
        g = grad_out.to(acc)[None, :]  # (1, N)
        # Vocabulary slices of the same element budget as the forward's token tiles:
        # N x slice <= chunk_size x V. Slicing the vocabulary rather than the tokens lets one
        # matmul over all N tokens produce each row block of the weight gradient, instead of
        # re-reading and re-writing the whole (V, H) gradient once per token tile (measurably
        # slower on CPU, and a rounding step per tile for a bfloat16 weight). Each slice's logits
        # are laid out transposed, (slice, N), the layout in which the weight-gradient matmul
        # reads them contiguously (about 3% faster overall on a 2-core AVX-512 CPU).
        vocab_slice = max(1, min(vocab, ctx.chunk_size * vocab // max(num_tokens, 1)))
        scratch = hidden.new_empty(num_tokens * vocab_slice, dtype=acc)
        # The hidden gradient sums over slices: accumulated in `acc`; it is only (N, H).
        grad_hidden = hidden.new_zeros(hidden.shape, dtype=acc) if want_hidden else None  # (N, H)
        grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if want_weight else None
        for v0 in range(0, vocab, vocab_slice):
            v1 = min(v0 + vocab_slice, vocab)
            w = weight[v0:v1]  # (n_v, H)
            buffer = scratch[: (v1 - v0) * num_tokens].view(v1 - v0, num_tokens)
            dlogits_t = _logits_into(w, hidden.t(), temperature, buffer)  # (n_v, N)
            # d logp / d logits = onehot(label) - softmax, scaled by 1/temperature.
            dlogits_t.sub_(shift[None, :]).sub_(log_sum[None, :]).exp_().mul_(-g)  # (n_v, N)
            in_slice = ((labels >= v0) & (labels < v1))[None, :]  # (1, N)
            slice_labels = (labels - v0).clamp(0, v1 - v0 - 1)[None, :]  # (1, N)
            dlogits_t.scatter_add_(0, slice_labels, torch.where(in_slice, g, 0.0))
            if temperature != 1.0:
                dlogits_t.div_(temperature)
            dlogits_t = dlogits_t.to(weight.dtype)
            if want_weight:
                torch.mm(dlogits_t, hidden, out=grad_weight[v0:v1])  # (n_v, N) @ (N, H)
            if want_hidden:
                if grad_hidden.dtype == w.dtype:
                    grad_hidden.addmm_(dlogits_t.t(), w)  # (N, n_v) @ (n_v, H)
                else:
                    grad_hidden.add_(dlogits_t.t() @ w)
        if want_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-token log-probs through the LM head: (B, T, H) hidden, (V, H) weight, (B, T) ids -> (B, T).

    Equals `per_token_logps(hidden @ weight.T, labels, temperature)`, i.e. the naive
    `log_softmax(hidden @ weight.T / temperature).gather(labels)`, but the (B, T, V) logits are
    never materialized: a custom autograd Function walks the tokens in tiles of `chunk_size`,
    computes each tile's logits, their max-subtracted log-sum-exp in float32 (float64 for float64
    inputs) and the label's log-prob, and keeps only the (B, T) log-sum-exp for backward. The
    backward recomputes the logits in vocabulary slices holding the same number of values
    (tokens x slice <= chunk_size x V). Peak extra memory is O(chunk_size x V). Gradients flow to
    both `hidden` and `weight` (tied embeddings included: pass the embedding matrix). The LM head
    must have no bias (true of Qwen2, Llama and Mistral). Returns float32, or float64 for
    float64 inputs.
    """
    if hidden.dim() != 3:
        raise ValueError(f"linear_logps: hidden must be (B, T, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"linear_logps: weight must be (V, H) with H = {hidden.shape[2]} (the hidden size), "
            f"got shape {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype or not hidden.dtype.is_floating_point:
        raise ValueError(
            f"linear_logps: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one floating dtype; "
            "cast the hidden states to the LM head's dtype"
        )
    if hidden.device != weight.device:
        raise ValueError(f"linear_logps: hidden is on {hidden.device} but weight is on {weight.device}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"linear_logps: chunk_size must be a positive int, got {chunk_size!r}")
    check_labels(labels, hidden.shape[:2], weight.shape[0], "linear_logps")
    check_temperature(temperature, "linear_logps")
    batch, length, width = hidden.shape
    flat_hidden = hidden.reshape(batch * length, width)  # (N, H); copies only a non-contiguous slice
    flat_labels = labels.reshape(batch * length).long()  # (N,)
    out = _LinearLogps.apply(flat_hidden, weight, flat_labels, float(temperature), chunk_size)  # (N,)
    return out.view(batch, length)  # (B, T)
