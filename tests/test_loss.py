"""k3_kl and policy_loss: hand-computed cases, TRL's definitions, clipping, and degenerate rows."""

import math

import pytest
import torch

from stable_ops import k3_kl, policy_loss

# ---- k3 ------------------------------------------------------------------------------------


def test_k3_matches_float64_formula():
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(64, generator=gen) * 8
    ref = -torch.rand(64, generator=gen) * 8
    x = ref.double() - logps.double()
    expected = torch.exp(x) - x - 1
    out = k3_kl(logps, ref)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-5)


def test_k3_half_inputs_computed_in_float32():
    logps = torch.tensor([-1.0, -3.0], dtype=torch.bfloat16)
    ref = torch.tensor([-1.5, -2.0], dtype=torch.bfloat16)
    assert k3_kl(logps, ref).dtype == torch.float32


def test_k3_finite_and_nonnegative_for_any_finite_inputs():
    big = torch.finfo(torch.float32).max
    logps = torch.tensor([0.0, -1e4, 0.0, big, -big, -1e-8, -3.0], requires_grad=True)
    ref = torch.tensor([-1e4, 0.0, -1e-30, -big, big, -1e-8 - 1e-9, -3.0 + 1e-7])
    out = k3_kl(logps, ref)
    assert torch.isfinite(out).all() and (out >= 0).all()
    # A large log-ratio in the safe direction keeps its exact, linear value: -x - 1.
    assert out[0].item() == pytest.approx(1e4 - 1)
    out.sum().backward()
    assert torch.isfinite(logps.grad).all()


def test_k3_small_log_ratios_do_not_go_negative():
    # exp(x) - x - 1 in float32 cancels to rounding noise, negative half the time, for |x| < 1e-4.
    x = torch.linspace(-1e-4, 1e-4, 2001)
    logps = torch.full_like(x, -2.0)
    out = k3_kl(logps, logps + x)
    assert (out >= 0).all()
    naive = torch.exp(x) - x - 1
    assert (naive < 0).any()  # the trap k3_kl avoids


# ---- policy_loss: one hand-computed batch ----------------------------------------------------
# Two completions of up to 3 tokens; the first has 2 tokens (its third is padding).
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
LOGPS = torch.tensor([[-0.8, -2.0, -5.0], [-0.5, -1.5, -3.0]])
OLD = torch.tensor([[-1.1, -1.5, -5.0], [-0.5, -1.0, -3.5]])
REF = torch.tensor([[-1.0, -1.8, 0.0], [-0.7, -1.5, -2.5]])
ADV = torch.tensor([1.0, -2.0])
EPS = 0.2
BETA = 0.1


def hand_k3(ref, logp):
    return math.exp(ref - logp) - (ref - logp) - 1


# Per token, with r = exp(logp - old) and the clip range [0.8, 1.2]:
#  row 0, A = +1: r = e^0.3 = 1.3499 > 1.2 -> clipped high: -1.2
#                 r = e^-0.5 = 0.6065 < 0.8, but A > 0 so min picks r*A: -0.6065
#  row 1, A = -2: r = 1 -> 2
#                 r = e^-0.5 = 0.6065 < 0.8 with A < 0 -> clipped low: -(0.8 * -2) = 1.6
#                 r = e^0.5 = 1.6487 > 1.2, but A < 0 so min picks r*A: 3.2974
SURROGATE = [[-1.2, -math.exp(-0.5)], [2.0, 1.6, 2 * math.exp(0.5)]]
K3 = [[hand_k3(-1.0, -0.8), hand_k3(-1.8, -2.0)], [hand_k3(-0.7, -0.5), 0.0, hand_k3(-2.5, -3.0)]]
PER_TOKEN = [[s + BETA * k for s, k in zip(srow, krow, strict=True)] for srow, krow in zip(SURROGATE, K3, strict=True)]
TOTAL = sum(map(sum, PER_TOKEN))

HAND_LOSSES = {
    "grpo": (sum(PER_TOKEN[0]) / 2 + sum(PER_TOKEN[1]) / 3) / 2,
    "bnpo": TOTAL / 5,
    "dr_grpo": TOTAL / (2 * 4),  # max_completion_length = 4
    "dapo": TOTAL / 5,
}


