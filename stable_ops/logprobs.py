"""Numerically stable log-softmax and per-token log-probabilities of chosen tokens.

Everything here follows the log-sum-exp algorithm: subtract the row maximum before `exp`, so every
exponent is <= 0 and nothing overflows, and accumulate in float32 when the inputs are float16
or bfloat16 (float16 overflows at exp(11.1); bfloat16 keeps 8 bits of mantissa, too few for a
sum over 150k vocabulary entries).
"""

from __future__ import annotations

import torch

# Elements of the float32 working copy that the chunked loops below hold at once: about 64 MiB,
# whatever the vocabulary (110 token rows at the Qwen2.5 vocabulary of 151,936).
CHUNK_ELEMENTS = 1 << 24


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (so gradcheck can run); every other float type is accumulated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def subtract_row_max_(work: torch.Tensor) -> torch.Tensor:
    """Subtract each row's max from `work` (n, V) in place and return the maxima (n,).

    After this every entry is <= 0, so `exp` cannot overflow. The label's shifted logit can then
    be read off exactly (the difference of two floats within a factor of two is exact), which
    keeps log-probs accurate even when logits are around 1e4, where float32 steps by 1e-3.
    A row that is all -inf has no max: it is shifted by 0 instead of giving (-inf) - (-inf) = NaN.
    """
    shift = work.amax(dim=-1, keepdim=True)  # (n, 1)
    shift.masked_fill_(~torch.isfinite(shift), 0.0)
    work.sub_(shift)
    return shift.squeeze(-1)


def log_sum_exp_shifted_(shifted: torch.Tensor) -> torch.Tensor:
    """`log(sum(exp(shifted), -1))` of max-subtracted rows (n, V), destroying `shifted`.

    Any row with a finite entry sums to at least exp(0) = 1. Only an all -inf row sums to 0; its
    sum is raised to the smallest positive float, so its log-probs come out -inf, never NaN.
    """
    return shifted.exp_().sum(dim=-1).clamp_min_(torch.finfo(shifted.dtype).tiny).log_()  # (n,)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Stable `log_softmax`: equals the naive `x - log(sum(exp(x), dim))`.

    The naive formula overflows as soon as an entry exceeds log(float max) (88.7 in float32,
    11.1 in float16). Here the max `m` is subtracted first, `x - m - log(sum(exp(x - m)))`,
    so every exponent is <= 0. Half-precision inputs are upcast and the result is float32;
    float64 stays float64. `-inf` entries give `-inf` (and zero gradient), never NaN.
    Differentiable with ordinary autograd; it materializes a float32 copy of `x`, so for
    (B, T, V) logits use `per_token_logps`, which never does.

    >>> log_softmax(torch.tensor([100.0, 102.0, 98.0]))
    tensor([-2.1429, -0.1429, -4.1429])
    """
    work = x.to(accumulation_dtype(x.dtype))
    # The shift cancels exactly in the result, so it takes no gradient.
    shift = work.detach().amax(dim=dim, keepdim=True)
    shift = shift.masked_fill(~torch.isfinite(shift), 0.0)
    shifted = work - shift
    # After the shift the largest term is exp(0) = 1, so a sum below 1 means every entry was -inf
    # (sum 0); the floor keeps its log finite instead of -inf - -inf = NaN in the result.
    sums = shifted.exp().sum(dim=dim, keepdim=True).clamp_min(torch.finfo(work.dtype).tiny)
    return shifted - sums.log()


def check_labels(labels: torch.Tensor, batch_shape: torch.Size, vocab_size: int, name: str) -> None:
    """Raise a ValueError naming `name` unless `labels` are integer ids of shape `batch_shape` in the vocabulary."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be integer token ids, got dtype {labels.dtype}")
    if labels.shape != batch_shape:
        raise ValueError(f"{name}: labels have shape {tuple(labels.shape)}, expected {tuple(batch_shape)}")
    if labels.numel() == 0:
        return
    # One host sync; an out-of-range id would otherwise be a device-side assert on CUDA.
    low, high = (int(v) for v in torch.aminmax(labels))
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{name}: label ids must lie in [0, {vocab_size}) (the vocabulary), got min {low} and max {high}; "
            "check that the tokenizer and the model's vocabulary match"
        )


