"""linear_logps (fused LM head) against the float64 naive `log_softmax(hidden @ W.T).gather`."""

import math

import pytest
import torch
from helpers import AllocationRecorder, assert_close_normwise, naive_log_softmax64

from stable_ops import linear_logps, per_token_logps

# Gradients, relative to their largest entry (see assert_close_normwise): a few units of the
# input dtype's rounding, since the backward's matmuls run in that dtype.
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
# Log-probs (atol, rtol): float32 is accurate to rounding; in half precision the matmul rounds
# the logits themselves (as the model's own lm_head does), 2^-8 of their size for bfloat16.
LOGP_TOL = {torch.float32: (2e-5, 1e-6), torch.bfloat16: (2e-2, 8e-3), torch.float16: (3e-3, 1e-3)}


def naive_linear_logps64(hidden, weight, labels, temperature=1.0):
    logits = hidden.double() @ weight.double().t() / temperature  # (B, T, V)
    return naive_log_softmax64(logits).gather(-1, labels[..., None]).squeeze(-1)


def make_inputs(dtype, batch=3, length=7, width=16, vocab=97, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, width, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, width, generator=gen) * 0.8).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_grads_match_float64(dtype, chunk_size, temperature):
    hidden, weight, labels = make_inputs(dtype)
    upstream = torch.randn(labels.shape)
    out = linear_logps(hidden, weight, labels, temperature, chunk_size=chunk_size)
    assert out.dtype == torch.float32
    (out * upstream).sum().backward()

    ref_hidden = hidden.detach().double().requires_grad_()
    ref_weight = weight.detach().double().requires_grad_()
    ref = naive_linear_logps64(ref_hidden, ref_weight, labels, temperature)
    (ref * upstream.double()).sum().backward()

    atol, rtol = LOGP_TOL[dtype]
    torch.testing.assert_close(out.double(), ref.detach(), atol=atol, rtol=rtol)
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    assert_close_normwise(hidden.grad, ref_hidden.grad, GRAD_TOL[dtype])
    assert_close_normwise(weight.grad, ref_weight.grad, GRAD_TOL[dtype])


def test_same_as_per_token_logps_on_materialized_logits():
    hidden, weight, labels = make_inputs(torch.float32, seed=1)
    fused = linear_logps(hidden, weight, labels, 0.9, chunk_size=5)
    materialized = per_token_logps(hidden @ weight.t(), labels, 0.9)
    torch.testing.assert_close(fused, materialized, atol=1e-5, rtol=0)


def test_gradcheck_float64_both_inputs():
    hidden, weight, labels = make_inputs(torch.float64, batch=2, length=5, width=4, vocab=11, seed=2)
    assert linear_logps(hidden, weight, labels).dtype == torch.float64
    for chunk_size in (1, 3, 64):
        assert torch.autograd.gradcheck(
            lambda h, w, c=chunk_size: linear_logps(h, w, labels, 0.7, chunk_size=c), (hidden, weight)
        )


def test_never_materializes_the_logits():
    batch, length, width, vocab, chunk = 4, 32, 8, 256, 8
    hidden, weight, labels = make_inputs(torch.float32, batch, length, width, vocab, seed=3)
    logits_bytes = batch * length * vocab * 4
    tile_bytes = chunk * vocab * 4
    with AllocationRecorder() as rec:
        linear_logps(hidden, weight, labels, chunk_size=chunk).sum().backward()
    # Besides the weight's own gradient (V x H), nothing larger than one tile is allocated.
    weight_grad_bytes = vocab * width * 4
    assert max(size for size, _ in rec.allocations if size != weight_grad_bytes) <= tile_bytes < logits_bytes
    with AllocationRecorder() as naive:
        per_token_logps(hidden @ weight.t(), labels).sum().backward()
    assert naive.count_at_least(logits_bytes) >= 2  # the recorder sees the logits and their gradient


def test_grads_flow_only_where_asked_and_tied_embeddings_accumulate():
    hidden, weight, labels = make_inputs(torch.float32, seed=4)
    frozen = weight.detach()
    linear_logps(hidden, frozen, labels).sum().backward()
    assert hidden.grad is not None and frozen.grad is None

    # Tied embeddings: the same matrix embeds the inputs and is the LM head.
    embedding = torch.randn(97, 16, requires_grad=True)
    ids = torch.randint(0, 97, (3, 7))
    (linear_logps(embedding[ids] * 2.0, embedding, labels)).sum().backward()
    ref_embedding = embedding.detach().double().requires_grad_()
    naive_linear_logps64(ref_embedding[ids] * 2.0, ref_embedding, labels).sum().backward()
    assert_close_normwise(embedding.grad, ref_embedding.grad, 1e-5)


