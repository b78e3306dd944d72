"""Prompt datasets and the resumable prompt order (grpo_split.rollouts.data)."""

from __future__ import annotations

import pytest

from grpo_split.rollouts.data import PromptOrder


def test_prompt_order_is_seeded_reshuffled_each_epoch_and_resumable():
    order = PromptOrder(5, seed=3)
    first_epoch = order.take(5)
    assert sorted(first_epoch) == list(range(5))
    second_epoch = order.take(5)
    assert sorted(second_epoch) == list(range(5)) and second_epoch != first_epoch
    assert PromptOrder(5, seed=3).take(7) == first_epoch + second_epoch[:2]  # crossing an epoch boundary

    resumed = PromptOrder(5, seed=3)
    partial = PromptOrder(5, seed=3)
    partial.take(7)
    resumed.load_state_dict(partial.state_dict())
    assert resumed.take(6) == partial.take(6)
    with pytest.raises(ValueError, match="same dataset and seed"):
        PromptOrder(6, seed=3).load_state_dict(partial.state_dict())