def check_temperature(temperature: float, name: str) -> None:
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")


class _PerTokenLogps(torch.autograd.Function):
    """`log_softmax(logits / temperature).gather(labels)` in row chunks, with a hand-written backward.

    Plain autograd over chunks would keep every chunk's float32 copy alive for backward (a second
    (B, T, V) tensor in total) and would build the logits gradient from one zero-filled full-size
    tensor per slice. This Function keeps only the (B, T) log-sum-exp and writes each chunk of the
    gradient, `g * (onehot(label) - softmax) / temperature`, straight into one gradient tensor.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
        batch, length, vocab = logits.shape
        acc = accumulation_dtype(logits.dtype)
        rows = max(1, min(length, CHUNK_ELEMENTS // vocab))
        scratch = logits.new_empty((rows, vocab), dtype=acc)  # reused by every chunk
        out = logits.new_empty((batch, length), dtype=acc)
        # log-sum-exp = shift + log_sum, kept apart so backward can form `logit - shift` exactly.
        shift = logits.new_empty((batch, length), dtype=acc)
        log_sum = logits.new_empty((batch, length), dtype=acc)
        # Row by row, then token chunks within the row: `logits` may be a non-contiguous slice
        # (e.g. logits[:, :-1]), which a flattening reshape would copy whole.
        for b in range(batch):
            for t0 in range(0, length, rows):
                t1 = min(t0 + rows, length)
                work = scratch[: t1 - t0].copy_(logits[b, t0:t1])  # (n, V)
                if temperature != 1.0:
                    work.div_(temperature)
                shift[b, t0:t1] = subtract_row_max_(work)
                picked = work.gather(-1, labels[b, t0:t1, None].long()).squeeze(-1)  # (n,) shifted label logits
                log_sum[b, t0:t1] = log_sum_exp_shifted_(work)
                out[b, t0:t1] = picked - log_sum[b, t0:t1]
        ctx.temperature = temperature
        ctx.save_for_backward(logits, labels, shift, log_sum)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels, shift, log_sum = ctx.saved_tensors
        batch, length, vocab = logits.shape
        temperature = ctx.temperature
        grad_out = grad_out.to(shift.dtype)
        rows = max(1, min(length, CHUNK_ELEMENTS // vocab))
        scratch = logits.new_empty((rows, vocab), dtype=shift.dtype)
        grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)  # the one (B, T, V) tensor
        for b in range(batch):
            for t0 in range(0, length, rows):
                t1 = min(t0 + rows, length)
                g = grad_out[b, t0:t1, None]  # (n, 1)
                work = scratch[: t1 - t0].copy_(logits[b, t0:t1])  # (n, V)
                if temperature != 1.0:
                    work.div_(temperature)
                work.sub_(shift[b, t0:t1, None]).sub_(log_sum[b, t0:t1, None]).exp_().mul_(-g)  # -g * softmax
                work.scatter_add_(-1, labels[b, t0:t1, None].long(), g)  # + g at the label
                if temperature != 1.0:
                    work.div_(temperature)
                grad_logits[b, t0:t1].copy_(work)
        return grad_logits, None, None


def per_token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each label: (B, T, V) logits, (B, T) ids -> (B, T).

    Equals the naive `log_softmax(logits / temperature, -1).gather(-1, labels[..., None])[..., 0]`
    computed in float64, but never allocates a second (B, T, V) tensor: it works through the
    logits in chunks of about `CHUNK_ELEMENTS` float32 values, with the max-subtracted
    log-sum-exp of `log_softmax`. Half-precision logits are accumulated and returned in float32,
    float32 stays float32, float64 stays float64 (for gradcheck). Differentiable; the backward
    allocates only the logits' own gradient.
    """
    if logits.dim() != 3:
        raise ValueError(f"per_token_logps: logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"per_token_logps: logits must be floating point, got {logits.dtype}")
    check_labels(labels, logits.shape[:2], logits.shape[2], "per_token_logps")
    check_temperature(temperature, "per_token_logps")
    return _PerTokenLogps.apply(logits, labels, float(temperature))
