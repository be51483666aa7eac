"""`combo probe` as a library call: stores in, run folder with weights, metrics and tables out."""

from __future__ import annotations

import json
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

from store_schema import FeatureStore

from .adapter import ComboAdapter, ComboConfig
from .align import make_prepare, normalise_maps
from .data import CachePlan, SplitSource, default_budget, eval_batches, plan_cache, training_batches
from .linear import LinearProbe
from .results import VTAB_GROUPS, markdown_table, new_run_dir, sanitise_url, write_json, write_table
from .stores import AlignedTask, align_tasks, common_tasks, open_stores
from .train import TrainConfig, evaluate, pick_device, set_seed, train_steps

PROTOCOL_STEPS = {"final": 1600, "dev": 1300}  # PAPER.md: VTAB-1k protocol
METHODS = ("combo", "linear")


@dataclass(frozen=True)
class ProbeConfig:
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
    grid: tuple[int, int] = (14, 14)
    cache: str = "auto"
    cache_budget: int = field(default_factory=default_budget)
    device: str | None = None
    out: str = "runs"
    group_lambda: float = 0.0
    eval_batch_size: int = 256
    storage_options: dict[str, Any] | None = None
    # adapter size (the paper's values; smaller ones only for tests and demos)
    width: int = 128
    depth: int = 6
    num_heads: int = 2

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOL_STEPS:
            raise ValueError(f"--protocol {self.protocol!r}: choose one of {', '.join(PROTOCOL_STEPS)}")
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not self.stores:
            raise ValueError("--stores: give at least one store (a short name, a path or a URL)")

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


# --------------------------------------------------------------------------------------- models and inputs


def _linear_layers(stores: Sequence[FeatureStore]) -> list[list[int]]:
    return [[s.num_layers - 1] for s in stores]


def linear_prepare(uses_prefix: Sequence[bool]) -> Callable[[Sequence[Tensor]], Tensor]:
    """Last-layer feature per backbone: the cls token where stored, else the mean of the patch tokens;
    each normalised over channels (parameter-free, like ComBo's maps) and concatenated."""

    def prepare(parts: Sequence[Tensor]) -> Tensor:
        pooled = []
        for x, prefix in zip(parts, uses_prefix):
            v = x[:, 0, 0, :] if prefix else x[:, 0].float().mean(dim=1)
            pooled.append(normalise_maps(v.float()[:, None, None, :])[:, 0, 0, :])
        return torch.cat(pooled, dim=1)

    return prepare


def build_model(kind: str, model_config: dict[str, Any]) -> nn.Module:
    """Rebuild a trained model from the config a run folder records."""
    if kind == "combo":
        cfg = dict(model_config)
        cfg["layers_per_backbone"] = tuple(cfg.get("layers_per_backbone", ()))
        return ComboAdapter(ComboConfig(**cfg))
    if kind == "linear":
        return LinearProbe(model_config["feature_dim"], model_config["num_classes"])
    raise ValueError(f"unknown model kind {kind!r}")


def sources_for(aligned: AlignedTask, rows: np.ndarray, method: str) -> SplitSource:
    stores = [p.store for p in aligned.parts]
    if method == "linear":
        uses_prefix = [s.num_prefix_tokens > 0 for s in stores]
        if any(uses_prefix) and not all(uses_prefix):
            # mixed: read tokens everywhere for one code path; the prefix reader would skip patch-only stores
            return SplitSource(aligned, rows, layers=_linear_layers(stores), prefix=False)
        return SplitSource(aligned, rows, layers=_linear_layers(stores), prefix=all(uses_prefix))
    return SplitSource(aligned, rows)


def model_and_prepare(aligned: AlignedTask, source: SplitSource, cfg: ProbeConfig) -> tuple[str, dict[str, Any], nn.Module, Callable]:
    num_classes = len(aligned.classes)
    if cfg.method == "linear":
        dim = aligned.feature_dim * len(aligned.parts) if len({p.store.feature_dim for p in aligned.parts}) == 1 else sum(p.store.feature_dim for p in aligned.parts)
        model_config = {"feature_dim": dim, "num_classes": num_classes, "uses_prefix": [source.prefix] * len(aligned.parts)}
        return "linear", model_config, LinearProbe(dim, num_classes), linear_prepare([source.prefix] * len(aligned.parts))
    combo = ComboConfig(
        num_layers=sum(aligned.layers_per_backbone), feature_dim=aligned.feature_dim,
        num_tokens=cfg.grid[0] * cfg.grid[1], num_classes=num_classes,
        width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, layers_per_backbone=aligned.layers_per_backbone,
    )
    model_config = asdict(combo)
    model_config["layers_per_backbone"] = list(combo.layers_per_backbone)
    return "combo", model_config, ComboAdapter(combo), make_prepare(aligned.grids, target=cfg.grid)


# --------------------------------------------------------------------------------------------- training


