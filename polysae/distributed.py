"""Data-parallel helpers on ``torch.distributed`` (gloo on CPU, nccl on GPUs), torchrun-ready.

Why not ``torch.nn.parallel.DistributedDataParallel``: DDP hooks gradients of ``module.forward``,
but the trainer optimises ``SAE.loss`` (TopK, AuxK, Matryoshka terms), and several SAEs share one
step. Averaging the gradients ourselves (one flattened all-reduce per SAE per step, after
``backward`` and before clipping) is the same arithmetic as DDP without bucketing/overlap, which
an SAE step (a few GEMMs) does not need. Every rank then takes the identical optimiser step and
the identical retraction, so parameters stay bitwise in sync without re-broadcasting.

With equal per-rank batch sizes, the mean of the per-rank mean losses is the global-batch mean, so
a W-rank run equals a 1-process run on the concatenated global batch up to float reassociation of
the all-reduce (tests/test_train_distributed.py measures it).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor


class DistInfo(NamedTuple):
    """Where this process sits in the job."""

    rank: int
    """Global rank (0 writes checkpoints and logs)."""
    world_size: int
    """Number of processes (1 = not distributed)."""
    local_rank: int
    """Rank on this node (picks the GPU)."""
    device: torch.device
    """cuda:<local_rank> when CUDA is present, else cpu."""


def init_from_env(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``); a no-op returning rank 0 of 1 outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, device)


def world() -> tuple[int, int]:
    """(rank, world_size) of the current process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each ``p.grad`` by its mean over ranks (one flattened all-reduce)."""
    _, n = world()
    if n == 1:
        return
    grads = [p.grad for p in params]
    shapes = [(g is not None) for g in grads]
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= n
    off = 0
    for p, had in zip(params, shapes):
        m = p.numel()
        chunk = flat[off:off + m].view_as(p)
        if had:
            p.grad.copy_(chunk)
        else:
            p.grad = chunk.clone()
        off += m


def all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce (``sum``, ``max`` or ``mean``); identity when not distributed."""
    _, n = world()
    if n == 1:
        return t
    if op == "max":
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "mean":
            t /= n
    return t


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (start of training)."""
    _, n = world()
    if n == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


__all__ = ["DistInfo", "init_from_env", "world", "average_gradients", "all_reduce",
           "broadcast_module", "barrier"]
