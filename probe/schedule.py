"""The learning-rate schedule (PAPER.md, "Training recipe"), stepped every iteration.

Linear warm-up over the first ``warmup_frac`` of the steps from ``lr * warmup_start_factor`` to ``lr``, then
cosine from ``lr`` to ``lr * final_factor`` reached exactly at the last step (``total_steps - 1``).
With W = int(warmup_frac * total_steps) warm-up steps:
  step s <= W:  lr * (start + (1 - start) * s / W)
  step s >= W:  lr * (final + (1 - final) * (1 + cos(pi * (s - W) / (total_steps - 1 - W))) / 2)
Both pieces give ``lr`` at s = W. Steps past the end are held at the final value, because LambdaLR evaluates
the factor once more after the last optimizer step.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["lr_at", "warmup_steps", "make_scheduler"]


def warmup_steps(total_steps: int, warmup_frac: float = 0.1) -> int:
    """Number of warm-up steps W (160 for 1,600 steps; 130 for 1,300)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"warmup_frac must be in [0, 1), got {warmup_frac}")
    return int(warmup_frac * total_steps)


def lr_at(
    step: int,
    *,
    total_steps: int,
    base_lr: float,
    warmup_frac: float = 0.1,
    warmup_start_factor: float = 0.01,
    final_factor: float = 0.001,
) -> float:
    """Learning rate used for optimizer step ``step`` (0-based)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    w = warmup_steps(total_steps, warmup_frac)
    last = total_steps - 1
    step = min(step, last)
    if step < w:
        factor = warmup_start_factor + (1.0 - warmup_start_factor) * step / w
    elif last > w:
        progress = (step - w) / (last - w)
        factor = final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # degenerate: no room for a decay (total_steps == 1 or W == last)
        factor = 1.0
    return base_lr * factor


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_frac: float = 0.1,
    warmup_start_factor: float = 0.01,
    final_factor: float = 0.001,
) -> LambdaLR:
    """LambdaLR applying ``lr_at`` to every param group's initial lr; call ``.step()`` after each optimizer step."""
    warmup_steps(total_steps, warmup_frac)  # validate now, not at the first step

    def factor(step: int) -> float:
        return lr_at(
            step,
            total_steps=total_steps,
            base_lr=1.0,
            warmup_frac=warmup_frac,
            warmup_start_factor=warmup_start_factor,
            final_factor=final_factor,
        )

    return LambdaLR(optimizer, lr_lambda=factor)
