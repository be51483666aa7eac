"""Frozen timm backbones and the output tokens of every transformer block.

ComBo probes the residual stream after *every* block of one or more frozen ViTs
(PAPER.md, "Features taken from each backbone"). This module owns the three
things that are easy to get subtly wrong there:

* which weights were really loaded (never a silent fall back to random weights;
  the sha256 of the file that was read is recorded for provenance),
* the input geometry (we always build the model at OUR image size so the
  position embedding is resized once at load time; timm's ``pretrained_cfg``
  keeps advertising the checkpoint's native size, e.g. 518 for DINOv2),
* what a "block output" is (raw block outputs taken with forward hooks: no final
  norm, no SAM neck; SAM blocks are NHWC, the others NLC with prefix tokens first).

Weights come from, in order of precedence: ``random_init`` (seeded), an explicit
``weights`` file, or timm's registered pretrained checkpoint found in the local
Hugging Face cache (downloaded only when online; ``HF_HUB_OFFLINE=1`` is honoured).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

import timm
import timm.models
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed_nhwc

__all__ = [
    "ALIASES",
    "SUPPORTED_TIMM_MODULES",
    "Backbone",
    "BackboneSpec",
    "DeviceUnavailableError",
    "UnknownModelError",
    "WeightsUnavailableError",
    "block_tokens",
    "inference_context",
    "load_backbone",
    "pick_device",
    "resolve_model",
    "sha256_file",
]

_logger = logging.getLogger(__name__)

# timm modules whose models are plain token ViTs exposing `.blocks`, `.patch_embed` and
# (optionally) `num_prefix_tokens` prefix tokens in front of the patch tokens.
SUPPORTED_TIMM_MODULES: tuple[str, ...] = ("vision_transformer", "vision_transformer_sam", "eva", "deit")

# Keys that must not come through `model_kwargs`: load_backbone owns them.
_RESERVED_MODEL_KWARGS = ("img_size", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                          "features_only", "checkpoint_path")

_HF_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm tries for an hf_hub_id
_PROBE_TIMEOUT_S = 3.0


class UnknownModelError(ValueError):
    """The name is neither an alias nor a supported timm ViT name."""


class WeightsUnavailableError(RuntimeError):
    """Requested weights cannot be found, read, verified or loaded. Never falls back to random."""


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
ALIASES: dict[str, BackboneSpec] = {
    spec.alias: spec
    for spec in (
        BackboneSpec("sam", "samvit_base_patch16", "sa1b"),
        BackboneSpec("clip", "vit_base_patch16_clip_224", "openai"),
        BackboneSpec("dfn-clip", "vit_base_patch16_clip_224", "dfn2b"),
        BackboneSpec("siglip", "vit_base_patch16_siglip_224", "webli"),
        BackboneSpec("dinov2", "vit_base_patch14_reg4_dinov2", "lvd142m"),
        BackboneSpec("in21k", "vit_base_patch16_224", "orig_in21k"),
        BackboneSpec("in21k-augreg", "vit_base_patch16_224", "augreg_in21k"),
        BackboneSpec("mae", "vit_base_patch16_224", "mae"),
    )
}


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
    num_prefix_tokens: int  # cls + distillation + register tokens (0 for SAM / SigLIP)
    num_layers: int  # number of blocks
    embed_dim: int  # D of the block outputs
    # extra timm create_model kwargs it was built with; recorded so the same model can be rebuilt
    model_kwargs: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------

def _unknown_model_message(name: str, why: str) -> str:
    aliases = ", ".join(f"{a} ({s.model_name})" for a, s in ALIASES.items())
    return (
        f"Unknown backbone {name!r}: {why}. Use an alias, one of: {aliases}; or any timm "
        f"ViT-family name 'arch' or 'arch.tag' from the timm modules {list(SUPPORTED_TIMM_MODULES)} "
        f"(e.g. vit_small_patch16_224.augreg_in21k, eva02_base_patch14_224.mim_in22k; "
        f"see timm.list_models(module=...) and timm.list_pretrained())."
    )


def resolve_model(name: str) -> BackboneSpec:
    """Map an alias or a timm ViT name ("arch" or "arch.tag") to a BackboneSpec.

    Checked against timm's registry without building anything, so a typo fails fast.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(_unknown_model_message(str(name), "empty name"))
    key = name.strip()
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    arch, tag = timm.models.split_model_name_tag(key)
    if not timm.models.is_model(arch):
        raise UnknownModelError(_unknown_model_message(name, f"timm has no architecture {arch!r}"))
    if not timm.models.is_model_in_modules(arch, list(SUPPORTED_TIMM_MODULES)):
        raise UnknownModelError(_unknown_model_message(
            name, f"{arch!r} is not a plain token ViT with per-block token outputs"))
    if tag:
        try:
            cfg = timm.models.get_pretrained_cfg(key, allow_unregistered=False)
        except RuntimeError as e:
            tags = [n.split(".", 1)[1] for n in timm.list_pretrained(arch) if "." in n]
            raise UnknownModelError(_unknown_model_message(
                name, f"{e} Known tags for {arch}: {tags}")) from None
        if cfg is None:
            raise UnknownModelError(_unknown_model_message(name, f"no pretrained tag {tag!r}"))
    return BackboneSpec(alias=key, timm_name=arch, pretrained_tag=tag or None)


