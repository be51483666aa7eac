"""Frozen timm backbones and the tokens of every layer, through timm's `forward_intermediates()`.

ComBo probes the residual stream after *every* block of one or more frozen models (PAPER.md, "Features taken
from each backbone"). This module owns the things that are easy to get subtly wrong there:

* which models can be probed: any timm model with `forward_intermediates()` and per-layer outputs
  (`feature_info`): the plain token ViTs of every timm family (ViT, DeiT, EVA / EVA-02 / DINOv3 / PE, SAM's ViT,
  AIMv2, TIPSv2, NaFlexViT for RADIO and SigLIP2-NaFlex ...), one grid and width, and hierarchical models
  (ConvNeXt, Swin, Hiera, SAM2's HieraDet, MaxViT, ResNet ...), whose stage outputs each keep their own grid and
  width (a multi-grid store, `grids`); a hierarchical model with prefix tokens, or a model without those outputs,
  is refused in one sentence naming what it lacks, before weights are looked for;
* a hierarchical model's grids at the requested size: from a forward of its meta twin (Swin pads odd grids up,
  PiT's first stage is 27x27 at 224: image_size // reduction is not always right), which also refuses a size the
  model cannot take, naming sizes that work;
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
import functools
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

import timm
import timm.models
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from store_schema.grids import GridSpec, group_layers

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


class UnknownModelError(ValueError):
    """The name is neither an alias nor a timm model name."""


class UnsupportedModelError(UnknownModelError):
    """timm knows the model, but it gives no per-layer token maps combo can store (say which part is missing).
    A subclass of UnknownModelError so that callers that refuse unknown names refuse these too."""


class ImageSizeError(ValueError):
    """The model cannot take images of the requested size (its grids would drop pixels, or timm refuses it)."""


class DeviceUnavailableError(RuntimeError):
    """An explicitly requested device is not usable on this machine."""


@dataclass(frozen=True)
class BackboneSpec:
    """What to build: the timm architecture and which pretrained weights (tag) it names."""

    alias: str  # "sam", or the name exactly as given for non-alias timm names
    timm_name: str  # architecture, e.g. "samvit_base_patch16"
    pretrained_tag: str | None  # e.g. "sa1b"; None = timm's default tag for the architecture

    @property
    def model_name(self) -> str:
        """timm's "arch.tag" name (just "arch" when no tag is pinned)."""
        return f"{self.timm_name}.{self.pretrained_tag}" if self.pretrained_tag else self.timm_name


# The paper's backbones (PAPER.md, "Backbones"). in21k is what the authors ran (orig_in21k);
# augreg_in21k is other weights, kept under its own alias so stores of the two never mix.
PAPER_ALIASES: tuple[BackboneSpec, ...] = (
    BackboneSpec("sam", "samvit_base_patch16", "sa1b"),
    BackboneSpec("clip", "vit_base_patch16_clip_224", "openai"),
    BackboneSpec("dfn-clip", "vit_base_patch16_clip_224", "dfn2b"),
    BackboneSpec("siglip", "vit_base_patch16_siglip_224", "webli"),
    BackboneSpec("dinov2", "vit_base_patch14_reg4_dinov2", "lvd142m"),
    BackboneSpec("in21k", "vit_base_patch16_224", "orig_in21k"),
    BackboneSpec("in21k-augreg", "vit_base_patch16_224", "augreg_in21k"),
    BackboneSpec("mae", "vit_base_patch16_224", "mae"),
)

# Today's foundation models, at ViT-B scale where one exists (the paper's scale), each pinned to its checkpoint.
# AIMv2 has no model below ViT-L (300M). PE-spatial's checkpoint is trained at 512 px; like DINOv2's 518 it is
# built at the extraction's image size. RADIO is C-RADIOv3-B as timm's NaFlexViT (summary tokens as prefix).
MODERN_ALIASES: tuple[BackboneSpec, ...] = (
    BackboneSpec("dinov3", "vit_base_patch16_dinov3", "lvd1689m"),
    BackboneSpec("siglip2", "vit_base_patch16_siglip_224", "v2_webli"),
    BackboneSpec("pe", "vit_pe_core_base_patch16_224", "fb"),
    BackboneSpec("pe-spatial", "vit_pe_spatial_base_patch16_512", "fb"),
    BackboneSpec("aimv2", "aimv2_large_patch14_224", "apple_pt"),
    BackboneSpec("radio", "naflexvit_base_patch16_radio_v3", "c_radio"),
    BackboneSpec("tipsv2", "vit_base_patch14_reg1_tipsv2", "webli"),
    BackboneSpec("eva02", "eva02_base_patch14_224", "mim_in22k"),
    # hierarchical (format 2.3 multi-grid stores): each of the 4 stage outputs on its own grid and width
    BackboneSpec("sam2", "sam2_hiera_base_plus", "fb_r896"),
    BackboneSpec("dinov3-convnext", "convnext_base", "dinov3_lvd1689m"),
)

