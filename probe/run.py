"""`combo probe` as a library call: stores in, run folder with weights, metrics and tables out."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from store_schema import FeatureStore, is_url

from .adapter import INITS, ComboAdapter, ComboConfig
from .align import default_grid, make_prepare, normalise_maps
from .data import (CACHE_MODES, EVAL_BATCH_SIZE, CachePlan, SplitSource, default_budget, eval_batches, plan_cache,
                   training_batches)
from .fanout import map_jobs  # imports dask.distributed only once a cluster is asked to run a job
from .linear import LinearProbe
from .progress import RunProgress
from .runstate import DONE, check_out_folder, finished_rows, new_state, open_resumed
from .results import GROUP_ORDER, VTAB_GROUPS, markdown_table, new_run_dir, sanitise_url, write_json, write_table
from .stores import AlignedTask, align_tasks, backbone_grid, common_tasks, open_stores
from .train import TrainConfig, evaluate, pick_device, set_seed, train_steps

PROTOCOL_STEPS = {"final": 1600, "dev": 1300}  # PAPER.md: VTAB-1k protocol
METHODS = ("combo", "linear")
POOLS = ("mean", "cls")  # the linear probe's feature: mean of the normalised patch tokens (the authors'), or cls


@dataclass(frozen=True)
class ProbeConfig:
    """Everything one `combo probe` invocation needs; recorded (minus storage options) in config.json."""

    stores: tuple[str, ...]
    store_root: str | None = None
    dataset: str = "vtab"
    tasks: tuple[str, ...] | None = None
    protocol: str = "final"
    method: str = "combo"
    steps: int | None = None  # None: the protocol's (1,600 final, 1,300 dev)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 42
    # common token grid; None: the authors' rule (align.default_grid: the stores' shared grid, else the smallest)
    grid: tuple[int, int] | None = None
    cache: str = "auto"
    cache_budget: int = field(default_factory=default_budget)
    device: str | None = None
    out: str = "runs"
    group_lambda: float = 0.0
    eval_batch_size: int = EVAL_BATCH_SIZE
    storage_options: dict[str, Any] | None = None
    # adapter size (the paper's values; smaller ones only for tests and demos)
    width: int = 128
    depth: int = 6
    num_heads: int = 2
    # rows per shuffle window; None: the whole split when cached, what the budget allows when streamed
    shuffle_window: int | None = None
    pool: str = "mean"  # linear probe: "mean" (normalised last-layer patch tokens, mean-pooled) or "cls"
    init: str = "timm"  # ComBo's F/head init: "timm" (the authors') or "torch" (PyTorch's Linear default)

    def __post_init__(self) -> None:
        stores = (self.stores,) if isinstance(self.stores, str) else tuple(str(s) for s in self.stores)
        object.__setattr__(self, "stores", stores)
        if self.tasks is not None:
            object.__setattr__(self, "tasks", (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks) or None)
        if self.grid is not None:
            grid = (self.grid, self.grid) if isinstance(self.grid, int) else tuple(int(v) for v in self.grid)
            object.__setattr__(self, "grid", grid)
        grid = self.grid or (1, 1)
        if self.protocol not in PROTOCOL_STEPS:
            raise ValueError(f"--protocol {self.protocol!r}: choose one of {', '.join(PROTOCOL_STEPS)}")
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not self.stores:
            raise ValueError("--stores: give at least one store (a short name, a path or a URL)")
        if self.pool not in POOLS:
            raise ValueError(f"--pool {self.pool!r}: choose one of {', '.join(POOLS)}")
        if self.init not in INITS:
            raise ValueError(f"--init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"--cache {self.cache!r}: choose one of {', '.join(CACHE_MODES)}")
        checks = [
            (self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.group_lambda >= 0, f"--lambda must be >= 0, got {self.group_lambda}"),
            (len(grid) == 2 and min(grid) >= 1, f"--grid must be two positive sizes (e.g. 14x14), got {self.grid}"),
            (self.cache_budget > 0, f"--cache-budget must be positive, got {self.cache_budget}"),
            (self.width >= 1 and self.depth >= 0 and self.num_heads >= 1 and self.width % self.num_heads == 0,
             f"adapter width {self.width} / depth {self.depth} / heads {self.num_heads}: width must be a positive "
             "multiple of heads"),
            (self.shuffle_window is None or self.shuffle_window >= 1,
             f"--shuffle-window must be >= 1 row, got {self.shuffle_window}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def total_steps(self) -> int:
        return int(self.steps or PROTOCOL_STEPS[self.protocol])

    def train_config(self, *, group_lambda: float | None = None) -> TrainConfig:
        return TrainConfig(
            steps=self.total_steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            seed=self.seed, group_lambda=self.group_lambda if group_lambda is None else group_lambda,
        )


@dataclass
class TaskFit:
    """One trained model on one task, with what is needed to rebuild and report it."""

    task: str
    model: nn.Module
    model_config: dict[str, Any]
    metrics: dict[str, Any]
    predictions: np.ndarray
    eval_rows: np.ndarray
    history: dict[str, Any]
    source: SplitSource | None = None  # the evaluation split as the model reads it
    prepare: Callable | None = None  # the model's input preparation (what `evaluate` needs again)


# --------------------------------------------------------------------------------------- models and inputs


def _linear_layers(stores: Sequence[FeatureStore]) -> list[list[int]]:
    """The last stored layer of each (part's) store: a multi-grid group's view counts its own layers."""
    return [[s.num_layers - 1] for s in stores]


def linear_prepare(uses_prefix: Sequence[bool], *, legacy: bool = False,
                   prenormalised: Sequence[bool] | None = None) -> Callable[[Sequence[Tensor]], Tensor]:
    """Last-layer feature per backbone, concatenated: the map read (the patch tokens [B, 1, T, D], or the
    prefix tokens [B, 1, P, D] whose first is cls) is normalised like ComBo's maps, then mean-pooled over
    its tokens (cls: just that token). The patch-token mean is what the authors' linear probe measures.

    ``legacy``: run folders written before combo recorded the pooling pooled first and then standardised
    over channels; kept so `combo predict` reproduces them. ``prenormalised`` (per backbone): maps already
    normalised per map (a compact store decoded with its stored statistics), pooled as they are."""
    flags = [bool(u) for u in uses_prefix]
    pre = [False] * len(flags) if prenormalised is None else [bool(p) for p in prenormalised]
    if len(pre) != len(flags):
        raise ValueError(f"linear probe: {len(pre)} prenormalised flags for {len(flags)} backbones")
    if legacy and any(pre):
        raise ValueError("linear probe: the legacy pooling standardises pooled vectors; it takes maps in original units")

    def prepare(parts: Sequence[Tensor]) -> Tensor:
        parts = [parts] if isinstance(parts, Tensor) else list(parts)
        if len(parts) != len(flags):
            raise ValueError(f"linear probe: got {len(parts)} feature tensors for {len(flags)} backbones")
        pooled = []
        for x, prefix, normalised in zip(parts, flags, pre):
            x = x[:, :1, :1] if prefix else x[:, :1]  # cls alone, or every patch token, of the last layer
            if legacy:
                v = x[:, 0].float().mean(dim=1)
                pooled.append(normalise_maps(v[:, None, None, :])[:, 0, 0, :])
            elif normalised:
                pooled.append(x[:, 0].float().mean(dim=1))
            else:
                pooled.append(normalise_maps(x)[:, 0].mean(dim=1))
        return torch.cat(pooled, dim=1)

    return prepare


def decoding_prepare(source: SplitSource, prepare: Callable, *, normalised: Sequence[bool] | bool = False) -> Callable:
    """``prepare`` for batches of ``source``'s arrays: compact stores' arrays are decoded first, where the batch
    is (the device), one tensor per store (``normalised``, per store: with their stored statistics). Where no
    store is compact, ``prepare`` itself is returned (full-size stores run exactly as before)."""
    if not source.any_compact:
        return prepare
    decoder = source.decoder

    def decoded(features: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        tensors = [features] if isinstance(features, Tensor) else list(features)
        return prepare(decoder(tensors, normalised=normalised))

    return decoded


def build_model(kind: str, model_config: dict[str, Any]) -> nn.Module:
    """Rebuild a trained model from the config a run folder records."""
    if kind == "combo":
        return ComboAdapter(ComboConfig.from_record(model_config))
    if kind == "linear":
        return LinearProbe(model_config["feature_dim"], model_config["num_classes"])
    raise ValueError(f"unknown model kind {kind!r}")


def sources_for(aligned: AlignedTask, rows: np.ndarray, method: str, *, pool: str = "mean") -> SplitSource:
    """What a method reads: ComBo every layer's patch tokens (every part); the linear probe the last layer's patch
    tokens (``pool="mean"``, the authors') or its cls token where a store has one (``pool="cls"``; else the patch
    tokens), of each backbone's last part (a multi-grid store's deepest stage)."""
    if method == "linear":
        last = aligned.last_parts() if aligned.grouped else aligned
        stores = [p.store for p in last.parts]
        uses_prefix = [pool == "cls" and s.num_prefix_tokens > 0 for s in stores]
        return SplitSource(last, rows, layers=_linear_layers(stores), prefix=uses_prefix)
    return SplitSource(aligned, rows)


def probe_grid(aligned: AlignedTask, cfg: ProbeConfig) -> tuple[int, int]:
    """The grid ComBo runs on for this task: --grid when given, else the authors' rule (align.default_grid) over
    one grid per backbone (a multi-grid store's stride-16 stage, `stores.backbone_grid`)."""
    return tuple(cfg.grid) if cfg.grid is not None else default_grid([backbone_grid(s) for s in aligned.stores])


def model_and_prepare(aligned: AlignedTask, source: SplitSource, cfg: ProbeConfig) -> tuple[str, dict[str, Any], nn.Module, Callable]:
    num_classes = len(aligned.classes) or int(aligned.labels.max()) + 1
    if cfg.method == "linear":
        read = source.task  # one part per backbone (its last)
        uses_prefix = [source.prefix_of(k) for k in range(len(read.parts))]
        dim = sum(p.store.feature_dim for p in read.parts)
        model_config = {"feature_dim": dim, "num_classes": num_classes, "uses_prefix": uses_prefix, "pool": cfg.pool,
                        "pooled": ["cls" if u else "mean" for u in uses_prefix], "normalise": "map, then pool"}
        # compact patch tokens: decoded on the device, ComBo-normalised with the maps' exact stored statistics
        normalised = [source.compact_of(k) for k in range(len(read.parts))]
        prepare = decoding_prepare(source, linear_prepare(uses_prefix, prenormalised=normalised), normalised=normalised)
        return "linear", model_config, LinearProbe(dim, num_classes), prepare
    grid = probe_grid(aligned, cfg)
    dims = aligned.feature_dims
    combo = ComboConfig(
        num_layers=sum(aligned.layers_per_backbone), feature_dim=dims[0],
        num_tokens=grid[0] * grid[1], num_classes=num_classes,
        width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, layers_per_backbone=aligned.layers_per_backbone,
        feature_dims=dims if len(set(dims)) > 1 else (), init=cfg.init,
        backbone_of_part=tuple(aligned.backbone_of_part) if aligned.grouped else (),
    )
    model_config = asdict(combo)
    model_config["layers_per_backbone"] = list(combo.layers_per_backbone)
    model_config["feature_dims"] = list(combo.feature_dims)
    model_config["backbone_of_part"] = list(combo.backbone_of_part)
    model_config["grid"] = list(grid)
    return "combo", model_config, ComboAdapter(combo), combo_prepare(aligned, source, grid)


def combo_prepare(aligned: AlignedTask, source: SplitSource, grid: tuple[int, int]) -> Callable:
    """ComBo's ``prepare`` for batches of ``source`` at ``grid``. A compact store already on the grid is decoded
    normalised with its maps' exact stored statistics; one that must be resized is decoded in original units,
    then resized and normalised like a full-size one."""
    normalised = [source.compact_of(k) and tuple(g) == tuple(grid) for k, g in enumerate(aligned.grids)]
    # reuse: the training and evaluation loops are done with each batch before they prepare the next
    return decoding_prepare(source, make_prepare(aligned.grids, target=grid, prenormalised=normalised, reuse=True),
                            normalised=normalised)


# --------------------------------------------------------------------------------------------- training


def task_splits(aligned: AlignedTask, cfg: ProbeConfig) -> tuple[str, str, np.ndarray, np.ndarray]:
    """The protocol's (training split, evaluation split, their rows), refused when no classifier can be trained
    or measured on them: a training split of one class would score 100% while learning nothing."""
    protocols = aligned.reference.protocols
    if cfg.protocol not in protocols:
        raise ValueError(
            f"task {aligned.name}: the store defines protocols {', '.join(protocols) or 'none'}, not {cfg.protocol!r}"
        )
    train_split, eval_split = protocols[cfg.protocol]
    train_rows, eval_rows = aligned.rows(train_split), aligned.rows(eval_split)
    if train_rows.size == 0 or eval_rows.size == 0:
        raise ValueError(f"task {aligned.name}: split {train_split!r} or {eval_split!r} has no samples")
    seen = np.unique(np.asarray(aligned.labels)[train_rows])
    if seen.size < 2:
        raise ValueError(f"task {aligned.name}: the training split {train_split} holds one class (label {int(seen[0])}); "
                         "a classifier cannot be trained or measured on it")
    return train_split, eval_split, train_rows, eval_rows


@dataclass
class TrainedModel:
    """A model trained on one task's training split, before it is evaluated (`combo study` evaluates many
    of them on one pass over the evaluation split)."""

    task: str
    kind: str
    model: nn.Module
    model_config: dict[str, Any]
    prepare: Callable
    history: dict[str, Any]
    plan: CachePlan | None
    train_split: str
    eval_split: str
    train_rows: np.ndarray
    eval_rows: np.ndarray
    started: float = 0.0  # time.perf_counter() when the fit began


def train_task(aligned: AlignedTask, cfg: ProbeConfig, *, device: torch.device, group_lambda: float | None = None,
               log: Callable[[str], None] | None = None, progress: RunProgress | None = None,
               label: str | None = None) -> TrainedModel:
    """Train on the protocol's training split (seeded, so the same call gives the same model anywhere).
    ``progress`` hears the fit start (as ``label``, default the task) and its steps."""
    train_split, eval_split, train_rows, eval_rows = task_splits(aligned, cfg)
    train_source = sources_for(aligned, train_rows, cfg.method, pool=cfg.pool)
    set_seed(cfg.seed)
    kind, model_config, model, prepare = model_and_prepare(aligned, train_source, cfg)
    plan: CachePlan = plan_cache(train_source, mode=cfg.cache, budget_bytes=cfg.cache_budget, device=device,
                                 batch_size=cfg.batch_size, shuffle_window=cfg.shuffle_window,
                                 eval_batch_size=cfg.eval_batch_size)
    if log:
        shape = (f"grid {'x'.join(str(v) for v in model_config['grid'])}" if kind == "combo"
                 else f"{cfg.pool}-pooled last layer")
        log(f"{label or aligned.name}: {kind} on {train_rows.size} {train_split} -> {eval_rows.size} {eval_split}, "
            f"{cfg.total_steps} steps, {shape}; {plan.describe()}")
    started = time.perf_counter()
    if progress:
        progress.start(label or aligned.name, steps=cfg.total_steps)
    batches = training_batches(train_source, plan, batch_size=cfg.batch_size, seed=cfg.seed, device=device)
    try:
        history = train_steps(model, batches, cfg.train_config(group_lambda=group_lambda), device=device, prepare=prepare,
                              progress=progress)
    finally:
        batches.close()  # the cached split (or the stream's windows) goes before the evaluation split is read
    return TrainedModel(aligned.name, kind, model, {"kind": kind, **model_config}, prepare, history, plan, train_split,
                        eval_split, train_rows, eval_rows, started=started)


def fit_metrics(aligned: AlignedTask, cfg: ProbeConfig, trained: TrainedModel, *, accuracy: float, n: int) -> dict[str, Any]:
    """The metrics row of one evaluated fit (metrics.csv)."""
    plan = trained.plan
    return {
        "task": aligned.name,
        "split": trained.eval_split,
        "accuracy": accuracy,
        "n": n,
        "group": aligned.reference.attrs.get("group") or VTAB_GROUPS.get(aligned.name),
        "train_split": trained.train_split,
        "n_train": int(trained.train_rows.size),
        "method": trained.kind,
        "protocol": cfg.protocol,
        "steps": cfg.total_steps,
        "final_loss": float(trained.history["loss"][-1]),
        "train_seconds": round(float(trained.history["seconds"]), 3),
        "cache": plan.mode if plan is not None else "",
        "shuffle_window": plan.window_rows if plan is not None else None,
        **({"grid": "x".join(str(v) for v in trained.model_config["grid"])} if trained.kind == "combo"
           else {"pool": cfg.pool}),
        "seconds": round(time.perf_counter() - trained.started, 3),
    }


def fit_task(aligned: AlignedTask, cfg: ProbeConfig, *, device: torch.device, group_lambda: float | None = None,
             log: Callable[[str], None] | None = None, progress: RunProgress | None = None,
             label: str | None = None) -> TaskFit:
    """Train on the protocol's training split and evaluate the final weights on its evaluation split.
    ``progress`` hears the fit start (as ``label``, default the task), its steps and its end."""
    trained = train_task(aligned, cfg, device=device, group_lambda=group_lambda, log=log, progress=progress, label=label)
    eval_source = sources_for(aligned, trained.eval_rows, cfg.method, pool=cfg.pool)
    accuracy, n, preds = evaluate(trained.model, eval_batches(eval_source, batch_size=cfg.eval_batch_size), device=device,
                                  prepare=trained.prepare)
    if progress:
        progress.finish(label or aligned.name, summary=f"{100 * accuracy:.1f}% on {n} {trained.eval_split}")
    metrics = fit_metrics(aligned, cfg, trained, accuracy=accuracy, n=n)
    return TaskFit(aligned.name, trained.model, trained.model_config, metrics, preds, trained.eval_rows, trained.history,
                   source=eval_source, prepare=trained.prepare)


# ------------------------------------------------------------------------------------------ run folders


def store_provenance(store: FeatureStore) -> dict[str, Any]:
    keep = ("schema_version", "backbone", "preprocessing", "features", "storage", "dataset", "created", "library_versions")
    return {"url": sanitise_url(store.url), **{k: store.attrs.get(k) for k in keep}}


def weights_of(model: nn.Module) -> dict[str, Tensor]:
    """A model's state as safetensors writes it: detached, on the CPU, contiguous."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_fit(run_dir: Path, fit: TaskFit, aligned: AlignedTask, *, prefix: str = "") -> None:
    """Weights (safetensors), predictions (Parquet) of one task."""
    save_file(weights_of(fit.model), str(run_dir / f"{prefix}adapter-{fit.task}.safetensors"),
              metadata={"task": fit.task, "config": json.dumps(fit.model_config)})
    ids = aligned.reference.sample_ids
    table = pa.table({
        "row": pa.array(fit.eval_rows),
        "sample_id": pa.array([ids[int(r)] for r in fit.eval_rows]),
        "label": pa.array(aligned.labels[fit.eval_rows]),
        "prediction": pa.array(fit.predictions.astype(np.int64)),
    })
    pq.write_table(table, run_dir / f"{prefix}predictions-{fit.task}.parquet")
    save_encodings(run_dir, fit.task, aligned)


ENCODING_FILE = "encoding-{task}.safetensors"


def part_grid_name(part: Any) -> str:
    """The grid group a part reads ("" for a single-grid store's task)."""
    grid = getattr(part, "grid", None)
    return str(getattr(grid, "name", "") or "")


def encoding_key(url: str, grid: str = "") -> str:
    """Where encoding-<task>.safetensors keeps a part's PCA basis: the store URL, and its group for a
    multi-grid store (``url#g1``), so a single-grid store's key is what it always was."""
    return f"{url}#{grid}" if grid else url


def save_encodings(run_dir: Path, task: str, aligned: AlignedTask) -> None:
    """The PCA bases of the task's compact stores (keyed by store URL), so that `combo predict` can put new
    images' features through the same encoding the model was trained on."""
    bases = {}
    for part in aligned.parts:
        if part.pca is not None:
            key = encoding_key(sanitise_url(part.store.url), part_grid_name(part))
            bases[f"{key}|pca_components"] = torch.from_numpy(np.ascontiguousarray(part.pca.components))
            bases[f"{key}|pca_mean"] = torch.from_numpy(np.ascontiguousarray(part.pca.mean))
    if not bases:
        return
    path = run_dir / ENCODING_FILE.format(task=task)
    if path.exists():  # a select run adds its subset's fit beside the full one: same stores, same bases
        from safetensors.torch import load_file

        bases = {**load_file(str(path)), **bases}
    save_file(bases, str(path))


@dataclass
class ProbeRun:
    """A finished run: ``metrics`` of every planned task (resumed ones read back from the folder), ``fits`` of the
    tasks trained by this call, and the dataset and backbones the opened stores recorded."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    fits: list[TaskFit]
    dataset: str = ""
    backbones: list[str] = field(default_factory=list)
    resumed: int = 0  # tasks that were already finished in the folder
    title: str = ""  # as results.md and the console show it


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what is true of the folder it leaves (for the CLI's message)."""

    def __init__(self, run_dir: Path, done: int, planned: int) -> None:
        super().__init__(f"{done} of {planned} tasks finished in {run_dir}")
        self.run_dir, self.done, self.planned = run_dir, done, planned


def resume_options(cfg: ProbeConfig) -> dict[str, Any]:
    """The options that decide a run's results, as JSON values: a resumed run must be given the same ones
    (``out`` may differ: the folder is named; storage options are never written)."""
    doc = asdict(cfg)
    for key in ("out", "storage_options"):
        doc.pop(key, None)
    doc["stores"] = [sanitise_url(r) for r in cfg.stores]
    doc["store_root"] = sanitise_url(cfg.store_root) if cfg.store_root else None
    return json.loads(json.dumps(doc, default=str))


def run_probe(cfg: ProbeConfig, *, log: Callable[[str], None] | None = None, run_dir: Path | None = None,
              progress: RunProgress | None = None, resume: str | os.PathLike | None = None,
              client: Any = None) -> ProbeRun:
    """Train and evaluate on every requested task of the stores; write the run folder.

    The folder's state.json records the planned tasks and which finished, after every task; ``resume`` names an
    unfinished folder whose missing tasks are trained (each task is seeded on its own, so the results equal an
    uninterrupted run's). Ctrl-C raises `RunInterrupted`, which says what finished. ``client`` (a connected
    `distributed.Client`) trains the tasks on its workers, one dask task each (probe/fanout.py); this process
    writes the folder, and a task that fails there is reported by name after the others finish."""
    if resume is None:
        check_out_folder(run_dir.parent if run_dir is not None else cfg.out)
    device = pick_device(cfg.device)
    stores = open_stores(cfg.stores, store_root=cfg.store_root, dataset=cfg.dataset, storage_options=cfg.storage_options)
    tasks = common_tasks(stores, cfg.tasks)
    aligned_tasks = [align_tasks(stores, t) for t in tasks]  # check every task before anything trains
    for aligned in aligned_tasks:
        task_splits(aligned, cfg)
    backbones = [str(s.backbone["alias"]) for s in stores]
    dataset = stores_dataset(stores)
    planned = [a.name for a in aligned_tasks]
    rows: list[dict[str, Any]] = []
    if resume is not None:
        run_dir = Path(resume)
        state, config_doc = open_resumed(run_dir, resume_options(cfg), planned)
        rows = finished_rows(run_dir, state.done)
        config_doc["tasks"] = {t: v for t, v in (config_doc.get("tasks") or {}).items() if t in state.done}
    else:
        run_dir = run_dir or new_run_dir(cfg.out, f"{cfg.method}-" + "+".join(backbones))
        state = new_state(planned, resume_options(cfg))
        state.save(run_dir)
        config_doc = run_config(cfg, stores, device=device)
        config_doc["tasks"] = {}
        write_json(run_dir / "config.json", config_doc)
    resumed = len(rows)
    fits: list[TaskFit] = []
    todo = [a for a in aligned_tasks if a.name not in state.done]
    if progress:
        progress.plan(len(todo))

    def record(aligned: AlignedTask, fit: TaskFit) -> None:
        """The run folder after one more finished task (weights, predictions, config, metrics, state)."""
        nonlocal rows
        save_fit(run_dir, fit, aligned)
        config_doc["tasks"][aligned.name] = {"model": fit.model_config, "classes": aligned.classes,
                                             "grids": [list(g) for g in aligned.grids]}  # per part
        write_json(run_dir / "config.json", config_doc)
        rows = [r for r in rows if r["task"] != aligned.name] + [fit.metrics]
        rows.sort(key=lambda r: planned.index(r["task"]))
        write_table(rows, run_dir / "metrics")  # rewritten after each task: a crash keeps finished ones
        state.tasks[aligned.name] = DONE
        state.save(run_dir)
        fits.append(fit)

    if client is not None:
        _fit_on_cluster(client, located_config(cfg, stores), todo, record, state=state, run_dir=run_dir,
                        planned=planned, progress=progress)
    for aligned in todo if client is None else []:
        try:
            state.tasks[aligned.name] = "running"
            state.save(run_dir)
            fit = fit_task(aligned, cfg, device=device, log=log, progress=progress)
            record(aligned, fit)
        except BaseException as err:
            state.tasks[aligned.name] = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            try:
                state.save(run_dir)  # best effort: a full disk may refuse this too; the last saved state holds
            except OSError:
                pass
            if isinstance(err, KeyboardInterrupt):
                raise RunInterrupted(run_dir, len(state.done), len(planned)) from None
            raise
    title = f"{cfg.method} on {' + '.join(backbones)} ({dataset}, protocol {cfg.protocol})"
    vtab = any(s.dataset == "vtab" for s in stores) or any(r.get("group") in GROUP_ORDER for r in rows)
    (run_dir / "results.md").write_text(markdown_table(rows, title=title, vtab=vtab))
    state.complete = True
    state.save(run_dir)
    return ProbeRun(run_dir=run_dir, metrics=rows, fits=fits, dataset=dataset, backbones=backbones, resumed=resumed,
                    title=title)


class TasksFailed(RuntimeError):
    """Some tasks of a run failed on the cluster; the others finished and are in the run folder."""


def failed_message(failures: Sequence[str], total: int, run_dir: Path, *, resumable: bool = True) -> str:
    again = (f"rerun the same command (or --resume {run_dir}) to train the failed ones again" if resumable
             else "rerun the command to train them again")
    return (f"{len(failures)} of {total} task(s) failed on the cluster: {'; '.join(failures)}. "
            f"The other tasks finished in {run_dir}; {again}")


def located_config(cfg: ProbeConfig, stores: Sequence[FeatureStore]) -> ProbeConfig:
    """`cfg` naming the stores this process opened by absolute path or URL, as workers elsewhere must open them
    (not by short name under a store root, nor by a path relative to this process's folder)."""
    located = tuple(s.url if is_url(s.url) else os.path.abspath(s.url) for s in stores)
    return replace(cfg, stores=located, store_root=None)


def aligned_task(cfg: ProbeConfig, task: str) -> AlignedTask:
    """The task as a dask worker reads it: its own handles on the stores `cfg` names (absolute paths or URLs,
    as `located_config` gives them)."""
    stores = open_stores(cfg.stores, store_root=cfg.store_root, dataset=cfg.dataset, storage_options=cfg.storage_options)
    return align_tasks(stores, task)


def slim(fit: TaskFit) -> TaskFit:
    """A fit to send back from a worker: the model on the CPU; store handles and closures stay on the worker."""
    fit.model.to("cpu")
    fit.source = fit.prepare = None
    return fit


def fit_job(cfg: ProbeConfig, task: str, *, device: torch.device, group_lambda: float | None = None) -> TaskFit:
    """Train and evaluate one task (`fit_task`) on a dask worker (`probe.fanout.map_jobs` ships it there)."""
    return slim(fit_task(aligned_task(cfg, task), cfg, device=device, group_lambda=group_lambda))


def _fit_on_cluster(client: Any, cfg: ProbeConfig, todo: Sequence[AlignedTask], record: Callable[[AlignedTask, TaskFit], None],
                    *, state: Any, run_dir: Path, planned: Sequence[str], progress: RunProgress | None) -> None:
    by_name = {a.name: a for a in todo}
    for name in by_name:
        state.tasks[name] = "running"
    state.save(run_dir)
    failures: list[str] = []
    try:
        for name, outcome in map_jobs(client, fit_job, {task: ((cfg, task), {}) for task in by_name}, device=cfg.device):
            if isinstance(outcome, BaseException):
                state.tasks[name] = "failed"
                state.save(run_dir)
                failures.append(f"{name} ({outcome})")
                continue
            if progress:
                progress.start(name, steps=cfg.total_steps)
                progress.finish(name, summary=f"{100 * outcome.metrics['accuracy']:.1f}% on {outcome.metrics['n']} "
                                              f"{outcome.metrics['split']}")
            record(by_name[name], outcome)
    except KeyboardInterrupt:
        for name in by_name:
            if state.tasks.get(name) == "running":
                state.tasks[name] = "interrupted"
        state.save(run_dir)
        raise RunInterrupted(run_dir, len(state.done), len(planned)) from None
    if failures:
        raise TasksFailed(failed_message(failures, len(todo), run_dir))


def stores_dataset(stores: Sequence[FeatureStore]) -> str:
    """The dataset the stores recorded (not the --dataset default, which only resolves short names)."""
    names = list(dict.fromkeys(str(s.dataset) for s in stores))
    return "+".join(names)


def run_config(cfg: ProbeConfig, stores: Sequence[FeatureStore], *, device: torch.device) -> dict[str, Any]:
    doc = {"kind": "probe", **asdict(cfg)}
    doc.pop("storage_options", None)  # may hold endpoints or keys: never written
    doc["stores"] = [store_provenance(s) for s in stores]
    doc["dataset"] = stores_dataset(stores)  # a store given as a path is read as what it holds
    doc["store_refs"] = [sanitise_url(r) for r in cfg.stores]
    doc["store_root"] = sanitise_url(cfg.store_root) if cfg.store_root else None
    doc["device"] = str(device)
    doc["grid_requested"] = list(cfg.grid) if cfg.grid else "auto (the stores' common grid, else the smallest; a hierarchical store's stride-16 stage)"
    if cfg.method == "combo":  # the grid used (each task's model config records it too)
        doc["grid"] = list(cfg.grid or default_grid([backbone_grid(s) for s in stores]))
    else:
        doc["grid"] = None
    doc["train"] = asdict(cfg.train_config())
    doc["combo_version"] = _version()
    return doc


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("combo-probe")
    except Exception:  # noqa: BLE001
        return "unknown"


__all__ = [
    "METHODS",
    "POOLS",
    "PROTOCOL_STEPS",
    "ProbeConfig",
    "ProbeRun",
    "RunInterrupted",
    "TaskFit",
    "TrainedModel",
    "aligned_task",
    "build_model",
    "decoding_prepare",
    "encoding_key",
    "fit_job",
    "fit_metrics",
    "fit_task",
    "linear_prepare",
    "model_and_prepare",
    "probe_grid",
    "replace",
    "run_config",
    "resume_options",
    "run_probe",
    "stores_dataset",
    "save_fit",
    "slim",
    "sources_for",
    "store_provenance",
    "task_splits",
    "train_task",
    "weights_of",
]
