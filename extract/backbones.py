"""Frozen timm backbones and the tokens of every layer, through timm's `forward_intermediates()`.

ComBo probes the residual stream after *every* block of one or more frozen models (PAPER.md, "Features taken
from each backbone"). Which models can be probed and their layers' grids (any timm model with
`forward_intermediates()` and `feature_info`: ViTs with one grid and width, hierarchical models with one per stage,
stored as a multi-grid store) are `extract/architecture.py`'s; what a name means is `extract/aliases.py`'s (both
re-exported here). This module builds the model and reads its layers, the things that are easy to get subtly
wrong there:

* the input geometry (we always build the model at OUR image size so the position embedding is resized once
  at load time; timm's ``pretrained_cfg`` keeps advertising the checkpoint's native size, e.g. 518 for DINOv2;
  a NaFlexViT gets the same fixed square input as every other model, the paper's protocol);
* what a "layer output" is: `forward_intermediates(norm=False)`, the raw block output (no final norm, no SAM
  neck), patch tokens on their row-major grid and the prefix tokens (cls, registers, RADIO's summary tokens)
  apart. For every model the earlier forward-hook path served these are bit-identical to the hooked block
  outputs (tests/test_backbones.py keeps the hook path as the reference), so that path is gone.

Which weights were really loaded is `extract/weights.py`'s job (never a silent fall back to random weights).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from store_schema.grids import GridSpec, group_layers

from .aliases import ALIASES, PAPER_ALIASES, BackboneSpec, alias_help, alias_table, geometry, resolve_model
from .architecture import (
    Architecture,
    ImageSizeError,
    UnknownModelError,
    UnsupportedModelError,
    architecture,
    parse_layers,
)
from .weights import (
    ResolvedWeights,
    WeightsUnavailableError,
    create_model,
    load_weights_file,
    resolve_pretrained,
    sha256_file,
)

__all__ = [
    "ALIASES",
    "alias_help",
    "alias_table",
    "geometry",
    "PAPER_ALIASES",
    "Architecture",
    "Backbone",
    "BackboneSpec",
    "DeviceUnavailableError",
    "ImageSizeError",
    "UnknownModelError",
    "UnsupportedModelError",
    "WeightsUnavailableError",
    "architecture",
    "block_tokens",
    "inference_context",
    "load_backbone",
    "parse_layers",
    "patch_size",
    "pick_device",
    "resolve_model",
    "sha256_file",
]

# Keys that must not come through `model_kwargs`: load_backbone owns them.
_RESERVED_MODEL_KWARGS = ("img_size", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                          "features_only", "checkpoint_path")


class DeviceUnavailableError(RuntimeError):
    """An explicitly requested device is not usable on this machine."""


@dataclass(frozen=True)
class Backbone:
    """A frozen, eval-mode model plus everything needed to feed it and to record provenance."""

    model: torch.nn.Module  # eval(), requires_grad_(False)
    spec: BackboneSpec
    weights_source: str  # "timm-pretrained:<hf repo or url>" | "file:<abs path>" | "random-init"
    weights_sha256: str | None  # sha256 of the weights file actually read; None for random-init
    seed: int | None  # the seed used for random-init, else None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # resize mode for inputs; always "bilinear", no crop (PAPER.md)
    token_grid: tuple[int, int]  # patch-token grid (h, w) at image_size
    num_prefix_tokens: int  # cls + distillation + register / summary tokens (0 for SAM / SigLIP)
    num_layers: int  # number of layers taken (len(layers))
    embed_dim: int  # D of the layer outputs
    layers: tuple[int, ...]  # indices into feature_info (the blocks of a ViT) taken, ascending
    num_blocks: int  # len(feature_info): every layer the model has
    # extra timm create_model kwargs it was built with; recorded so the same model can be rebuilt
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # the taken layers' (grid, width) groups when there are several (a hierarchical model's stages, stored as a
    # multi-grid store, format 2.3); None: one grid, token_grid x embed_dim. token_grid / embed_dim are then the
    # last layer's (the deepest stage)
    grids: tuple[GridSpec, ...] | None = None

    @property
    def layer_shapes(self) -> dict[int, tuple[int, int, int]]:
        """Each taken layer's (h, w, width)."""
        if self.grids is None:
            return {layer: (*self.token_grid, self.embed_dim) for layer in self.layers}
        return {layer: (*g.token_grid, g.feature_dim) for g in self.grids for layer in g.layers}


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------

def _embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    return getattr(model, "patch_embed", None) or getattr(model, "embeds", None)  # NaFlexViT: embeds


def patch_size(model: torch.nn.Module) -> tuple[int, int]:
    """Pixels per patch token (h, w): the patch embedding's, else the layers' reduction (feature_info)."""
    embed = _embedding(model)
    ps = getattr(embed, "patch_size", None) if embed is not None else None
    if ps is None:
        r = int(model.feature_info[0]["reduction"])
        return r, r
    return (int(ps[0]), int(ps[1])) if isinstance(ps, (tuple, list)) else (int(ps), int(ps))


