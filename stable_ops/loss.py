"""GRPO policy loss: clipped importance ratio, k3 KL penalty, and the loss normalizations.

The definitions are those of Hugging Face TRL's GRPOTrainer (`_compute_loss` in
trl/trainer/grpo_trainer.py) for the same names, so the same inputs give the same loss. TRL also
divides by the gradient-accumulation steps inside the loss; here that is left to the caller (the
DeepSpeed engine scales by it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# k3 is evaluated exactly for log-ratios x = ref - logp in [KL_LOG_RATIO_MIN, KL_LOG_RATIO_MAX].
# Above KL_LOG_RATIO_MAX it continues as its tangent line there, k3(M) + expm1(M) * (x - M): exp(x)
# itself overflows float32 above 88.7, and a plain clamp of x would zero the KL gradient exactly
# where the penalty matters most (a token the policy finds e^20 times less likely than the
# reference). The tangent keeps k3 convex, >= 0, continuous with a continuous derivative at M, and
# its gradient a constant expm1(M) = 4.9e8 that keeps pulling logp back up. M = 20 changes no
# value of a working run: sampling from the policy does not produce such tokens.
# Below, x is only bounded by -1e30, which keeps it finite if `ref - logp` of two huge finite floats
# overflows; there k3 is ~ -x - 1, linear, and cannot overflow by itself.
KL_LOG_RATIO_MAX = 20.0
KL_LOG_RATIO_MIN = -1e30
# Cap on x - M in the *value* of the tangent part, so that value (4.9e8 x 1e12 = 4.9e20) and sums of
# it over ~1e17 tokens stay finite in float32; the gradient is not capped (see `_k3_past_bound`).
# Log-probs never get there: with ref <= 0, x - M > 1e12 needs a policy log-prob below -1e12, i.e.
# logits spread over more than 1e12 nats, and the logits of a model that has not already diverged
# span tens of nats.
KL_TANGENT_EXCESS_MAX = 1e12


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): `exp(ref - logp) - (ref - logp) - 1`.

    Schulman's k3 estimator ("Approximating KL Divergence", joschu.net/blog/kl-approx.html):
    unbiased for tokens sampled from the policy and >= 0 everywhere. Computed in float32
    (float64 stays float64) as `expm1(x) - x`, which unlike `exp(x) - x - 1` does not cancel to
    rounding noise (and below 0) for small x; the tiny negative rounding residue near 0 is
    clamped to 0. For x above KL_LOG_RATIO_MAX = M the value is k3's tangent at M and the
    gradient w.r.t. logps is -expm1(M) (see the constants' comment). Value and gradient are
    finite and the value >= 0 for any finite inputs.
    """
    if logps.shape != ref_logps.shape:
        raise ValueError(f"k3_kl: logps {tuple(logps.shape)} and ref_logps {tuple(ref_logps.shape)} differ in shape")
    acc = torch.promote_types(torch.promote_types(logps.dtype, ref_logps.dtype), torch.float32)
    log_ratio = ref_logps.to(acc) - logps.to(acc)  # may overflow to +-inf: see the two branches
    inside = log_ratio.clamp(KL_LOG_RATIO_MIN, KL_LOG_RATIO_MAX)
    k3_inside = (torch.expm1(inside) - inside).clamp_min(0.0)
    # `where` sends each branch a zero gradient where it is not selected, and both branches have
    # finite local derivatives everywhere, so inside the bound value and gradient are exactly those
    # of k3_inside alone.
    return torch.where(log_ratio > KL_LOG_RATIO_MAX, _k3_past_bound(log_ratio), k3_inside)


def _k3_past_bound(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3's tangent line at M = KL_LOG_RATIO_MAX, evaluated at `log_ratio` (meaningful for x > M)."""
    bound = torch.tensor(KL_LOG_RATIO_MAX, dtype=log_ratio.dtype, device=log_ratio.device)
    slope = torch.expm1(bound)  # k3'(M) = exp(M) - 1
    k3_at_bound = slope - bound  # the inside branch's own expression at M: the pieces meet exactly
    # The value reads x detached with its excess capped, so that it stays finite for any x (an
    # overflowed +inf lands on the cap too). The gradient comes from `x - x.detach()`, which is 0 in
    # value for finite x but has derivative 1, so the slope reaches logps at every finite x, past the
    # cap as well. Only an x that overflowed to +inf gets no gradient, and that needs ref_logps > 0:
    # for log-probs, ref <= 0 gives x <= -logps, which is finite.
    excess = (log_ratio.detach() - bound).clamp(0.0, KL_TANGENT_EXCESS_MAX)
    gradient_carrier = torch.where(torch.isfinite(log_ratio), log_ratio - log_ratio.detach(), 0.0)
    return k3_at_bound + slope * (excess + gradient_carrier)


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

    Returns `(loss, metrics)`; metrics are detached scalars: `kl` (when ref_logps is given, a mean
    over unmasked tokens), `clip_ratio/low_mean` (ratio below 1 - eps_low with A < 0),
    `clip_ratio/high_mean` (above 1 + eps_high with A > 0), `clip_ratio/region_mean` (either),
    and `ratio/mean`. The ratio metrics average over unmasked tokens at token level, and over
    sequences (those with at least one unmasked token) at sequence level, where each sequence has
    one ratio: a long sequence counts once, as in TRL (see `_loss_metrics`).
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
    metrics = _loss_metrics(ratio.detach(), advantages, maskf, kl, epsilon_low, epsilon_high,
                            per_sequence=importance_sampling_level == "sequence")
    return loss, metrics


def _loss_metrics(ratio, advantages, maskf, kl, epsilon_low, epsilon_high, *, per_sequence: bool
                  ) -> dict[str, torch.Tensor]:
    """Clip and ratio metrics of (B, T) token ratios or (B, 1) sequence ratios; `kl` per token.

    Sequence-level ratios are averaged over sequences, not over tokens: TRL's GRPOTrainer does the
    same for the three clip_ratio names (huggingface/trl, trl/trainer/grpo_trainer.py at commit
    d2b69d76, `_compute_loss`: its `masked_batch_mean` takes a plain `.mean()` of a (B, 1) tensor,
    the sequence-level case, and the clip indicators go through it). TRL logs no `ratio/mean`;
    ours follows the same rule. One difference: TRL's mean also counts rows without any completion
    token (ratio 1, never clipped); here those rows are left out, as masked tokens are at token
    level. The level is passed in rather than read off the shape, because token-level ratios of
    one-token completions are (B, 1) too.
    """
    if per_sequence:
        weights = (maskf.sum(-1, keepdim=True) > 0).to(maskf.dtype)  # (B, 1): sequences with a token
    else:
        weights = maskf  # (B, T)
    count = weights.sum().clamp(min=1.0)

    def weighted_mean(x: torch.Tensor) -> torch.Tensor:
        return (x * weights).sum() / count

    adv = advantages.unsqueeze(1)  # (B, 1)
    low = (ratio < 1.0 - epsilon_low) & (adv < 0)  # same shape as ratio
    high = (ratio > 1.0 + epsilon_high) & (adv > 0)
    metrics = {
        "clip_ratio/low_mean": weighted_mean(low.to(maskf.dtype)),
        "clip_ratio/high_mean": weighted_mean(high.to(maskf.dtype)),
        "clip_ratio/region_mean": weighted_mean((low | high).to(maskf.dtype)),
        "ratio/mean": weighted_mean(ratio),
    }
    if kl is not None:
        metrics["kl"] = (kl.detach() * maskf).sum() / maskf.sum().clamp(min=1.0)
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
