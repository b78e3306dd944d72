"""Completion masks and group-relative advantages: the per-rollout bookkeeping of GRPO."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Added to the standard deviation before dividing, as in TRL's GRPOTrainer, so a group whose
# rewards barely differ does not turn rounding noise into huge advantages.
STD_EPS = 1e-4

SCALE_MODES = ("group", "batch", "none")


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """(B, L) completion ids -> (B, L) int32 mask: 1 up to and including the first EOS, 0 after.

    A row without EOS is all ones (a truncated completion). The mask is found from the position
    of the first EOS, never from padding, so it is right when the pad token equals EOS (a mask derived
    from `pad_token_id` then drops the EOS token itself). `eos_token_id` may be
    one id or several (chat models often stop on more than one).
    """
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_mask: completion_ids must be (B, L), got shape {tuple(completion_ids.shape)}")
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not eos_ids or not all(isinstance(i, int) for i in eos_ids):
        raise ValueError(f"completion_mask: eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    length = completion_ids.shape[1]
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # (B, L)
    positions = torch.arange(length, device=completion_ids.device)  # (L,)
    # Position of the first EOS, or L for a row without one.
    first_eos = torch.where(is_eos, positions, length).amin(dim=1, keepdim=True)  # (B, 1)
    return (positions <= first_eos).to(torch.int32)  # (B, L)


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale: str = "group", batch_std: float | torch.Tensor | None = None
) -> torch.Tensor:
    """(N,) rewards of N / G groups of G consecutive completions -> (N,) advantages.

    Equals TRL's GRPO advantage `(r - mean_group(r)) / (std + 1e-4)` with Bessel's correction,
    where std is the group's (`scale="group"`), the whole batch's (`"batch"`), or no division at
    all (`"none"`, Dr. GRPO). Two guarantees the naive formula lacks:
    - a NaN reward (a reward function that could not score) is left out of its group's mean and
      std (and of the batch std) and gets advantage 0, so it neither helps nor hurts;
    - a group whose rewards are all equal, or that has fewer than two scored rewards, gets
      exactly 0 (never NaN, never rounding noise divided by 1e-4).
    Computed in float32 (float64 inputs stay float64). Infinite rewards are an error.

    `batch_std` (only with `scale="batch"`): the std to divide by, when this tensor holds only part
    of the step's rewards. Under data parallelism each rank scores its own groups, but "batch" means
    the whole step on all ranks (TRL gathers every process's rewards before taking the std), so the
    caller passes `reward_std(...)` of the whole step; default: the std of `rewards` themselves.
    """
    if scale not in SCALE_MODES:
        raise ValueError(f"group_advantages: scale must be one of {SCALE_MODES}, got {scale!r}")
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if not (isinstance(num_generations, int) and num_generations >= 1):
        raise ValueError(f"group_advantages: num_generations must be a positive int, got {num_generations!r}")
    if rewards.numel() % num_generations:
        raise ValueError(
            f"group_advantages: {rewards.numel()} rewards do not split into groups of num_generations="
            f"{num_generations}; pass the G completions of each prompt consecutively"
        )
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    if torch.isinf(rewards).any():
        raise ValueError("group_advantages: rewards must be finite (NaN marks 'could not score'); got inf")

    grouped = rewards.view(-1, num_generations)  # (N/G, G)
    scored = ~torch.isnan(grouped)  # (N/G, G)
    count = scored.sum(dim=1, keepdim=True)  # (N/G, 1)
    values = torch.where(scored, grouped, 0.0)
    mean = values.sum(dim=1, keepdim=True) / count.clamp(min=1)  # (N/G, 1)
    centered = torch.where(scored, grouped - mean, 0.0)  # (N/G, G)
    # Exactly 0 for equal rewards: their mean can differ from each of them by a rounding error.
    spread = torch.where(scored, grouped, -torch.inf).amax(1, keepdim=True) - torch.where(
        scored, grouped, torch.inf
    ).amin(1, keepdim=True)  # (N/G, 1); -inf for an unscored group
    centered = torch.where(spread > 0, centered, 0.0)

    if scale == "group":
        centered = centered / (_bessel_std(centered, count, dim=1) + STD_EPS)
    elif scale == "batch" and batch_std is not None:
        centered = centered / (torch.as_tensor(batch_std, dtype=centered.dtype) + STD_EPS)
    elif scale == "batch":
        batch_count = scored.sum()
        batch_mean = values.sum() / batch_count.clamp(min=1)
        batch_centered = torch.where(scored, grouped - batch_mean, 0.0).view(-1)  # (N,)
        centered = centered / (_bessel_std(batch_centered, batch_count, dim=0) + STD_EPS)
    return centered.view(-1)  # (N,)


def reward_std_from_moments(count: float, total: float, total_sq: float) -> float:
    """Sample std (Bessel) of scored rewards from their count, sum and sum of squares; 0 below two.

    The three moments add over ranks with one all-reduce, which is how the trainer gets the std of
    the whole step's rewards. Summed in float64 by the caller: rewards are O(1), so the cancellation
    in `total_sq - total**2 / count` loses at most ~1e-12 relative, far below float32 rounding.
    """
    if count < 2:
        return 0.0
    variance = (total_sq - total * total / count) / (count - 1)
    return max(variance, 0.0) ** 0.5


def reward_moments(rewards: torch.Tensor) -> list[float]:
    """(N,) rewards with NaN for unscored -> [count, sum, sum of squares] of the scored ones, float64."""
    kept = rewards[~torch.isnan(rewards)].double()
    return [float(kept.numel()), kept.sum().item(), kept.square().sum().item()]


def _bessel_std(centered: torch.Tensor, count: torch.Tensor, dim: int) -> torch.Tensor:
    """Sample std along `dim` of values already centered (0 where unscored); 0 below two samples."""
    sum_sq = centered.square().sum(dim=dim, keepdim=True)
    return torch.where(count >= 2, sum_sq / (count - 1).clamp(min=1), 0.0).sqrt()
