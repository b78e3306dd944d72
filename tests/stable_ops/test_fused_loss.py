"""linear_policy_loss (the GRPO loss fused with the LM head) against policy_loss(linear_logps(...)) and float64."""

import math

import pytest
import torch
from helpers import AllocationRecorder, assert_close_normwise, naive_log_softmax64
from torch.utils._python_dispatch import TorchDispatchMode

from stable_ops import linear_logps, linear_policy_loss, policy_loss
from stable_ops.fused_loss import MAX_CHUNK, MIN_CHUNK, auto_chunk_size, plan_tiles

# Callers scale the loss (1 / gradient-accumulation steps, a loss scale): the backward must scale too.
GRAD_OUTPUT = 0.37
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
LEVELS = ["token", "sequence"]
# (beta, on_policy): KL and old log-probs given; no KL, on-policy ratio exp(logp - logp.detach()); KL, on-policy.
REGIMES = [(0.04, False), (0.0, True), (0.04, True)]
# (temperature, logit_scale, softcap): the plain head, a sampling temperature, a Gemma-like scaled, capped head.
HEADS = [(1.0, 1.0, None), (0.7, 1.0, None), (0.7, 1.5, 2.0)]
MAX_COMPLETION_LENGTH = 9


def naive_logps64(hidden, weight, labels, temperature=1.0, logit_scale=1.0, softcap=None, logits_dtype=None):
    """log_softmax(f(hidden @ W.T) / T) at the labels, in float64 over the full (B, T, V) logits.

    With `logits_dtype`, the raw logits are rounded to it (value only), as a half-precision head rounds them.
    """
    z = hidden.double() @ weight.double().t()  # (B, T, V)
    if logits_dtype is not None:
        z = z + (z.detach().to(logits_dtype).double() - z.detach())
    y = logit_scale * z if softcap is None else softcap * torch.tanh(logit_scale * z / softcap)
    return naive_log_softmax64(y / temperature).gather(-1, labels[..., None]).squeeze(-1)


