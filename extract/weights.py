"""Weight files for frozen backbones: find, verify and load them strictly, never falling back to random weights.

Where the weights come from (an explicit file, or timm's registered checkpoint in the local Hugging Face or
torch hub cache, downloaded only when online; ``HF_HUB_OFFLINE=1`` is honoured) and how a file is loaded into
a timm model at OUR image size (timm's checkpoint filters, a strict load; SAM's position tables resized the way
timm resizes them on the fly). The sha256 of the file read is what a store records as the weights' identity.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

import timm
import timm.models
from timm.layers import resample_abs_pos_embed_nhwc

__all__ = ["WeightsUnavailableError", "create_model", "takes_img_size", "load_weights_file", "resolve_pretrained", "sha256_file",
           "ResolvedWeights"]

_HF_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm tries for an hf_hub_id
_PROBE_TIMEOUT_S = 3.0


class WeightsUnavailableError(RuntimeError):
    """Requested weights cannot be found, read, verified or loaded. Never falls back to random."""


def sha256_file(path: str | Path, *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _how_to_supply(model_name: str, hf_repo: str | None) -> str:
    fetch = (f"`hf download {hf_repo}` (`huggingface-cli download` in older huggingface_hub)"
             if hf_repo else "a download")
    return (
        f"To supply weights for {model_name}: (1) fill the Hugging Face cache on a machine with network "
        f"via {fetch}, copy the cache (HF_HOME / HF_HUB_CACHE) here and set HF_HUB_OFFLINE=1; or "
        f"(2) pass a local checkpoint with --weights FILE (load_backbone(weights=FILE); .safetensors, "
        f".pth/.pt/.bin, or .npz for JAX checkpoints); or (3) use --random-init (random_init=True) "
        f"for the random-weights baseline. Random weights are never used silently."
    )


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_offline() -> bool:
    """Read at call time: huggingface_hub freezes its constants at import."""
    if "HF_HUB_OFFLINE" in os.environ:
        return _env_true("HF_HUB_OFFLINE")
    if _env_true("TRANSFORMERS_OFFLINE"):
        return True
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _hf_cache_dir() -> str:
    """HF hub cache resolved from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _hf_endpoint() -> str:
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    from huggingface_hub import constants
    return constants.ENDPOINT