def fit_task(aligned: AlignedTask, cfg: ProbeConfig, *, device: torch.device, group_lambda: float | None = None,
             log: Callable[[str], None] | None = None) -> TaskFit:
    """Train on the protocol's training split and evaluate the final weights on its evaluation split."""
    protocols = aligned.reference.protocols
    if cfg.protocol not in protocols:
        raise ValueError(
            f"task {aligned.name}: the store defines protocols {', '.join(protocols) or 'none'}, not {cfg.protocol!r}"
        )
    train_split, eval_split = protocols[cfg.protocol]
    train_rows, eval_rows = aligned.rows(train_split), aligned.rows(eval_split)
    if train_rows.size == 0 or eval_rows.size == 0:
        raise ValueError(f"task {aligned.name}: split {train_split!r} or {eval_split!r} has no samples")
    train_source = sources_for(aligned, train_rows, cfg.method)
    eval_source = sources_for(aligned, eval_rows, cfg.method)
    set_seed(cfg.seed)
    kind, model_config, model, prepare = model_and_prepare(aligned, train_source, cfg)
    plan: CachePlan = plan_cache(train_source, mode=cfg.cache, budget_bytes=cfg.cache_budget, device=device, batch_size=cfg.batch_size)
    if log:
        window = "whole split" if plan.window_rows is None else f"{plan.window_rows} rows"
        log(f"{aligned.name}: {train_rows.size} {train_split} -> {eval_rows.size} {eval_split}; "
            f"cache {plan.mode} ({plan.split_bytes / 2**20:.0f} MiB, shuffle window {window})")
    started = time.perf_counter()
    batches = training_batches(train_source, plan, batch_size=cfg.batch_size, seed=cfg.seed, device=device)
    history = train_steps(model, batches, cfg.train_config(group_lambda=group_lambda), device=device, prepare=prepare)
    accuracy, n, preds = evaluate(model, eval_batches(eval_source, batch_size=cfg.eval_batch_size), device=device, prepare=prepare)
    metrics = {
        "task": aligned.name,
        "split": eval_split,
        "accuracy": accuracy,
        "n": n,
        "group": aligned.reference.attrs.get("group") or VTAB_GROUPS.get(aligned.name),
        "train_split": train_split,
        "n_train": int(train_rows.size),
        "method": kind,
        "protocol": cfg.protocol,
        "steps": cfg.total_steps,
        "final_loss": float(history["loss"][-1]),
        "cache": plan.mode,
        "shuffle_window": plan.window_rows,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return TaskFit(aligned.name, model, {"kind": kind, **model_config}, metrics, preds, eval_rows, history)


# ------------------------------------------------------------------------------------------ run folders


def store_provenance(store: FeatureStore) -> dict[str, Any]:
    keep = ("schema_version", "backbone", "preprocessing", "features", "storage", "dataset", "created", "library_versions")
    return {"url": sanitise_url(store.url), **{k: store.attrs.get(k) for k in keep}}


def save_fit(run_dir: Path, fit: TaskFit, aligned: AlignedTask, *, prefix: str = "") -> None:
    """Weights (safetensors), predictions (Parquet) of one task."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in fit.model.state_dict().items()}
    save_file(tensors, str(run_dir / f"{prefix}adapter-{fit.task}.safetensors"),
              metadata={"task": fit.task, "config": json.dumps(fit.model_config)})
    ids = aligned.reference.sample_ids
    table = pa.table({
        "row": pa.array(fit.eval_rows),
        "sample_id": pa.array([ids[int(r)] for r in fit.eval_rows]),
        "label": pa.array(aligned.labels[fit.eval_rows]),
        "prediction": pa.array(fit.predictions.astype(np.int64)),
    })
    pq.write_table(table, run_dir / f"{prefix}predictions-{fit.task}.parquet")


@dataclass
class ProbeRun:
    run_dir: Path
    metrics: list[dict[str, Any]]
    fits: list[TaskFit]


def run_probe(cfg: ProbeConfig, *, log: Callable[[str], None] | None = None, run_dir: Path | None = None) -> ProbeRun:
    """Train and evaluate on every requested task of the stores; write the run folder."""
    device = pick_device(cfg.device)
    stores = open_stores(cfg.stores, store_root=cfg.store_root, dataset=cfg.dataset, storage_options=cfg.storage_options)
    tasks = common_tasks(stores, cfg.tasks)
    aligned_tasks = [align_tasks(stores, t) for t in tasks]  # check every task before anything trains
    label = f"{cfg.method}-" + "+".join(s.backbone["alias"] for s in stores)
    run_dir = run_dir or new_run_dir(cfg.out, label)
    config_doc = run_config(cfg, stores, device=device)
    config_doc["tasks"] = {}
    write_json(run_dir / "config.json", config_doc)
    fits, rows = [], []
    for aligned in aligned_tasks:
        fit = fit_task(aligned, cfg, device=device, log=log)
        save_fit(run_dir, fit, aligned)
        config_doc["tasks"][aligned.name] = {"model": fit.model_config, "classes": aligned.classes, "grids": [list(g) for g in aligned.grids]}
        write_json(run_dir / "config.json", config_doc)
        fits.append(fit)
        rows.append(fit.metrics)
        write_table(rows, run_dir / "metrics")  # rewritten after each task: a crash keeps finished ones
    title = f"{cfg.method} on {' + '.join(s.backbone['alias'] for s in stores)} ({cfg.dataset}, protocol {cfg.protocol})"
    (run_dir / "results.md").write_text(markdown_table(rows, title=title, vtab=cfg.dataset == "vtab" or any(r["group"] for r in rows)))
    return ProbeRun(run_dir=run_dir, metrics=rows, fits=fits)


def run_config(cfg: ProbeConfig, stores: Sequence[FeatureStore], *, device: torch.device) -> dict[str, Any]:
    doc = {"kind": "probe", **asdict(cfg)}
    doc.pop("storage_options", None)  # may hold endpoints or keys: never written
    doc["stores"] = [store_provenance(s) for s in stores]
    doc["store_refs"] = [sanitise_url(r) for r in cfg.stores]
    doc["device"] = str(device)
    doc["train"] = asdict(cfg.train_config())
    doc["combo_version"] = _version()
    return doc


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("combo")
    except Exception:  # noqa: BLE001
        return "unknown"


__all__ = ["METHODS", "PROTOCOL_STEPS", "ProbeConfig", "ProbeRun", "TaskFit", "build_model", "fit_task", "run_probe", "save_fit", "replace"]