def make_case(dtype=torch.float32, batch=4, length=6, width=16, vocab=97, seed=0, head=HEADS[0]):
    """Inputs with old/ref log-probs near the policy's (ratios around 1, some clipped), a fully masked row."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, width, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, width, generator=gen) * 0.8).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    with torch.no_grad():
        logps = naive_logps64(hidden, weight, labels, *head).float()  # (B, T)
    old = logps + 0.3 * torch.randn(batch, length, generator=gen)
    ref = logps + 0.3 * torch.randn(batch, length, generator=gen)
    advantages = torch.randn(batch, generator=gen)
    mask = (torch.rand(batch, length, generator=gen) > 0.25).float()
    mask[1] = 0.0  # a row without a completion token
    mask[0] = 1.0
    return hidden, weight, labels, old, ref, advantages, mask


def loss_kwargs(loss_type="grpo", level="token", beta=0.04):
    return {"beta": beta, "loss_type": loss_type, "importance_sampling_level": level,
            "max_completion_length": MAX_COMPLETION_LENGTH, "epsilon_high": 0.28}


def fused(hidden, weight, labels, old, ref, adv, mask, head=HEADS[0], chunk_size=None, **kwargs):
    temperature, logit_scale, softcap = head
    return linear_policy_loss(hidden, weight, labels, old, ref, adv, mask, temperature=temperature,
                              logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size, **kwargs)


def unfused(hidden, weight, labels, old, ref, adv, mask, head=HEADS[0], chunk_size=None, **kwargs):
    temperature, logit_scale, softcap = head
    logps = linear_logps(hidden, weight, labels, temperature, logit_scale=logit_scale, softcap=softcap)
    return policy_loss(logps, old, ref, adv, mask, **kwargs)


def naive64(hidden, weight, labels, old, ref, adv, mask, head=HEADS[0], chunk_size=None, logits_dtype=None,
            **kwargs):
    logps = naive_logps64(hidden, weight, labels, *head, logits_dtype=logits_dtype)
    return policy_loss(logps, None if old is None else old.double(), None if ref is None else ref.double(),
                       adv.double(), mask, **kwargs)


def loss_metrics_grads(fn, hidden, weight, *args, as_float64=False, **kwargs):
    """Run `fn` on fresh leaves (float64 copies with `as_float64`); backward of GRAD_OUTPUT x loss."""
    convert = (lambda t: t.detach().double()) if as_float64 else (lambda t: t.detach().clone())
    hidden, weight = convert(hidden).requires_grad_(), convert(weight).requires_grad_()
    loss, metrics = fn(hidden, weight, *args, **kwargs)
    (GRAD_OUTPUT * loss).backward()
    return loss.detach(), metrics, hidden.grad, weight.grad


def assert_same(actual, expected, *, value_tol, grad_tol):
    loss, metrics, grad_hidden, grad_weight = actual
    ref_loss, ref_metrics, ref_grad_hidden, ref_grad_weight = expected
    torch.testing.assert_close(loss.double(), ref_loss.double(), atol=value_tol, rtol=value_tol)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key].double(), ref_metrics[key].double(), atol=value_tol,
                                   rtol=value_tol, msg=lambda m, k=key: f"metric {k}: {m}")
    assert_close_normwise(grad_hidden, ref_grad_hidden, grad_tol)
    assert_close_normwise(grad_weight, ref_grad_weight, grad_tol)


# ---- the matrix: same loss, metrics and gradients as policy_loss(linear_logps(...)) -------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(("beta", "on_policy"), REGIMES)
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_matches_policy_loss_of_linear_logps(loss_type, level, beta, on_policy, head, chunk_size):
    hidden, weight, labels, old, ref, adv, mask = make_case(head=head, seed=1)
    old = None if on_policy else old
    kwargs = loss_kwargs(loss_type, level, beta)
    actual = loss_metrics_grads(fused, hidden, weight, labels, old, ref, adv, mask, head, chunk_size, **kwargs)
    expected = loss_metrics_grads(unfused, hidden, weight, labels, old, ref, adv, mask, head, **kwargs)
    # float32 rounding: the matmuls of tiles of other sizes may round the logits differently in the last bit.
    assert_same(actual, expected, value_tol=2e-6, grad_tol=2e-6)
    assert actual[2].dtype == torch.float32 and actual[3].dtype == torch.float32
    assert actual[1]["ratio/mean"] > 0 and actual[2].abs().max() > 0 and actual[3].abs().max() > 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", LEVELS)
def test_float64_inputs_match_to_float64_rounding(loss_type, level):
    hidden, weight, labels, old, ref, adv, mask = make_case(torch.float64, seed=2, head=HEADS[2])
    kwargs = loss_kwargs(loss_type, level)
    actual = loss_metrics_grads(fused, hidden, weight, labels, old, ref, adv, mask, HEADS[2], 3, **kwargs)
    expected = loss_metrics_grads(unfused, hidden, weight, labels, old, ref, adv, mask, HEADS[2], **kwargs)
    assert actual[0].dtype == torch.float64 and actual[2].dtype == torch.float64
    assert_same(actual, expected, value_tol=1e-12, grad_tol=1e-12)


# ---- against the float64 naive full-logits reference ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("head", [HEADS[0], HEADS[2]])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_matches_the_float64_naive_reference(dtype, level, head, loss_type):
    hidden, weight, labels, old, ref, adv, mask = make_case(dtype, seed=3, head=head)
    kwargs = loss_kwargs(loss_type, level) | {"num_items": 13.0}
    actual = loss_metrics_grads(fused, hidden, weight, labels, old, ref, adv, mask, head, 4, **kwargs)
    expected = loss_metrics_grads(naive64, hidden, weight, labels, old, ref, adv, mask, head,
                                  logits_dtype=dtype, as_float64=True, **kwargs)
    assert actual[0].dtype == torch.float32  # the loss of half-precision inputs is computed in float32
    assert actual[2].dtype == dtype and actual[3].dtype == dtype
    # bfloat16: the softmax gradient is rounded to 8 bits before the two matmuls, as linear_logps's is.
    assert_same(actual, expected, value_tol=1e-5, grad_tol=1e-5 if dtype == torch.float32 else 2e-2)


def test_gradient_is_the_derivative_of_the_loss():
    """Central differences of the float64 loss along random directions equal the returned gradient."""
    hidden, weight, labels, old, ref, adv, mask = make_case(torch.float64, batch=3, length=4, width=5, vocab=11,
                                                            seed=4, head=HEADS[2])
    gen = torch.Generator().manual_seed(4)
    for level in LEVELS:
        kwargs = loss_kwargs("grpo", level) | {"head": HEADS[2], "chunk_size": 2}

        def loss_at(h, w, kwargs=kwargs):
            return fused(h, w, labels, old, ref, adv, mask, **kwargs)[0]

        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss_at(h, w).backward()
        for _ in range(3):
            dh, dw = torch.randn(h.shape, generator=gen, dtype=h.dtype), torch.randn(w.shape, generator=gen,
                                                                                     dtype=w.dtype)
            eps = 1e-6
            with torch.no_grad():
                numeric = (loss_at(h + eps * dh, w + eps * dw) - loss_at(h - eps * dh, w - eps * dw)) / (2 * eps)
            analytic = (h.grad * dh).sum() + (w.grad * dw).sum()
            assert analytic.item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-9)


# ---- the backward does no LM-head work ---------------------------------------------------------------------

MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "mv", "addmv", "dot"}


class MatmulCounter(TorchDispatchMode):
    """Records the shapes of the operands of every matrix product run while active."""

    def __init__(self):
        super().__init__()
        self.calls: list[list[tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            self.calls.append([tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("level", LEVELS)
def test_three_lm_head_matmuls_per_tile_and_none_in_backward(level):
    hidden, weight, labels, old, ref, adv, mask = make_case(batch=4, length=6, seed=5)
    mask.fill_(1.0)
    kwargs = loss_kwargs("grpo", level)
    with MatmulCounter() as forward:
        loss, _ = fused(hidden, weight, labels, old, ref, adv, mask, chunk_size=6, **kwargs)
    with MatmulCounter() as backward:
        (GRAD_OUTPUT * loss).backward()
    assert backward.calls == []
    assert len(forward.calls) == 3 * 4  # 24 tokens in tiles of 6 (one row each at sequence level)
    # The test can fail: the unfused pair recomputes the logits in backward.
    loss, _ = unfused(hidden, weight, labels, old, ref, adv, mask, **kwargs)
    with MatmulCounter() as recompute:
        loss.backward()
    assert len(recompute.calls) >= 3


def test_backward_never_reads_the_weight():
    """Under ZeRO-3 the weight is partitioned away after the head's forward: its values must not be needed later."""
    hidden, weight, labels, old, ref, adv, mask = make_case(seed=6)
    kwargs = loss_kwargs()
    clean = loss_metrics_grads(fused, hidden, weight, labels, old, ref, adv, mask, chunk_size=4, **kwargs)
    for fn, finite in ((fused, True), (unfused, False)):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss, _ = fn(h, w, labels, old, ref, adv, mask, chunk_size=4, **kwargs)
        w.data.fill_(math.nan)  # what the weight holds after the forward no longer matters
        (GRAD_OUTPUT * loss).backward()
        assert bool(torch.isfinite(w.grad).all()) is finite  # the recomputing pair reads the weight in backward
        if finite:
            torch.testing.assert_close(h.grad, clean[2], atol=0, rtol=0)
            torch.testing.assert_close(w.grad, clean[3], atol=0, rtol=0)


