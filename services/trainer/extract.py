"""A LoRA extracted from a fully fine-tuned model: the best low-rank approximation of each
layer's weight change, in peft's lora_A/lora_B layout."""

from __future__ import annotations

import torch

# A layer whose change is below this fraction of its weight's norm did not train (or only
# by rounding): it gets no LoRA rather than a rank-r factorisation of noise.
UNCHANGED = 1e-6


def extract_lora(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], rank: int, *,
                 modules: list[str], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """For each module (a Linear weight [out, in] or a Conv2d weight [out, in, kh, kw] seen as
    [out, in·kh·kw]): ΔW = tuned - base = U·S·Vh, kept to its r = min(rank, out, in·kh·kw) largest
    singular values, which is the closest rank-r matrix to ΔW (Eckart–Young), split evenly as
    lora_B = U·√S and lora_A = √S·Vh so that lora_B @ lora_A ≈ ΔW at lora_alpha = r (scale 1).

    Returns `{module}.lora_A.weight` / `{module}.lora_B.weight` tensors shaped as peft's LoRA
    layers hold them (a Conv2d's lora_A keeps the kernel, its lora_B is 1×1), float32 on the
    CPU; modules whose change is ~0 are left out. The SVDs run on `device` (default: where
    the weights are)."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1 (got {rank})")
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        key = f"{module}.weight"
        if key not in base or key not in tuned:
            raise KeyError(f"{key} is missing from the {'base' if key not in base else 'tuned'} weights")
        before, after = base[key], tuned[key]
        if before.shape != after.shape or after.ndim not in (2, 4):
            raise ValueError(f"{key}: cannot extract a LoRA from weights shaped {tuple(before.shape)} "
                             f"and {tuple(after.shape)}")
        target = device if device is not None else after.device
        before = before.to(target, torch.float32)
        delta = after.to(target, torch.float32) - before
        if delta.norm() <= UNCHANGED * max(before.norm().item(), 1e-12):
            continue
        matrix = delta.flatten(1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        r = min(rank, *matrix.shape)
        root = s[:r].sqrt()
        up = u[:, :r] * root
        down = root[:, None] * vh[:r]
        if after.ndim == 4:
            up = up[:, :, None, None]
            down = down.reshape(r, *after.shape[1:])
        out[f"{module}.lora_A.weight"] = down.contiguous().cpu()
        out[f"{module}.lora_B.weight"] = up.contiguous().cpu()
    return out