ALIASES: dict[str, BackboneSpec] = {spec.alias: spec for spec in (*PAPER_ALIASES, *MODERN_ALIASES)}


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
# names and architectures
# --------------------------------------------------------------------------------------

def _unknown_model_message(name: str, why: str) -> str:
    aliases = ", ".join(f"{a} ({s.model_name})" for a, s in ALIASES.items())
    return (
        f"Unknown backbone {name!r}: {why}. Use an alias, one of: {aliases}; or any timm name 'arch' or "
        f"'arch.tag' of a model with per-layer token outputs (e.g. vit_small_patch16_224.augreg_in21k, "
        f"eva02_base_patch14_224.mim_in22k, naflexvit_base_patch16_siglip.v2_webli; see timm.list_pretrained())."
    )


@dataclass(frozen=True)
class Architecture:
    """What timm says a model's layer outputs are (`feature_info`), read without weights or memory."""

    timm_name: str
    model_class: str
    modules: tuple[str, ...]  # feature_info[i]["module"], e.g. "blocks.3" or "stages.2"
    reductions: tuple[int, ...]  # pixels per token side of each layer's grid
    widths: tuple[int, ...]  # channels of each layer
    num_prefix_tokens: int
    has_intermediates: bool  # timm's forward_intermediates()
    kwargs_json: str = "{}"  # the create_model kwargs it was read with (sorted JSON), to build it again

    @property
    def num_layers(self) -> int:
        return len(self.modules)

    @property
    def hierarchical(self) -> bool:
        """Layer outputs of more than one grid or width (stage outputs of ConvNeXt, Swin, Hiera, MaxViT ...)."""
        return len(set(zip(self.reductions, self.widths))) > 1

    @property
    def stem(self) -> tuple[int, ...]:
        """A first feature_info entry that is the model's stem, not a stage: `stem` / `stem.*` (MaxViT, CoAtNet,
        ResNetV2, VoVNet ...) or ResNet's `act1`. It is what a ViT's patch embedding is (which no ViT lists), at the
        largest grid of all (MaxViT-T: 112x112x64, two thirds of its bytes), so it is not stored by default."""
        if self.hierarchical and self.num_layers > 1 and (
                self.modules[0].split(".")[0] == "stem" or self.modules[0] == "act1"):
            return (0,)
        return ()

    @property
    def default_layers(self) -> tuple[int, ...]:
        """What is stored without --layers: every block of a ViT (the paper's), every stage output of a
        hierarchical model, not its stem."""
        return tuple(i for i in range(self.num_layers) if i not in self.stem)

    def grids(self, image_size: int) -> list[tuple[int, int]]:
        """Each layer's (h, w) token grid at image_size. A hierarchical model's come from a forward of its meta
        twin at that size, not from image_size // reduction: PiT's first stage is 27x27 at 224, Swin pads odd
        grids up; a size the model cannot take raises ImageSizeError naming sizes that work."""
        if not self.hierarchical:
            return [(image_size // r, image_size // r) for r in self.reductions]
        return [(h, w) for h, w, _ in self.layer_shapes(image_size)]

    def layer_shapes(self, image_size: int, *, name: str | None = None) -> list[tuple[int, int, int]]:
        """(h, w, width) of every layer at image_size (see `grids`); `name` is what messages call the model."""
        return list(_layer_shapes(self.timm_name, self.kwargs_json, image_size, name or self.timm_name))

    def refusal(self, name: str) -> str | None:
        """Why combo cannot store this model's layers (one sentence naming what is missing), or None."""
        if not self.has_intermediates:
            return (f"{name!r} ({self.model_class}) cannot be probed: timm gives it no forward_intermediates(), "
                    "which combo reads every layer's tokens through")
        if not self.modules:
            return f"{name!r} ({self.model_class}) cannot be probed: timm lists no per-layer outputs (feature_info)"
        if self.hierarchical and self.num_prefix_tokens:
            stages = ", ".join(f"{r}x/{w}" for r, w in zip(self.reductions, self.widths))
            return (f"{name!r} ({self.model_class}) cannot be stored: its layer outputs have different grids and "
                    f"widths (reduction/width {stages}) and it has {self.num_prefix_tokens} prefix token(s), and a "
                    "multi-grid store holds no prefix tokens (their width would change from stage to stage)")
        return None


def _size_problem(timm_name: str, kwargs_json: str, image_size: int) -> tuple[str | None, list[tuple[int, int, int]]]:
    """(why image_size does not work or None, the layers' (h, w, width)): a forward on the meta device, no memory."""
    kwargs = json.loads(kwargs_json)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = create_model(timm_name, image_size=image_size, pretrained=False, overlay=None, kwargs=kwargs).eval()
            n = len(model.feature_info)
            outputs = model.forward_intermediates(torch.empty(1, 3, image_size, image_size), indices=list(range(n)),
                                                  norm=False, output_fmt="NCHW", intermediates_only=True)
    except Exception as e:  # noqa: BLE001 - timm raises anything (assertions, shape errors) for a size it cannot take
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", []
    shapes = []
    for out in outputs:
        x = out[0] if isinstance(out, (tuple, list)) else out
        shapes.append((int(x.shape[2]), int(x.shape[3]), int(x.shape[1])))
    return None, shapes


@functools.lru_cache(maxsize=256)
def _layer_shapes(timm_name: str, kwargs_json: str, image_size: int, name: str) -> tuple[tuple[int, int, int], ...]:
    arch = _architecture(timm_name, kwargs_json)
    first, step = arch.reductions[0], max(arch.reductions)
    why, shapes = _size_problem(timm_name, kwargs_json, image_size) if image_size % first == 0 else (
        f"{image_size} is not a multiple of its first layer's stride {first}, so its stem would drop pixel rows", [])
    if why is None:
        return tuple(shapes)
    works: list[int] = []
    near = {v for unit in (first, step) for k in (-1, 0, 1, 2) if (v := (image_size // unit + k) * unit) >= step}
    for size in sorted(near - {image_size}, key=lambda v: (abs(v - image_size), v)):
        if _size_problem(timm_name, kwargs_json, size)[0] is None:
            works.append(size)
        if len(works) == 2:
            break
    if works:
        hint = f"sizes that work near it: {', '.join(map(str, sorted(works)))}"
    elif _size_problem(timm_name, kwargs_json, 224)[0] is None:
        hint = "no size near it works; 224 does"
    else:
        hint = "no size near it works, nor 224"
    raise ImageSizeError(f"--image-size {image_size}: {name!r} ({arch.model_class}) cannot take {image_size} px "
                         f"images ({why}); {hint}")


@functools.lru_cache(maxsize=64)
def _architecture(timm_name: str, kwargs_json: str) -> Architecture:
    kwargs = json.loads(kwargs_json)
    try:
        with torch.device("meta"):  # structure only: no weights, no memory, ~0.1 s even for a ViT-7B
            model = timm.create_model(timm_name, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm raises anything for odd kwargs
        raise UnsupportedModelError(f"timm cannot build {timm_name!r} with {kwargs or 'its defaults'}: "
                                    f"{type(e).__name__}: {e}") from e
    info = list(getattr(model, "feature_info", None) or [])
    return Architecture(
        timm_name=timm_name,
        model_class=type(model).__name__,
        modules=tuple(str(f.get("module", i)) for i, f in enumerate(info)),
        reductions=tuple(int(f.get("reduction", 0)) for f in info),
        widths=tuple(int(f.get("num_chs", 0)) for f in info),
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0) or 0),
        has_intermediates=callable(getattr(model, "forward_intermediates", None)),
        kwargs_json=kwargs_json,
    )


def architecture(timm_name: str, model_kwargs: dict | None = None) -> Architecture:
    """The layer structure of a timm architecture (built on the meta device, cached)."""
    return _architecture(timm_name, json.dumps(model_kwargs or {}, sort_keys=True, default=str))


def resolve_model(name: str, *, model_kwargs: dict | None = None) -> BackboneSpec:
    """Map an alias or a timm name ("arch" or "arch.tag") to a BackboneSpec.

    Checked against timm's registry and the architecture's layer outputs without building anything real,
    so a typo or a model combo cannot store fails fast, before any weights are looked for.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(_unknown_model_message(str(name), "empty name"))
    key = name.strip()
    if key.lower() in ALIASES:
        spec = ALIASES[key.lower()]
        if not timm.models.is_model(spec.timm_name):
            raise UnsupportedModelError(
                f"alias {key.lower()!r} is {spec.model_name}, which the installed timm {timm.__version__} does not have; "
                "upgrade it (pip install -U timm)")
    else:
        arch, tag = timm.models.split_model_name_tag(key)
        if not timm.models.is_model(arch):
            raise UnknownModelError(_unknown_model_message(name, f"timm has no architecture {arch!r}"))
        if tag:
            try:
                cfg = timm.models.get_pretrained_cfg(key, allow_unregistered=False)
            except RuntimeError as e:
                tags = [n.split(".", 1)[1] for n in timm.list_pretrained(arch) if "." in n]
                raise UnknownModelError(_unknown_model_message(
                    name, f"{e} Known tags for {arch}: {tags}")) from None
            if cfg is None:
                raise UnknownModelError(_unknown_model_message(name, f"no pretrained tag {tag!r}"))
        spec = BackboneSpec(alias=key, timm_name=arch, pretrained_tag=tag or None)
    why = architecture(spec.timm_name, model_kwargs).refusal(name)
    if why:
        raise UnsupportedModelError(why)
    return spec


def parse_layers(text: str | Sequence[int] | None, num_blocks: int, *, what: str = "--layers",
                 default: Sequence[int] | None = None) -> tuple[int, ...]:
    """Which layer outputs to store: "all" (every feature_info entry), "last:N", or indices "0,5,11" (negative
    ones count from the end); None: `default` (Architecture.default_layers: all but a hierarchical model's stem),
    else all. Ascending, each once; refused with the valid range when out of it."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return tuple(sorted(default)) if default is not None else tuple(range(num_blocks))
    if isinstance(text, str) and text.strip().lower() == "all":
        return tuple(range(num_blocks))
    if isinstance(text, str):
        spec = text.strip().lower()
        if spec.startswith("last:"):
            try:
                n = int(spec[5:])
            except ValueError:
                raise ValueError(f"{what} {text!r}: 'last:N' needs an integer N") from None
            if not 1 <= n <= num_blocks:
                raise ValueError(f"{what} {text!r}: N must be 1..{num_blocks} (the model has {num_blocks} layers)")
            return tuple(range(num_blocks - n, num_blocks))
        try:
            values = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{what} {text!r}: give 'all', 'last:N' or comma-separated layer indices") from None
    else:
        values = [int(v) for v in text]
    if not values:
        raise ValueError(f"{what} {text!r} selects no layer")
    out = []
    for v in values:
        if not -num_blocks <= v < num_blocks:
            raise ValueError(f"{what} {text!r}: layer {v} is out of range; the model has {num_blocks} layers "
                             f"(0..{num_blocks - 1}, or -1 for the last)")
        out.append(v % num_blocks)
    if len(set(out)) != len(out):
        raise ValueError(f"{what} {text!r} names a layer twice")
    return tuple(sorted(out))


def alias_table(image_size: int = 224) -> list[dict[str, Any]]:
    """Every alias's checkpoint and geometry at image_size, from timm's architecture (no weights): what
    `combo extract --help` and the README list. `stages`: (h, w, width) of each default layer of a hierarchical
    model (None for one grid); grid / width are the last layer's; raw_bytes = float16 bytes of one image's stored
    tokens (summed over the layers)."""
    rows = []
    for alias, spec in ALIASES.items():
        arch = architecture(spec.timm_name)
        taken = arch.default_layers
        if arch.hierarchical:
            shapes = arch.layer_shapes(image_size, name=alias)
            stages = [shapes[i] for i in taken]
        else:
            (gh, gw), width = arch.grids(image_size)[0], arch.widths[0]
            stages = [(gh, gw, width)] * len(taken)
        p = arch.num_prefix_tokens
        gh, gw, width = stages[-1]
        rows.append({"alias": alias, "checkpoint": spec.model_name, "grid": (gh, gw), "layers": len(taken),
                     "width": width, "prefix": p, "stages": stages if arch.hierarchical else None,
                     "raw_bytes": sum((h * w + p) * d * 2 for h, w, d in stages)})
    return rows


def geometry(row: dict[str, Any]) -> str:
    """An alias_table row's layers in words: "14x14 12x768", or each stage of a hierarchical model
    "4 stages 56x56x128 .. 7x7x1024"."""
    if row["stages"] is None:
        return f"{row['grid'][0]}x{row['grid'][1]:<3} {row['layers']}x{row['width']}"
    first, last = row["stages"][0], row["stages"][-1]
    return f"{row['layers']} stages {first[0]}x{first[1]}x{first[2]} .. {last[0]}x{last[1]}x{last[2]}"


def alias_help(image_size: int = 224) -> str:
    """`alias_table` as fixed-width lines (click's "\b" keeps them unwrapped)."""
    lines = [f"Aliases at {image_size} px (prefix tokens, float16 MiB per image, grid and layers x width; for a "
             "hierarchical model its stages' grid x width, first .. last):", "", "\b"]
    for r in alias_table(image_size):
        lines.append(f"{r['alias']:<16}{r['checkpoint']:<40}{r['prefix']:>2} {r['raw_bytes'] / 2**20:6.2f}  "
                     f"{geometry(r)}")
    return "\n".join(lines) + "\n"


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
