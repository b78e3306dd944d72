"""GRPO policy loss: clipped importance ratio, k3 KL penalty, and the loss normalizations.

The definitions are those of Hugging Face TRL's GRPOTrainer (`_compute_loss` in
trl/trainer/grpo_trainer.py) for the same names, so the same inputs give the same loss. TRL also
divides by the gradient-accumulation steps inside the loss; here that is left to the caller (the
DeepSpeed engine scales by it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Upper bound on the log-ratio `ref - logp` inside k3. exp(20) = 4.9e8 is far from float32's
# limit (exp overflows above 88.7), so k3 and its gradient exp(x) - 1 stay finite; a token the
# policy finds e^20 times less likely than the reference does is not something sampling from
# the policy produces, so no value of a working run is changed. Below, the log-ratio is only
# bounded by -1e30, which keeps `ref - logp` finite if the subtraction of two huge finite floats
# overflows; there k3 is ~ -x - 1, linear, and cannot overflow by itself.
KL_LOG_RATIO_MAX = 20.0
KL_LOG_RATIO_MIN = -1e30


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): `exp(ref - logp) - (ref - logp) - 1`.

    Schulman's k3 estimator ("Approximating KL Divergence", joschu.net/blog/kl-approx.html):
    unbiased for tokens sampled from the policy and >= 0 everywhere. Computed in float32
    (float64 stays float64) as `expm1(x) - x`, which unlike `exp(x) - x - 1` does not cancel to
    rounding noise (and below 0) for small x. Finite and >= 0 for any finite inputs: x is
    clamped to [KL_LOG_RATIO_MIN, KL_LOG_RATIO_MAX] (see their comment), and the tiny negative
    rounding residue of `expm1(x) - x` near 0 is clamped to 0.
    """
    if logps.shape != ref_logps.shape:
        raise ValueError(f"k3_kl: logps {tuple(logps.shape)} and ref_logps {tuple(ref_logps.shape)} differ in shape")
    acc = torch.promote_types(torch.promote_types(logps.dtype, ref_logps.dtype), torch.float32)
    log_ratio = (ref_logps.to(acc) - logps.to(acc)).clamp(KL_LOG_RATIO_MIN, KL_LOG_RATIO_MAX)
    return (torch.expm1(log_ratio) - log_ratio).clamp_min(0.0)


# ---- loss normalizations: per-token loss (B, T) and mask (B, T) -> scalar ----------------------


def normalize_grpo(per_token_loss, mask, **_):
    """Mean over each sequence's tokens, then over sequences (the GRPO paper; favours short answers)."""
    return (per_token_loss.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def normalize_bnpo(per_token_loss, mask, **_):
    """Sum over all tokens / number of unmasked tokens in this batch."""
    return per_token_loss.sum() / mask.sum().clamp(min=1.0)


def normalize_dr_grpo(per_token_loss, mask, *, max_completion_length, **_):
    """Sum / (batch size x max_completion_length): a constant, so no length bias (Dr. GRPO)."""
    return per_token_loss.sum() / (per_token_loss.shape[0] * max_completion_length)


def normalize_dapo(per_token_loss, mask, *, num_items=None, **_):
    """Sum / token count, where the count may be global (DAPO's token-level loss).

    `num_items` is the count to divide by. Under data parallelism with gradients averaged over
    `world_size` ranks, pass `global_token_count / world_size`, as TRL does, so every token of the
    global batch weighs the same. Without it, this batch's own token count is used.
    """
    normalizer = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=per_token_loss.dtype)
    return per_token_loss.sum() / normalizer.clamp(min=1.0)