# --------------------------------------------------------------------------------------
# weight files
# --------------------------------------------------------------------------------------

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
class _ResolvedWeights:
    path: Path
    source: str  # value for Backbone.weights_source
    custom_format: bool  # a non state-dict format (JAX .npz) loaded by model.load_pretrained
    tag: str | None  # the pretrained tag actually resolved (timm default when spec had none)


def _resolve_timm_pretrained(spec: BackboneSpec) -> _ResolvedWeights:
    """Find (download only if allowed and online) the file timm would load for spec."""
    cfg = timm.models.get_pretrained_cfg(spec.model_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsUnavailableError(
            f"timm registers no pretrained weights for {spec.model_name!r}. "
            + _how_to_supply(spec.model_name, None))
    model_name = f"{spec.timm_name}.{cfg.tag}" if cfg.tag else spec.timm_name

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
                return _ResolvedWeights(Path(hit), source, custom, cfg.tag)
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
                return _ResolvedWeights(Path(path), source, custom, cfg.tag)
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
        return _ResolvedWeights(cached, source, custom, cfg.tag)
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
    return _ResolvedWeights(Path(path), source, custom, cfg.tag)


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


def _create(model_name: str, *, image_size: int | tuple[int, int], pretrained: bool,
            overlay: dict | None, kwargs: dict) -> torch.nn.Module:
    return timm.create_model(
        model_name,
        pretrained=pretrained,
        pretrained_cfg_overlay=overlay,
        img_size=image_size,
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


def _load_weights_file(model_name: str, resolved: _ResolvedWeights, *, image_size: int,
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
                return _create(model_name, image_size=image_size, pretrained=True, overlay=overlay, kwargs=kwargs)
            patch = _sam_patch_size(shapes)
            native_size = (native[0] * patch, native[1] * patch)
            if native_size == (image_size, image_size):
                return _create(model_name, image_size=image_size, pretrained=True, overlay=overlay, kwargs=kwargs)
            # SAM: load strictly at the checkpoint's own size, then move the weights to our size.
            src = _create(model_name, image_size=native_size, pretrained=True, overlay=overlay, kwargs=kwargs)
            sd = src.state_dict()
            del src
            model = _create(model_name, image_size=image_size, pretrained=False, overlay=None, kwargs=kwargs)
            model.load_state_dict(_resize_sam_state_dict(sd, model), strict=True)
            return model
    except WeightsUnavailableError:
        raise
    except (RuntimeError, KeyError, ValueError, AssertionError, OSError, TypeError, NotImplementedError) as e:
        raise WeightsUnavailableError(
            f"Weights file {path} does not fit {model_name!r} at image_size={image_size}"
            f"{' (create_model kwargs ' + repr(kwargs) + ')' if kwargs else ''}: "
            f"{type(e).__name__}: {_short(e)}") from e


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------

def _patch_size(model: torch.nn.Module) -> tuple[int, int]:
    ps = model.patch_embed.patch_size
    return (int(ps[0]), int(ps[1])) if isinstance(ps, (tuple, list)) else (int(ps), int(ps))


def _token_grid(model: torch.nn.Module, image_size: int) -> tuple[int, int]:
    pe = model.patch_embed
    if hasattr(pe, "dynamic_feat_size"):
        h, w = pe.dynamic_feat_size((image_size, image_size))
        return int(h), int(w)
    ph, pw = _patch_size(model)
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
) -> Backbone:
    """Build a frozen backbone at image_size (its pos-embed resized to that grid).

    Weights: random_init (seeded by `seed`), else the local file `weights`, else timm's
    pretrained checkpoint from the HF cache (downloaded only when online). A failure to get
    real weights raises WeightsUnavailableError; there is no fallback to random weights.
    The model stays on CPU unless `device` is given.
    """
    spec = resolve_model(name)
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

    if random_init:
        # fork_rng: seeding must not disturb the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = _create(spec.model_name, image_size=image_size, pretrained=False, overlay=None,
                            kwargs=kwargs)
        source, digest, used_seed = "random-init", None, int(seed)
    else:
        if weights is not None:
            path = Path(weights).expanduser().resolve()
            if not path.is_file():
                raise WeightsUnavailableError(
                    f"Weights file {path} for {spec.model_name!r} does not exist or is not a file.")
            is_npz = path.suffix.lower() in (".npz", ".npy")
            resolved = _ResolvedWeights(path, f"file:{path}", is_npz, spec.pretrained_tag)
        else:
            resolved = _resolve_timm_pretrained(spec)
            spec = replace(spec, pretrained_tag=resolved.tag)  # record the tag timm resolved
        digest = sha256_file(resolved.path)
        if expected_sha256 is not None and digest.lower() != expected_sha256.strip().lower():
            raise WeightsUnavailableError(
                f"sha256 mismatch for weights file {resolved.path} ({spec.model_name}): expected "
                f"{expected_sha256.strip().lower()}, found {digest}.")
        model = _load_weights_file(spec.model_name, resolved, image_size=image_size, kwargs=kwargs)
        source, used_seed = resolved.source, None

    if not (hasattr(model, "blocks") and hasattr(model, "patch_embed")):
        raise UnknownModelError(_unknown_model_message(name, f"{type(model).__name__} has no .blocks/.patch_embed"))
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
        token_grid=_token_grid(model, image_size),
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0) or 0),
        num_layers=len(model.blocks),
        embed_dim=int(model.embed_dim),
        model_kwargs=kwargs,
    )


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------

