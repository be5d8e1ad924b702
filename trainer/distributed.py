"""Data-parallel training across processes with torch.distributed, for any policy module.

    torchrun --nproc_per_node 2 -m voxloop.clients.cli train --once      # 2 processes, one cycle

    group = data_parallel_from_env()          # SINGLE without torchrun's variables
    group.owns(j)                             # does this process compute minibatch j of a step?
    group.sum_gradients(policy.parameters())  # after backward: every process holds the step's gradient

Every process ("rank") holds the whole policy and the whole rollout. An optimizer step's minibatches
are dealt out (minibatch j to rank j mod world_size), each rank backpropagates its own, and one
all-reduce sums the gradients, so every rank takes the same step: N processes make exactly the update
one process makes with N times the gradient accumulation (PPOConfig.gradient_accumulation_steps), up
to the order of float additions. Nothing here knows the policy: it moves `.grad` tensors and state
dicts of whatever nn.Module the cycle updates (the CTC policy today, an encoder-decoder tomorrow),
as DistributedDataParallel would, but with the accumulation and the step left to the update loop.

Rank 0 is the main process: it alone reads the store, gates, exports, publishes and records the
cycle; the others get the batch from it (`broadcast`) and end after the update. The backend is
NCCL when the parameters live on a CUDA device, gloo otherwise (today's trainer updates on the CPU).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

WORLD_SIZE_ENV = "WORLD_SIZE"
RANK_ENV = "RANK"


def backend_for(device: torch.device) -> str:
    """The collective backend for tensors on `device`: NCCL for CUDA, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the training processes; SINGLE (rank 0 of 1) makes every method a no-op."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The process that reads the store and publishes (rank 0)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def owns(self, index: int) -> bool:
        """Whether this process computes item `index` of a sequence dealt out round-robin."""
        return index % self.world_size == self.rank

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """The main process's `value` (picklable), in every process."""
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy the main process's parameters and buffers into every process's `module`."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the processes (one flat all-reduce; a missing grad counts 0).

        Every process must pass the same parameters in the same order (the same module).
        """
        if not self.enabled:
            return
        params = [p for p in parameters if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for param in params:
            size = param.numel()
            param.grad = flat[offset: offset + size].view_as(param).clone()
            offset += size

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of a vector of floats over the processes (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()


SINGLE = DataParallel()
"""One process: no torch.distributed."""


def data_parallel_from_env(env: Mapping[str, str] | None = None, device: torch.device | None = None) -> DataParallel:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); SINGLE without it.

    `device` is where the policy's parameters live (the CPU by default): it picks the backend.
    Raises ValueError for inconsistent variables.
    """
    env = os.environ if env is None else env
    device = device if device is not None else torch.device("cpu")
    world_size = int(env.get(WORLD_SIZE_ENV, "1"))
    if world_size <= 1:
        return SINGLE
    rank = int(env.get(RANK_ENV, "-1"))
    if not 0 <= rank < world_size:
        raise ValueError(f"${RANK_ENV}={env.get(RANK_ENV)!r} does not fit ${WORLD_SIZE_ENV}={world_size}; "
                         "start the processes with torchrun (--nproc_per_node N)")
    if not dist.is_initialized():
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        log.info("data-parallel training: rank %d of %d (%s)", rank, world_size, backend)
    return DataParallel(rank, world_size)


def close(group: DataParallel) -> None:
    """Leave the process group (after the last collective call)."""
    if group.enabled and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["SINGLE", "DataParallel", "backend_for", "close", "data_parallel_from_env"]
