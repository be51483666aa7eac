"""Backbone names: the aliases (the paper's and today's foundation models, each pinned to one checkpoint), the
mapping of an alias or a timm name to a `BackboneSpec` (refusing, before any weights are looked for, a name timm does
not know or a model combo cannot store), and the alias table `combo extract --help` and the README show.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import timm.models

from .architecture import UnknownModelError, UnsupportedModelError, architecture

__all__ = ["ALIASES", "MODERN_ALIASES", "PAPER_ALIASES", "BackboneSpec", "alias_help", "alias_table", "geometry",
           "resolve_model"]


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


def _unknown_model_message(name: str, why: str) -> str:
    aliases = ", ".join(f"{a} ({s.model_name})" for a, s in ALIASES.items())
    return (
        f"Unknown backbone {name!r}: {why}. Use an alias, one of: {aliases}; or any timm name 'arch' or "
        f"'arch.tag' of a model with per-layer token outputs (e.g. vit_small_patch16_224.augreg_in21k, "
        f"eva02_base_patch14_224.mim_in22k, naflexvit_base_patch16_siglip.v2_webli; see timm.list_pretrained())."
    )


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
