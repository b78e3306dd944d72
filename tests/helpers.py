"""Test helpers shared by the stable_ops tests."""

from __future__ import annotations

import threading

import torch
import waitress
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from waitress import wasyncore


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


def _safetensors_bytes(tensors: dict, metadata: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def _raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    import json
    import struct

    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


class _WritesFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def malformed_bodies(valid: bytes, marker, vocab_size: int, seed: int = 0):
    """Deterministic corpus of invalid batch bodies (over 300), invalid for /logps and /upload alike.

    `valid` is an encoded valid rollout batch; `marker` is a path that a pickle payload would
    create if anything unpickled it.
    """
    import pickle
    import random
    import struct

    rng = random.Random(seed)
    for length in list(range(0, 40)) + [rng.randrange(40, 5000) for _ in range(40)]:
        yield bytes(rng.randrange(256) for _ in range(length))
    for cut in range(0, len(valid) - 1, max(1, len(valid) // 80)):
        yield valid[:cut]
    header_len = struct.unpack("<Q", valid[:8])[0]
    for declared in (2**63, 2**40, 10**9, header_len + 1, len(valid), 1, 0):
        yield struct.pack("<Q", declared) + valid[8:]
    for junk in (b"{not json", b"[1, 2, 3]", b'"a string"', b"\xff\xfe\xfd\xfc", b"null", b"{}"):
        yield struct.pack("<Q", len(junk)) + junk
    payload = _WritesFileWhenUnpickled(marker)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        yield pickle.dumps(payload, protocol=protocol)
        yield pickle.dumps({"input_ids": payload}, protocol=protocol)
    # Syntactically valid safetensors whose declared sizes lie.
    yield _raw_safetensors({"input_ids": {"dtype": "I64", "shape": [10**12, 10**12], "data_offsets": [0, 16]}},
                           b"\0" * 16)
    yield _raw_safetensors({"input_ids": {"dtype": "I64", "shape": [2, 4], "data_offsets": [0, 10**12]}}, b"\0" * 64)
    yield _raw_safetensors({"input_ids": {"dtype": "I64", "shape": [2, 4], "data_offsets": [8, 4]}}, b"\0" * 64)
    yield _raw_safetensors({"input_ids": {"dtype": "X99", "shape": [2, 4], "data_offsets": [0, 64]}}, b"\0" * 64)
    yield _raw_safetensors({"__metadata__": {"format": 1}, "input_ids": {"dtype": "I64", "shape": [1, 2],
                                                                             "data_offsets": [0, 16]}}, b"\0" * 16)

    # Well-formed files with wrong fields, in several sizes each.
    for variant in range(9):
        g = torch.Generator().manual_seed(seed * 100 + variant)
        batch, prompt, completion = 2 + variant % 3, 2 + variant % 4, 3 + variant % 5
        length = prompt + completion
        ids = torch.randint(0, vocab_size, (batch, length), generator=g)
        rewards = torch.rand(batch, generator=g)
        meta = {"format": "grpo-batch/1", "prompt_length": str(prompt), "policy_version": "0",
                "num_generations": "1"}
        base = {"input_ids": ids, "rewards": rewards}
        cases = [
            (base, {**meta, "format": "grpo-batch/999"}),
            (base, {k: v for k, v in meta.items() if k != "format"}),
            (base, {k: v for k, v in meta.items() if k != "prompt_length"}),
            (base, {**meta, "prompt_length": "0"}),
            (base, {**meta, "prompt_length": str(length)}),
            (base, {**meta, "prompt_length": "-1"}),
            (base, {**meta, "prompt_length": "abc"}),
            (base, {**meta, "prompt_length": "2.5"}),
            (base, {**meta, "policy_version": "-3"}),
            (base, {**meta, "num_generations": str(batch + 1)}),
            (base, {**meta, "temperature": "0"}),
            (base, {**meta, "surprise": "1"}),
            ({**base, "input_ids": ids.float()}, meta),
            ({**base, "input_ids": ids[0]}, meta),
            ({**base, "input_ids": ids[None]}, meta),
            ({**base, "input_ids": ids + vocab_size}, meta),
            ({**base, "input_ids": ids - vocab_size - 1}, meta),
            ({**base, "attention_mask": torch.ones(batch, length + 1, dtype=torch.int64)}, meta),
            ({**base, "attention_mask": torch.full((batch, length), 2, dtype=torch.int64)}, meta),
            ({**base, "rewards": torch.full((batch,), float("nan"))}, meta),
            ({**base, "rewards": torch.rand(batch + 1, generator=g)}, meta),
            ({**base, "rewards": rewards.double()}, meta),
            ({**base, "rewards": rewards[:, None]}, meta),
            ({**base, "old_logps": -torch.rand(batch, completion + 1, generator=g)}, meta),
            ({**base, "old_logps": torch.full((batch, completion), float("inf"))}, meta),
            ({**base, "completion_mask": torch.ones(batch + 1, completion, dtype=torch.int64)}, meta),
            ({**base, "scored": torch.full((batch,), 2, dtype=torch.uint8)}, meta),
            ({**base, "scored": torch.ones(batch + 1, dtype=torch.uint8)}, meta),
            ({**base, "scored": torch.zeros(batch, dtype=torch.uint8)}, meta),  # unscored rows with rewards != 0
            ({**base, "ref_logps": -torch.rand(batch - 1, completion, generator=g)}, meta),
            ({**base, "mystery": torch.zeros(2)}, meta),
        ]
        for tensors, metadata in cases:
            yield _safetensors_bytes(tensors, metadata)


class LoopbackServer:
    """A WSGI app served by waitress on 127.0.0.1 (port 0: a free one) in a daemon thread."""

    def __init__(self, app, port: int = 0):
        self._server = waitress.create_server(app, host="127.0.0.1", port=port, threads=4)
        self.url = f"http://127.0.0.1:{self._server.effective_port}"
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        # waitress's own run() loops until its socket map is empty. Looping here in short rounds
        # instead lets close() ask for the shutdown with a flag, and every socket and pipe is then
        # closed by this thread: closing them from another thread races the select() this thread
        # is blocked in (EBADF), and waking it through waitress's trigger pipe failed in CI with
        # EBADF on the pipe itself (once in some fifty runs; not reproduced under tracing).
        socket_map = self._server._map
        while not self._closing.is_set():
            wasyncore.loop(timeout=0.05, map=socket_map, count=1)
        self._server.close()  # the listening socket and the trigger pipe
        while socket_map:  # connections still open: serve them until their clients close them
            wasyncore.loop(timeout=0.05, map=socket_map, count=1)

    def close(self) -> bool:
        """Stop listening; True once the serving thread ended (it ends only when no client holds a connection)."""
        self._closing.set()
        self._thread.join(timeout=2)
        self._server.task_dispatcher.shutdown(timeout=2)
        return not self._thread.is_alive()
