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
