"""Data parallel training on ``torch.distributed``: torchrun set-up and a DDP wrapper for SAEs.

``polysae train`` started by ``torchrun --nproc_per_node N -m polysae train ...`` joins the process
group torchrun describes (:func:`init_from_env`: nccl when CUDA is present, gloo on CPU) and trains
every SAE through :class:`torch.nn.parallel.DistributedDataParallel`. DDP (rather than FSDP): an SAE
is a few weight matrices that fit on one device many times over, so sharding parameters and
optimiser state (FSDP's point) would only add an all-gather per step; DDP replicates them and
all-reduces gradients in buckets that overlap the backward pass.

DDP hooks gradients of ``module.forward``, while the trainer optimises ``SAE.loss`` (TopK, AuxK,
Matryoshka terms, a dead-latent mask): :class:`SAELoss` is the module whose ``forward`` is that
loss, and :func:`wrap` puts it under DDP. Every rank then holds the same averaged gradients, takes
the same Adam step and the same retraction of U (QR of identical inputs is deterministic), so
parameters stay bitwise in sync; :func:`assert_in_sync` checks that (the trainer calls it at every
checkpoint) by comparing a sha256 of every parameter and buffer across ranks.

With equal per-rank batches the mean of the per-rank mean losses is the global-batch mean, so a
W-rank run equals a 1-process run on the concatenated global batch up to float reassociation of
the gradient all-reduce (tests/test_train_distributed.py and tests/test_torchrun.py measure it).
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn


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


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (it is set by "
                         "torchrun; do not set it by hand)") from None


def init_from_env(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``); a no-op returning rank 0 of 1 outside torchrun.

    The backend is nccl when CUDA is present and gloo otherwise (``backend`` overrides); each rank
    uses ``cuda:<LOCAL_RANK>``."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    cuda = torch.cuda.is_available()
    if cuda and world > 1 and local >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} "
                         "GPU(s): --nproc_per_node must not exceed the GPUs per node")
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ValueError(f"WORLD_SIZE={world} but {var} is not set: start the job with "
                                 "torchrun (it sets MASTER_ADDR/MASTER_PORT), see "
                                 "docs/distributed.md")
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


class SAELoss(nn.Module):
    """``forward(x, dead_mask)`` = ``sae.loss(x, dead_mask)``: the loss as a module forward, so
    DDP sees (and all-reduces the gradients of) what the trainer actually differentiates."""

    def __init__(self, sae: nn.Module):
        super().__init__()
        self.sae = sae

    def forward(self, x: Tensor, dead_mask: Tensor | None = None):
        return self.sae.loss(x, dead_mask=dead_mask)


def wrap(sae: nn.Module) -> nn.Module:
    """``SAELoss(sae)`` under DDP when a process group is up, else plain ``SAELoss(sae)``.

    DDP broadcasts rank 0's parameters and buffers once, at construction. The per-forward buffer
    broadcast is off: the only SAE buffer is the BatchTopK threshold, which the trainer averages
    over ranks after each step itself (a broadcast would silently replace it by rank 0's)."""
    mod = SAELoss(sae)
    if world()[1] == 1:
        return mod
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(sae.parameters()).device
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] \
        if dev.type == "cuda" else None
    # torch >= 2.13 names the per-forward buffer broadcast forward_sync_buffers (buffers are
    # still synced once at construction); older versions call it broadcast_buffers
    import inspect

    no_sync = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
               else {"broadcast_buffers": False})
    return DDP(mod, device_ids=ids, find_unused_parameters=False, **no_sync)


def all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce (``sum``, ``max`` or ``mean``); identity when not distributed. A CPU
    tensor under nccl travels through the GPU and is copied back."""
    _, n = world()
    if n == 1:
        return t
    dev = _comm_device()
    buf = t if t.device.type == dev.type else t.to(dev)
    if op == "max":
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    else:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if op == "mean":
            buf /= n
    if buf is not t:
        t.copy_(buf)
    return t


def _comm_device() -> torch.device:
    """Where a small tensor must live for a collective of the current backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (one tiny all-reduce)."""
    if world()[1] == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank."""
    _, n = world()
    if n == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (pickled; tensors inside travel on CPU)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def state_digest(module: nn.Module) -> str:
    """sha256 over the bytes of every parameter and buffer, in ``state_dict`` order."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assert_in_sync(modules: dict[str, nn.Module]) -> None:
    """Raise ``RuntimeError`` on every rank when any module's parameters or buffers differ
    bitwise between ranks (names the module and the ranks that disagree with rank 0)."""
    rank, n = world()
    if n == 1:
        return
    mine = {name: state_digest(m) for name, m in modules.items()}
    gathered: list = [None] * n
    dist.all_gather_object(gathered, mine)
    bad = {name: [r for r in range(n) if gathered[r][name] != gathered[0][name]]
           for name in mine}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise RuntimeError(f"data-parallel ranks out of sync (parameters differ from rank 0's): "
                           f"{bad}")


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


__all__ = ["DistInfo", "init_from_env", "world", "SAELoss", "wrap", "all_reduce", "any_rank",
           "broadcast_module", "broadcast_object", "state_digest", "assert_in_sync", "barrier"]
