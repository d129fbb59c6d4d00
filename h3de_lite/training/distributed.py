"""Multi-process training under ``torchrun``: process group set-up, rank queries, collectives that degrade to no-ops.

``torchrun --nproc_per_node=N`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``)
in every process; :func:`setup` reads them, starts the process group (NCCL on CUDA, gloo on CPU) unless one is
already running, and returns a :class:`DistInfo`. In a plain ``python`` process everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "barrier", "all_gather_objects", "broadcast_object", "all_reduce_sum"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a distributed run.

    Args:
        rank: global rank (0 in a single process).
        world_size: number of processes (1 in a single process).
        local_rank: rank on this machine; picks the CUDA device.
        started_here: whether :func:`setup` started the process group (and :func:`teardown` should end it).

    Shape:
        not a tensor class.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, validates and writes files."""
        return self.rank == 0


def setup(device_type: str) -> DistInfo:
    """Join the process group ``torchrun`` describes (env ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), if any.

    Args:
        device_type: ``"cuda"`` picks the NCCL backend, anything else gloo.

    Returns:
        :class:`DistInfo`; ``DistInfo()`` (rank 0 of 1) when the environment names no distributed run.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return DistInfo(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", rank)))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world <= 1:
        return DistInfo(rank=rank, world_size=world, local_rank=local_rank)
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed; launch without torchrun")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, started_here=True)


def teardown(info: DistInfo) -> None:
    """End the process group if :func:`setup` started it."""
    if info.started_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op in a single process)."""
    if info.distributed:
        dist.barrier()


def all_gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` in a single process)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(info: DistInfo, values: dict[str, float]) -> dict[str, float]:
    """Sum a dict of floats over the ranks (same keys on every rank; the dict itself in a single process)."""
    if not info.distributed:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return {k: float(v) for k, v in zip(keys, tensor.tolist(), strict=True)}
