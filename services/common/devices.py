"""The device and dtype every service runs its models on: CUDA with bfloat16 when present,
the CPU with float32 otherwise, unless LORAMESH_DEVICE names a device."""

from __future__ import annotations

import torch


def pick_device(wanted: str = "auto") -> torch.device:
    """`wanted` ("auto", "cpu", "cuda", "cuda:1", ...) as a torch device; "auto" and a CUDA
    device on a host without CUDA give the CPU."""
    if wanted == "auto" or (wanted.startswith("cuda") and not torch.cuda.is_available()):
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (half the memory, the precision diffusion models are trained in);
    float32 elsewhere, where half precision is slow or missing."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_and_dtype(wanted: str = "auto") -> tuple[torch.device, torch.dtype]:
    device = pick_device(wanted)
    return device, default_dtype(device)
