"""Multi-process data-parallel plumbing for the trainer (torchrun sets RANK / WORLD_SIZE).

`torchrun --nproc-per-node N -m tmkt train ...` starts N copies of the trainer; each reads its
rank from the environment torchrun provides, joins the process group (NCCL on CUDA, gloo on
CPU) and trains on its shard of every epoch. Without those variables everything here is a
no-op on a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: `rank` of `world_size`, `local_rank` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher) gave this process a rank in a larger world."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun; a single-process `DistInfo` otherwise."""
    if not launched_by_torchrun():
        return DistInfo()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def comm_device(info: DistInfo, device: torch.device) -> torch.device:
    """Device that collectives need their tensors on (NCCL: the GPU; gloo: the CPU)."""
    return device if info.enabled and dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, info: DistInfo, device: torch.device) -> torch.Tensor:
    """Sum of `t` over ranks (returned on the CPU); `t` itself on a single process."""
    if not info.enabled:
        return t
    x = t.to(comm_device(info, device)).clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.cpu()


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (all ranks then stop together)."""
    if not info.enabled:
        return flag
    return bool(all_reduce_sum(torch.tensor([int(flag)]), info, device).item() > 0)


def all_gather_bytes(data: torch.Tensor, info: DistInfo, device: torch.device) -> list[torch.Tensor]:
    """Each rank's uint8 tensor `data` (same size on every rank), in rank order."""
    if not info.enabled:
        return [data]
    x = data.to(comm_device(info, device))
    out = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(out, x)
    return [o.cpu() for o in out]


def broadcast_text(text: str, info: DistInfo, device: torch.device, max_bytes: int = 4096) -> str:
    """Rank 0's `text` on every rank (UTF-8 through a fixed-size uint8 tensor, no pickling)."""
    if not info.enabled:
        return text
    buf = torch.zeros(max_bytes + 4, dtype=torch.uint8)
    if info.is_main:
        raw = text.encode()
        if len(raw) > max_bytes:
            raise ValueError(f"text longer than {max_bytes} bytes cannot be broadcast")
        buf[:4] = torch.tensor(list(len(raw).to_bytes(4, "little")), dtype=torch.uint8)
        buf[4 : 4 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    x = buf.to(comm_device(info, device))
    dist.broadcast(x, src=0)
    x = x.cpu()
    n = int.from_bytes(bytes(x[:4].tolist()), "little")
    return bytes(x[4 : 4 + n].tolist()).decode()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank."""
    if not info.enabled:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)