def block_tokens(backbone: Backbone, images: torch.Tensor, *,
                 out_dtype: torch.dtype | None = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block's output (residual stream after the block), split into patch and prefix tokens.

    images: [B, 3, S, S] normalised, S == backbone.image_size (moved to the model's device).
    Returns (patch [B, L, T, D] with T = h*w row-major, prefix [B, L, P, D], P possibly 0).
    Taken with forward hooks on model.blocks[i], so no final norm and no SAM neck; the
    forward runs forward_features (the classifier head is skipped). Call it inside
    inference_context(); out_dtype=None keeps the dtype the blocks produced.
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

    outputs: list[torch.Tensor] = []

    def _hook(_module, _inputs, output):
        outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    handles = [blk.register_forward_hook(_hook) for blk in model.blocks]
    try:
        model.forward_features(images)
    finally:
        for h in handles:
            h.remove()
    if len(outputs) != backbone.num_layers:
        raise RuntimeError(f"{backbone.spec.alias}: captured {len(outputs)} block outputs, expected "
                           f"{backbone.num_layers}")

    gh, gw = backbone.token_grid
    p = backbone.num_prefix_tokens
    b = images.shape[0]
    patches, prefixes = [], []
    for i, x in enumerate(outputs):
        if x.ndim == 4:  # SAM: NHWC, no prefix tokens
            if tuple(x.shape[1:3]) != (gh, gw):
                raise RuntimeError(f"{backbone.spec.alias}: block {i} grid {tuple(x.shape[1:3])} != {(gh, gw)}")
            patches.append(x.reshape(b, gh * gw, x.shape[-1]))
            prefixes.append(x.new_zeros((b, 0, x.shape[-1])))
        elif x.ndim == 3:
            if x.shape[1] != p + gh * gw:
                raise RuntimeError(f"{backbone.spec.alias}: block {i} has {x.shape[1]} tokens, expected "
                                   f"{p} prefix + {gh}x{gw} patch tokens")
            prefixes.append(x[:, :p])
            patches.append(x[:, p:])
        else:
            raise RuntimeError(f"{backbone.spec.alias}: block {i} output has shape {tuple(x.shape)}")
    patch = torch.stack(patches, dim=1)
    prefix = torch.stack(prefixes, dim=1)
    if out_dtype is not None:
        patch, prefix = patch.to(out_dtype), prefix.to(out_dtype)
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
