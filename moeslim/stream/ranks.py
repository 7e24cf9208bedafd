"""Calibration and validation over several processes with torch.distributed, as ``torchrun`` launches them.

Run under ``torchrun --nproc-per-node N -m moeslim ...`` (or ``--nnodes`` for several machines): every rank
holds the same decoder layer at a time and runs it over its own share of the calibration batches (batch ``b``
belongs to rank ``b mod N``); what the ranks collect is summed (statistics, KL totals) or gathered (per-token
validation metrics) across ranks, so every rank holds the result a single process would have computed, and
rank 0 alone writes files and prints (torch is imported only by a run of several processes). Statistics are
reduced on the CPU through gloo; with ``--device cuda`` the process group also has NCCL for the GPUs, and each
rank uses its node's GPU ``LOCAL_RANK``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks; ``Ranks()`` is a single process (everything is local)."""

    rank: int = 0
    world: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        """A suffix for per-rank files (empty for a single process)."""
        return "" if self.world == 1 else f".rank{self.rank}of{self.world}"

    def share(self, batches: int) -> list[int]:
        """The global batch indices of ``batches`` this rank runs, ascending."""
        return list(range(self.rank, batches, self.world))

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over the ranks (float64)."""
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).clone()
        dist.all_reduce(tensor)
        return tensor.numpy()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_rows(self, tensor: Any) -> list[Any]:
        """Every rank's ``tensor`` (a torch tensor; the ranks' may differ in their first dimension), in rank order."""
        if self.world == 1:
            return [tensor]
        import torch
        import torch.distributed as dist

        sizes = self.gather(int(tensor.shape[0]))
        wire = tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor  # gloo's types
        padded = wire.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = wire
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded.contiguous())
        return [o[:n].to(tensor.dtype) for o, n in zip(out, sizes, strict=True)]

    def sum_tensor(self, tensor: Any) -> Any:
        """Element-wise sum of a torch tensor over the ranks (a new tensor, in ``tensor``'s dtype)."""
        if self.world == 1:
            return tensor
        import torch
        import torch.distributed as dist

        wire = tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor.clone()
        dist.all_reduce(wire)
        return wire.to(tensor.dtype)

    def from_leader(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return self.gather(obj)[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


SINGLE = Ranks()


def current(device: str = "cpu") -> Ranks:
    """The ranks of this run: launched by torchrun (``WORLD_SIZE`` > 1) the process group is joined once (gloo on
    the CPU, plus NCCL with a CUDA device); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def divides_experts(ranks: Ranks) -> bool:
    """Whether several ranks divide each MoE layer's experts among them (the default; each rank reads and runs
    1/N of them), or, with ``MOESLIM_PARALLEL=batches``, each loads every layer whole (faster where a layer's
    experts are small against the tokens run through them)."""
    mode = os.environ.get("MOESLIM_PARALLEL", "experts").strip() or "experts"
    if mode not in ("experts", "batches"):
        from moeslim.errors import UsageError

        raise UsageError(f"MOESLIM_PARALLEL={mode!r} is not experts or batches; unset it or pick one")
    return ranks.world > 1 and mode == "experts"


def rank_device(device: str) -> str:
    """``cuda`` under torchrun means this rank's GPU on its node (``LOCAL_RANK``); anything else is kept."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device
