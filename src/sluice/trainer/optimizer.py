"""AdamW with linear warmup to a constant learning rate, and the clipped optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sluice.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig, lr: float | None = None
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters at ``lr`` (default ``config.lr``) with ``config``'s betas, decay, warmup."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr if lr is None else lr, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay, foreach=True,
    )
    warmup = max(config.lr_warmup_iters, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    return optimizer, scheduler


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, clip_grad: float,
                   accept: Callable[[float], bool] = math.isfinite) -> tuple[float, bool]:
    """Clip the global gradient norm to ``clip_grad`` (0: off) and step, unless ``accept(grad_norm)`` refuses;
    clear the gradients either way. Returns (grad norm, whether the step was applied).

    The default refuses a NaN/inf norm: AdamW would otherwise write NaN into every weight and both moments.
    A refused step leaves the weights, the moments and the LR schedule untouched.
    """
    max_norm = clip_grad if clip_grad > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    applied = accept(grad_norm)
    if applied:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, applied
