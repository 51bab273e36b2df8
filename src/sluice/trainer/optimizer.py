"""AdamW with Megatron's learning-rate schedule (warmup, then constant, linear or cosine decay), and the clipped
optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from sluice.config import TrainConfig


def warmup_steps(config: TrainConfig) -> int:
    """--lr-warmup-iters, or --lr-warmup-fraction of --lr-decay-iters (Megatron's rule: the fraction wins)."""
    if config.lr_warmup_fraction is not None and config.lr_decay_iters:
        return int(config.lr_warmup_fraction * config.lr_decay_iters)
    return max(config.lr_warmup_iters, 0)


def lr_at(step: int, config: TrainConfig, peak: float | None = None) -> float:
    """The learning rate of optimizer step ``step`` (0 = the first), peaking at ``peak`` (default ``config.lr``).

    After warmup this is Megatron's curve with its step count equal to ``step``: the decay fraction is
    (step - W) / (D - W) and from step D on the rate is --min-lr. Warmup departs by one step: step k < W runs at
    init + (peak - init) (k + 1) / W, so the first step trains instead of running at the initial rate.
    --min-lr and --lr-warmup-init scale with ``peak`` / --lr (the critic's schedule has the actor's shape).
    """
    base = config.lr if peak is None else peak
    scale = base / config.lr if config.lr > 0 else 0.0
    init, low = config.lr_warmup_init * scale, config.min_lr * scale
    warmup = warmup_steps(config)
    if step < warmup:
        return init + (base - init) * (step + 1) / warmup
    if config.lr_decay_style == "constant" or not config.lr_decay_iters:
        return base
    decay = config.lr_decay_iters
    if step >= decay:
        return low
    ratio = (step - warmup) / (decay - warmup)
    if config.lr_decay_style == "linear":
        coeff = 1.0 - ratio
    else:  # cosine
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return low + coeff * (base - low)


def build_optimizer(model: torch.nn.Module, config: TrainConfig, lr: float | None = None,
                    masters: list[torch.Tensor] | None = None
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters at ``lr`` (default ``config.lr``) with ``config``'s betas and decay,
    scheduled by ``lr_at``. ``masters``: the host masters of --optimizer-cpu-offload (host_optimizer.py), one per
    trainable parameter in order, stepped by torch's fused CPU kernel instead."""
    peak = config.lr if lr is None else lr
    params = masters if masters is not None else [p for p in model.parameters() if p.requires_grad]
    kernel = dict(fused=True) if masters is not None else dict(foreach=True)
    optimizer = torch.optim.AdamW(
        params, lr=peak, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay, **kernel)
    # LambdaLR multiplies the peak by the factor; a peak of 0 stays 0 whatever the curve.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, config, peak) / peak if peak > 0 else 0.0
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


@contextmanager
def kernels_kept(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Around loading a state dict, which takes the saved groups' kernel choice (foreach or fused): keep this
    optimizer's own, and put the step counters where its kernel reads them (the fused kernel on the parameters'
    device, the foreach one on the host), so moments saved by the host optimizer resume on the device and back."""
    kept = [(group.get("foreach"), group.get("fused")) for group in optimizer.param_groups]
    yield
    for group, (foreach, fused) in zip(optimizer.param_groups, kept):
        group["foreach"], group["fused"] = foreach, fused
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(param.device if fused else "cpu", torch.float32)
