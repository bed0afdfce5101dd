"""The processes of a distributed run as the core sees them: rank, world size, and the exchanges
of results whose length differs between processes.

Everything here reads the default process group that the framework (Lightning, accelerate,
torchrun) initialised; nothing opens a group of its own, so the same calls work on one node or
many. Each exchange is a collective when the world is larger than one: call it on every rank, in
the same order. Alone (no group, or a world of one) every function is a no-op.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def ranks() -> tuple[int, int]:
    """``(rank, world size)`` in the default process group; ``(0, 1)`` without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    """Whether more than one process takes part (collectives needed)."""
    return ranks()[1] > 1


def collective_device() -> torch.device:
    """Where tensors must lie for the default group's backend: the current GPU for NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_columns(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``[R, n_r]`` (the same ``R`` and dtype everywhere, ``n_r`` its own), in rank
    order, on every process: lengths are exchanged first, then the columns padded to the longest.
    Returned on ``tensor``'s device."""
    _, world = ranks()
    if world == 1:
        return [tensor]
    device = collective_device()
    length = torch.tensor([tensor.shape[1]], device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = max(int(n) for n in lengths)
    padded = torch.zeros(tensor.shape[0], longest, dtype=tensor.dtype, device=device)
    padded[:, : tensor.shape[1]] = tensor.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [g[:, : int(n)].to(tensor.device) for g, n in zip(gathered, lengths)]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes (a new tensor on ``tensor``'s device)."""
    if not is_distributed():
        return tensor
    total = tensor.to(collective_device()).clone()
    dist.all_reduce(total)
    return total.to(tensor.device)


def sharded_parameters(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds sharded parameters: FSDP2 ``DTensor`` ones, or FSDP1 flat ones."""
    for parameter in model.parameters():
        if type(parameter).__name__ in ("DTensor", "FlatParameter") or getattr(parameter, "_is_flat_param", False):
            return True
        if hasattr(parameter, "device_mesh") and hasattr(parameter, "placements"):
            return True
    return False


def deepspeed_refusal(owner: str, setting: str) -> str:
    """Why ``owner`` refuses DeepSpeed (``setting``: where the user turned it on) and what works instead."""
    return (f"{owner} does not support DeepSpeed ({setting}): ZeRO-3 keeps each layer's weight as an empty "
            "placeholder outside its forward, so layer shapes and the attribution's passes cannot be read. Use DDP, "
            "or FSDP (torch fully_shard through Lightning's ModelParallelStrategy, Lightning's FSDPStrategy, or the "
            "Hugging Face Trainer's fsdp=True), with the callback attached")


def broadcast_generator(generator: Optional[torch.Generator]) -> None:
    """Give every process rank 0's ``generator`` state, so that labels sampled in a pass that every
    rank runs on the same data are the same everywhere."""
    if generator is None or not is_distributed():
        return
    state = [generator.get_state()]
    dist.broadcast_object_list(state, src=0)
    generator.set_state(state[0])


__all__ = ["all_gather_columns", "all_reduce_sum", "broadcast_generator", "collective_device", "deepspeed_refusal",
           "is_distributed", "ranks", "sharded_parameters"]
