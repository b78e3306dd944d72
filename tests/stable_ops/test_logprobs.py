"""log_softmax and per_token_logps against a float64 reference, on random and extreme inputs."""

import math

import pytest
import torch
from helpers import AllocationRecorder, naive_log_softmax64

import stable_ops.logprobs as logprobs_module
from stable_ops import log_softmax, per_token_logps

HALF_DTYPES = (torch.bfloat16, torch.float16)
# Tolerances on log-probs when the op is given inputs already rounded to `dtype` and compared with
# float64 on those same rounded inputs: only the op's own arithmetic (float32) is measured.
LOGP_ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
# Gradients come back in the input dtype, so they carry its rounding (2^-8 relative for bfloat16):
# (atol, rtol) per dtype.
GRAD_TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-3, 8e-3), torch.float16: (1e-4, 1e-3)}


def naive_per_token_logps64(logits, labels, temperature=1.0):
    return naive_log_softmax64(logits.double() / temperature).gather(-1, labels[..., None]).squeeze(-1)


def test_log_softmax_reproduces_the_numerics_note_example():
    out = log_softmax(torch.tensor([100.0, 102.0, 98.0]))
    torch.testing.assert_close(out, torch.tensor([-2.1429, -0.1429, -4.1429]), atol=1e-4, rtol=0)
    # The naive formula the note warns about overflows on the same input, even in float32 (exp(102) > 3.4e38).
    naive = torch.tensor([100.0, 102.0, 98.0])
    assert not torch.isfinite(naive - naive.exp().sum().log()).any()


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_log_softmax_matches_float64_reference(dtype):
    torch.manual_seed(1)
    x = (torch.randn(4, 7, 301) * 6).to(dtype)
    out = log_softmax(x)
    assert out.dtype == torch.float32  # half precision is accumulated and returned in float32
    torch.testing.assert_close(out.double(), naive_log_softmax64(x), atol=LOGP_ATOL[dtype], rtol=0)
    torch.testing.assert_close(log_softmax(x, dim=1).double(), naive_log_softmax64(x, dim=1), atol=2e-5, rtol=0)


def test_log_softmax_float64_stays_float64_and_gradcheck():
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    assert log_softmax(x).dtype == torch.float64
    assert torch.autograd.gradcheck(log_softmax, (x,))


def test_log_softmax_extreme_and_minus_inf_entries():
    x = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-math.inf, 3.0, -math.inf, 1.0], [-math.inf] * 4], requires_grad=True)
    out = log_softmax(x)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out[0].double(), naive_log_softmax64(x[0].detach()), atol=1e-5, rtol=0)
    assert torch.isfinite(out[1, [1, 3]]).all() and (out[1, [0, 2]] == -math.inf).all()
    assert (out[2] == -math.inf).all()  # a row with nothing possible, not NaN
    (torch.where(torch.isfinite(out), out, 0.0) * torch.randn(3, 4)).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_per_token_logps_values_and_grads_match_float64(dtype, temperature):
    torch.manual_seed(2)
    logits = (torch.randn(3, 11, 257) * 5).to(dtype).requires_grad_()
    labels = torch.randint(0, 257, (3, 11))
    upstream = torch.randn(3, 11)

    out = per_token_logps(logits, labels, temperature)
    assert out.dtype == torch.float32 and out.shape == (3, 11)
    (out * upstream).sum().backward()

    ref_logits = logits.detach().double().requires_grad_()
    ref = naive_per_token_logps64(ref_logits, labels, temperature)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), atol=LOGP_ATOL[dtype], rtol=0)
    assert logits.grad.dtype == dtype
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, atol=atol, rtol=rtol)


def test_per_token_logps_small_chunks_and_non_contiguous_slice(monkeypatch):
    # Chunks of 3 rows force several chunks per sequence; logits[:, :-1] is a non-contiguous view.
    monkeypatch.setattr(logprobs_module, "CHUNK_ELEMENTS", 3 * 50)
    torch.manual_seed(3)
    full = torch.randn(2, 9, 50, requires_grad=True)
    labels = torch.randint(0, 50, (2, 8))
    out = per_token_logps(full[:, :-1], labels)
    out.sum().backward()
    ref_full = full.detach().double().requires_grad_()
    ref = naive_per_token_logps64(ref_full[:, :-1], labels)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(full.grad.double(), ref_full.grad, atol=1e-6, rtol=1e-5)
    assert (full.grad[:, -1] == 0).all()


