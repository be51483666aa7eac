"""Stage 1 end to end: images -> frozen backbone -> every block's tokens -> a feature store.

`extract(ExtractConfig(...))` is the entry point. This module runs one extraction: the checks that
cost nothing, the store and its tasks (create, resume, repair), and for each task the pending shards,
here or on a dask cluster (extract/cluster.py).

The backbone is the expensive part, so everything else hides behind it: images are decoded
in DataLoader workers (extract/forward.py), and finished shards are compressed, written and
checksummed by a background thread while the next batches run through the model (extract/writebehind.py).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from store_schema import (
    BackboneInfo,
    FeatureInfo,
    Preprocessing,
    Skipped,
    StoreInfo,
    StoreLayout,
    StoreError,
    StoreMismatchError,
    StoreWriter,
    TaskWriter,
    build_sample_table,
    is_url,
    store_path,
)
from store_schema.compact import CompactSpecError, PcaBasis, fit_split
from store_schema.grids import group_layers
from store_schema.location import can_list, list_sizes, nearest_existing, redact, resolve
from store_schema.writer import JOURNAL_NAME, shard_block
from store_schema.writer.lock import refuse_if_locked

from .backbones import (
    Backbone,
    BackboneSpec,
    architecture,
    load_backbone,
    parse_layers,
    patch_size,
    pick_device,
    resolve_model,
)
from .config import ExtractConfig
from .datasets import (DATASET_KINDS, DatasetError, TaskPlan, is_hf_root, is_vtab_hf_folder, plan_dataset,
                       resolve_hf_root, vtab_group)
from .forward import ProgressFactory, fit_training_pca
from .order import RowOrder, natural_order, row_order
from .writebehind import write_behind

if TYPE_CHECKING:
    from .cluster import ClusterRunner


@dataclass
class TaskResult:
    task: str
    images: int  # images run through the backbone in this call
    seconds: float
    status: str  # "extracted" | "resumed" | "repaired" | "already complete"
    skipped: list[Skipped] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # store keys found missing or resized, extracted again
    whole_task: bool = False  # repaired by extracting the whole task again (not only shards were damaged)


@dataclass
class ExtractResult:
    store: Path | str  # a folder, or a remote store's URL
    tasks: list[TaskResult]
    bytes_on_disk: int
    seconds: float

    @property
    def images(self) -> int:
        return sum(t.images for t in self.tasks)


@dataclass
class ExtractState:
    """Where a run stands, for a caller that has to explain an interruption or a failure."""

    store: Path | str | None = None  # a folder, or a remote store's URL
    task: str | None = None  # the task being written
    shards_kept: int = 0  # shards of `task` finished and journaled (this run's and earlier runs')
    shards_total: int = 0
    removed: bool = False  # the run created the store, failed before its first shard, and removed it again


WarnFn = Callable[[str], None]

_PATCH_IN_NAME = re.compile(r"_patch(\d+)")


def known_patch_size(spec: BackboneSpec, model_kwargs: dict[str, Any] | None = None) -> int | None:
    """The patch size a timm name spells (vit_base_patch16_224 -> 16), before building anything."""
    given = (model_kwargs or {}).get("patch_size")
    if given is not None:
        return given if isinstance(given, int) else None
    match = _PATCH_IN_NAME.search(spec.timm_name)
    return int(match.group(1)) if match else None


def check_image_size(image_size: int, patch: int, model: str) -> None:
    """Refuse an input size that is not a multiple of the patch size (the patch embedding would drop pixels)."""
    if image_size < patch:
        raise ValueError(f"--image-size {image_size} is smaller than the patch size {patch} of {model}; "
                         f"use {patch} or another multiple of {patch}")
    if image_size % patch:
        low = image_size // patch * patch
        raise ValueError(
            f"--image-size {image_size} is not a multiple of the patch size {patch} of {model}: the last "
            f"{image_size - low} pixel rows and columns would be dropped; use {low} or {low + patch}"
        )


def _check_int(option: str, value: Any, low: int) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{option} must be an integer >= {low}, got {value!r}")


def check_config(cfg: ExtractConfig) -> BackboneSpec:
    """Every check that costs nothing, before a backbone is built or an image read: options, the
    dataset root, the model name (timm's registry) and, for names that spell it, the patch size."""
    if cfg.dataset not in DATASET_KINDS:
        raise DatasetError(f"--dataset {cfg.dataset!r} is not a dataset kind; choose one of {', '.join(DATASET_KINDS)}")
    _check_int("--batch-size", cfg.batch_size, 1)
    _check_int("--num-workers", cfg.num_workers, 0)
    _check_int("--image-size", cfg.image_size, 1)
    _check_int("--rows-per-shard", cfg.rows_per_shard, 1)
    _check_int("--seed", cfg.seed, 0)
    if cfg.layout is None:
        StoreLayout(dtype=cfg.dtype, rows_per_shard=cfg.rows_per_shard)  # refuses an unknown --dtype
    cfg.compact_spec  # refuses an unknown --compact
    columns = [f"--{n.replace('_', '-')}" for n in ("image_column", "label_column", "split_column") if getattr(cfg, n)]
    if columns and cfg.dataset != "parquet":
        raise ValueError(f"{', '.join(columns)}: only --dataset parquet has columns (this run: --dataset {cfg.dataset})")
    if cfg.dataset in ("vtab", "folder", "parquet"):
        if cfg.root is None:
            what = {"vtab": "the folder holding the VTAB-1k tasks (<root>/<task>/train800.txt ...) or Hugging Face "
                            "dataset repos (hf://datasets/ORG/REPO)",
                    "folder": "the image folder (one sub-folder per class)",
                    "parquet": "a Parquet file or a folder of them"}[cfg.dataset]
            hint = "; for the bundled offline demo data use --dataset digits" if cfg.dataset == "vtab" else ""
            raise DatasetError(f"--dataset {cfg.dataset} needs --root, {what}{hint}")
    if cfg.task_name is not None and cfg.dataset != "vtab":
        raise DatasetError(f"--task-name: only --dataset vtab with a Hugging Face root names its task (this run: --dataset {cfg.dataset})")
    if is_hf_root(cfg.root):
        if cfg.dataset != "vtab":
            raise DatasetError(f"--root {cfg.root}: hf:// roots are read by --dataset vtab (this run: --dataset {cfg.dataset})")
        if not cfg.download:
            resolve_hf_root(str(cfg.root))  # a repo missing from the hub cache: how to fill it, before any model loads
    elif cfg.dataset in ("vtab", "folder", "parquet"):
        root = os.path.abspath(os.path.expanduser(str(cfg.root)))
        if not os.path.exists(root):
            raise DatasetError(f"--root {root} does not exist")
        if cfg.dataset != "parquet" and not os.path.isdir(root):
            raise DatasetError(f"--root {root} is not a folder")
        if cfg.task_name is not None and not is_vtab_hf_folder(root):
            raise DatasetError(
                f"--task-name: {root} is a VTAB folder, whose tasks are named by their folders; --task-name names"
                " the task of one Hugging Face dataset (hf://datasets/ORG/REPO or a save_to_disk folder)")
    spec = resolve_model(cfg.model, model_kwargs=cfg.model_kwargs)
    arch = architecture(spec.timm_name, cfg.model_kwargs)
    taken = parse_layers(cfg.layers, arch.num_layers, default=arch.default_layers)  # refuses a bad --layers
    if arch.hierarchical:
        # its grids at --image-size from a forward of its meta twin (~0.1-0.3 s): a size it cannot take is refused
        # naming sizes that work, and --layers whose grids do not form runs of layers (group_layers) too
        shapes = arch.layer_shapes(cfg.image_size, name=cfg.model)
        group_layers(taken, [shapes[i][:2] for i in taken], [shapes[i][2] for i in taken])
        return spec
    patch = known_patch_size(spec, cfg.model_kwargs)
    if patch:
        check_image_size(cfg.image_size, patch, cfg.model)
    return spec


def check_writable(out: str, store: Path | str, *, storage_options: dict[str, Any] | None = None) -> None:
    """Can this run create or extend `store` under the store root `out`? Checked before the model is
    loaded: a read-only or unwritable folder, or a file where a folder should be, is one sentence.
    A URL: its file system must be installed and able to list (the staging folder's resume needs it)."""
    if is_url(out):
        try:
            location = resolve(str(store), storage_options=storage_options)
        except (ImportError, ValueError) as err:
            raise StoreError(f"--out {out}: cannot write there ({err})") from None
        if not can_list(location):
            raise StoreError(f"--out {out}: a plain web server cannot be written to; use s3://, gs://, ... "
                             "or a local folder")
        return
    assert isinstance(store, Path)
    existing = nearest_existing(store.absolute())
    if not existing.is_dir():
        if existing == Path(out).absolute():
            raise ValueError(f"--out {out} is a file, not a folder (stores go to OUT/<model>/<dataset>.zarr)")
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        code = errno.EACCES
        try:
            if os.statvfs(existing).f_flag & os.ST_RDONLY:
                code = errno.EROFS
        except (AttributeError, OSError):
            pass
        raise OSError(code, os.strerror(code), str(existing))
    try:  # what os.access cannot see (a read-only mount for root, quotas, a full disk)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".combo-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(existing)) from None


def _missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    out = []
    path = path.absolute()
    while not path.exists() and path.parent != path:
        out.append(path)
        path = path.parent
    return out


def _has_shards(task_dir: Path) -> bool:
    """A task some run finished a shard of (journaled) or completed. A shard file without a journal
    line is a write cut short (a full disk, a kill): not data."""
    if (task_dir / JOURNAL_NAME).exists():
        return True
    try:
        doc = json.loads((task_dir / "zarr.json").read_text())
        return bool(((doc.get("attributes") or {}).get("combo_task") or {}).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def _single_class(plan: TaskPlan) -> bool:
    return len(set(plan.labels)) < 2


def store_info(backbone: Backbone, *, dataset: str, root: str | None) -> StoreInfo:
    """Provenance of a store written from `backbone`."""
    return StoreInfo(
        backbone=BackboneInfo(
            alias=backbone.spec.alias,
            timm_name=backbone.spec.timm_name,
            pretrained_tag=backbone.spec.pretrained_tag,
            weights_source=backbone.weights_source,
            weights_sha256=backbone.weights_sha256,
            seed=backbone.seed,
            model_kwargs=dict(backbone.model_kwargs) or None,  # recorded so `combo predict` can rebuild it
        ),
        preprocessing=Preprocessing(
            image_size=backbone.image_size,
            mean=tuple(backbone.mean),
            std=tuple(backbone.std),
            interpolation=backbone.interpolation,
        ),
        features=FeatureInfo(
            token_grid=tuple(backbone.token_grid),
            num_prefix_tokens=backbone.num_prefix_tokens,
            layers=tuple(backbone.layers),
            feature_dim=backbone.embed_dim,
            model_layers=None if backbone.layers == tuple(range(backbone.num_blocks)) else backbone.num_blocks,
            grids=backbone.grids,
        ),
        dataset=dataset,
        dataset_root=str(Path(root).resolve()) if root else None,
    )


def extract(
    cfg: ExtractConfig,
    *,
    progress: ProgressFactory | None = None,
    state: ExtractState | None = None,
    warn: WarnFn | None = None,
    client: Any = None,
) -> ExtractResult:
    """Run `cfg.model` once over every image of `cfg.dataset` and write the store; resumable.

    Order: free checks (options, --root, model name, patch size), then whether the store can be
    written, then the backbone, then the dataset plan (which may hash every image), then the store.
    A run that fails before its first shard removes the store / task it created (nothing an earlier
    run wrote); shards already written stay, and rerunning the same command resumes.
    `state` (optional) is kept up to date for a caller that must explain an interruption; `warn`
    receives warnings (default: `warnings.warn`).
    `client` (optional, a connected `distributed.Client`) runs the backbone on its workers, whole shards per
    task (extract/cluster.py); this process keeps the lock, the journal and finalisation.
    """
    started = time.perf_counter()
    state = state if state is not None else ExtractState()
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    spec = check_config(cfg)
    layout = cfg.layout or StoreLayout(dtype=cfg.dtype, rows_per_shard=cfg.rows_per_shard)
    compact = cfg.compact_spec
    target = store_path(cfg.out, spec.alias, cfg.dataset)
    if compact is not None:
        target = target[: -len(f"{cfg.dataset}.zarr")] + f"{cfg.dataset}-{compact.name}.zarr"
    path: Path | str = target if is_url(target) else Path(target)
    check_writable(cfg.out, path, storage_options=cfg.storage_options)
    if isinstance(path, str) and not cfg.break_lock:  # a teammate's live writer: said before the model loads
        refuse_if_locked(resolve(path, storage_options=cfg.storage_options), where=redact(path))
    state.store = path
    runner = None
    if client is not None:
        from .cluster import ClusterRunner  # dask.distributed only when asked for

        runner = ClusterRunner(client)
    return _extract_into(path, cfg, layout, progress=progress, state=state, warn=warn, runner=runner, started=started)


def _extract_into(path: Path | str, cfg: ExtractConfig, layout: StoreLayout, *, progress: ProgressFactory | None,
                  state: ExtractState, warn: WarnFn, runner: "ClusterRunner | None", started: float) -> ExtractResult:
    compact = cfg.compact_spec
    # on a cluster the workers run the model; this process only needs its geometry for the store's metadata
    device = pick_device("cpu" if runner is not None else cfg.device)
    backbone = load_backbone(
        cfg.model,
        image_size=cfg.image_size,
        random_init=cfg.random_init,
        weights=cfg.weights,
        seed=cfg.seed,
        model_kwargs=cfg.model_kwargs,
        layers=cfg.layers,
    )
    if not architecture(backbone.spec.timm_name, backbone.model_kwargs).hierarchical:  # those: load_backbone checked
        check_image_size(cfg.image_size, patch_size(backbone.model)[0], cfg.model)
    backbone.model.to(device)
    plans = plan_dataset(cfg.dataset, root=cfg.root, tasks=list(cfg.tasks) if cfg.tasks else None,
                         num_workers=cfg.num_workers, image_column=cfg.image_column,
                         label_column=cfg.label_column, split_column=cfg.split_column,
                         task_name=cfg.task_name, download=cfg.download)
    for plan in plans:
        for note in plan.notes:  # e.g. how many duplicate images were merged
            warn(f"task {plan.task}: {note}")
        if compact is not None:  # PCA's R fits every group's width
            compact.check_dim(min(d for _, _, d in backbone.layer_shapes.values()), where=f"--compact {cfg.compact}: ")
            if compact.pca is not None and fit_split(plan.protocols, list(plan.splits)) is None:
                raise CompactSpecError(
                    f"--compact {cfg.compact}: task {plan.task} has no training split to fit PCA on (it has: "
                    f"{', '.join(plan.splits) or 'none'}); PCA is fitted on the training split only. "
                    "Use --compact int8, which fits nothing")
        if _single_class(plan):
            label = plan.labels[0] if plan.labels else None
            name = plan.classes[label] if label is not None and label < len(plan.classes) else "?"
            warn(f"task {plan.task} has a single class ({name}, {len(plan)} images): its features are "
                 "stored, but no probe can be trained on it (combo probe refuses one-class tasks)")
    created = _missing_dirs(path) if isinstance(path, Path) else []
    results: list[TaskResult] = []
    try:
        info = store_info(backbone, dataset=cfg.dataset, root=None if is_hf_root(cfg.root) else cfg.root)
        with StoreWriter(path, info, layout, overwrite=cfg.overwrite, compact=compact,
                         storage_options=cfg.storage_options, break_lock=cfg.break_lock) as writer:
            for note in writer.lock_notes():
                warn(note)
            for plan in plans:
                existed = (writer.path / plan.task).exists()
                try:
                    results.append(_extract_task(cfg, writer, backbone, plan, device=device, progress=progress, state=state,
                                                 runner=runner))
                except BaseException:
                    if not existed and not _has_shards(writer.path / plan.task):
                        try:
                            writer.drop_task(plan.task)  # created by this run, nothing in it: leave no trace
                        except Exception:  # noqa: BLE001 - the original failure is what matters
                            pass
                    raise
    except BaseException:
        if created and isinstance(path, Path) and path.is_dir() and not any(c.is_dir() for c in path.iterdir()):
            shutil.rmtree(path, ignore_errors=True)  # the store this run created holds no task: remove it
            for folder in created[1:]:
                try:
                    folder.rmdir()  # only while empty
                except OSError:
                    break
            state.removed = True
        raise
    size = sum((list_sizes(resolve(path, storage_options=cfg.storage_options)) or {}).values())
    return ExtractResult(store=path, tasks=results, bytes_on_disk=size, seconds=time.perf_counter() - started)


def _sample_table(order: RowOrder):
    plan = order.plan
    return build_sample_table(
        sample_ids=[s.sample_id for s in plan.samples],
        labels=[s.label for s in plan.samples],
        splits=[s.splits for s in plan.samples],
        split_names=list(plan.splits),
        aliases=[s.aliases for s in plan.samples],
        source_index=order.source_index,
    )


def _task_writer(cfg: ExtractConfig, writer: StoreWriter, backbone: Backbone, plan: TaskPlan, *,
                 overwrite: bool | None = None,
                 pca: tuple[PcaBasis | list[PcaBasis], dict[str, Any]] | None = None
                 ) -> tuple[TaskWriter, TaskPlan]:
    """Open (create or resume) the task; returns it with the plan in the store's row order (extract/order.py).
    A compact store's new task takes `pca`: its fitted basis (one per grid group of a multi-grid store) and the
    record of the fit."""
    order = row_order(plan)
    last = backbone.grids[-1] if backbone.grids else None  # a multi-grid store: the writer takes its groups' own
    task_kwargs = dict(
        num_layers=last.num_layers if last else backbone.num_layers,
        num_tokens=backbone.token_grid[0] * backbone.token_grid[1],
        feature_dim=backbone.embed_dim,
        num_prefix_tokens=backbone.num_prefix_tokens,
        protocols=plan.protocols,
        classes=plan.classes,
        group=vtab_group(plan.task) if plan.dataset == "vtab" else None,
        source=plan.source,
        overwrite=cfg.overwrite if overwrite is None else overwrite,
        **({"pca": pca[0], "compact_fit": pca[1]} if pca is not None else {}),
    )
    try:
        task_writer = writer.task(plan.task, samples=_sample_table(order), row_order=order.attrs, **task_kwargs)
    except StoreMismatchError:
        # Begun by a combo that stored rows in natural order (no source_index column)? A finished
        # one is a valid store and stays as it is; an unfinished one must not be finished in another order.
        legacy = natural_order(plan)
        # raises the writer's own mismatch error when the dataset itself changed
        task_writer = writer.task(plan.task, samples=_sample_table(legacy), **task_kwargs)
        if not task_writer.complete:
            raise StoreMismatchError(
                f"task {plan.task!r} in {writer.path} was begun by an older combo, which stored the rows in the "
                "dataset's natural (e.g. class by class) order; this combo stores training rows shuffled "
                "(store_schema/README.md, 'Row order') and will not finish a task in a mix of both orders. "
                "Use --overwrite to extract it again"
            ) from None
        return task_writer, legacy.plan
    return task_writer, order.plan


def _fit(cfg: ExtractConfig, backbone: Backbone, natural: TaskPlan, components: int, *, device: torch.device,
         progress: ProgressFactory | None, runner: "ClusterRunner | None"
         ) -> tuple[PcaBasis | list[PcaBasis], dict[str, Any]]:
    if runner is not None:
        return runner.fit_pca(cfg, natural, components)
    return fit_training_pca(cfg, backbone, natural, components, device=device, progress=progress)


def _extract_task(
    cfg: ExtractConfig,
    writer: StoreWriter,
    backbone: Backbone,
    plan: TaskPlan,
    *,
    device: torch.device,
    progress: ProgressFactory | None,
    state: ExtractState | None = None,
    runner: "ClusterRunner | None" = None,
) -> TaskResult:
    started = time.perf_counter()
    # A finished task whose shards were deleted or cut short since: the manifest against one listing.
    damaged = [] if cfg.overwrite else writer.damaged(plan.task)
    whole_task = any(shard_block(plan.task, key) is None for key in damaged)
    natural = plan
    spec = writer.compact
    fitted = None
    if spec is not None and spec.pca is not None and (cfg.overwrite or whole_task or not writer.has_task(plan.task)):
        # before the task exists: its basis is stored with it, so a resumed run never fits again
        fitted = _fit(cfg, backbone, natural, spec.pca, device=device, progress=progress, runner=runner)
    # plan: samples in store row order
    task_writer, plan = _task_writer(cfg, writer, backbone, natural, overwrite=True if whole_task else None, pca=fitted)
    if task_writer.complete:
        if not damaged:
            return TaskResult(plan.task, 0, 0.0, "already complete", [task_writer.skipped[r] for r in sorted(task_writer.skipped)])
        if task_writer.reopen_for_repair(damaged) is None:
            whole_task = True  # a shard the manifest does not list: extract the whole task again
            if spec is not None and spec.pca is not None and fitted is None:
                fitted = _fit(cfg, backbone, natural, spec.pca, device=device, progress=progress, runner=runner)
            task_writer, plan = _task_writer(cfg, writer, backbone, natural, overwrite=True, pca=fitted)
    pending = task_writer.pending()
    if damaged:
        status = "repaired"
    else:
        status = "resumed" if len(pending) < len(task_writer.blocks) else "extracted"
    if state is not None:
        state.task, state.shards_total, state.shards_kept = plan.task, len(task_writer.blocks), len(task_writer.done)
    rows = [r for b in pending for r in task_writer.blocks[b]]
    advance = progress(plan.task, len(rows)) if progress else None
    try:
        if runner is not None:  # a dask cluster: whole shards per worker, this process journals them
            done_images = runner.run_blocks(cfg, task_writer, plan, pending, advance=advance)
        else:
            done_images = write_behind(
                cfg, backbone, plan, task_writer.blocks, pending, np.dtype(task_writer.store.layout.dtype),
                lambda shard: task_writer.write_block(shard.block, shard.tokens, shard.prefix, skipped=shard.skipped),
                device=device, advance=advance)
    finally:
        if state is not None:
            state.shards_kept = len(task_writer.done)
    task_writer.finalize()
    skipped = [task_writer.skipped[r] for r in sorted(task_writer.skipped)]
    return TaskResult(plan.task, done_images, time.perf_counter() - started, status, skipped,
                      repaired=damaged, whole_task=whole_task)
