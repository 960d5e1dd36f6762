"""Where training and inference run: the device a setting names, the process group under
`torchrun` (NCCL on GPUs, gloo on CPUs), and autocast. The one distributed setup every stage
uses: the logits job, the students' and the teacher's training loop."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from configs import UserError


class DeviceUnavailable(UserError):
    """The configured device does not exist on this machine or in this torch build."""


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """'auto' is CUDA when available, else the CPU; any other name must be a device this torch
    has (a `DeviceUnavailable` naming `setting`, the config key, otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type != "cpu":
        module = getattr(torch, device.type, None)
        available = module is not None and module.is_available()
        count = module.device_count() if available and hasattr(module, "device_count") else 0
        if not available or (device.index is not None and device.index >= count):
            raise DeviceUnavailable(
                f"device {name!r} is not available to this torch ({torch.__version__}, "
                f"{count} {device.type} device(s)): set {setting} to 'cpu' or 'auto'")
    return device


def local_device(name: str, setting: str = "device") -> torch.device:
    """The device `name` names; an unindexed CUDA device is this process's GPU (LOCAL_RANK)."""
    device = resolve_device(name, setting)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def is_writer() -> bool:
    """Whether this process writes shared outputs: rank 0, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_distributed(device_name: str, setting: str = "device"
                      ) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when run under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = local_device(device_name, setting)
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