def test_backward_scales_by_the_incoming_gradient_and_runs_once():
    hidden, weight, labels, old, ref, adv, mask = make_case(seed=7)
    grads = []
    for scale in (1.0, -2.5):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss, _ = fused(h, w, labels, old, ref, adv, mask, **loss_kwargs())
        (scale * loss).backward(retain_graph=True)
        grads.append((h.grad, w.grad))
        with pytest.raises(RuntimeError, match="backward ran twice"):
            loss.backward()
    torch.testing.assert_close(grads[1][0], -2.5 * grads[0][0])
    torch.testing.assert_close(grads[1][1], -2.5 * grads[0][1])


# ---- degenerate inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_extreme_logits(level):
    hidden, weight, labels, old, ref, adv, mask = make_case(seed=8)
    with torch.no_grad():
        hidden.mul_(2000.0)  # logits of order +-1e4: log-probs of order -1e4
        logps = naive_logps64(hidden, weight, labels).float()
        old, ref = logps + 0.3 * torch.randn(logps.shape), logps + 0.3 * torch.randn(logps.shape)
    kwargs = loss_kwargs("grpo", level)
    actual = loss_metrics_grads(fused, hidden, weight, labels, old, ref, adv, mask, chunk_size=4, **kwargs)
    expected = loss_metrics_grads(unfused, hidden, weight, labels, old, ref, adv, mask, **kwargs)
    assert torch.isfinite(actual[0]) and torch.isfinite(actual[2]).all() and torch.isfinite(actual[3]).all()
    # float32 log-probs of size 1e4 step by 1e-3, and the ratios exponentiate that.
    assert_same(actual, expected, value_tol=5e-3, grad_tol=5e-3)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_mask(level, loss_type):
    hidden, weight, labels, old, ref, adv, mask = make_case(seed=9)
    mask.zero_()
    kwargs = loss_kwargs(loss_type, level)
    with MatmulCounter() as counter:
        actual = loss_metrics_grads(fused, hidden, weight, labels, old, ref, adv, mask, **kwargs)
    expected = loss_metrics_grads(unfused, hidden, weight, labels, old, ref, adv, mask, **kwargs)
    assert counter.calls == []  # nothing to compute
    assert actual[0].item() == 0.0 and not actual[2].any() and not actual[3].any()
    assert_same(actual, expected, value_tol=0.0, grad_tol=0.0)


