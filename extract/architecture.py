"""What a timm model's layer outputs are, read without weights: `Architecture` (from `feature_info` on the meta
device), each layer's grid and width at an image size (a forward of the meta twin: Swin pads odd grids up, PiT's
first stage is 27x27 at 224, so image_size // reduction is not always right), and which layers `--layers` takes.

Why its own module: resolving a name (extract/aliases.py) and loading a model (extract/backbones.py) both ask these
questions, and answering them must cost no weights and no memory, before anything real is built.
"""
from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

import timm

from .weights import create_model

__all__ = ["Architecture", "ImageSizeError", "UnknownModelError", "UnsupportedModelError", "architecture",
           "parse_layers"]


class UnknownModelError(ValueError):
    """The name is neither an alias nor a timm model name."""


class UnsupportedModelError(UnknownModelError):
    """timm knows the model, but it gives no per-layer token maps combo can store (say which part is missing).
    A subclass of UnknownModelError so that callers that refuse unknown names refuse these too."""


class ImageSizeError(ValueError):
    """The model cannot take images of the requested size (its grids would drop pixels, or timm refuses it)."""


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
        shapes, problem = _layer_shapes(self.timm_name, self.kwargs_json, image_size)
        if problem is not None:
            why, hint = problem
            raise ImageSizeError(f"--image-size {image_size}: {name or self.timm_name!r} ({self.model_class}) cannot "
                                 f"take {image_size} px images ({why}); {hint}")
        return list(shapes)

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
def _layer_shapes(timm_name: str, kwargs_json: str, image_size: int
                  ) -> tuple[tuple[tuple[int, int, int], ...], tuple[str, str] | None]:
    """(the layers' (h, w, width), None), or ((), (why image_size does not work, which sizes near it do)): cached
    per architecture and size, whatever name the caller shows in its message."""
    arch = _architecture(timm_name, kwargs_json)
    first, step = arch.reductions[0], max(arch.reductions)
    why, shapes = _size_problem(timm_name, kwargs_json, image_size) if image_size % first == 0 else (
        f"{image_size} is not a multiple of its first layer's stride {first}, so its stem would drop pixel rows", [])
    if why is None:
        return tuple(shapes), None
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
    return (), (why, hint)


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
