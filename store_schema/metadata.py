"""The store's metadata: plain JSON documents in zarr attributes, described here once.

Root group attribute ``combo`` (one per store)::

    format           "combo-feature-store"
    format_version   "MAJOR.MINOR": a reader of major M reads every M.x; a new major is incompatible
    schema_version   int, the major again (format 1 readers only know this key, and refuse > 1)
    backbone         {alias, timm_name, pretrained_tag, weights_source, weights_sha256, seed,
                      model_kwargs (only when non-empty: the extra timm create_model kwargs)}
    preprocessing    {image_size, resize, interpolation, crop, mean, std}
    features         {kind, token_grid, num_tokens, num_prefix_tokens, layers, num_layers, feature_dim,
                      model_layers (only when layers is a subset),
                      grids (2.3, multi-grid stores only: [{name, token_grid, num_tokens, feature_dim, layers}]
                      one per (grid, width) group; token_grid / num_tokens / feature_dim are then the last group's)}
    storage          {dtype, codec, rows_per_shard, rows_per_chunk, layers_per_chunk, chunk_checksum}
    dataset          {name} (format 1 also recorded the absolute root; format 2 records no local path)
    tasks            [task names]
    library_versions {python, torch, timm, zarr, numpy, pyarrow, combo}
    created          ISO-8601 UTC

``backbone.model_kwargs`` is optional and absent means none, so stores written before it
existed keep the same identity (no schema version bump: the change is additive).

Task group attribute ``combo_task`` (one per task group)::

    task, group, num_samples, splits {name: count}, protocols {name: [train, eval]},
    classes [names by label], complete (bool), skipped [{row, sample_id, error}], completed (time)
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata as _importlib_metadata
from typing import Any

from .grids import GridSpec, grid_problems, multi_grids

FORMAT_MAJOR, FORMAT_MINOR = 2, 3
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"
# What each minor version added to the arrays. A writer extending or resuming an older 2.x store writes its
# new tasks in that store's layout, so a store's version always says what every one of its tasks holds.
# 2.2: `sample_id` as zero-padded UTF-8 bytes (uint8 [N, W]; before: zarr-python's variable-length "string",
# which tensorstore and zarrs refuse), and compact arrays whose integer never-written fill is a reserved
# marker that decodes to NaN (int8 codes -128, outlier_index -1; before: 0, which decoded as data)
ID_BYTES_SINCE = FILL_MARKERS_SINCE = (2, 2)
# 2.3: the multi-grid layout (store_schema/grids.py): a model whose stored layers have more than one (grid, width)
# gets one array per group (`tokens_g0`, `layer_g0`, ...) and `features.grids`; single-grid tasks are 2.2's
MULTI_GRID_SINCE = (2, 3)
SCHEMA_VERSION = FORMAT_MAJOR  # the integer format 1 readers check: they refuse anything above 1
FORMAT_NAME = "combo-feature-store"
# The name combo is published under: "combo" on the public index is an unrelated package.
DISTRIBUTION = "combo-probe"
UPGRADE_HINT = f"pip install -U {DISTRIBUTION}"
ROOT_ATTR = "combo"
TASK_ATTR = "combo_task"
SUPPORTED_DTYPES = ("float16", "float32")

# Fields that must agree for an existing store to be resumed or extended with new tasks.
IDENTITY_KEYS = ("backbone", "preprocessing", "features", "storage")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def library_versions() -> dict[str, str]:
    """Versions of everything that shapes the stored numbers."""
    versions = {"python": platform.python_version()}
    try:
        versions["combo"] = _importlib_metadata.version(DISTRIBUTION)
    except _importlib_metadata.PackageNotFoundError:
        pass
    for dist in ("torch", "timm", "zarr", "numcodecs", "numpy", "pyarrow", "pillow", "torchvision"):
        try:
            versions[dist] = _importlib_metadata.version(dist)
        except _importlib_metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class BackboneInfo:
    alias: str
    timm_name: str
    pretrained_tag: str | None
    weights_source: str  # "timm-pretrained:<id>" | "file:<path>" (recorded as file:<name>) | "random-init"
    weights_sha256: str | None
    seed: int | None = None
    # Extra timm create_model kwargs (e.g. {"depth": 2}); part of identity, since they change
    # the features, and what `combo predict` needs to rebuild the model. Plain JSON only.
    model_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for key, value in (self.model_kwargs or {}).items():
            if not isinstance(key, str) or not _plain_json(value):
                raise ValueError(
                    f"model_kwargs[{key!r}] = {value!r} cannot be recorded in the store's metadata: "
                    "only plain JSON values (str, int, float, bool, None, lists, str-keyed dicts) are; "
                    "pass e.g. a timm layer's name instead of the object"
                )

    def to_attrs(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["weights_source"] = portable_weights_source(self.weights_source)
        if not self.model_kwargs:
            del doc["model_kwargs"]  # absent = none: older stores compare identical
        return doc


def _plain_json(value: Any) -> bool:
    """True if `value` survives a JSON round trip unchanged (tuples become lists)."""
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_plain_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_json(v) for k, v in value.items())
    return False


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    resize: str = "square, no crop"


@dataclass(frozen=True)
class FeatureInfo:
    token_grid: tuple[int, int]
    num_prefix_tokens: int
    layers: tuple[int, ...]
    feature_dim: int
    kind: str = "block output (residual stream), patch tokens"
    # how many layer outputs the model has, recorded only when `layers` is a subset of them (`combo extract
    # --layers`): `combo predict` checks the rebuilt model against it. Absent: every layer is stored.
    model_layers: int | None = None
    # format 2.3: one entry per (grid, width) group of a hierarchical model's layers, in layer order (None: one
    # grid); token_grid / feature_dim are then the last group's (the deepest stage, what a linear probe reads)
    grids: tuple[GridSpec, ...] | None = None

    def __post_init__(self) -> None:
        if self.grids is not None:
            problems = grid_problems(self.grids, layers=self.layers, token_grid=self.token_grid,
                                     feature_dim=self.feature_dim, num_prefix_tokens=self.num_prefix_tokens)
            if problems:
                raise ValueError("FeatureInfo.grids: " + "; ".join(problems))

    @property
    def num_tokens(self) -> int:
        return int(self.token_grid[0] * self.token_grid[1])


@dataclass(frozen=True)
class StoreInfo:
    """Everything the root attribute records; `to_attrs` gives the plain document."""

    backbone: BackboneInfo
    preprocessing: Preprocessing
    features: FeatureInfo
    dataset: str
    dataset_root: str | None = None  # not recorded (a local path means nothing to a teammate); kept for callers
    created: str = field(default_factory=utc_now)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "StoreInfo":
        """The description a store records (its root attribute), e.g. to derive another store from it."""
        b, p, f = attrs["backbone"], attrs["preprocessing"], attrs["features"]
        return cls(
            backbone=BackboneInfo(b["alias"], b["timm_name"], b.get("pretrained_tag"), b["weights_source"],
                                  b.get("weights_sha256"), b.get("seed"), b.get("model_kwargs")),
            preprocessing=Preprocessing(int(p["image_size"]), tuple(p["mean"]), tuple(p["std"]),
                                        p.get("interpolation", "bilinear"), p.get("resize", "square, no crop")),
            features=FeatureInfo(tuple(f["token_grid"]), int(f["num_prefix_tokens"]), tuple(f["layers"]),
                                 int(f["feature_dim"]), f.get("kind", FeatureInfo.kind), f.get("model_layers"),
                                 multi_grids(f)),
            dataset=str(attrs["dataset"]["name"]),
        )

    def to_attrs(self, *, storage: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
        feats = asdict(self.features)
        feats["token_grid"] = list(self.features.token_grid)
        feats["layers"] = list(self.features.layers)
        feats["num_tokens"] = self.features.num_tokens
        feats["num_layers"] = len(self.features.layers)
        if self.features.model_layers is None:
            del feats["model_layers"]  # stores of every layer keep the document they always had
        if self.features.grids is None:
            del feats["grids"]  # a single-grid store's document is 2.2's
        else:
            feats["grids"] = [g.to_attrs() for g in self.features.grids]
        pre = asdict(self.preprocessing)
        pre["mean"], pre["std"] = list(self.preprocessing.mean), list(self.preprocessing.std)
        pre["crop"] = "none"
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "schema_version": SCHEMA_VERSION,
            "backbone": self.backbone.to_attrs(),
            "preprocessing": pre,
            "features": feats,
            "storage": storage,
            "dataset": {"name": self.dataset},
            "tasks": list(tasks),
            "library_versions": library_versions(),
            "created": self.created,
        }


def identity(attrs: dict[str, Any]) -> dict[str, Any]:
    """The part of the root document that must match to resume or extend a store."""
    return {key: attrs.get(key) for key in IDENTITY_KEYS} | {"dataset": (attrs.get("dataset") or {}).get("name")}


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of identity fields that differ (dotted paths)."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            out.append(f"{path}: store has {a!r}, asked for {b!r}")

    walk(identity(old), identity(new), "")
    return out


def format_version(attrs: dict[str, Any]) -> tuple[int, int] | None:
    """(major, minor) of a root document; format 1 stores only have the integer `schema_version`."""
    text = attrs.get("format_version")
    if isinstance(text, str):
        major, _, minor = text.partition(".")
        if major.isdigit() and minor.isdigit():
            return int(major), int(minor)
        return None
    version = attrs.get("schema_version")
    return (version, 0) if isinstance(version, int) and not isinstance(version, bool) else None


def format_major(attrs: dict[str, Any]) -> int:
    """The major format version of a root document (1 when it records none readable)."""
    return (format_version(attrs) or (1, 0))[0]


def portable_weights_source(source: str) -> str:
    """`file:<absolute path>` becomes `file:<file name>`: the sha256 identifies the weights, not a path."""
    if source.startswith("file:"):
        return "file:" + source[len("file:"):].replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return source
