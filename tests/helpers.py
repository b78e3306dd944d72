"""Test helpers shared by the stable_ops tests."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationRecorder(TorchDispatchMode):
    """Records the byte size of every new tensor storage created by an aten op while active.

    Views (outputs sharing storage with an input) are not counted. Backward ops run while the
    mode is active are recorded too, so `with AllocationRecorder() as rec: f().sum().backward()`
    sees every buffer forward and backward allocate.
    """

    def __init__(self):
        super().__init__()
        self.allocations: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocations.append((t.untyped_storage().nbytes(), str(func)))
        return out

    def count_at_least(self, nbytes: int) -> int:
        return sum(1 for size, _ in self.allocations if size >= nbytes)

    def largest(self) -> int:
        return max((size for size, _ in self.allocations), default=0)


def naive_log_softmax64(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The textbook formula in float64, shifted only for finiteness: the reference every op is checked against."""
    x = x.double()
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return x - m - (x - m).exp().sum(dim=dim, keepdim=True).log()


def assert_close_normwise(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """max |actual - expected| <= tol * max |expected|.

    The right check for gradients that are sums with cancellation (a softmax gradient sums to
    zero over the vocabulary): elementwise relative error is meaningless where the true value is
    near zero, while the error stays proportional to the size of the terms summed.
    """
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3e} exceeds {tol:g} x max |expected| ({scale:.3e})"
