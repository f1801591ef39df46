"""Optimizers and learning-rate schedules named by the ai-toolkit config."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(train, groups: list[dict], device: torch.device) -> tuple[torch.optim.Optimizer, list[str]]:
    """The optimizer `train.optimizer` over `groups`, and notes on what was replaced."""
    name, params, notes = train.optimizer, dict(train.optimizer_params), []
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    if name == "adamw8bit":
        optimizer_class = _bitsandbytes_adamw8bit()
        if optimizer_class is None:
            notes.append(f"optimizer adamw8bit needs bitsandbytes, which is not available here; used adamw on "
                         f"{device.type}")
            optimizer_class = torch.optim.AdamW
        return optimizer_class(groups, **params), notes
    if name == "adamw":
        return torch.optim.AdamW(groups, **params), notes
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # The configured lr and lr_scheduler drive Adafactor, so its own relative step is off.
        if params.pop("relative_step", False) | params.pop("warmup_init", False):
            notes.append("adafactor relative_step/warmup_init ignored; lr and lr_scheduler set the learning rate")
        params.setdefault("scale_parameter", False)
        if "eps" in params and not isinstance(params["eps"], (list, tuple)):
            params["eps"] = (params["eps"], 1e-3)
        return Adafactor(groups, lr=groups[0]["lr"], relative_step=False, warmup_init=False, **params), notes
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, **params), notes
    raise ValueError(f"unknown optimizer {name}")


def _bitsandbytes_adamw8bit():
    """bitsandbytes' 8-bit AdamW (CUDA, and CPU since 0.45), or None where it cannot load."""
    try:
        import bitsandbytes
    except (ImportError, RuntimeError, OSError):
        return None
    return bitsandbytes.optim.AdamW8bit


def build_lr_scheduler(train, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    """One LambdaLR per config: warm-up, then the named decay over `total_steps`.
    `eta_min` and `lr_end` are absolute learning rates, as in torch and ai-toolkit."""
    name, kwargs = train.lr_scheduler, train.lr_scheduler_kwargs
    warmup = int(kwargs.get("warmup_steps", 0))
    total = max(1, total_steps)

    def factor_for(base_lr: float):
        floor = (kwargs.get("eta_min", 0.0) / base_lr) if base_lr else 0.0

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if name in ("constant", "constant_with_warmup"):
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if name == "linear":
                end = kwargs.get("end_factor", 0.0)
                return 1.0 + (end - 1.0) * progress
            if name == "cosine":
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
            if name == "cosine_with_restarts":
                cycles = int(kwargs.get("num_cycles", 1))
                if progress >= 1.0:
                    return floor
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))
            if name == "polynomial":
                end = kwargs.get("lr_end", 0.0) / base_lr if base_lr else 0.0
                return end + (1 - end) * (1 - progress) ** kwargs.get("power", 1.0)
            raise ValueError(f"unknown lr_scheduler {name}")

        return factor

    return LambdaLR(optimizer, [factor_for(group["lr"]) for group in optimizer.param_groups])