LOSS_NORMALIZERS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": normalize_grpo,
    "bnpo": normalize_bnpo,
    "dr_grpo": normalize_dr_grpo,
    "dapo": normalize_dapo,
}

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def importance_log_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """(B, T) masked log-ratios -> log importance weights: (B, T) per token, or (B, 1) per sequence.

    "sequence" is GSPO's sequence-level weight: the mask-averaged log-ratio of each sequence,
    i.e. the log of the geometric mean of its token ratios.
    """
    if level == "token":
        return log_ratio
    return log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1)


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float):
    """PPO's clipped objective, negated: `-min(r * A, clamp(r, 1 - eps_low, 1 + eps_high) * A)`."""
    advantages = advantages.unsqueeze(1)  # (B, 1)
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    num_items: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss of one batch and its metrics.

    Args (all per-token tensors (B, T) over completion tokens):
        logps: log-probs under the policy being trained (carries the gradient).
        old_logps: log-probs under the policy that sampled the batch; None means on-policy
            (a single pass per batch), i.e. `logps.detach()`, ratio 1 with its gradient.
        ref_logps: log-probs under the frozen reference model; may be None when `beta == 0`.
        advantages: (B,) one advantage per completion (see `group_advantages`).
        mask: completion mask, 1 for tokens that count (see `completion_mask`).
        beta: weight of the k3 KL penalty.
        epsilon_low / epsilon_high: clip range [1 - eps_low, 1 + eps_high]; eps_high defaults to eps_low.
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo" (see the normalize_* functions).
        max_completion_length: required by "dr_grpo".
        importance_sampling_level: "token", or "sequence" (GSPO).
        num_items: token count for "dapo" (see `normalize_dapo`).

    Per token: `r = exp(logps - old_logps)` and
    `loss = -min(r * A, clamp(r, 1 - eps_low, 1 + eps_high) * A) + beta * k3_kl(logps, ref_logps)`,
    then normalized by `loss_type`. Masked positions are zeroed before any arithmetic, so garbage
    there (padding, -inf, NaN) cannot reach the loss, the metrics or the gradient.

    Returns `(loss, metrics)`; metrics are detached scalars, each a mean over unmasked tokens:
    `kl` (when ref_logps is given), `clip_ratio/low_mean` (ratio below 1 - eps_low with A < 0),
    `clip_ratio/high_mean` (above 1 + eps_high with A > 0), `clip_ratio/region_mean` (either),
    and `ratio/mean`. A sequence-level weight counts once per token of its sequence.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    _check_policy_loss_args(logps, old_logps, ref_logps, advantages, mask, beta, epsilon_low, epsilon_high,
                            loss_type, max_completion_length, importance_sampling_level)
    acc = torch.promote_types(logps.dtype, torch.float32)
    keep = mask.bool()  # (B, T)
    maskf = keep.to(acc)

    def masked(x: torch.Tensor) -> torch.Tensor:
        # Zero masked positions before any arithmetic: padding may hold -inf or NaN, and
        # `0 * inf` would poison the loss, the metrics, or (through `where`) the gradient.
        return torch.where(keep, x.to(acc), 0.0)

    logps = masked(logps)
    old_logps = logps.detach() if old_logps is None else masked(old_logps)
    advantages = advantages.to(acc)

    log_ratio = logps - old_logps  # (B, T)
    log_weights = importance_log_weights(log_ratio, maskf, importance_sampling_level)  # (B, T) or (B, 1)
    ratio = torch.exp(log_weights)
    per_token = clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high)  # (B, T) or (B, 1)
    per_token = per_token.expand_as(logps)  # (B, T)

    kl = None
    if ref_logps is not None:
        kl = k3_kl(logps if beta != 0.0 else logps.detach(), masked(ref_logps))  # (B, T); 0 where masked
        if beta != 0.0:
            per_token = per_token + beta * kl

    per_token = torch.where(keep, per_token, 0.0)
    loss = LOSS_NORMALIZERS[loss_type](
        per_token, maskf, max_completion_length=max_completion_length, num_items=num_items
    )
    metrics = _loss_metrics(ratio.detach(), advantages, maskf, kl, epsilon_low, epsilon_high)
    return loss, metrics


def _loss_metrics(ratio, advantages, maskf, kl, epsilon_low, epsilon_high) -> dict[str, torch.Tensor]:
    token_count = maskf.sum().clamp(min=1.0)

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return (x.expand_as(maskf) * maskf).sum() / token_count

    adv = advantages.unsqueeze(1)  # (B, 1)
    low = (ratio < 1.0 - epsilon_low) & (adv < 0)
    high = (ratio > 1.0 + epsilon_high) & (adv > 0)
    metrics = {
        "clip_ratio/low_mean": masked_mean(low.to(maskf.dtype)),
        "clip_ratio/high_mean": masked_mean(high.to(maskf.dtype)),
        "clip_ratio/region_mean": masked_mean((low | high).to(maskf.dtype)),
        "ratio/mean": masked_mean(ratio),
    }
    if kl is not None:
        metrics["kl"] = masked_mean(kl.detach())
    return metrics


def _check_policy_loss_args(logps, old_logps, ref_logps, advantages, mask, beta, epsilon_low, epsilon_high,
                            loss_type, max_completion_length, importance_sampling_level) -> None:
    if loss_type not in LOSS_NORMALIZERS:
        raise ValueError(f"policy_loss: loss_type must be one of {tuple(LOSS_NORMALIZERS)}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"policy_loss: importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
            f"got {importance_sampling_level!r}"
        )
    if loss_type == "dr_grpo" and not (max_completion_length and max_completion_length > 0):
        raise ValueError("policy_loss: loss_type 'dr_grpo' needs max_completion_length (a positive int)")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"policy_loss: beta={beta} needs ref_logps; pass them, or set beta=0 to train without KL")
    if not (epsilon_low >= 0 and epsilon_high >= 0):
        raise ValueError(f"policy_loss: epsilon_low ({epsilon_low}) and epsilon_high ({epsilon_high}) must be >= 0")
    if logps.dim() != 2:
        raise ValueError(f"policy_loss: logps must be (B, T), got shape {tuple(logps.shape)}")
    for name, tensor in (("old_logps", old_logps), ("ref_logps", ref_logps), ("mask", mask)):
        if tensor is not None and tensor.shape != logps.shape:
            raise ValueError(f"policy_loss: {name} has shape {tuple(tensor.shape)}, logps has {tuple(logps.shape)}")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(
            f"policy_loss: advantages must be (B,) = ({logps.shape[0]},), got shape {tuple(advantages.shape)}"
        )
