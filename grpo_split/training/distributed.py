"""Thin helpers over torch.distributed for the trainer: set-up, and the few collectives a step needs.

`python grpo_ref_split.py` (no launcher) runs as a world of one, so the training code has a single
path; `deepspeed grpo_ref_split.py` sets RANK / WORLD_SIZE / MASTER_* itself.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Initialize the process group with DeepSpeed's backend for this machine (nccl on GPUs, gloo on CPU).

    Returns (rank, world_size, local_rank).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # a plain `python grpo_ref_split.py`: a world of one on this machine
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if get_accelerator().device_name() == "cuda":
        get_accelerator().set_device(local_rank)
    if get_accelerator().device_name() == "cpu":
        unlink_shm_allreduce_buffer()
    return dist.get_rank(), dist.get_world_size(), local_rank


def shm_allreduce_buffer() -> Path:
    """This rank's shared-memory all-reduce buffer of DeepSpeed's CPU backend (its shm.cpp names it
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>)."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    return Path("/dev/shm") / name


def unlink_shm_allreduce_buffer() -> None:
    """Remove this rank's DeepSpeed CPU all-reduce buffer from /dev/shm once every rank has mapped it.

    DeepSpeed creates one 67 MB buffer per rank at start-up and never unlinks it, so each CPU run
    left 134 MB (two ranks) in /dev/shm, which is RAM: we found 17 GB of them after a day of tests.
    A mapped buffer outlives its name: once all ranks are past start-up (they map every peer's
    buffer there, hence the barrier), the name can go and the memory is freed when the ranks exit,
    however they exit.
    """
    dist.barrier()
    shm_allreduce_buffer().unlink(missing_ok=True)


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, get_accelerator().current_device())


def _comm_device() -> torch.device:
    # gloo reduces CPU tensors, nccl only GPU ones.
    return torch.device("cpu") if dist.get_backend() == "gloo" else device()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a short list of numbers over all ranks (one collective)."""
    if not dist.is_initialized():  # one process without a process group (TorchEngine): nothing to sum
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (all ranks must take the same branch)."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's rows from every rank (ranks may hold different numbers of rows)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return tensor
    comm = _comm_device()
    local = tensor.to(comm)
    counts = [torch.zeros(1, dtype=torch.long, device=comm) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=comm))
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=comm)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts, strict=True)]).to(tensor.device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown(wait_for_all: bool = True) -> None:
    """Leave the process group after the last collective (torch warns at exit otherwise).

    With `wait_for_all`, ranks first meet in a barrier, so none tears down its connections while
    another still uses them; a rank that failed skips it (the others may never arrive).
    """
    if dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def broadcast_bytes(data: bytes | None, src: int = 0) -> bytes | None:
    """`data` of rank `src` on every rank (the other ranks pass None).

    None from `src` arrives as None everywhere: how a rank that failed to get the data releases
    the others, which would otherwise wait in the collective forever.
    """
    if not dist.is_initialized():
        return data
    comm = _comm_device()
    length = torch.tensor([-1 if data is None else len(data)], dtype=torch.long, device=comm)
    dist.broadcast(length, src)
    size = int(length.item())
    if size < 0:
        return None
    buffer = torch.empty(size, dtype=torch.uint8, device=comm)
    if dist.get_rank() == src:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src)
    return buffer.cpu().numpy().tobytes()


class PeerRankFailed(RuntimeError):
    """Another rank failed at a point where this one waited for it; that rank prints the cause."""