def run(loss_type="grpo", **overrides):
    logps = LOGPS.clone().requires_grad_()
    args = dict(beta=BETA, epsilon_low=EPS, loss_type=loss_type, max_completion_length=4) | overrides
    loss, metrics = policy_loss(logps, OLD, REF, ADV, MASK, **args)
    return loss, metrics, logps


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_hand_computed_loss_for_each_loss_type(loss_type):
    loss, _, _ = run(loss_type)
    assert loss.item() == pytest.approx(HAND_LOSSES[loss_type], rel=1e-6)


def test_dapo_uses_the_global_token_count_when_given():
    loss, _, _ = run("dapo", num_items=10)
    assert loss.item() == pytest.approx(TOTAL / 10, rel=1e-6)


def test_hand_computed_metrics():
    _, metrics, _ = run()
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(2 / 5)
    ratios = [math.exp(0.3), math.exp(-0.5), 1.0, math.exp(-0.5), math.exp(0.5)]
    assert metrics["ratio/mean"].item() == pytest.approx(sum(ratios) / 5, rel=1e-6)
    assert metrics["kl"].item() == pytest.approx(sum(map(sum, K3)) / 5, rel=1e-6)
    assert all(not value.requires_grad for value in metrics.values())


def test_clipped_tokens_get_no_policy_gradient():
    # beta = 0: the gradient is the surrogate's alone. Clipped tokens (0,0) high and (1,1) low get
    # none; unclipped ones get -A * r / 5 (bnpo); padding gets none.
    loss, _, logps = run("bnpo", beta=0.0)
    loss.backward()
    expected = torch.tensor(
        [[0.0, -1 * math.exp(-0.5) / 5, 0.0], [2 * 1.0 / 5, 0.0, 2 * math.exp(0.5) / 5]], dtype=torch.float32
    )
    torch.testing.assert_close(logps.grad, expected, atol=1e-7, rtol=1e-6)


def test_asymmetric_clip_epsilon_high():
    # With epsilon_high = 0.4, r = 1.3499 at (0, 0) is inside [0.8, 1.4]: no longer clipped.
    loss, metrics, _ = run("bnpo", epsilon_high=0.4)
    expected_total = TOTAL - (-1.2) + (-math.exp(0.3))
    assert loss.item() == pytest.approx(expected_total / 5, rel=1e-6)
    assert metrics["clip_ratio/high_mean"].item() == 0.0


def test_sequence_level_importance_sampling_gspo():
    # Row weights: exp(mean of the row's masked log-ratios): row 0 exp((0.3 - 0.5) / 2), row 1 exp(0).
    loss, _, _ = run("grpo", beta=0.0, importance_sampling_level="sequence")
    row0 = -math.exp(-0.1)  # A = +1, ratio 0.905 inside the clip range
    row1 = 2.0  # A = -2, ratio 1
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_no_reference_needed_when_beta_is_zero():
    loss, metrics = policy_loss(LOGPS, OLD, None, ADV, MASK, beta=0.0, loss_type="bnpo")
    surrogate_total = sum(map(sum, SURROGATE))
    assert loss.item() == pytest.approx(surrogate_total / 5, rel=1e-6)
    assert "kl" not in metrics
    with pytest.raises(ValueError, match="needs ref_logps"):
        policy_loss(LOGPS, OLD, None, ADV, MASK, beta=0.04)


def test_on_policy_old_logps_none_means_ratio_one_with_gradient():
    logps = LOGPS.clone().requires_grad_()
    loss, metrics = policy_loss(logps, None, None, ADV, MASK, beta=0.0, loss_type="bnpo")
    assert loss.item() == pytest.approx((-1.0 * 2 + 2.0 * 3) / 5)
    assert metrics["ratio/mean"].item() == 1.0
    loss.backward()
    torch.testing.assert_close(logps.grad, -ADV[:, None] * MASK / 5)


# ---- TRL's definitions on random inputs ----------------------------------------------------


