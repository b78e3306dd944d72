"""k3_kl and policy_loss: hand-computed cases, TRL's definitions, clipping, and degenerate rows."""

import math

import pytest
import torch

from stable_ops import k3_kl, policy_loss
from stable_ops.loss import KL_LOG_RATIO_MAX, KL_LOG_RATIO_MIN

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


M = KL_LOG_RATIO_MAX
SLOPE64 = math.expm1(M)  # k3'(M)


def k3_clamped_formula(logps, ref):
    """k3 as it was before the tangent past M: the log-ratio clamped to [MIN, M]. Inside the bound
    the new k3 must match it bit for bit, value and gradient."""
    acc = torch.promote_types(torch.promote_types(logps.dtype, ref.dtype), torch.float32)
    x = (ref.to(acc) - logps.to(acc)).clamp(KL_LOG_RATIO_MIN, KL_LOG_RATIO_MAX)
    return (torch.expm1(x) - x).clamp_min(0.0)


def value_and_grads(fn, logps, ref):
    logps, ref = logps.clone().requires_grad_(), ref.clone().requires_grad_()
    out = fn(logps, ref)
    out.sum().backward()
    return out.detach(), logps.grad, ref.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_k3_inside_the_bound_is_bit_identical_to_the_clamped_formula(dtype):
    gen = torch.Generator().manual_seed(1)
    logps = -torch.rand(4096, generator=gen, dtype=torch.float64) * 30
    ref = -torch.rand(4096, generator=gen, dtype=torch.float64) * 30
    keep = (ref - logps) <= M
    logps, ref = logps[keep], ref[keep]
    # Exactly at the bound, tiny log-ratios, and the far safe side.
    logps = torch.cat([logps, torch.tensor([-20.0, -2.0, 0.0, -3.0])]).to(dtype)
    ref = torch.cat([ref, torch.tensor([0.0, -2.0 + 1e-9, -1e4, -3.0 - 1e-6])]).to(dtype)
    assert ((ref.double() - logps.double()) <= M).all()
    new = value_and_grads(k3_kl, logps, ref)
    old = value_and_grads(k3_clamped_formula, logps, ref)
    for got, want in zip(new, old, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k3_past_the_bound_is_the_tangent_with_a_restoring_gradient(dtype):
    excess = torch.tensor([1e-3, 0.5, 5.0, 80.0, 1e4, 1e8], dtype=torch.float64)
    logps = -(M + excess)  # ref = 0: the policy finds these tokens e^(M + excess) times less likely
    ref = torch.zeros_like(logps)
    value, logps_grad, ref_grad = value_and_grads(k3_kl, logps.to(dtype), ref.to(dtype))
    expected = (math.expm1(M) - M) + SLOPE64 * excess  # float64 tangent at M
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=0.0)
    # d k3 / d logp = -expm1(M) everywhere past the bound: the penalty pushes logp back up.
    torch.testing.assert_close(logps_grad.double(), torch.full_like(excess, -SLOPE64), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(ref_grad.double(), torch.full_like(excess, SLOPE64), rtol=1e-6, atol=0.0)


def test_k3_value_and_derivative_are_continuous_at_the_bound():
    h = 1e-7
    x = torch.tensor([M - h, M, M + h], dtype=torch.float64)
    value, logps_grad, _ = value_and_grads(k3_kl, -x, torch.zeros_like(x))
    exact = torch.exp(x) - x - 1  # naive float64 k3, fine at x ~ 20
    # Left of, at and right of M the value agrees with k3 to second order in h ...
    torch.testing.assert_close(value, exact, rtol=1e-12, atol=0.0)
    # ... and the derivative d k3 / dx = -d k3 / d logp jumps by no more than k3'' * h.
    derivative = -logps_grad
    assert abs(derivative[0] - derivative[2]) <= math.exp(M) * 2 * h
    assert derivative[1].item() == pytest.approx(SLOPE64, rel=1e-12)
    # float32 as well: the two pieces meet exactly at M.
    below, at, above = k3_kl(-torch.tensor([M - 1e-3, M, M + 1e-3]), torch.zeros(3)).double().tolist()
    assert below < at < above
    assert above - at == pytest.approx(at - below, rel=1e-3)


EXTREMES = [3e38, -3e38, 1e30, -1e30, 1e4, -1e4, -20.5, 0.0, -1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k3_finite_for_extreme_inputs(dtype):
    pairs = torch.cartesian_prod(torch.tensor(EXTREMES, dtype=torch.float64),
                                 torch.tensor(EXTREMES, dtype=torch.float64)).to(dtype)
    logps, ref = pairs[:, 0], pairs[:, 1]
    value, logps_grad, ref_grad = value_and_grads(k3_kl, logps, ref)
    assert torch.isfinite(value).all() and (value >= 0).all()
    assert torch.isfinite(logps_grad).all() and torch.isfinite(ref_grad).all()
    # Wherever ref - logp is past the bound and representable, the restoring gradient is there,
    # however far past (the value is capped, the gradient is not).
    x = ref.double() - logps.double()
    past = (x > M) & torch.isfinite(ref - logps)
    assert past.sum() > 20
    torch.testing.assert_close(logps_grad[past].double(), torch.full((int(past.sum()),), -SLOPE64, dtype=torch.float64),
                               rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_loss_with_extreme_log_probs_is_finite_with_a_restoring_gradient(level, dtype):
    logps = torch.tensor([[-3e38, -1e30, -1e4, -1.0], [-0.5, -3e38, -25.0, -2.0]], dtype=dtype, requires_grad=True)
    ref = torch.tensor([[-1.0, -2.0, -3e38, -1e30], [-3e38, -1e-3, -0.1, -2.0]], dtype=dtype)
    mask = torch.ones(2, 4)
    loss, metrics = policy_loss(logps, None, ref, torch.zeros(2), mask, beta=0.04, loss_type="bnpo",
                                importance_sampling_level=level)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(torch.isfinite(v) for v in metrics.values())
    assert torch.isfinite(logps.grad).all()
    # Advantages are 0, so the gradient is the KL term's: every token the policy finds far less
    # likely than the reference is pushed up with the same force, beta * expm1(M) / 8 tokens.
    far_below = (ref.double() - logps.detach().double()) > M
    assert far_below.sum() == 4
    torch.testing.assert_close(logps.grad[far_below].double(),
                               torch.full((4,), -0.04 * SLOPE64 / 8, dtype=torch.float64), rtol=1e-6, atol=0.0)


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


def test_sequence_level_metrics_count_each_sequence_once():
    # Rows of 1, 8 and 4 tokens, and one row with none. Row 0 is clipped high, row 1 clipped low,
    # row 2 inside the range: per sequence that is 1/3 each; per token it would be 1/13 and 8/13.
    lengths = [1, 8, 4, 0]
    mask = torch.zeros(4, 8)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    row_log_ratio = [0.5, -0.5, 0.05, 0.0]  # every token of a row gets its row's log-ratio
    old = -torch.rand(4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    logps = old + torch.tensor(row_log_ratio, dtype=torch.float64)[:, None]
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    _, metrics = policy_loss(logps, old, None, adv, mask, beta=0.0, importance_sampling_level="sequence")

    # float64 naive: one ratio per non-empty sequence, a plain mean over those sequences.
    ratios, low, high = [], [], []
    for row, length in enumerate(lengths):
        if length == 0:
            continue
        r = math.exp(sum((logps[row, :length] - old[row, :length]).tolist()) / length)
        ratios.append(r)
        low.append(r < 0.8 and adv[row] < 0)
        high.append(r > 1.2 and adv[row] > 0)
    assert low == [False, True, False] and high == [True, False, False]
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(2 / 3)
    assert metrics["ratio/mean"].item() == pytest.approx(sum(ratios) / 3, rel=1e-12)
    token_weighted = sum(r * n for r, n in zip(ratios, lengths, strict=False)) / 13
    assert abs(sum(ratios) / 3 - token_weighted) > 0.05  # the batch does tell the two apart

    # At token level the same batch is averaged over its 13 tokens.
    _, token_metrics = policy_loss(logps, old, None, adv, mask, beta=0.0, importance_sampling_level="token")
    assert token_metrics["clip_ratio/low_mean"].item() == pytest.approx(8 / 13)
    assert token_metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 13)


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
