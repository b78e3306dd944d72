"""completion_mask and group_advantages against plain-Python / float64 references."""

import math
import statistics

import pytest
import torch

from stable_ops import completion_mask, group_advantages

EOS = 2


def reference_mask(row, eos_ids):
    """Plain Python: ones up to and including the first EOS."""
    out = []
    seen = False
    for token in row:
        out.append(0 if seen else 1)
        seen = seen or token in eos_ids
    return out


def test_completion_mask_when_pad_equals_eos():
    # The completion "7 9 EOS", right-padded with EOS as the pad token: only the first EOS counts.
    ids = torch.tensor([[7, 9, EOS, EOS, EOS], [EOS, EOS, EOS, EOS, EOS], [7, 8, 9, 10, 11]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.int32)
    assert torch.equal(completion_mask(ids, EOS), expected)


def test_completion_mask_matches_reference_on_random_rows_and_several_eos_ids():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (64, 17), generator=gen)
    for eos_ids in ([EOS], [EOS, 5]):
        mask = completion_mask(ids, eos_ids if len(eos_ids) > 1 else eos_ids[0])
        expected = torch.tensor([reference_mask(row, eos_ids) for row in ids.tolist()], dtype=torch.int32)
        assert torch.equal(mask, expected)


def test_completion_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="must be \\(B, L\\)"):
        completion_mask(torch.zeros(5, dtype=torch.long), EOS)
    with pytest.raises(ValueError, match="eos_token_id"):
        completion_mask(torch.zeros(2, 5, dtype=torch.long), [])


def reference_advantages(rewards, group_size, scale):
    """float64 Python reference: NaN rewards are skipped in the statistics and get 0."""
    out = []
    scored_all = [r for r in rewards if not math.isnan(r)]
    batch_std = statistics.stdev(scored_all) if len(scored_all) >= 2 else 0.0
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        scored = [r for r in group if not math.isnan(r)]
        mean = sum(scored) / len(scored) if scored else 0.0
        std = statistics.stdev(scored) if len(scored) >= 2 else 0.0
        equal = len(set(scored)) <= 1
        for r in group:
            if math.isnan(r) or equal:
                out.append(0.0)
            elif scale == "group":
                out.append((r - mean) / (std + 1e-4))
            elif scale == "batch":
                out.append((r - mean) / (batch_std + 1e-4))
            else:
                out.append(r - mean)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_float64_reference(scale):
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(48, generator=gen) * 3
    rewards[[3, 10, 11, 40]] = math.nan  # reward functions that could not score
    rewards[16:24] = 0.5  # a group whose rewards are all equal
    rewards[24:31] = math.nan  # a group with one scored reward
    out = group_advantages(rewards, 8, scale)
    assert out.dtype == torch.float32 and not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), reference_advantages(rewards.tolist(), 8, scale), atol=2e-5, rtol=2e-5)


def test_group_advantages_equal_trl_formula_without_nan():
    # TRL: (r - group mean) / (group std + 1e-4), or the batch std for scale="batch".
    gen = torch.Generator().manual_seed(2)
    rewards = torch.rand(32, generator=gen, dtype=torch.float64)
    grouped = rewards.view(-1, 4)
    centered = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    group_std = grouped.std(1).repeat_interleave(4)
    torch.testing.assert_close(group_advantages(rewards, 4, "group"), centered / (group_std + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, 4, "batch"), centered / (rewards.std() + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, 4, "none"), centered)


def test_equal_rewards_give_exactly_zero():
    # 0.1 three times: the float mean is not exactly 0.1, and dividing that residue by 1e-4
    # would give a nonzero advantage to a group with nothing to learn from.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1 / 3, 1 / 3, 1 / 3, 1.0, math.nan, 1.0])
    for scale in ("group", "batch", "none"):
        assert torch.equal(group_advantages(rewards, 3, scale), torch.zeros(9))


def test_group_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="do not split into groups of num_generations=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(torch.zeros(4), 2, "global")
    with pytest.raises(ValueError, match="got inf"):
        group_advantages(torch.tensor([1.0, math.inf]), 2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
