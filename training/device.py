"""Where training and inference run: the device a setting names, the process group under
`torchrun` (NCCL on GPUs, gloo on CPUs), and autocast. The one distributed setup every stage
uses: the logits job, the students' and the teacher's training loop."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def local_device(name: str) -> torch.device:
    """The device `name` names; an unindexed CUDA device is this process's GPU (LOCAL_RANK)."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def is_writer() -> bool:
    """Whether this process writes shared outputs: rank 0, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when run under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = local_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def wrap_ddp(model: torch.nn.Module, device: torch.device):
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """fp16/bf16 autocast on CUDA only; the CPU always runs fp32 (CPU bf16 is many times slower)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