def test_masked_tokens_are_not_computed_and_their_garbage_is_ignored():
    hidden, weight, labels, old, ref, adv, mask = make_case(seed=10)
    kwargs = loss_kwargs()
    expected = loss_metrics_grads(unfused, hidden, weight, labels, old, ref, adv, mask, **kwargs)
    poisoned = hidden.detach().clone()
    poisoned[~mask.bool()] = math.nan  # padding states: garbage that must not reach anything
    with MatmulCounter() as counter:
        actual = loss_metrics_grads(fused, poisoned, weight, labels, old, ref, adv, mask, chunk_size=4, **kwargs)
    assert_same(actual, expected, value_tol=2e-6, grad_tol=2e-6)
    computed = int(mask.sum())
    assert sum(shapes[0][0] for shapes in counter.calls[::3]) == computed < mask.numel()  # tile rows of matmul 1


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", LEVELS)
def test_bfloat16_matches_policy_loss_of_linear_logps(loss_type, level):
    """bfloat16 head, float32 old/ref/advantages and a bool mask; one tile, so the same bfloat16 logits."""
    hidden, weight, labels, old, ref, adv, mask = make_case(torch.bfloat16, seed=11, head=HEADS[2])
    kwargs = loss_kwargs(loss_type, level)
    args = (labels, old, ref, adv, mask.bool(), HEADS[2])
    actual = loss_metrics_grads(fused, hidden, weight, *args, **kwargs)
    expected = loss_metrics_grads(unfused, hidden, weight, *args, **kwargs)
    assert actual[0].dtype == torch.float32 and actual[3].dtype == torch.bfloat16
    # Both round the softmax gradient to bfloat16; linear_logps also sums the hidden gradient over vocabulary
    # slices in float32, where the fused op takes it from one bfloat16 matmul.
    assert_same(actual, expected, value_tol=1e-5, grad_tol=1e-2)


# ---- which gradients, and where -----------------------------------------------------------------------------


def test_gradients_only_where_asked():
    hidden, weight, labels, old, ref, adv, mask = make_case(seed=12)
    frozen = weight.detach()
    loss, _ = fused(hidden, frozen, labels, old, ref, adv, mask, **loss_kwargs())
    loss.backward()
    assert hidden.grad is not None and frozen.grad is None
    with torch.inference_mode():
        loss, metrics = fused(hidden, weight, labels, old, ref, adv, mask, **loss_kwargs())
        expected, expected_metrics = unfused(hidden, weight, labels, old, ref, adv, mask, **loss_kwargs())
    assert not loss.requires_grad
    # One tile each, so the same arithmetic: the same bits.
    torch.testing.assert_close(loss, expected, atol=0, rtol=0)
    torch.testing.assert_close(metrics, expected_metrics, atol=0, rtol=0)


def test_non_contiguous_hidden_states():
    hidden, weight, labels, old, ref, adv, mask = make_case(length=7, seed=13)
    sliced = (hidden[:, 1:], weight, labels[:, 1:], old[:, 1:], ref[:, 1:], adv, mask[:, 1:])
    kwargs = loss_kwargs("bnpo", "sequence")
    actual = loss_metrics_grads(fused, *sliced, chunk_size=4, **kwargs)
    expected = loss_metrics_grads(unfused, *sliced, **kwargs)
    assert_same(actual, expected, value_tol=2e-6, grad_tol=2e-6)


