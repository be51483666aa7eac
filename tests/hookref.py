"""The extraction path combo used before timm's forward_intermediates(): the reference that keeps stores' bytes."""

from __future__ import annotations

import torch

from extract.backbones import Backbone, inference_context


def hooked_block_outputs(bb: Backbone, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The extraction path before forward_intermediates: forward hooks on model.blocks around forward_features
    (SAM blocks NHWC, the others NLC with the prefix tokens first). Kept here as the reference."""
    outputs = []
    handles = [blk.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for blk in bb.model.blocks]
    try:
        with inference_context(torch.device("cpu")):
            bb.model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    p, b = bb.num_prefix_tokens, x.shape[0]
    patch = [o.reshape(b, -1, o.shape[-1]) if o.ndim == 4 else o[:, p:] for o in outputs]
    prefix = [o.new_zeros((b, 0, o.shape[-1])) if o.ndim == 4 else o[:, :p] for o in outputs]
    return torch.stack(patch, 1), torch.stack(prefix, 1)