def trl_style_loss(logps, old, ref, adv, mask, beta, eps_low, eps_high, loss_type, max_len, level, num_items):
    """The GRPOTrainer loss as TRL defines it (trl/trainer/grpo_trainer.py, `_compute_loss`), restated
    independently here: k3 with no bound, `per_token_loss * mask` normalizations."""
    mask = mask.double()
    log_ratio = logps - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1))
    if beta != 0.0:
        per_token = per_token + beta * (torch.exp(ref - logps) - (ref - logps) - 1)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_len)
    return (per_token * mask).sum() / num_items


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize(("beta", "eps_high"), [(0.0, None), (0.04, None), (0.04, 0.28)])
def test_same_loss_and_gradient_as_trl_definitions(loss_type, level, beta, eps_high):
    gen = torch.Generator().manual_seed(7)
    batch, length = 8, 12
    logps = (-torch.rand(batch, length, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    old = logps.detach() + torch.randn(batch, length, generator=gen, dtype=torch.float64) * 0.3
    ref = logps.detach() + torch.randn(batch, length, generator=gen, dtype=torch.float64) * 0.5
    adv = torch.randn(batch, generator=gen, dtype=torch.float64)
    mask = (torch.rand(batch, length, generator=gen) < 0.8).int()
    num_items = 37.0

    loss, _ = policy_loss(logps, old, ref, adv, mask, beta=beta, epsilon_low=0.2, epsilon_high=eps_high,
                          loss_type=loss_type, max_completion_length=length, importance_sampling_level=level,
                          num_items=num_items)
    (grad,) = torch.autograd.grad(loss, logps)
    expected = trl_style_loss(logps, old, ref, adv, mask, beta, 0.2, 0.2 if eps_high is None else eps_high,
                              loss_type, length, level, num_items)
    (expected_grad,) = torch.autograd.grad(expected, logps)
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-10)


# ---- degenerate batches --------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_zero_advantages_and_all_masked_rows_give_no_nan(loss_type):
    logps = LOGPS.clone().requires_grad_()
    mask = torch.tensor([[0, 0, 0], [1, 1, 1]])
    loss, metrics = policy_loss(logps, OLD, REF, torch.zeros(2), mask, beta=BETA, loss_type=loss_type,
                                max_completion_length=4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())
    assert (logps.grad[0] == 0).all()
    # Only the KL term is left, over the one unmasked row.
    kl_row = sum(K3[1])
    expected = {"grpo": BETA * kl_row / 3 / 2, "bnpo": BETA * kl_row / 3, "dr_grpo": BETA * kl_row / 8,
                "dapo": BETA * kl_row / 3}[loss_type]
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    empty_loss, empty_metrics = policy_loss(logps, OLD, REF, torch.zeros(2), torch.zeros(2, 3), beta=BETA,
                                            loss_type=loss_type, max_completion_length=4)
    assert empty_loss.item() == 0.0 and all(v.item() == 0.0 for v in empty_metrics.values())


def test_garbage_in_masked_positions_changes_nothing():
    clean_logps = LOGPS.clone().requires_grad_()
    clean, clean_metrics = policy_loss(clean_logps, OLD, REF, ADV, MASK, beta=BETA)
    clean.backward()

    dirty_logps = LOGPS.clone()
    dirty_logps[0, 2] = -math.inf
    dirty_logps.requires_grad_()
    dirty_old, dirty_ref = OLD.clone(), REF.clone()
    dirty_old[0, 2], dirty_ref[0, 2] = math.nan, math.inf
    dirty, dirty_metrics = policy_loss(dirty_logps, dirty_old, dirty_ref, ADV, MASK, beta=BETA)
    dirty.backward()
    assert dirty.item() == clean.item()
    torch.testing.assert_close(dirty_logps.grad, clean_logps.grad)
    assert {k: v.item() for k, v in dirty_metrics.items()} == {k: v.item() for k, v in clean_metrics.items()}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss_type": "ppo"}, "loss_type must be one of"),
        ({"importance_sampling_level": "group"}, "importance_sampling_level must be one of"),
        ({"loss_type": "dr_grpo", "max_completion_length": None}, "needs max_completion_length"),
        ({"epsilon_low": -0.1}, "must be >= 0"),
    ],
)
def test_policy_loss_rejects_bad_arguments(overrides, message):
    args = dict(beta=BETA, loss_type="grpo", max_completion_length=4) | overrides
    with pytest.raises(ValueError, match=message):
        policy_loss(LOGPS, OLD, REF, ADV, MASK, **args)


def test_policy_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="advantages must be \\(B,\\)"):
        policy_loss(LOGPS, OLD, REF, torch.zeros(3), MASK, beta=BETA)
    with pytest.raises(ValueError, match="ref_logps has shape"):
        policy_loss(LOGPS, OLD, REF[:, :2], ADV, MASK, beta=BETA)
