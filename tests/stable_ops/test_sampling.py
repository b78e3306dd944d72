"""stable_ops.sampling: the inverse-CDF sampler draws from the given distribution, never a zero, and
top-p keeps the nucleus transformers' TopPLogitsWarper keeps."""

from __future__ import annotations

import pytest
import torch

from stable_ops.sampling import BLOCK, sample_rows, top_p_log_probs


def test_draws_follow_the_distribution_across_block_boundaries_and_never_pick_a_zero():
    vocab = 3 * BLOCK + 37  # a short last block
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(vocab, generator=gen) ** 4  # uneven mass
    probs[::3] = 0.0  # every third entry impossible
    probs[BLOCK - 1] = 5.0  # a spike at the end of a block ...
    probs[BLOCK] = 3.0  # ... and one at the start of the next
    probs[-1] = 2.0  # and one in the short last block
    draws = 60_000
    torch.manual_seed(1)
    picks = sample_rows(probs.expand(draws, vocab))  # unnormalized rows are fine
    counts = torch.bincount(picks, minlength=vocab).double()
    expected = probs.double() / probs.sum() * draws
    assert counts[probs == 0].sum() == 0
    # Every entry within 5 standard deviations of its binomial expectation.
    std = (expected * (1 - expected / draws)).sqrt()
    assert ((counts - expected).abs() <= 5 * std + 1).all()
    # Pearson's chi-square over the possible entries, well inside its mean + 5 std.
    possible = probs > 0
    chi2 = ((counts[possible] - expected[possible]) ** 2 / expected[possible]).sum()
    dof = int(possible.sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (float(chi2), dof)


@pytest.mark.parametrize("where", [0, BLOCK - 1, BLOCK, 2 * BLOCK + 5])
def test_a_one_hot_row_always_draws_its_token(where):
    probs = torch.zeros(50, 2 * BLOCK + 6)
    probs[:, where] = 1e-30  # tiny but positive: the only possible draw
    assert (sample_rows(probs) == where).all()


def test_rows_without_any_mass_are_an_error():
    probs = torch.ones(3, 10)
    probs[1] = 0.0
    with pytest.raises(ValueError, match="no positive probability"):
        sample_rows(probs)
    probs[1] = torch.nan
    with pytest.raises(ValueError, match="no positive probability"):
        sample_rows(probs)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_what_transformers_keeps(top_p):
    from transformers.generation.logits_process import TopPLogitsWarper

    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 3000, generator=gen) * 3
    ours = top_p_log_probs(torch.log_softmax(logits, -1), top_p)
    theirs = torch.log_softmax(TopPLogitsWarper(top_p)(None, logits.clone()), -1)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = torch.isfinite(ours)
    torch.testing.assert_close(ours[kept], theirs[kept], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.exp().sum(-1), torch.ones(16), atol=1e-5, rtol=0)


def test_top_p_of_one_changes_nothing():
    log_probs = torch.log_softmax(torch.randn(4, 100), -1)
    assert top_p_log_probs(log_probs, 1.0) is log_probs