def _probe_host(url: str) -> str | None:
    """One short TCP connect, so that no network fails in seconds, not after minutes of retries.

    Returns None when reachable (or when a proxy is configured and a direct probe means nothing),
    else a reason string.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                        "ALL_PROXY", "all_proxy")):
        return None
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return f"cannot parse a host from {url!r}"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            return None
    except OSError as e:
        return f"cannot reach {host}:{port} ({e})"


@dataclass(frozen=True)
class ResolvedWeights:
    path: Path
    source: str  # value for Backbone.weights_source
    custom_format: bool  # a non state-dict format (JAX .npz) loaded by model.load_pretrained
    tag: str | None  # the pretrained tag actually resolved (timm default when spec had none)


def resolve_pretrained(requested: str, timm_name: str) -> ResolvedWeights:
    """Find (download only if allowed and online) the file timm would load for `requested` ("arch" or "arch.tag")."""
    cfg = timm.models.get_pretrained_cfg(requested)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsUnavailableError(
            f"timm registers no pretrained weights for {requested!r}. " + _how_to_supply(requested, None))
    model_name = f"{timm_name}.{cfg.tag}" if cfg.tag else timm_name  # with the tag timm resolved

    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        revision = revision or None
        if cfg.hf_hub_filename:
            filenames: tuple[str, ...] = (cfg.hf_hub_filename,)
            custom = cfg.custom_load == "hf"
        else:
            filenames, custom = _HF_DEFAULT_FILES, False
        source = f"timm-pretrained:{cfg.hf_hub_id}"
        cache_dir = _hf_cache_dir()
        from huggingface_hub import try_to_load_from_cache
        for fn in filenames:
            hit = try_to_load_from_cache(repo_id, fn, cache_dir=cache_dir, revision=revision)
            if isinstance(hit, str) and os.path.isfile(hit):
                return ResolvedWeights(Path(hit), source, custom, cfg.tag)
        where = f"{repo_id} ({' or '.join(filenames)}) in the Hugging Face cache {cache_dir}"
        if _hf_offline():
            raise WeightsUnavailableError(
                f"Pretrained weights for {model_name!r} are not in the local cache and HF_HUB_OFFLINE is "
                f"set: looked for {where}. " + _how_to_supply(model_name, repo_id))
        reason = _probe_host(_hf_endpoint())
        if reason:
            raise WeightsUnavailableError(
                f"Pretrained weights for {model_name!r} are not cached ({where}) and cannot be "
                f"downloaded: {reason}. " + _how_to_supply(model_name, repo_id))
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
        last_error: Exception | None = None
        for fn in filenames:
            try:
                path = hf_hub_download(repo_id, fn, revision=revision, cache_dir=cache_dir)
                return ResolvedWeights(Path(path), source, custom, cfg.tag)
            except LocalEntryNotFoundError as e:  # network trouble (subclass of EntryNotFoundError)
                last_error = e
                break
            except EntryNotFoundError as e:  # this filename is not in the repo: try the next one
                last_error = e
            except Exception as e:  # HTTP errors, gated repos, disk errors, ...
                last_error = e
                break
        raise WeightsUnavailableError(
            f"Could not download pretrained weights for {model_name!r} from {repo_id}: "
            f"{type(last_error).__name__}: {last_error}. " + _how_to_supply(model_name, repo_id)
        ) from last_error

    # url-only checkpoints (torch hub cache, as timm uses)
    from timm.models._hub import download_cached_file, get_cache_dir
    url = cfg.url
    cached = Path(get_cache_dir()) / os.path.basename(urlparse(url).path)
    source = f"timm-pretrained:{url}"
    custom = bool(cfg.custom_load)
    if cached.is_file():
        return ResolvedWeights(cached, source, custom, cfg.tag)
    if _hf_offline():
        raise WeightsUnavailableError(
            f"Pretrained weights for {model_name!r} ({url}) are not in the torch hub cache {cached} and "
            f"HF_HUB_OFFLINE is set. " + _how_to_supply(model_name, None))
    reason = _probe_host(url)
    if reason:
        raise WeightsUnavailableError(
            f"Pretrained weights for {model_name!r} are not cached ({cached}) and cannot be downloaded: "
            f"{reason}. " + _how_to_supply(model_name, None))
    try:
        path = download_cached_file(url)
    except Exception as e:
        raise WeightsUnavailableError(
            f"Could not download pretrained weights for {model_name!r} from {url}: {e}. "
            + _how_to_supply(model_name, None)) from e
    return ResolvedWeights(Path(path), source, custom, cfg.tag)


def _unwrap_checkpoint(obj: Any) -> Any:
    """Same nesting rules as timm.models.load_state_dict (EMA first, then state_dict / model)."""
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model_ema"):
            if obj.get(key, None) is not None:
                return obj[key]
        for key in ("state_dict", "model"):
            if key in obj:
                return obj[key]
    return obj


def _peek_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape of a checkpoint without materialising it (None for .npz)."""
    suffix = path.suffix.lower()
    if suffix in (".npz", ".npy"):
        return None
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be mmapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsUnavailableError(
            f"Cannot read weights file {path}: {type(e).__name__}: {e}") from e
    sd = _unwrap_checkpoint(obj)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsUnavailableError(
            f"Weights file {path} does not hold a state dict of tensors (also looked under "
            f"'state_dict_ema', 'model_ema', 'state_dict', 'model').")
    sd = timm.models.clean_state_dict(sd)
    return {k: tuple(v.shape) for k, v in sd.items()}


def _classifier_names(model_name: str) -> tuple[str, ...]:
    cfg = timm.models.get_pretrained_cfg(model_name)
    names = (cfg.classifier if cfg is not None else None) or "head"
    return (names,) if isinstance(names, str) else tuple(names)


def _head_classes(model_name: str, shapes: dict[str, tuple[int, ...]] | None) -> int | None:
    """num_classes that makes a timm-native checkpoint load strictly (head or not), else None.

    Keeping the load strict is what guarantees no parameter silently stays random.
    """
    if shapes is None:
        return None
    head = _classifier_names(model_name)[0]
    if f"{head}.weight" in shapes:
        return int(shapes[f"{head}.weight"][0])
    if "patch_embed.proj.weight" in shapes:  # timm-native keys, saved without a head
        return 0
    return None  # original-format checkpoint: the model's filter converts it, keep the default


def _short(msg: Any, limit: int = 1500) -> str:
    """Summarise torch's load_state_dict error (it lists every key) into counts plus examples."""
    text = str(msg)
    parts = []
    for label in ("Missing", "Unexpected"):
        m = re.search(label + r' key\(s\) in state_dict: (.*?)(?:\.\s*$|\.\s*\n)', text, flags=re.M | re.S)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            parts.append(f"{label} key(s) {len(keys)}: {keys[:5]}{more}")
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) "
                       r"from checkpoint, the shape in current model is (torch.Size\(\[[^\]]*\]\))", text)
    if sizes:
        shown = "; ".join(f"{k}: file {a[11:-1]} vs model {b[11:-1]}" for k, a, b in sizes[:5])
        more = f" (+{len(sizes) - 5} more)" if len(sizes) > 5 else ""
        parts.append(f"size mismatch for {len(sizes)} tensor(s): {shown}{more}")
    text = "; ".join(parts) if parts else " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ...(truncated)"