# ---- memory ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("head", "tiles"), [(HEADS[0], 1), (HEADS[1], 1), (HEADS[2], 2)])
@pytest.mark.parametrize("level", LEVELS)
def test_memory_is_one_tile_of_logits(head, tiles, level):
    """Besides the two gradients, nothing larger than a tile of logits: one buffer, two with a cap's slope."""
    batch, length, width, vocab, chunk = 4, 8, 12, 256, 8
    hidden, weight, labels, old, ref, adv, mask = make_case(batch=batch, length=length, width=width, vocab=vocab,
                                                            seed=14, head=head)
    mask.fill_(1.0)
    tile_bytes = chunk * vocab * 4
    gradient_bytes = {vocab * width * 4, batch * length * width * 4}
    with AllocationRecorder() as rec:
        loss, _ = fused(hidden, weight, labels, old, ref, adv, mask, head, chunk, **loss_kwargs("grpo", level))
        loss.backward()
    others = [size for size, _ in rec.allocations if size not in gradient_bytes]
    assert max(others) <= tile_bytes < batch * length * vocab * 4
    assert sum(1 for size in others if size == tile_bytes) == tiles


def test_automatic_tile_size():
    assert auto_chunk_size(10) == MIN_CHUNK
    assert auto_chunk_size(1024) == 171  # six tiles
    assert auto_chunk_size(8192) == 1024
    assert auto_chunk_size(10**6) == MAX_CHUNK


def test_tile_plans():
    # Token tiles cut rows; (a0, a1, r0, r1) = tokens [a0, a1) of rows [r0, r1).
    assert plan_tiles([3, 0, 2, 4], 4, whole_rows=False) == [(0, 4, 0, 3), (4, 8, 2, 4), (8, 9, 3, 4)]
    # Whole rows: as many as fit, at least one however long; rows without tokens get no tile of their own.
    assert plan_tiles([3, 0, 2, 4], 4, whole_rows=True) == [(0, 3, 0, 2), (3, 5, 2, 3), (5, 9, 3, 4)]
    assert plan_tiles([0, 0], 4, whole_rows=True) == []
    assert plan_tiles([5, 1], 2, whole_rows=True) == [(0, 5, 0, 1), (5, 6, 1, 2)]


# ---- argument checks ------------------------------------------------------------------------------------


def _bad(**changes):
    hidden, weight, labels, old, ref, adv, mask = make_case(seed=15)
    args = {"hidden": hidden, "weight": weight, "labels": labels, "old_logps": old, "ref_logps": ref,
            "advantages": adv, "mask": mask} | changes
    kwargs = {"beta": 0.04} | args.pop("kwargs", {})
    return args, kwargs


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden": torch.randn(4, 16)}, "hidden must be \\(B, T, H\\)"),
        ({"weight": torch.randn(97, 8)}, "weight must be \\(V, H\\)"),
        ({"weight": torch.randn(97, 16, dtype=torch.float64)}, "share one floating dtype"),
        ({"labels": torch.full((4, 6), 97)}, "must lie in \\[0, 97\\)"),
        ({"labels": torch.zeros(4, 5, dtype=torch.long)}, "labels have shape"),
        ({"old_logps": torch.zeros(4, 5)}, "linear_policy_loss: old_logps has shape \\(4, 5\\), labels have"),
        ({"ref_logps": None}, "linear_policy_loss: beta=0.04 needs ref_logps"),
        ({"advantages": torch.zeros(3)}, "advantages must be \\(B,\\)"),
        ({"advantages": None}, "advantages is required"),
        ({"mask": None}, "mask is required"),
        ({"mask": torch.ones(4, 7)}, "mask has shape"),
        ({"kwargs": {"loss_type": "ppo"}}, "loss_type must be one of"),
        ({"kwargs": {"importance_sampling_level": "group"}}, "importance_sampling_level must be one of"),
        ({"kwargs": {"loss_type": "dr_grpo"}}, "dr_grpo' needs max_completion_length"),
        ({"kwargs": {"epsilon_low": -0.1}}, "epsilon_low"),
        ({"kwargs": {"chunk_size": 0}}, "chunk_size must be None \\(automatic\\) or a positive int"),
        ({"kwargs": {"chunk_size": 2.5}}, "chunk_size"),
        ({"kwargs": {"temperature": 0.0}}, "temperature must be > 0"),
        ({"kwargs": {"logit_scale": -1.0}}, "logit_scale must be finite and > 0"),
        ({"kwargs": {"softcap": math.inf}}, "softcap must be finite and > 0"),
    ],
)
def test_rejects_bad_arguments_naming_them(changes, message):
    args, kwargs = _bad(**changes)
    with pytest.raises(ValueError, match=message) as error:
        linear_policy_loss(**args, **kwargs)
    assert str(error.value).startswith("linear_policy_loss: ")
