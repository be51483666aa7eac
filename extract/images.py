"""Turn planned samples into backbone input tensors: decode, convert to RGB, resize, normalise.

The paper's preprocessing: resize to S x S with bilinear interpolation, no crop, no augmentation,
then normalise with the backbone's own mean/std. PIL's BILINEAR resize widens its filter when
shrinking (it is antialiased), which is exactly what timm's and torchvision's `Resize` do on PIL
images, so features match the usual eval pipelines.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .datasets import TaskPlan

__all__ = [
    "ImageDecodeError",
    "PlanImages",
    "collate_plan_images",
    "load_rgb",
    "preprocess",
    "to_rgb",
]


class ImageDecodeError(RuntimeError):
    """An image that cannot be decoded or converted; the message names the sample or file."""


_INT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _grey_to_rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="L").convert("RGB")


def _int_to_u8(arr: np.ndarray) -> np.ndarray:
    """16-bit range 0..65535 maps linearly onto 0..255 (v / 257, rounded): a 12-bit scan stays
    dark, as it is, instead of being clipped to white (PIL's own convert clips) or stretched
    differently per image. Values outside 0..65535 (32-bit "I" data) are min-max stretched."""
    a = arr.astype(np.int64)
    lo, hi = int(a.min()), int(a.max())
    if lo >= 0 and hi <= 65535:
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    if hi == lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _float_to_u8(arr: np.ndarray) -> np.ndarray:
    """Float "F" data: [0, 1] -> x255; [0, 255] -> as is; anything else min-max stretched.
    NaN and infinities become 0 and are ignored for the range."""
    a = arr.astype(np.float64)
    finite = np.isfinite(a)
    a = np.where(finite, a, 0.0)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if lo >= 0.0 and hi <= 1.0:
        out = a * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        out = a
    elif hi == lo:
        out = np.zeros_like(a)
    else:
        out = (a - lo) * (255.0 / (hi - lo))
    return np.rint(np.where(finite, out, 0.0)).clip(0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> "RGB".

    Alpha is dropped, not composited: that is what `Image.convert("RGB")` in timm's and
    torchvision's loaders does, so features match theirs (palette transparency likewise keeps the
    palette colour). Greyscale and 1-bit images are replicated to three channels; CMYK, YCbCr,
    LAB and HSV use PIL's conversions; 16/32-bit integer and float images are scaled to 8 bits
    (see `_int_to_u8`, `_float_to_u8`) rather than clipped.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _INT16_MODES or mode == "I":
        return _grey_to_rgb(_int_to_u8(np.asarray(img)))
    if mode == "F":
        return _grey_to_rgb(_float_to_u8(np.asarray(img)))
    if mode in ("P", "PA"):
        # Via RGBA so palette transparency is handled without PIL's warning; alpha then dropped.
        return img.convert("RGBA").convert("RGB")
    if mode == "La":
        return img.convert("LA").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        try:
            return img.convert("RGBA").convert("RGB")
        except (ValueError, OSError):
            raise ImageDecodeError(f"cannot convert image mode {mode!r} to RGB ({e})") from None


def _norm_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(mean, dtype=torch.float64).flatten()
    s = torch.as_tensor(std, dtype=torch.float64).flatten()
    if m.numel() == 1:
        m = m.repeat(3)
    if s.numel() == 1:
        s = s.repeat(3)
    if m.numel() != 3 or s.numel() != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={list(mean)} std={list(std)}")
    if not bool((s > 0).all()):
        raise ValueError(f"std must be positive, got {list(std)}")
    # (x/255 - mean)/std == x * scale + shift, one fused pass over the tensor.
    scale = (1.0 / (255.0 * s)).to(torch.float32).view(3, 1, 1)
    shift = (-m / s).to(torch.float32).view(3, 1, 1)
    return scale, shift


def _check_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def _to_tensor(
    img: Image.Image, size: int, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    img = to_rgb(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32)
    return x.mul_(scale).add_(shift)


def preprocess(
    img: Image.Image, *, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """RGB-convert, bilinear-resize to (S, S) without crop, scale to [0, 1], normalise.

    Returns a contiguous float32 tensor [3, S, S].
    """
    size = _check_size(image_size)
    scale, shift = _norm_stats(mean, std)
    return _to_tensor(img, size, scale, shift)


def load_rgb(plan: TaskPlan, row: int) -> Image.Image:
    """Decode a plan's row as RGB, raising ImageDecodeError that names the file or sample."""
    try:
        return to_rgb(plan.load_image(row))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise ImageDecodeError(f"cannot decode {plan.describe(row)}: {_reason(e)}") from e


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class PlanImages(torch.utils.data.Dataset):
    """Rows of a plan as (tensor, row, error) for a DataLoader.

    Never raises on a bad image: it returns zeros and the error text, so the main process decides
    whether to stop (naming the file) or skip the row. Safe with worker processes (the plan and
    its reader pickle; parquet readers cache per worker).
    """

    def __init__(
        self,
        plan: TaskPlan,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        rows: range | Sequence[int] | None = None,
    ):
        self.plan = plan
        self.image_size = _check_size(image_size)
        self.scale, self.shift = _norm_stats(mean, std)
        n = len(plan.samples)
        self.rows = range(n) if rows is None else rows
        if len(self.rows) and (min(self.rows) < 0 or max(self.rows) >= n):
            raise ValueError(f"rows must lie in 0..{n - 1} for {plan.dataset}/{plan.task}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, str | None]:
        row = int(self.rows[k])
        try:
            img = self.plan.load_image(row)
            return _to_tensor(img, self.image_size, self.scale, self.shift), row, None
        except Exception as e:  # noqa: BLE001 - reported to the main process, never raised here
            zeros = torch.zeros(3, self.image_size, self.image_size, dtype=torch.float32)
            return zeros, row, f"cannot decode {self.plan.describe(row)}: {_reason(e)}"


def collate_plan_images(
    batch: Sequence[tuple[torch.Tensor, int, str | None]],
) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
    """DataLoader collate_fn for PlanImages: (images [B,3,S,S], rows int64 [B], errors list).

    The default collate cannot batch the None/str error slot, hence this one.
    """
    images = torch.stack([b[0] for b in batch])
    rows = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    return images, rows, [b[2] for b in batch]