def test_per_token_logps_float64_gradcheck():
    torch.manual_seed(4)
    logits = torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (2, 5))
    assert per_token_logps(logits, labels).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: per_token_logps(x, labels, 0.8), (logits,))


def test_per_token_logps_never_allocates_a_second_logits_tensor(monkeypatch):
    monkeypatch.setattr(logprobs_module, "CHUNK_ELEMENTS", 4 * 64)
    batch, length, vocab = 4, 16, 64
    logits = torch.randn(batch, length, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length))
    full_bytes = batch * length * vocab * 4
    with AllocationRecorder() as forward:
        out = per_token_logps(logits, labels)
    assert forward.largest() <= 4 * vocab * 4  # one chunk of float32 rows at most
    with AllocationRecorder() as backward:
        out.sum().backward()
    assert backward.count_at_least(full_bytes) == 1  # the logits' own gradient, nothing else

    # The recorder does see the naive formula's full-size intermediates.
    with AllocationRecorder() as naive:
        torch.log_softmax(logits, -1).gather(-1, labels[..., None]).sum().backward()
    assert naive.count_at_least(full_bytes) >= 3


def test_per_token_logps_extreme_logits_float32():
    torch.manual_seed(5)
    logits = (torch.randint(-1, 2, (2, 6, 40)) * 1e4 + torch.randn(2, 6, 40)).requires_grad_()
    labels = torch.randint(0, 40, (2, 6))
    out = per_token_logps(logits, labels)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), naive_per_token_logps64(logits.detach(), labels), atol=1e-5, rtol=1e-6)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_per_token_logps_float16_above_naive_overflow():
    # exp(11.1) is already inf in float16; these logits would make the naive formula NaN.
    torch.manual_seed(6)
    logits = (torch.rand(2, 5, 30) * 50 + 12).half().requires_grad_()
    labels = torch.randint(0, 30, (2, 5))
    naive_in_fp16 = logits.detach() - logits.detach().exp().sum(-1, keepdim=True).log()
    assert not torch.isfinite(naive_in_fp16).any()
    out = per_token_logps(logits, labels)
    torch.testing.assert_close(out.double(), naive_per_token_logps64(logits.detach(), labels), atol=2e-5, rtol=0)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_per_token_logps_minus_inf_entries():
    logits = torch.randn(1, 4, 6)
    logits[0, 0, [1, 2]] = -math.inf  # masked vocabulary entries
    logits[0, 1, :] = -math.inf  # nothing possible at this position
    logits.requires_grad_()
    labels = torch.tensor([[0, 3, 5, 4]])
    labels_on_masked = torch.tensor([[1, 0, 0, 0]])
    out = per_token_logps(logits, labels)
    assert not torch.isnan(out).any()
    assert torch.isfinite(out[0, [0, 2, 3]]).all() and out[0, 1] == -math.inf
    ref = naive_per_token_logps64(logits.detach(), labels)
    torch.testing.assert_close(out[0, [0, 2, 3]].double(), ref[0, [0, 2, 3]], atol=1e-6, rtol=0)
    assert per_token_logps(logits, labels_on_masked)[0, 0] == -math.inf  # a masked label is impossible
    out[0, [0, 2, 3]].sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[0, 0, [1, 2]] == 0).all()


def test_per_token_logps_inference_mode_and_no_grad():
    logits = torch.randn(2, 3, 10)
    labels = torch.randint(0, 10, (2, 3))
    with torch.inference_mode():
        out = per_token_logps(logits, labels)
    torch.testing.assert_close(out.double(), naive_per_token_logps64(logits, labels), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("logits", "labels", "temperature", "message"),
    [
        (torch.randn(2, 10), torch.zeros(2, dtype=torch.long), 1.0, "must be \\(B, T, V\\)"),
        (torch.randn(2, 3, 10), torch.zeros(2, 4, dtype=torch.long), 1.0, "expected \\(2, 3\\)"),
        (torch.randn(2, 3, 10), torch.full((2, 3), 10), 1.0, "must lie in \\[0, 10\\)"),
        (torch.randn(2, 3, 10), torch.full((2, 3), -1), 1.0, "must lie in \\[0, 10\\)"),
        (torch.randn(2, 3, 10), torch.zeros(2, 3), 1.0, "integer token ids"),
        (torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.long), 0.0, "temperature must be > 0"),
    ],
)
def test_per_token_logps_rejects_bad_input_with_a_clear_message(logits, labels, temperature, message):
    with pytest.raises(ValueError, match=message):
        per_token_logps(logits, labels, temperature)
