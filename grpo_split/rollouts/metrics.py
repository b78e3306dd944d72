"""Rollout statistics of a whole step (all ranks' rows gathered), under TRL's metric names."""

from __future__ import annotations

import math

import torch


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