def test_inference_mode_and_non_contiguous_hidden():
    hidden, weight, labels = make_inputs(torch.float32, seed=5)
    with torch.inference_mode():
        out = linear_logps(hidden[:, 1:], weight, labels[:, 1:], chunk_size=3)
    ref = naive_linear_logps64(hidden.detach()[:, 1:], weight.detach(), labels[:, 1:])
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


def test_extreme_hidden_states_stay_finite():
    hidden, weight, labels = make_inputs(torch.float32, seed=6)
    with torch.no_grad():
        hidden.mul_(2000.0)  # logits of order +-1e4
    out = linear_logps(hidden, weight, labels, chunk_size=4)
    assert torch.isfinite(out).all()
    ref = naive_linear_logps64(hidden.detach(), weight.detach(), labels)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=1e-5)  # float32 logits of 1e4 step by 1e-3
    out.sum().backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize(
    ("hidden", "weight", "labels", "chunk_size", "message"),
    [
        (torch.randn(2, 3), torch.randn(5, 3), torch.zeros(2, dtype=torch.long), 4, "hidden must be \\(B, T, H\\)"),
        (torch.randn(2, 3, 4), torch.randn(5, 3), torch.zeros(2, 3, dtype=torch.long), 4, "weight must be \\(V, H\\)"),
        (torch.randn(2, 3, 4), torch.randn(5, 4).half(), torch.zeros(2, 3, dtype=torch.long), 4, "share one"),
        (torch.randn(2, 3, 4), torch.randn(5, 4), torch.full((2, 3), 5), 4, "must lie in \\[0, 5\\)"),
        (torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long), 0, "chunk_size"),
    ],
)
def test_rejects_bad_input_with_a_clear_message(hidden, weight, labels, chunk_size, message):
    with pytest.raises(ValueError, match=message):
        linear_logps(hidden, weight, labels, chunk_size=chunk_size)


def test_empty_batch():
    out = linear_logps(torch.randn(0, 3, 4), torch.randn(5, 4), torch.zeros(0, 3, dtype=torch.long))
    assert out.shape == (0, 3)
    assert not math.isnan(out.sum().item())


# ---- heads that transform the logits: f(z) = logit_scale * z, or softcap * tanh(logit_scale * z / softcap) ----

# (logit_scale, softcap): Granite-like division, Cohere-like multiplication, Gemma-like cap, both.
TRANSFORMS = [(0.125, None), (3.0, None), (1.0, 2.0), (1.7, 3.0)]


def naive_transformed_logps64(hidden, weight, labels, temperature, logit_scale, softcap, logits_dtype=None):
    """The textbook head in float64: log_softmax(f(hidden @ W.T) / T) at the labels.

    With `logits_dtype`, the raw logits' values are rounded to it, as a half-precision lm_head rounds
    its output before any transform (the gradient passes straight through the rounding). A scale or
    a low temperature multiplies that rounding into the softmax; this reference keeps it out of the
    comparison, which then measures only the op's own arithmetic.
    """
    z = hidden.double() @ weight.double().t()  # (B, T, V)
    if logits_dtype is not None:
        z = z + (z.detach().to(logits_dtype).double() - z.detach())
    y = logit_scale * z if softcap is None else softcap * torch.tanh(logit_scale * z / softcap)
    return naive_log_softmax64(y / temperature).gather(-1, labels[..., None]).squeeze(-1)


@pytest.mark.parametrize(("logit_scale", "softcap"), TRANSFORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_transformed_head_values_and_grads_match_float64(logit_scale, softcap, dtype, chunk_size, temperature):
    hidden, weight, labels = make_inputs(dtype, seed=7)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(7))
    out = linear_logps(hidden, weight, labels, temperature, chunk_size, logit_scale=logit_scale, softcap=softcap)
    (out * upstream).sum().backward()

    ref_hidden = hidden.detach().double().requires_grad_()
    ref_weight = weight.detach().double().requires_grad_()
    ref = naive_transformed_logps64(ref_hidden, ref_weight, labels, temperature, logit_scale, softcap, dtype)
    (ref * upstream.double()).sum().backward()

    # float32 rounding of the logits y = f(z) / T grows with their size: scale / T times that of z.
    growth = max(1.0, logit_scale / temperature)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5 * growth, rtol=1e-6)
    assert_close_normwise(hidden.grad, ref_hidden.grad, GRAD_TOL[dtype] * growth)
    assert_close_normwise(weight.grad, ref_weight.grad, GRAD_TOL[dtype] * growth)


def test_transform_is_applied_not_ignored():
    """The cap and the scale change the answer by far more than the tolerance above (no accidental plain head)."""
    hidden, weight, labels = make_inputs(torch.float32, seed=8)
    plain = naive_linear_logps64(hidden.detach(), weight.detach(), labels, 0.6)
    for logit_scale, softcap in TRANSFORMS:
        out = linear_logps(hidden.detach(), weight.detach(), labels, 0.6, logit_scale=logit_scale, softcap=softcap)
        assert (out.double() - plain).abs().max() > 0.5