@functools.lru_cache(maxsize=256)
def takes_img_size(timm_name: str) -> bool:
    """Whether the architecture's model class takes an `img_size` argument: names it, or passes **kwargs on (DeiT's
    distilled ViT). ViTs, Swin, Hiera and MaxViT do (their position tables or windows are sized from it); ConvNeXt,
    ResNet and SAM2's HieraDet do not (they take any input size as built) and refuse it as an unexpected keyword.
    Read from the class built on the meta device."""
    arch = timm.models.split_model_name_tag(timm_name)[0]
    with torch.device("meta"):  # structure only, ~0.1 s
        model = timm.create_model(arch, pretrained=False)
    params = inspect.signature(type(model).__init__).parameters
    return "img_size" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def create_model(model_name: str, *, image_size: int | tuple[int, int], pretrained: bool,
                 overlay: dict | None, kwargs: dict) -> torch.nn.Module:
    """timm.create_model at our input size: `img_size` only for models that take it (`takes_img_size`); the others
    are fed image_size as built, and their grids at that size are checked on the meta device (extract/backbones.py)."""
    size = {"img_size": image_size} if takes_img_size(model_name) else {}
    return timm.create_model(
        model_name,
        pretrained=pretrained,
        pretrained_cfg_overlay=overlay,
        **size,
        **kwargs,
    )


def _sam_native_grid(shapes: dict[str, tuple[int, ...]] | None) -> tuple[int, int] | None:
    if not shapes:
        return None
    for key in ("pos_embed", "image_encoder.pos_embed"):
        if key in shapes and len(shapes[key]) == 4:
            return int(shapes[key][1]), int(shapes[key][2])
    return None


def _sam_patch_size(shapes: dict[str, tuple[int, ...]]) -> int:
    for key in ("patch_embed.proj.weight", "image_encoder.patch_embed.proj.weight"):
        if key in shapes:
            return int(shapes[key][-1])
    return 16


def _resize_sam_state_dict(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Resize SAM's abs pos-embed and global-attention rel-pos tables to model's grid.

    Uses exactly the interpolation timm applies on the fly when a SAM model is fed a
    smaller image (resample_abs_pos_embed_nhwc; linear F.interpolate in get_rel_pos), so
    loading at 224 equals feeding 224 images to the 1024 model; timm's SAM checkpoint
    filter itself does not resize.
    """
    target = model.state_dict()
    out = {}
    for k, v in sd.items():
        if k in target and target[k].shape != v.shape:
            want = target[k].shape
            if k == "pos_embed" and v.ndim == 4:
                v = resample_abs_pos_embed_nhwc(v, [want[1], want[2]])
            elif k.endswith(("rel_pos_h", "rel_pos_w")) and v.ndim == 2 and v.shape[1] == want[1]:
                v = F.interpolate(v.reshape(1, v.shape[0], -1).permute(0, 2, 1), size=want[0], mode="linear")
                v = v.reshape(-1, want[0]).permute(1, 0)
            # anything else is left as is: load_state_dict(strict=True) reports it
        out[k] = v
    return out


def load_weights_file(model_name: str, resolved: ResolvedWeights, *, image_size: int,
                       kwargs: dict) -> torch.nn.Module:
    """Build model_name at image_size with the weights of resolved.path, strictly, via timm.

    timm's own pretrained path runs the architecture's checkpoint_filter_fn (original
    DINOv2/CLIP/SAM/MAE formats, pos-embed resampling) and, with matching num_classes,
    loads strictly; we only pick num_classes so that strictness holds.
    """
    path = resolved.path
    shapes = _peek_shapes(path)
    kwargs = dict(kwargs)
    overlay: dict[str, Any] = {"file": str(path), "custom_load": resolved.custom_format}
    if "num_classes" in kwargs:
        overlay["num_classes"] = kwargs["num_classes"]
    else:
        n = _head_classes(model_name, shapes)
        if n is not None:
            kwargs["num_classes"] = overlay["num_classes"] = n

    is_sam = timm.models.is_model_in_modules(model_name, ["vision_transformer_sam"])
    native = _sam_native_grid(shapes) if is_sam else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pos-embed resample chatter
            if native is None:
                return create_model(model_name, image_size=image_size, pretrained=True, overlay=overlay, kwargs=kwargs)
            patch = _sam_patch_size(shapes)
            native_size = (native[0] * patch, native[1] * patch)
            if native_size == (image_size, image_size):
                return create_model(model_name, image_size=image_size, pretrained=True, overlay=overlay, kwargs=kwargs)
            # SAM: load strictly at the checkpoint's own size, then move the weights to our size.
            src = create_model(model_name, image_size=native_size, pretrained=True, overlay=overlay, kwargs=kwargs)
            sd = src.state_dict()
            del src
            model = create_model(model_name, image_size=image_size, pretrained=False, overlay=None, kwargs=kwargs)
            model.load_state_dict(_resize_sam_state_dict(sd, model), strict=True)
            return model
    except WeightsUnavailableError:
        raise
    except (RuntimeError, KeyError, ValueError, AssertionError, OSError, TypeError, NotImplementedError) as e:
        raise WeightsUnavailableError(
            f"Weights file {path} does not fit {model_name!r} at image_size={image_size}"
            f"{' (create_model kwargs ' + repr(kwargs) + ')' if kwargs else ''}: "
            f"{type(e).__name__}: {_short(e)}") from e