def _token_grid(model: torch.nn.Module, image_size: int) -> tuple[int, int]:
    embed = _embedding(model)
    if embed is not None and hasattr(embed, "dynamic_feat_size"):
        h, w = embed.dynamic_feat_size((image_size, image_size))
        return int(h), int(w)
    ph, pw = patch_size(model)
    return image_size // ph, image_size // pw


def _triple(values: Any, what: str, name: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ValueError(f"{name}: expected 3 {what} values in the pretrained cfg, got {values!r}")
    return vals  # type: ignore[return-value]


def load_backbone(
        name: str,
        *,
        image_size: int = 224,
        random_init: bool = False,
        weights: str | Path | None = None,
        seed: int = 0,
        expected_sha256: str | None = None,
        model_kwargs: dict | None = None,
        device: str | torch.device | None = None,
        layers: str | Sequence[int] | None = None,
) -> Backbone:
    """Build a frozen backbone at image_size (its pos-embed resized to that grid).

    Weights: random_init (seeded by `seed`), else the local file `weights`, else timm's
    pretrained checkpoint from the HF cache (downloaded only when online). A failure to get
    real weights raises WeightsUnavailableError; there is no fallback to random weights.
    The model stays on CPU unless `device` is given. ``layers``: which layer outputs `block_tokens` returns
    (`parse_layers`: "all", "last:N" or indices; default all, the paper's).
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if random_init and weights is not None:
        raise ValueError(f"{name}: random_init=True and weights={weights!r} are mutually exclusive")
    if random_init and expected_sha256 is not None:
        raise ValueError(f"{name}: expected_sha256 makes no sense with random_init=True")
    kwargs = dict(model_kwargs or {})
    bad = [k for k in _RESERVED_MODEL_KWARGS if k in kwargs]
    if bad:
        raise ValueError(f"{name}: model_kwargs must not set {bad}; load_backbone controls them")
    spec = resolve_model(name, model_kwargs=kwargs)  # refuses what cannot be stored before any weights are read
    arch = architecture(spec.timm_name, kwargs)
    taken = parse_layers(layers, arch.num_layers, what=f"{name}: layers", default=arch.default_layers)
    # a hierarchical model's grids at image_size, from its meta twin: a size it cannot take fails here, before weights
    shapes = arch.layer_shapes(image_size, name=name) if arch.hierarchical else None

    if random_init:
        # fork_rng: seeding must not disturb the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = create_model(spec.model_name, image_size=image_size, pretrained=False, overlay=None,
                                 kwargs=kwargs)
        source, digest, used_seed = "random-init", None, int(seed)
    else:
        if weights is not None:
            path = Path(weights).expanduser().resolve()
            if not path.is_file():
                raise WeightsUnavailableError(
                    f"Weights file {path} for {spec.model_name!r} does not exist or is not a file.")
            is_npz = path.suffix.lower() in (".npz", ".npy")
            resolved = ResolvedWeights(path, f"file:{path}", is_npz, spec.pretrained_tag)
        else:
            resolved = resolve_pretrained(spec.model_name, spec.timm_name)
            spec = replace(spec, pretrained_tag=resolved.tag)  # record the tag timm resolved
        digest = sha256_file(resolved.path)
        if expected_sha256 is not None and digest.lower() != expected_sha256.strip().lower():
            raise WeightsUnavailableError(
                f"sha256 mismatch for weights file {resolved.path} ({spec.model_name}): expected "
                f"{expected_sha256.strip().lower()}, found {digest}.")
        model = load_weights_file(spec.model_name, resolved, image_size=image_size, kwargs=kwargs)
        source, used_seed = resolved.source, None

    info = model.feature_info  # resolve_model checked it (and forward_intermediates) on the meta device
    if len(info) != arch.num_layers:
        raise UnsupportedModelError(f"{name}: the built model lists {len(info)} layer outputs (feature_info), its "
                                    f"meta twin {arch.num_layers}")
    grids: tuple[GridSpec, ...] | None = None
    if shapes is not None:
        groups = group_layers(taken, [shapes[i][:2] for i in taken], [shapes[i][2] for i in taken])
        grids = tuple(groups) if len(groups) > 1 else None
        token_grid, embed_dim = shapes[taken[-1]][:2], shapes[taken[-1]][2]
    else:
        token_grid, embed_dim = _token_grid(model, image_size), int(info[0]["num_chs"])
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(torch.device(device))

    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = _triple(cfg.get("mean") or IMAGENET_DEFAULT_MEAN, "mean", spec.model_name)
    std = _triple(cfg.get("std") or IMAGENET_DEFAULT_STD, "std", spec.model_name)
    return Backbone(
        model=model,
        spec=spec,
        weights_source=source,
        weights_sha256=digest,
        seed=used_seed,
        image_size=image_size,
        mean=mean,
        std=std,
        interpolation="bilinear",
        token_grid=(int(token_grid[0]), int(token_grid[1])),
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0) or 0),
        num_layers=len(taken),
        embed_dim=int(embed_dim),
        model_kwargs=kwargs,
        layers=taken,
        num_blocks=len(info),
        grids=grids,
    )


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------

def block_tokens(backbone: Backbone, images: torch.Tensor, *, out_dtype: torch.dtype | None = torch.float32
                 ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
    """The output of every taken layer (residual stream after the block), split into patch and prefix tokens.

    images: [B, 3, S, S] normalised, S == backbone.image_size (moved to the model's device).
    Returns (patch [B, L, T, D] with T = h*w row-major, prefix [B, L, P, D], P possibly 0), L = len(layers).
    A multi-grid backbone (`backbone.grids`, a hierarchical model's stages): patch is a list, one [B, L_k, T_k, D_k]
    per group in grid order, and prefix is [B, L, 0, D_last] (such models have no prefix tokens).
    timm's forward_intermediates(norm=False, intermediates_only=True): no final norm, no SAM neck, no head,
    and no block after the last taken layer. Call it inside inference_context(); out_dtype=None keeps the
    dtype the blocks produced.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a [B, 3, S, S] tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)}")
    s = backbone.image_size
    if tuple(images.shape[-2:]) != (s, s):
        raise ValueError(f"{backbone.spec.alias}: images are {tuple(images.shape[-2:])}, the backbone was "
                         f"built for {(s, s)}; resize (bilinear) to image_size first")
    if not images.is_floating_point():
        raise ValueError(f"images must be normalised floats, got dtype {images.dtype}")
    model = backbone.model
    param = next(model.parameters(), None)
    if param is not None and images.device != param.device:
        images = images.to(param.device, non_blocking=True)

    p = backbone.num_prefix_tokens
    options: dict[str, Any] = {"indices": list(backbone.layers), "norm": False, "output_fmt": "NCHW",
                               "intermediates_only": True, "stop_early": True}
    if p:
        options["return_prefix_tokens"] = True
    outputs = model.forward_intermediates(images, **options)
    if len(outputs) != backbone.num_layers:
        raise RuntimeError(f"{backbone.spec.alias}: forward_intermediates gave {len(outputs)} layer outputs, "
                           f"expected {backbone.num_layers}")

    b = images.shape[0]
    expected = backbone.layer_shapes
    patches, prefixes = {}, []
    for layer, out in zip(backbone.layers, outputs):
        x, pre = out if isinstance(out, (tuple, list)) else (out, None)
        gh, gw, d = expected[layer]
        if x.ndim != 4 or tuple(x.shape[2:]) != (gh, gw) or x.shape[1] != d:
            raise RuntimeError(f"{backbone.spec.alias}: layer {layer} output has shape {tuple(x.shape)}, expected "
                               f"[{b}, {d}, {gh}, {gw}]")
        patches[layer] = x.flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D], row-major grid
        if p:
            if pre is None or tuple(pre.shape[1:]) != (p, d):
                raise RuntimeError(f"{backbone.spec.alias}: layer {layer} prefix tokens have shape "
                                   f"{None if pre is None else tuple(pre.shape)}, expected [{b}, {p}, {d}]")
            prefixes.append(pre)
        else:
            prefixes.append(x.new_zeros((b, 0, backbone.embed_dim)))
    prefix = torch.stack(prefixes, dim=1)
    if backbone.grids is None:
        patch: torch.Tensor | list[torch.Tensor] = torch.stack([patches[layer] for layer in backbone.layers], dim=1)
        if out_dtype is not None:
            patch = patch.to(out_dtype)
    else:
        patch = [torch.stack([patches[layer] for layer in g.layers], dim=1) for g in backbone.grids]
        if out_dtype is not None:
            patch = [t.to(out_dtype) for t in patch]
    if out_dtype is not None:
        prefix = prefix.to(out_dtype)
    return patch, prefix


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """"cuda" when available else "cpu"; an explicit request is honoured or refused clearly."""
    if requested is None or (isinstance(requested, str) and requested.strip().lower() in ("", "auto")):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(requested.strip() if isinstance(requested, str) else requested)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"Unknown device {requested!r} (use 'cpu', 'cuda' or 'cuda:N')") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"Device {requested!r} was requested but CUDA is not available "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use 'cpu'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"Device {requested!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist.")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceUnavailableError(f"Device {requested!r} was requested but MPS is not available.")
    elif dev.type != "cpu":
        raise DeviceUnavailableError(f"Device type {dev.type!r} is not supported here (use 'cpu' or 'cuda').")
    return dev


@contextlib.contextmanager
def inference_context(device: torch.device | str) -> Iterator[None]:
    """inference_mode everywhere; bf16 autocast on CUDA (PAPER.md), plain fp32 on CPU."""
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if device.type == "cuda":
            stack.enter_context(torch.autocast(device_type="cuda", dtype=torch.bfloat16))
        yield