def test_cap_before_scale_is_a_cap_of_scale_times_cap():
    """s * c * tanh(z / c) == (s c) * tanh(s z / (s c)): the docstring's recipe for the other order."""
    hidden, weight, labels = make_inputs(torch.float64, seed=9)
    s, c = 0.5, 2.0
    z = hidden.detach() @ weight.detach().t()
    ref = naive_log_softmax64(s * c * torch.tanh(z / c) / 0.7).gather(-1, labels[..., None]).squeeze(-1)
    out = linear_logps(hidden.detach(), weight.detach(), labels, 0.7, logit_scale=s, softcap=s * c)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("logit_scale", "softcap"), TRANSFORMS)
def test_gradcheck_float64_transformed_head(logit_scale, softcap):
    hidden, weight, labels = make_inputs(torch.float64, batch=2, length=5, width=4, vocab=11, seed=10)
    for chunk_size in (1, 3, 64):
        assert torch.autograd.gradcheck(
            lambda h, w, c=chunk_size: linear_logps(
                h, w, labels, 0.7, chunk_size=c, logit_scale=logit_scale, softcap=softcap
            ),
            (hidden, weight),
        )


@pytest.mark.parametrize(("logit_scale", "softcap"), TRANSFORMS)
def test_transformed_head_extreme_hidden_states(logit_scale, softcap):
    hidden, weight, labels = make_inputs(torch.float32, seed=11)
    with torch.no_grad():
        hidden.mul_(2000.0)  # raw logits of order +-1e4: the cap saturates, tanh's slope underflows
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(11))
    out = linear_logps(hidden, weight, labels, 0.6, chunk_size=4, logit_scale=logit_scale, softcap=softcap)
    (out * upstream).sum().backward()
    ref_hidden = hidden.detach().double().requires_grad_()
    ref_weight = weight.detach().double().requires_grad_()
    ref = naive_transformed_logps64(ref_hidden, ref_weight, labels, 0.6, logit_scale, softcap, torch.float32)
    (ref * upstream.double()).sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    # float32 logits y = f(z) / T of size |y| are rounded by about eps * |y| (5e-3 at the 5e4 that a scale of
    # 3 reaches here; the cap bounds them), and a softmax and its gradient move by as much.
    raw = (hidden.detach().double() @ weight.detach().double().t()).abs().max().item()
    size = (raw * logit_scale if softcap is None else softcap) / 0.6
    tol = max(1e-3, 4 * torch.finfo(torch.float32).eps * size)
    torch.testing.assert_close(out.double(), ref.detach(), atol=tol, rtol=1e-5)
    assert_close_normwise(hidden.grad, ref_hidden.grad, tol)
    assert_close_normwise(weight.grad, ref_weight.grad, tol)


@pytest.mark.parametrize(("logit_scale", "softcap", "tiles"), [(1.0, None, 2), (0.125, None, 2), (1.7, 3.0, 3)])
def test_transformed_head_stays_memory_bounded(logit_scale, softcap, tiles):
    """Tile-sized buffers: the forward's, the backward's, and for a cap one more for its slope. Nothing larger."""
    batch, length, width, vocab, chunk = 4, 32, 12, 256, 8  # width 12: the weight's gradient is not tile-sized
    hidden, weight, labels = make_inputs(torch.float32, batch, length, width, vocab, seed=12)
    tile_bytes = chunk * vocab * 4
    weight_grad_bytes = vocab * width * 4
    with AllocationRecorder() as rec:
        linear_logps(hidden, weight, labels, 0.6, chunk, logit_scale=logit_scale, softcap=softcap).sum().backward()
    others = [size for size, _ in rec.allocations if size != weight_grad_bytes]
    assert max(others) <= tile_bytes
    assert sum(1 for size in others if size == tile_bytes) == tiles


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logit_scale": 0.0}, "logit_scale must be finite and > 0"),
        ({"logit_scale": -2.0}, "logit_scale must be finite and > 0"),
        ({"logit_scale": math.nan}, "logit_scale must be finite and > 0"),
        ({"logit_scale": math.inf}, "logit_scale must be finite and > 0"),
        ({"logit_scale": "8"}, "logit_scale must be a number"),
        ({"logit_scale": True}, "logit_scale must be a number"),
        ({"softcap": 0.0}, "softcap must be finite and > 0"),
        ({"softcap": -30.0}, "softcap must be finite and > 0"),
        ({"softcap": math.inf}, "softcap must be finite and > 0"),
        ({"softcap": math.nan}, "softcap must be finite and > 0"),
        ({"softcap": torch.tensor(30.0)}, "softcap must be a number"),
    ],
)
def test_rejects_bad_transform_arguments(kwargs, message):
    hidden, weight, labels = make_inputs(torch.float32, seed=13)
    with pytest.raises(ValueError, match=message):
        linear_logps(hidden, weight, labels, **kwargs)
