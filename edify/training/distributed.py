"""The thin distributed layer: the only module in edify that touches `torch.distributed`.

Initialised from the environment `torchrun` sets (RANK, WORLD_SIZE, LOCAL_RANK); gloo on CPU, nccl
on CUDA. In one process every function is a no-op (rank 0 of a world of 1), so the training loop
reads the same in both cases. Model wrapping covers DDP and FSDP2 (`fully_shard`, per block then
the root), and the full-state-dict helpers give checkpoints one format for every mode.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from edify.errors import EdifyError

DIST_MODES = ("none", "ddp", "fsdp")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(timeout_s: float = 600.0) -> torch.device:
    """Join the process group described by torchrun's environment; return this process's device.

    Without WORLD_SIZE (or with WORLD_SIZE=1) nothing is initialised and the device is cuda:0 if
    present, else cpu.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the process group, or from the RANK / WORLD_SIZE variables before
    initialisation (data readers and DataLoader workers split shards with it)."""
    if is_initialized():
        return rank(), world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """An explicit (rank, world size) with the missing parts taken from `rank_and_world_size`."""
    env_rank, env_world = rank_and_world_size()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise EdifyError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over all ranks (a new tensor; `x` itself is left alone)."""
    if not is_initialized():
        return x.clone()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()


def all_gather_object(obj) -> list:
    """One object from every rank, in rank order (for small metadata such as RNG states)."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def check_mode(mode: str) -> str:
    if mode not in DIST_MODES:
        raise EdifyError(f"dist mode must be one of {', '.join(DIST_MODES)}, got {mode!r}")
    return mode


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: `model.fsdp_units()` if defined, else every ModuleList item."""
    if hasattr(model, "fsdp_units"):
        return list(model.fsdp_units())
    units = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            units.extend(module)
    return units


def wrap_model(model: nn.Module, mode: str, device: torch.device | None = None) -> nn.Module:
    """Wrap for data-parallel training: "none" (returned as is), "ddp" or "fsdp" (FSDP2).

    In a single process every mode returns the model unchanged.
    """
    check_mode(mode)
    if mode == "none" or not is_initialized():
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device is not None and device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device_type = device.type if device is not None else "cpu"
    mesh = init_device_mesh(device_type, (world_size(),))
    for unit in _fsdp_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user module inside a DDP wrapper (FSDP2 shards in place, so it is the module itself)."""
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on non-final micro-steps of gradient accumulation."""
    if enabled or not is_initialized():
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def to_full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor shard gathered to its full tensor (collective); plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full`, sharded as the DTensor `like`; plain tensors pass through."""
    if not hasattr(like, "device_mesh"):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None):
    """(model, optimizer) state dicts with full, unsharded CPU tensors keyed by parameter name.

    Collective under FSDP: every rank must call it; rank 0 gets the tensors, other ranks get empty
    dicts. The same format comes out of a plain module, DDP and FSDP2.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=options)
    osd = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return msd, osd


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None, msd: dict,
                          osd: dict | None) -> None:
    """Inverse of `full_state_dicts`: every rank passes the full dicts and keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, msd, options=options)
    if optimizer is not None and osd is not None:
        set_optimizer_state_dict(model, optimizer, osd, options=options)
