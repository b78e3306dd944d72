"""Numerically stable, memory-bounded GRPO math in pure torch.

Importable with torch alone (no transformers, no deepspeed, no network), so the trainer, the
reference server and the tests share one implementation of every formula.
"""

from .advantages import completion_mask, group_advantages, reward_moments, reward_std_from_moments
from .fused_linear import linear_logps
from .fused_loss import linear_policy_loss
from .logprobs import log_softmax, per_token_logps
from .loss import k3_kl, policy_loss

__all__ = [
    "completion_mask",
    "group_advantages",
    "k3_kl",
    "linear_logps",
    "linear_policy_loss",
    "log_softmax",
    "per_token_logps",
    "policy_loss",
    "reward_moments",
    "reward_std_from_moments",
]
