"""AdamW with the paper's weight-decay exclusions (PAPER.md, "Training recipe").

No decay on biases, norm weights, the cls token and the position embedding. The rule is structural so that
it also covers the linear-probe baselines: a parameter is exempt when it has ndim <= 1 (biases, LayerNorm
weights), its name ends in ``bias`` (covers stacked per-layer biases [L, C]), or its last name component is
``cls_token`` or ``pos_embed``. Everything else (Lambda weight, qkv/proj/fc weights, head weight) decays.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NO_DECAY_NAMES", "decays", "param_groups", "make_optimizer"]

NO_DECAY_NAMES = frozenset({"cls_token", "pos_embed"})


def decays(name: str, param: torch.Tensor) -> bool:
    """True when weight decay applies to this named parameter."""
    leaf = name.rsplit(".", 1)[-1]
    return not (param.ndim <= 1 or leaf.endswith("bias") or leaf in NO_DECAY_NAMES)


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``[{decay params, weight_decay}, {no-decay params, 0.0}]`` (trainable only).

    Each group also carries ``names`` (ignored by the optimizer) so tests and logs can see the split.
    """
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if decays(name, p):
            decay.append(p)
            decay_names.append(name)
        else:
            no_decay.append(p)
            no_decay_names.append(name)
    return [
        {"params": decay, "weight_decay": float(weight_decay), "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def make_optimizer(
    model: nn.Module,
    *,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    groups = [g for g in param_groups(model, weight_decay=weight_decay) if g["params"]]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
