"""`combo predict`: run the backbones a probe run was trained on, then its adapter, on new images.

Composes both stages (so it lives here, not in `extract` or `probe`): every backbone recorded in
the run's config.json is rebuilt exactly as `combo extract` built it (same architecture, image size
and weights: random-init with the same seed, the same file, or timm's pretrained checkpoint, checked
against the recorded sha256 when one was recorded), images are preprocessed exactly as at
extraction (`extract.images.preprocess`), every block's tokens are taken, rounded to the store's
dtype, aligned and normalised as in training, and fed to the saved adapter (or linear probe).

A hierarchical backbone's store (format 2.3, several (grid, width) groups) was read by the probe as one
part per group; its rebuilt backbone gives one tensor per group (`extract.backbones.block_tokens`), which
are fed as those parts, each through its own encoding when the store is compact.

Custom timm `model_kwargs` used at extraction (e.g. a shrunken test ViT) are recorded in the store's
`backbone.model_kwargs` and passed again. The rebuilt backbone is still checked against the recorded
shapes (layer count, width, grid): a mismatch, e.g. a store written with kwargs before combo recorded
them, is refused.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from extract.backbones import Backbone, block_tokens, inference_context, load_backbone, pick_device
from extract.datasets import IMAGE_EXTENSIONS, open_image_file
from extract.images import preprocess
from probe.align import make_prepare
from probe.run import ENCODING_FILE, build_model, encoding_key, linear_prepare
from probe.runstate import read_state
from store_schema.compact import CompactSpec, PcaBasis
from store_schema.grids import GridSpec, multi_grids
from store_schema.compact import decode as compact_decode
from store_schema.compact import encode as compact_encode
from store_schema.location import nearest_existing

__all__ = [
    "PredictError",
    "PredictResult",
    "RecordedBackbone",
    "TrainedTask",
    "check_output_file",
    "list_images",
    "load_trained",
    "predict_images",
    "rebuild_backbone",
    "write_predictions",
]

RUN_KINDS = ("probe", "relevance", "select")


class PredictError(ValueError):
    """A run folder, image path or backbone that cannot be used for prediction; the message says which."""


@dataclass(frozen=True)
class RecordedBackbone:
    """One store's backbone and preprocessing, as recorded in a run's config.json."""

    alias: str
    timm_name: str
    pretrained_tag: str | None
    weights_source: str
    weights_sha256: str | None
    seed: int | None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    token_grid: tuple[int, int]
    num_prefix_tokens: int
    layers: tuple[int, ...]
    num_layers: int
    feature_dim: int
    dtype: str
    url: str
    model_kwargs: dict[str, Any] | None = None  # absent in the store = none
    model_layers: int | None = None  # the model's layer count; recorded only when the store keeps a subset
    compact: dict[str, Any] | None = None  # the store's encoding (compact stores): features go through it too
    # a multi-grid store's groups, as recorded (features.grids); None: one grid
    grids: tuple[GridSpec, ...] | None = None

    @property
    def part_grids(self) -> list[tuple[int, int]]:
        """The token grid of every part the probe read from this store (one per group)."""
        return [g.token_grid for g in self.grids] if self.grids else [tuple(self.token_grid)]

    @property
    def part_names(self) -> list[str]:
        """The group name of every part ("" for a single-grid store)."""
        return [g.name for g in self.grids] if self.grids else [""]

    @property
    def part_layers(self) -> list[tuple[int, ...]]:
        """The model layer indices of every part."""
        return [g.layers for g in self.grids] if self.grids else [tuple(self.layers)]

    @classmethod
    def from_provenance(cls, doc: dict[str, Any]) -> "RecordedBackbone":
        try:
            bb, pre, feats = doc["backbone"], doc["preprocessing"], doc["features"]
            return cls(
                alias=str(bb["alias"]), timm_name=str(bb["timm_name"]), pretrained_tag=bb.get("pretrained_tag"),
                weights_source=str(bb["weights_source"]), weights_sha256=bb.get("weights_sha256"), seed=bb.get("seed"),
                image_size=int(pre["image_size"]), mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                token_grid=tuple(int(v) for v in feats["token_grid"]), num_prefix_tokens=int(feats["num_prefix_tokens"]),
                layers=tuple(int(v) for v in feats.get("layers") or range(int(feats["num_layers"]))),
                num_layers=int(feats.get("num_layers") or len(feats["layers"])),
                feature_dim=int(feats["feature_dim"]), dtype=str((doc.get("storage") or {}).get("dtype", "float16")),
                url=str(doc.get("url", "")), model_kwargs=dict(bb.get("model_kwargs") or {}) or None,
                model_layers=int(feats["model_layers"]) if feats.get("model_layers") else None,
                compact=(doc.get("storage") or {}).get("compact") or None,
                grids=multi_grids(feats),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise PredictError(f"store record {doc.get('url', '?')} in config.json lacks backbone provenance ({err})") from None


@dataclass
class TrainedTask:
    """Everything needed to rebuild one task's trained model."""

    run_dir: Path
    task: str
    kind: str  # "combo" | "linear"
    model_config: dict[str, Any]
    classes: list[str]
    backbones: list[RecordedBackbone]
    grid: tuple[int, int]
    weights: Path
    partial: str | None = None  # "partial: k of n planned tasks finished" for an unfinished run


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise PredictError(f"--probe {run_dir}: no such run folder")
    if not path.is_file():
        raise PredictError(f"--probe {run_dir}: no config.json (not a run folder written by combo probe)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PredictError(f"{path} is not valid JSON: {err}") from None


def study_head_folder(run_dir: Path, doc: dict[str, Any], head: str | None) -> Path:
    """The folder of one head of a study run (heads/<head>/, itself a probe or select run folder); ``head`` is
    its name as study.csv's column shows it (``combo[top-2]``, ``linear[sam]``) or its folder name."""
    import csv

    heads: dict[str, str] = {}
    if (run_dir / "study.csv").is_file():
        with open(run_dir / "study.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                heads.setdefault(row["column"], row["folder"])
    listing = ", ".join(heads) or "none finished yet"
    if head is None:
        raise PredictError(f"{run_dir} is a study with several heads; choose one with --head ({listing})")
    for column, folder in heads.items():
        if head in (column, folder, Path(folder).name):
            return run_dir / folder
    raise PredictError(f"{run_dir}: no head {head!r} in this study; its heads: {listing}")


def load_trained(run_dir: str | os.PathLike, task: str | None = None, *, head: str | None = None) -> TrainedTask:
    """Read a probe (or relevance / select) run folder, or one head of a study, and pick one task's model."""
    run_dir = Path(run_dir)
    doc = _read_config(run_dir)
    kind = doc.get("kind", "probe")
    if kind == "study":
        return load_trained(study_head_folder(run_dir, doc, head), task)
    if head is not None:
        raise PredictError(f"--head {head!r}: {run_dir} is a {kind} run, not a study (--head picks a study's head)")
    if kind not in RUN_KINDS:
        raise PredictError(f"{run_dir} is a {kind!r} run; predict needs a probe, relevance or select run")
    tasks = doc.get("tasks") or {}
    state = read_state(run_dir)
    partial = state.describe() if state is not None and state.partial else None
    if partial:  # an unfinished run: only the tasks its state says finished are usable
        tasks = {t: v for t, v in tasks.items() if t in state.done}
        if task is not None and task not in tasks and task in state.tasks:
            finished = f"finished: {', '.join(tasks)}" if tasks else "no task finished"
            raise PredictError(f"{run_dir}: task {task} did not finish in this run ({partial}; {finished}); "
                               "resume the run to train it")
    if not tasks:
        raise PredictError(f"{run_dir}: no trained task recorded in config.json (did the run finish a task?)")
    if task is None:
        if len(tasks) > 1:
            raise PredictError(f"{run_dir} holds {len(tasks)} tasks ({', '.join(tasks)}); choose one with --task")
        task = next(iter(tasks))
    if task not in tasks:
        raise PredictError(f"{run_dir}: no task {task!r}; it holds {', '.join(tasks)}")
    entry = tasks[task]
    stores = [RecordedBackbone.from_provenance(s) for s in doc.get("stores", [])]
    model_config = dict(entry.get("model") or {})
    if kind == "select":
        names = list(doc.get("backbones") or [])
        kept = list((doc.get("selection") or {}).get(task) or [])
        if not kept or "selected_model" not in entry or any(n not in names for n in kept):
            raise PredictError(f"{run_dir}: the selection for task {task} is not recorded completely")
        stores = [stores[names.index(n)] for n in kept]
        model_config = dict(entry["selected_model"])
    model_kind = model_config.pop("kind", doc.get("method", "combo"))
    weights = run_dir / f"adapter-{task}.safetensors"
    if not weights.is_file():
        raise PredictError(f"{run_dir}: the weights file {weights.name} is missing")
    grid = tuple(model_config.get("grid") or doc.get("grid") or (14, 14))
    classes = list(entry.get("classes") or [])
    num_classes = int(model_config.get("num_classes", len(classes)))
    if len(classes) < num_classes:
        classes += [str(i) for i in range(len(classes), num_classes)]
    return TrainedTask(run_dir=run_dir, task=task, kind=model_kind, model_config=model_config, classes=classes,
                       backbones=stores, grid=(int(grid[0]), int(grid[1])), weights=weights, partial=partial)


def load_model(trained: TrainedTask) -> torch.nn.Module:
    model = build_model(trained.kind, trained.model_config)
    try:
        state = load_file(str(trained.weights))
        model.load_state_dict(state, strict=True)
    except Exception as err:  # noqa: BLE001 - safetensors / shape errors
        raise PredictError(f"{trained.weights} does not fit the recorded {trained.kind} model: {err}") from None
    return model.eval()


# --------------------------------------------------------------------------------------------- backbones


def rebuild_backbone(record: RecordedBackbone, *, weights_override: str | None = None) -> Backbone:
    """The backbone of one store, with the same weights; its structure is checked against the record."""
    source = record.weights_source
    # by the recorded checkpoint, not the alias: an alias can be re-pointed at other weights (in21k was)
    name = f"{record.timm_name}.{record.pretrained_tag}" if record.pretrained_tag else record.timm_name
    common = {"image_size": record.image_size, "model_kwargs": record.model_kwargs, "layers": record.layers}
    try:
        if source == "random-init":
            if weights_override:
                raise PredictError(f"--weights {record.alias}=...: that store was extracted with random-init weights")
            backbone = load_backbone(name, random_init=True, seed=int(record.seed or 0), **common)
        elif source.startswith("file:"):
            path = weights_override or source[len("file:"):]
            if not weights_override and not os.path.isabs(path):
                # format 2 records the file's name and sha256, never a local path
                raise PredictError(
                    f"store {record.url} was extracted from the weights file {path} (sha256 "
                    f"{(record.weights_sha256 or '?')[:12]}…); pass its path with --weights {record.alias}=PATH"
                )
            backbone = load_backbone(name, weights=path, expected_sha256=record.weights_sha256, **common)
        elif source.startswith("timm-pretrained:"):
            backbone = load_backbone(name, weights=weights_override, expected_sha256=record.weights_sha256, **common)
        else:
            raise PredictError(f"store {record.url}: unknown weights source {source!r}")
    except PredictError:
        raise
    except (ValueError, RuntimeError, OSError) as err:
        raise PredictError(f"cannot rebuild backbone {record.alias} of store {record.url}: {err}") from None
    # rebuilt to give the recorded layers (load_backbone refuses ids the model does not have); the model's own
    # layer count must match too: a store without `model_layers` holds every layer
    found = {
        "blocks": backbone.num_blocks, "token grid": tuple(backbone.token_grid),
        "prefix tokens": backbone.num_prefix_tokens, "width D": backbone.embed_dim,
    }
    wanted = {
        "blocks": record.model_layers or record.num_layers, "token grid": record.token_grid, "prefix tokens": record.num_prefix_tokens,
        "width D": record.feature_dim,
    }
    if record.grids:  # a hierarchical backbone: every group's grid, width and layers
        found["grid groups"] = [(g.token_grid, g.feature_dim, g.layers) for g in backbone.grids or ()]
        wanted["grid groups"] = [(g.token_grid, g.feature_dim, g.layers) for g in record.grids]
    differ = [f"{k}: rebuilt {found[k]} vs recorded {wanted[k]}" for k in found if found[k] != wanted[k]]
    if differ:
        kwargs = f"model_kwargs {record.model_kwargs}" if record.model_kwargs else "no model_kwargs"
        raise PredictError(
            f"backbone {record.alias} rebuilt from {source} with {kwargs} does not match store {record.url} "
            f"({'; '.join(differ)}); was the store extracted with custom timm model_kwargs before combo recorded "
            "them (backbone.model_kwargs)? Extract it again to predict with it"
        )
    return backbone


# ------------------------------------------------------------------------------------------------ images


def list_images(path: str | os.PathLike) -> list[Path]:
    """A single file, or every image file under a folder (recursive, sorted, hidden entries skipped)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PredictError(f"--images {path}: no such file or folder")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    if not found:
        raise PredictError(f"--images {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


# ------------------------------------------------------------------------------------------------ predict


@dataclass
class PredictResult:
    task: str
    classes: list[str]
    backbones: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)  # path, prediction, class, confidence, error
    partial: str | None = None  # the run's "partial: k of n planned tasks finished", when it did not finish

    @property
    def predictions(self) -> np.ndarray:
        return np.array([r["prediction"] if r["prediction"] is not None else -1 for r in self.rows], dtype=np.int64)


_STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _features(backbones: Sequence[Backbone], records: Sequence[RecordedBackbone], images: Sequence[Any],
              *, kind: str, uses_prefix: Sequence[bool], device: torch.device) -> list[Tensor]:
    """What the store held for these images (rounded to its dtype) and the probe read: per part for ComBo (a
    multi-grid backbone gives one tensor per grid group), per backbone (its last part's last layer) for the
    linear probe."""
    parts = []
    for backbone, record, prefix in zip(backbones, records, uses_prefix):
        x = torch.stack([preprocess(img, image_size=record.image_size, mean=record.mean, std=record.std) for img in images])
        with inference_context(device):
            patch, pre = block_tokens(backbone, x.to(device))
        dtype = _STORE_DTYPES.get(record.dtype, torch.float16)
        groups = list(patch) if isinstance(patch, (list, tuple)) else [patch]
        if len(groups) != len(record.part_grids):
            raise PredictError(f"backbone {record.alias} gave {len(groups)} token group(s), but store {record.url} "
                               f"holds {len(record.part_grids)}")
        # the backbone was rebuilt to give exactly the store's layers (rebuild_backbone), in the store's order
        if kind == "linear":
            parts.append((pre if prefix else groups[-1])[:, -1:].to(dtype).clone())
        else:
            parts += [g.to(dtype).clone() for g in groups]
    return parts


def _encodings(trained: TrainedTask) -> list[tuple[CompactSpec, PcaBasis | None] | None]:
    """Per part (every group of every backbone, in order), the encoding of the store it was trained from (None:
    full size), with its PCA basis."""
    path = trained.run_dir / ENCODING_FILE.format(task=trained.task)
    saved = load_file(str(path)) if path.is_file() else {}
    out: list[tuple[CompactSpec, PcaBasis | None] | None] = []
    for record in trained.backbones:
        spec = CompactSpec.from_attrs(record.compact)
        for grid in record.part_names:
            if spec is None:
                out.append(None)
                continue
            basis = None
            if spec.pca is not None:
                key = encoding_key(record.url, grid)
                if f"{key}|pca_components" not in saved:
                    where = f" (group {grid})" if grid else ""
                    raise PredictError(f"{trained.run_dir}: the model was trained from the compact store {record.url}"
                                       f"{where} ({spec.name}), but {path.name} does not hold its PCA basis; train it again")
                basis = PcaBasis(saved[f"{key}|pca_components"].numpy(), saved[f"{key}|pca_mean"].numpy())
            out.append((spec, basis))
    return out


def _last_parts(records: Sequence[RecordedBackbone]) -> list[int]:
    """The index (among every backbone's parts) of each backbone's last part: what the linear probe read."""
    ends = np.cumsum([len(r.part_grids) for r in records])
    return [int(e) - 1 for e in ends]


def _through_encoding(x: Tensor, encoding: tuple[CompactSpec, PcaBasis | None], layers: Sequence[int],
                      *, normalised: bool) -> Tensor:
    """New features as the model saw its training features: encoded and decoded like the store's tokens."""
    spec, basis = encoding
    chosen = None if basis is None else basis.select(layers)
    values = x.float().cpu().numpy()
    decoded = compact_decode(compact_encode(values, spec, chosen), spec, chosen, normalised=normalised)
    return torch.from_numpy(decoded).to(x.device)


def predict_images(
    run_dir: str | os.PathLike,
    images: str | os.PathLike,
    *,
    task: str | None = None,
    device: str | None = None,
    batch_size: int = 32,
    weights: dict[str, str] | None = None,
    skip_bad: bool = False,
    log: Callable[[str], None] | None = None,
    head: str | None = None,
) -> PredictResult:
    """Predict a class for every image under `images` with the model a run folder recorded.

    `weights` maps a backbone alias to a local checkpoint to use instead of the recorded location (its
    sha256 is still checked when the run recorded one). Undecodable images stop with an error naming the
    file, or with `skip_bad` get a row with the error and no prediction.
    """
    if batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {batch_size}")
    trained = load_trained(run_dir, task, head=head)
    files = list_images(images)
    torch_device = pick_device(device)
    weights = dict(weights or {})
    unknown = [a for a in weights if a not in {b.alias for b in trained.backbones}]
    if unknown:
        raise PredictError(f"--weights {', '.join(unknown)}: no such backbone in the run "
                           f"({', '.join(b.alias for b in trained.backbones)})")
    model = load_model(trained).to(torch_device)
    backbones = []
    for record in trained.backbones:
        if log:
            log(f"rebuilding {record.alias} ({record.weights_source}) at {record.image_size}px")
        backbones.append(rebuild_backbone(record, weights_override=weights.get(record.alias)))
        backbones[-1].model.to(torch_device)
    encodings = _encodings(trained)  # per part
    part_layers = [layers for b in trained.backbones for layers in b.part_layers]
    if trained.kind == "linear":
        encodings = [encodings[j] for j in _last_parts(trained.backbones)]  # per backbone: its last part
        part_layers = [part_layers[j] for j in _last_parts(trained.backbones)]
        uses_prefix = list(trained.model_config.get("uses_prefix") or [b.num_prefix_tokens > 0 for b in trained.backbones])
        # compact patch tokens were trained on normalised with their maps' exact statistics (cls is full size)
        normalised = [e is not None and not u for e, u in zip(encodings, uses_prefix)]
        # runs from before the pooling was recorded standardised the pooled vector instead of each map
        prepare = linear_prepare(uses_prefix, legacy="normalise" not in trained.model_config, prenormalised=normalised)
    else:
        grids = [g for b in trained.backbones for g in b.part_grids]
        uses_prefix = [False] * len(grids)
        normalised = [e is not None and tuple(g) == tuple(trained.grid) for e, g in zip(encodings, grids)]
        prepare = make_prepare(grids, target=trained.grid, prenormalised=normalised)
    result = PredictResult(task=trained.task, classes=trained.classes, backbones=[b.alias for b in trained.backbones],
                           partial=trained.partial)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        decoded, kept = [], []
        for path in chunk:
            try:
                decoded.append(open_image_file(path))
                kept.append(path)
            except Exception as err:  # noqa: BLE001 - PIL raises many types
                if not skip_bad:
                    raise PredictError(f"cannot decode image {path}: {type(err).__name__}: {err}") from None
                result.rows.append({"path": str(path), "prediction": None, "class": None, "confidence": None,
                                    "error": f"{type(err).__name__}: {err}"})
        if not decoded:
            continue
        prefix_of = (uses_prefix if trained.kind == "linear" else [False] * len(trained.backbones))
        parts = _features(backbones, trained.backbones, decoded, kind=trained.kind, uses_prefix=prefix_of,
                          device=torch_device)
        for k, (encoding, layer_ids) in enumerate(zip(encodings, part_layers)):
            if encoding is not None and not uses_prefix[k]:
                stored = list(range(len(layer_ids)))  # positions of the part's layers, as its basis has them
                layers = stored[-1:] if trained.kind == "linear" else stored
                parts[k] = _through_encoding(parts[k], encoding, layers, normalised=normalised[k])
        with torch.no_grad():
            x = prepare(parts)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=torch_device.type == "cuda"):
                logits = model(x)
            probs = torch.softmax(logits.float(), dim=-1).cpu()
        confidence, index = probs.max(dim=-1)
        for path, k, p in zip(kept, index.tolist(), confidence.tolist()):
            name = trained.classes[k] if k < len(trained.classes) else str(k)
            result.rows.append({"path": str(path), "prediction": int(k), "class": name, "confidence": float(p), "error": None})
    return result


def check_output_file(path: str | os.PathLike) -> Path:
    """Refuse, before any backbone is loaded, a CSV path that cannot be written: a folder, a file or folder in
    its way, or a read-only / unwritable place."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise PredictError(f"--out {path} is a folder; give a file name such as {path / 'predictions.csv'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise PredictError(f"--out {path} is not writable (read-only or no permission)")
    folder = nearest_existing(path.parent)
    if not folder.is_dir():
        raise PredictError(f"--out {path} cannot be created: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PredictError(f"--out {path} cannot be written: {folder} is read-only or not writable")
    return path


def write_predictions(result: PredictResult, path: str | os.PathLike) -> Path:
    """CSV with one row per image: path, task, prediction (class index), class (name), confidence, error."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "task", "prediction", "class", "confidence", "error"])
        writer.writeheader()
        for row in result.rows:
            writer.writerow({"task": result.task, **{k: ("" if v is None else v) for k, v in row.items()}})
    return path
