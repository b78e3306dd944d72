"""Fused LM head: per-token log-probs from final hidden states without (B, T, V) logits.

At the Qwen2.5 vocabulary (V = 151,936) the logits of 8 completions of 1,024 tokens are 5 GB in
float32, and their gradient another 5 GB. `linear_logps` computes the same per-token
log-probabilities one tile of tokens at a time and recomputes each tile's logits in backward, so
what it holds beyond its inputs and their gradients is one tile of chunk_size x V values, plus
a (B, T) log-sum-exp. The cost is one extra matmul of the LM head in backward.

Some heads transform the logits `z = hidden @ W.T` before the softmax: Granite divides them by
`config.logits_scaling`, Cohere multiplies them by `logit_scale`, Gemma 2/3 soft-cap them with
`cap * tanh(z / cap)`. `linear_logps` takes the transform as `logit_scale` and `softcap` and
applies it tile by tile, so such heads keep the memory bound instead of falling back to logits.
"""

from __future__ import annotations

import math

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


def _logits_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the raw logits `a @ b` into the accumulation-dtype buffer `out` and return it.

    Used for a tile of logits, `hidden_tile @ weight.T`, and for a transposed vocabulary slice,
    `weight_slice @ hidden.T`.
    """
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)  # no temporary: the matmul writes the buffer
    else:
        # Half-precision weights: the product is taken in their dtype, as the model's own
        # lm_head would, then upcast for the softmax arithmetic.
        out.copy_(a @ b)
    return out


def _transform_(
    z: torch.Tensor, logit_scale: float, softcap: float | None, temperature: float, slope: torch.Tensor | None = None
) -> torch.Tensor:
    """In place: raw logits `z` -> `f(z) / temperature`, with `f` the head's transform; returns `z`.

    When `slope` (a buffer shaped like `z`) is given, it receives `d (f(z) / temperature) / dz`,
    which the backward needs only for the soft-cap (elsewhere the slope is a constant).
    """
    if softcap is None:
        if logit_scale == 1.0:
            if temperature != 1.0:
                z.div_(temperature)  # the plain head: the same rounding as per_token_logps
        else:
            z.mul_(logit_scale / temperature)
        return z
    z.mul_(logit_scale / softcap)  # x = scale * z / cap
    if slope is not None:
        # d/dz cap * tanh(x) / T = scale * sech(x)^2 / T. Through cosh rather than 1 - tanh(x)^2:
        # where tanh rounds to +-1 the difference cancels to 0 in float32, while 1 / cosh^2 keeps
        # its relative accuracy and only underflows to 0 (cosh^2 = inf) where the true slope is
        # below the smallest float anyway.
        torch.cosh(z, out=slope).square_().reciprocal_().mul_(logit_scale / temperature)
    return z.tanh_().mul_(softcap / temperature)


class _LinearLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, logit_scale, softcap):
        num_tokens = hidden.shape[0]  # hidden is (N, H), labels (N,)
        acc = accumulation_dtype(weight.dtype)
        out = hidden.new_empty(num_tokens, dtype=acc)
        # log-sum-exp = shift + log_sum, kept apart so backward can form `logit - shift` exactly.
        shift = hidden.new_empty(num_tokens, dtype=acc)
        log_sum = hidden.new_empty(num_tokens, dtype=acc)
        scratch = hidden.new_empty((min(chunk_size, num_tokens), weight.shape[0]), dtype=acc)  # (C, V), reused
        for i0 in range(0, num_tokens, chunk_size):
            i1 = min(i0 + chunk_size, num_tokens)
            logits = _logits_into(hidden[i0:i1], weight.t(), scratch[: i1 - i0])  # (n, V)
            _transform_(logits, logit_scale, softcap, temperature)
            shift[i0:i1] = subtract_row_max_(logits)
            picked = logits.gather(-1, labels[i0:i1, None]).squeeze(-1)  # (n,) shifted label logits
            log_sum[i0:i1] = log_sum_exp_shifted_(logits)
            out[i0:i1] = picked - log_sum[i0:i1]
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.logit_scale = logit_scale
        ctx.softcap = softcap
        ctx.save_for_backward(hidden, weight, labels, shift, log_sum)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, labels, shift, log_sum = ctx.saved_tensors
        temperature, logit_scale, softcap = ctx.temperature, ctx.logit_scale, ctx.softcap
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
        # The soft-cap's slope varies per logit: one more slice-sized buffer, the only extra memory it costs.
        slope_scratch = hidden.new_empty(num_tokens * vocab_slice, dtype=acc) if softcap is not None else None
        # A scale or temperature alone has a constant slope.
        constant_slope = logit_scale / temperature
        # The hidden gradient sums over slices: accumulated in `acc`; it is only (N, H).
        grad_hidden = hidden.new_zeros(hidden.shape, dtype=acc) if want_hidden else None  # (N, H)
        grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if want_weight else None
        for v0 in range(0, vocab, vocab_slice):
            v1 = min(v0 + vocab_slice, vocab)
            w = weight[v0:v1]  # (n_v, H)
            buffer = scratch[: (v1 - v0) * num_tokens].view(v1 - v0, num_tokens)
            slope = None if slope_scratch is None else slope_scratch[: buffer.numel()].view_as(buffer)
            dlogits_t = _logits_into(w, hidden.t(), buffer)  # (n_v, N) raw logits z
            _transform_(dlogits_t, logit_scale, softcap, temperature, slope)  # (n_v, N) y = f(z) / T
            # d logp / dy = onehot(label) - softmax(y).
            dlogits_t.sub_(shift[None, :]).sub_(log_sum[None, :]).exp_().mul_(-g)  # (n_v, N)
            in_slice = ((labels >= v0) & (labels < v1))[None, :]  # (1, N)
            slice_labels = (labels - v0).clamp(0, v1 - v0 - 1)[None, :]  # (1, N)
            dlogits_t.scatter_add_(0, slice_labels, torch.where(in_slice, g, 0.0))
            # Chain rule back to the raw logits: d logp / dz = d logp / dy * dy / dz.
            if slope is not None:
                dlogits_t.mul_(slope)
            elif logit_scale == 1.0 and temperature != 1.0:
                dlogits_t.div_(temperature)
            elif constant_slope != 1.0:
                dlogits_t.mul_(constant_slope)
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
        return grad_hidden, grad_weight, None, None, None, None, None


def _check_positive_finite(value, name: str, what: str) -> float:
    """`value` as a float, or a ValueError naming the argument unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"linear_logps: {name} must be a number ({what}), got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"linear_logps: {name} must be finite and > 0 ({what}), got {value!r}")
    return float(value)


def linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-token log-probs through the LM head: (B, T, H) hidden, (V, H) weight, (B, T) ids -> (B, T).

    Equals `per_token_logps(f(hidden @ weight.T), labels, temperature)`, i.e. the naive
    `log_softmax(f(hidden @ weight.T) / temperature).gather(labels)`, where the head's transform
    is `f(z) = softcap * tanh(logit_scale * z / softcap)` when `softcap` is set (Gemma 2/3's
    `final_logit_softcapping`) and `f(z) = logit_scale * z` otherwise (Cohere's `logit_scale`;
    Granite's `logits_scaling` is `logit_scale = 1 / logits_scaling`). A cap applied before a
    scale, `s * c * tanh(z / c)`, is the same function with `softcap = s * c`. The (B, T, V) logits are
    never materialized: a custom autograd Function walks the tokens in tiles of `chunk_size`,
    computes each tile's logits, their max-subtracted log-sum-exp in float32 (float64 for float64
    inputs) and the label's log-prob, and keeps only the (B, T) log-sum-exp for backward. The
    backward recomputes the logits in vocabulary slices holding the same number of values
    (tokens x slice <= chunk_size x V); a soft-cap adds one more buffer of that size for its
    slope. Peak extra memory is O(chunk_size x V). Gradients flow to both `hidden` and `weight`
    (tied embeddings included: pass the embedding matrix). The LM head must have no bias (true of
    Qwen2, Llama and Mistral). Returns float32, or float64 for float64 inputs.
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
    logit_scale = _check_positive_finite(logit_scale, "logit_scale", "the factor applied to hidden @ weight.T")
    if softcap is not None:
        softcap = _check_positive_finite(softcap, "softcap", "the bound of softcap * tanh(z / softcap); None for none")
    batch, length, width = hidden.shape
    flat_hidden = hidden.reshape(batch * length, width)  # (N, H); copies only a non-contiguous slice
    flat_labels = labels.reshape(batch * length).long()  # (N,)
    out = _LinearLogps.apply(
        flat_hidden, weight, flat_labels, float(temperature), chunk_size, logit_scale, softcap
    )  # (N,)
    return out.view(batch, length)  # (B, T)
