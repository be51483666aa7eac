"""Which backbones (and which of their layers) a task needs (PAPER.md, "Task relevance and backbone selection").

Relevance: train ComBo once with loss = CE + lambda * sum_k s_k, where s_k = ||W[:, layers_of_k, :]||_F is the
norm of the slice of Lambda's weight that reads backbone k (a group lasso over backbones). The penalty pushes
whole slices of unhelpful backbones towards zero, so the s_k rank the backbones. The same slicing per layer,
||W[:, l, :]||_F, shows where inside each backbone the useful features are.

The ranking is only meaningful because every (image, layer) map is standardised before Lambda
(``probe.align.normalise_maps``): a backbone whose raw features are 100x larger does not need a 100x smaller
slice to contribute the same, so s_k compares contributions, not feature scales.

s_k says how much the penalised probe *uses* a backbone, not whether that use generalises: beside it each
row carries the held-out importance (``probe.heldout``): the drop in accuracy on the dev protocol's held-out
split (VTAB: trained on train800, measured on val200) when that backbone's features are shuffled across
samples, with a 95% interval. The relevance pass therefore always trains on the dev protocol and never reads
the test split; ``--protocol`` only sets where ``--select``'s retrained subset trains and is evaluated. When
the probe's held-out accuracy is not clearly above chance, or the two measures disagree on the top backbone,
the run says so (``warnings`` in config.json and results.md, and on the console).

Output tables: relevance.csv has one row per (task, backbone) with s_k, s_k / sum_j s_j and the rank (1 = most
important), the held-out drop (``heldout_drop``, ``heldout_low``, ``heldout_high``, ``heldout_rank``) and the
probe's held-out accuracy and chance level; layer_relevance.csv one row per (task, backbone, layer) with ||W[:, l, :]||_F and its share of the
sum over ALL layers of all backbones of that task (so layers of different backbones are comparable).

Selective adaptation (``run_select``): relevance run, keep some backbones PER TASK, retrain ComBo on them
without the penalty, evaluate. Backbone names are the stores' aliases; when two stores share an alias they
are told apart by their position in ``--stores`` ("clip#0", "clip#1").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from store_schema import FeatureStore

from .adapter import ComboAdapter
from .data import SplitSource
from .heldsplit import hold_rows
from .heldout import HELDOUT_REPEATS, chance_accuracy, descending_ranks, heldout_drops, layer_heldout_drops, near_chance
from .results import markdown_table, new_run_dir, write_json, write_table
from .progress import RunProgress
from .runstate import DONE, RunState, new_state
from .run import (ProbeConfig, TaskFit, TasksFailed, aligned_task, failed_message, fit_job, fit_task, located_config,
                  run_config, save_fit, slim, stores_dataset, task_splits)
from .stores import AlignedTask, align_tasks, common_tasks, open_stores
from .train import pick_device

__all__ = [
    "DEFAULT_LAMBDA",
    "RelevanceRun",
    "SelectRun",
    "Selection",
    "SelectionError",
    "backbone_names",
    "check_measure",
    "choose_backbones",
    "relevance_warnings",
    "importance_rows",
    "layer_importance_rows",
    "parse_select",
    "relevance_penalty",
    "selection_table",
    "run_relevance",
    "run_select",
]

DEFAULT_LAMBDA = 0.01  # PAPER.md
MEASURES = ("norm", "heldout")  # --by: the paper's s_k, or the held-out drop
RELEVANCE_PROTOCOL = "dev"  # train on the dev training split, measure on its held-out split: never the test split

Log = Callable[[str], None] | None


class SelectionError(ValueError):
    """A --select value that names no valid choice of backbones."""


# ------------------------------------------------------------------------------------------- naming, norms


def backbone_names(stores: Sequence[FeatureStore]) -> list[str]:
    """Store aliases in --stores order; an alias used twice gets '#<index in --stores>' on every use."""
    aliases = [str(s.backbone.get("alias") or "store") for s in stores]
    return [f"{a}#{i}" if aliases.count(a) > 1 else a for i, a in enumerate(aliases)]


def relevance_penalty(model: ComboAdapter, group_lambda: float) -> torch.Tensor:
    """lambda * sum_k s_k: the term relevance training adds to the cross-entropy (exactly 0 for lambda = 0)."""
    if group_lambda < 0:
        raise ValueError(f"--lambda must be >= 0, got {group_lambda}")
    if group_lambda == 0:
        return torch.zeros((), device=model.lambda_weight.device)
    return group_lambda * model.backbone_norms().sum()


def importance_rows(task: str, model: ComboAdapter, names: Sequence[str], *, group_lambda: float) -> list[dict[str, Any]]:
    """One row per backbone: s_k, s_k / sum(s), rank (1 = most important; ties keep --stores order)."""
    norms = model.backbone_norms().detach().float().cpu().tolist()
    if len(norms) != len(names):
        raise ValueError(f"task {task}: the model reads {len(norms)} backbones but {len(names)} names were given")
    total = sum(norms)
    rank = descending_ranks(norms)
    return [
        {
            "task": task,
            "backbone": name,
            "store_index": k,
            "importance": float(norms[k]),
            "importance_normalised": float(norms[k] / total) if total > 0 else 0.0,
            "rank": rank[k],
            "group_lambda": group_lambda,
        }
        for k, name in enumerate(names)
    ]


def layer_importance_rows(task: str, model: ComboAdapter, names: Sequence[str],
                          layer_ids: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
    """One row per (backbone, layer): ||W[:, l, :]||_F; ``layer`` is the store's block index of that layer
    (a multi-grid backbone's layers run over its parts, its grid groups, in order)."""
    norms = model.layer_norms().detach().float().cpu().tolist()
    total = sum(norms)
    rows = []
    for k, (name, s) in enumerate(zip(names, model.cfg.backbone_slices)):
        ids = list(layer_ids[k])
        if len(ids) != s.stop - s.start:
            raise ValueError(f"task {task}: backbone {name} has {s.stop - s.start} Lambda layers but {len(ids)} layer ids")
        for pos, l in enumerate(range(s.start, s.stop)):
            rows.append({
                "task": task, "backbone": name, "store_index": k, "layer": int(ids[pos]), "layer_position": pos,
                "importance": float(norms[l]), "importance_normalised": float(norms[l] / total) if total > 0 else 0.0,
            })
    return rows


def _layer_ids(store: FeatureStore) -> list[int]:
    ids = store.features.get("layers")
    return [int(i) for i in ids] if ids else list(range(store.num_layers))


# ---------------------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selection:
    """How to pick backbones from their importances: the k highest, or normalised importance >= threshold."""

    top_k: int | None = None
    threshold: float | None = None
    by: str = "norm"  # "norm": the paper's s_k; "heldout": the held-out accuracy drop

    def __post_init__(self) -> None:
        check_measure(self.by)

    def describe(self) -> str:
        if self.top_k is not None:
            rule = f"top-{self.top_k}"
        else:
            rule = f"{'importance' if self.by == 'norm' else 'heldout'}_normalised >= {self.threshold:g}"
        return rule + (" by held-out drop" if self.by == "heldout" else "")


def check_measure(by: str) -> str:
    """`by` if it names a measure --select can rank by; else a SelectionError saying which ones do."""
    if by not in MEASURES:
        raise SelectionError(f"--by {by!r}: choose norm (the paper's s_k) or heldout (the held-out accuracy drop)")
    return by


_TOP = re.compile(r"^top[-_ ]?(\d+)$")
_THRESHOLD = re.compile(r"^(?:ge|>=)?\s*([0-9]*\.?[0-9]+(?:e-?\d+)?)$")


def parse_select(text: str, *, by: str = "norm") -> Selection:
    """'top-2' (also 'top2') keeps the 2 most important backbones of each task; '0.2', 'ge0.2' or '>=0.2' keeps
    every backbone whose normalised importance is >= 0.2 (a number in (0, 1]). ``by``: "norm" ranks by the
    paper's s_k (normalised: s_k / sum s), "heldout" by the held-out drop (normalised: its share of the sum of
    the positive drops)."""
    raw = str(text).strip().lower()
    if m := _TOP.match(raw):
        k = int(m.group(1))
        if k < 1:
            raise SelectionError(f"--select {text!r}: top-k needs k >= 1")
        return Selection(top_k=k, by=by)
    if m := _THRESHOLD.match(raw):
        t = float(m.group(1))
        if not 0 < t <= 1:
            raise SelectionError(f"--select {text!r}: a threshold on normalised importance must be in (0, 1]")
        return Selection(threshold=t, by=by)
    raise SelectionError(
        f"--select {text!r}: use top-K (e.g. top-2) or a threshold on normalised importance (e.g. 0.2 or ge0.2)"
    )


def choose_backbones(rows: Sequence[dict[str, Any]], selection: Selection) -> list[int]:
    """Store indices kept for one task, in --stores order. A threshold above every importance keeps the top one
    (ComBo needs at least one backbone)."""
    if not rows:
        raise SelectionError("no importances to select from")
    rank_key, share_key = ("rank", "importance_normalised") if selection.by == "norm" else ("heldout_rank", "heldout_normalised")
    if rank_key not in rows[0]:
        raise SelectionError(f"--by {selection.by}: this relevance run has no held-out importances")
    if selection.top_k is not None:
        if selection.top_k > len(rows):
            raise SelectionError(f"--select top-{selection.top_k}: only {len(rows)} backbone(s) were given")
        kept = [r["store_index"] for r in rows if r[rank_key] <= selection.top_k]
    else:
        kept = [r["store_index"] for r in rows if r[share_key] >= float(selection.threshold)]
        if not kept:
            kept = [min(rows, key=lambda r: r[rank_key])["store_index"]]
    return sorted(int(k) for k in kept)


def selection_table(task: str, rows: Sequence[dict[str, Any]], keep: Sequence[int], *, by: str) -> list[dict[str, Any]]:
    """selection.csv's rows of one task: each backbone's two measures and whether it was kept."""
    return [{"task": task, "backbone": r["backbone"], "store_index": r["store_index"],
             "importance_normalised": r["importance_normalised"], "rank": r["rank"], "heldout_drop": r["heldout_drop"],
             "heldout_rank": r["heldout_rank"], "by": by, "selected": r["store_index"] in keep} for r in rows]


def add_heldout(rows: list[dict[str, Any]], fit: TaskFit, *, device: torch.device, batch_size: int,
                repeats: int = HELDOUT_REPEATS, seed: int = 0) -> None:
    """Add the held-out drop of each backbone (and the task's held-out accuracy and chance) to its relevance row."""
    assert fit.source is not None
    drops = heldout_drops(fit.model, fit.source, fit.predictions, device=device, prepare=fit.prepare,
                          batch_size=batch_size, repeats=repeats, seed=seed)
    ranks = descending_ranks([d.drop for d in drops])
    positive = sum(max(d.drop, 0.0) for d in drops)
    labels = fit.source.labels
    summary = {"heldout_split": fit.metrics["split"], "heldout_accuracy": fit.metrics["accuracy"],
               "heldout_chance": chance_accuracy(labels), "heldout_n": int(labels.size), "heldout_repeats": repeats}
    for row, d, rank in zip(rows, drops, ranks):
        row.update(heldout_drop=d.drop, heldout_low=d.low, heldout_high=d.high, heldout_rank=rank,
                   heldout_normalised=max(d.drop, 0.0) / positive if positive > 0 else 0.0,
                   heldout_shuffled_accuracy=d.shuffled_accuracy, **summary)


def add_layer_heldout(rows: list[dict[str, Any]], fit: TaskFit, *, device: torch.device, batch_size: int,
                      seed: int = 0) -> None:
    """Add each layer's held-out drop (that layer alone shuffled, one shuffle) to its layer_relevance row."""
    assert fit.source is not None
    counts = list(fit.model.cfg.backbone_layer_counts)  # a multi-grid backbone's layers over all its parts
    drops = layer_heldout_drops(fit.model, fit.source, fit.predictions, layers_per_store=counts, device=device,
                                prepare=fit.prepare, batch_size=batch_size, seed=seed)
    for row in rows:
        d = drops[int(row["store_index"])][int(row["layer_position"])]
        row.update(heldout_drop=d.drop, heldout_low=d.low, heldout_high=d.high)


def relevance_warnings(task: str, rows: Sequence[dict[str, Any]], *, top_k: int = 1) -> list[str]:
    """Plain sentences for when a task's ranking should not be believed (rows carry the held-out columns)."""
    if not rows or "heldout_drop" not in rows[0]:
        return []
    first = rows[0]
    out = []
    acc, chance, n = first["heldout_accuracy"], first["heldout_chance"], first["heldout_n"]
    if near_chance(acc, chance, n):
        out.append(
            f"task {task}: the probe's held-out accuracy ({100 * acc:.1f}% on {n} {first['heldout_split']} samples) is "
            f"not clearly above chance ({100 * chance:.1f}%, the most frequent class), so it learnt nothing that "
            "generalises and its backbone ranking is not evidence of relevance; train longer, on more data, or "
            "check the stores"
        )
    k = min(top_k, len(rows))
    by_norm = {r["backbone"] for r in rows if r["rank"] <= k}
    by_heldout = {r["backbone"] for r in rows if r["heldout_rank"] <= k}
    if by_norm != by_heldout:  # always said: a user acting on either top-k must know the other differs
        def show(names: set[str]) -> str:
            return ", ".join(sorted(names))

        drops = "; ".join(
            f"{r['backbone']} s_k {r['importance_normalised']:.2f}, drop {100 * r['heldout_drop']:+.1f} "
            f"[{100 * r['heldout_low']:+.1f}, {100 * r['heldout_high']:+.1f}] pts"
            for r in sorted(rows, key=lambda r: r["rank"])
        )
        # the held-out difference is significant when what it adds clearly helps (interval above zero) and what
        # s_k would keep instead does not; s_k is one number per backbone, without an interval to test
        gained = [r for r in rows if r["backbone"] in by_heldout - by_norm]
        dropped = [r for r in rows if r["backbone"] in by_norm - by_heldout]
        significant = all(r["heldout_low"] > 0 for r in gained) and all(r["heldout_low"] <= 0 for r in dropped)
        if significant:
            verdict = (f"The held-out difference is significant ({show(by_heldout - by_norm)} clearly helps on held-out "
                       f"data, {show(by_norm - by_heldout)} does not; s_k has no interval): select by held-out drop "
                       "(--by heldout)")
        else:
            verdict = ("Neither difference is significant (s_k has no interval, and the held-out 95% intervals do not "
                       "separate them): the ranking is within noise; train longer (--steps), try --init torch, or "
                       "measure on more data before acting on either")
        out.append(
            f"task {task}: the paper's measure (s_k) and the held-out drop disagree on the top {k}: "
            f"{show(by_norm)} by s_k, {show(by_heldout)} by held-out drop ({drops}). {verdict}. s_k measures how much "
            "the penalised probe uses a backbone, the drop whether that use helps on data it never trained on"
        )
    return out


# --------------------------------------------------------------------------------------------------- runs


@dataclass
class RelevanceRun:
    run_dir: Path
    backbones: list[str]
    importances: list[dict[str, Any]]  # relevance.csv
    layer_importances: list[dict[str, Any]]  # layer_relevance.csv
    metrics: list[dict[str, Any]]  # the penalised model's accuracy per task (on the dev held-out split)
    fits: list[TaskFit]
    warnings: list[str] = field(default_factory=list)  # when the ranking should not be believed


@dataclass
class SelectRun:
    run_dir: Path
    relevance: RelevanceRun
    selection: Selection
    chosen: dict[str, list[str]]  # task -> kept backbones
    metrics: list[dict[str, Any]]  # the retrained subset's accuracy per task (metrics.csv)
    fits: list[TaskFit]


def _open(cfg: ProbeConfig) -> tuple[torch.device, list[FeatureStore], list[AlignedTask]]:
    if cfg.method != "combo":
        raise ValueError(f"relevance needs --method combo (the penalty is on ComBo's Lambda), not {cfg.method!r}")
    device = pick_device(cfg.device)
    stores = open_stores(cfg.stores, store_root=cfg.store_root, dataset=cfg.dataset, storage_options=cfg.storage_options)
    tasks = common_tasks(stores, cfg.tasks)
    return device, stores, [align_tasks(stores, t) for t in tasks]  # every task checked before anything trains


def relevance_config(cfg: ProbeConfig) -> ProbeConfig:
    """The configuration of the relevance (penalised) pass: the dev protocol, whatever --protocol says."""
    return replace(cfg, protocol=RELEVANCE_PROTOCOL)


@dataclass
class TaskRelevance:
    """One task's penalised fit with what it says: s_k and held-out rows per backbone and per layer."""

    fit: TaskFit
    rows: list[dict[str, Any]]
    layer_rows: list[dict[str, Any]]
    metrics: dict[str, Any]
    warnings: list[str]


def relevance_of_task(aligned: AlignedTask, cfg: ProbeConfig, *, device: torch.device, group_lambda: float,
                      names: Sequence[str], layer_ids: Sequence[Sequence[int]], top_k: int = 1,
                      heldout_repeats: int = HELDOUT_REPEATS, layer_heldout: bool = False, log: Log = None,
                      progress: RunProgress | None = None) -> TaskRelevance:
    """Train the penalised model on one task (``cfg`` already on the relevance protocol) and measure it.

    The protocol's rows are read into RAM once when they fit ``cfg.cache_budget`` (`hold_dev_rows`), so the fit,
    its evaluation and every held-out shuffle (K x repeats passes over the held-out split, L more with
    ``layer_heldout``) read each stored byte once; `combo study` hands in a task already held."""
    held = hold_dev_rows(aligned, cfg, log=log)
    fit = fit_task(held, cfg, device=device, group_lambda=group_lambda, log=log, progress=progress,
                   label=f"{aligned.name}: penalised")
    model = fit.model
    assert isinstance(model, ComboAdapter)
    rows = importance_rows(aligned.name, model, names, group_lambda=group_lambda)
    add_heldout(rows, fit, device=device, batch_size=cfg.eval_batch_size, repeats=heldout_repeats, seed=cfg.seed)
    layer_rows = layer_importance_rows(aligned.name, model, names, layer_ids)
    if layer_heldout:
        add_layer_heldout(layer_rows, fit, device=device, batch_size=cfg.eval_batch_size, seed=cfg.seed)
    metrics = {**fit.metrics, "group_lambda": group_lambda,
               "penalty": float(relevance_penalty(model, group_lambda).detach().cpu()), "backbones": "+".join(names)}
    if held is not aligned and fit.source is not None:
        fit.source = replace(fit.source, task=aligned)  # the result keeps no copy of the rows in RAM
    return TaskRelevance(fit, rows, layer_rows, metrics, relevance_warnings(aligned.name, rows, top_k=top_k))


def hold_dev_rows(aligned: AlignedTask, cfg: ProbeConfig, *, log: Log = None) -> AlignedTask:
    """``aligned`` with the protocol's training and held-out rows held in RAM (`probe.heldsplit`) when they fit
    ``cfg.cache_budget``; as it is when they do not (each pass streams them) or when they already are held."""
    if any(hasattr(part, "held_index") for part in aligned.parts):
        return aligned
    _, _, train_rows, eval_rows = task_splits(aligned, cfg)
    rows = np.union1d(train_rows, eval_rows)
    total = rows.size * SplitSource(aligned, rows).row_bytes()
    if total > cfg.cache_budget:
        if log:
            log(f"{aligned.name}: the relevance rows ({total / 2**20:.1f} MiB) do not fit --cache-budget "
                f"({cfg.cache_budget / 2**20:.1f} MiB): each held-out pass streams them")
        return aligned
    return hold_rows(aligned, rows)


def relevance_job(cfg: ProbeConfig, task: str, *, device: torch.device, **kwargs: Any) -> TaskRelevance:
    """`relevance_of_task` on a dask worker (probe/fanout.py), the fit sent back without its data handles."""
    result = relevance_of_task(aligned_task(cfg, task), cfg, device=device, **kwargs)
    result.fit = slim(result.fit)
    return result


def in_order(aligned_tasks: Sequence[AlignedTask], results: Iterator[tuple[str, Any]],
             record: Callable[[AlignedTask, Any], None]) -> list[str]:
    """Record results that arrive in any order in the planned order (files grow as a sequential run's would);
    returns the failures, "task (error)", once every task has finished or failed."""
    pending: dict[str, Any] = {}
    failed: set[str] = set()
    failures: list[str] = []
    position = 0
    for name, outcome in results:
        if isinstance(outcome, BaseException):
            failed.add(name)
            failures.append(f"{name} ({outcome})")
        else:
            pending[name] = outcome
        while position < len(aligned_tasks) and (aligned_tasks[position].name in pending
                                                 or aligned_tasks[position].name in failed):
            aligned = aligned_tasks[position]
            if aligned.name in pending:
                record(aligned, pending.pop(aligned.name))
            position += 1
    return failures


def _relevance_pass(cfg: ProbeConfig, *, stores: Sequence[FeatureStore], aligned_tasks: Sequence[AlignedTask],
                    device: torch.device, group_lambda: float, run_dir: Path, config_doc: dict[str, Any],
                    metrics_stem: str, weights_prefix: str, log: Log, top_k: int = 1,
                    heldout_repeats: int = HELDOUT_REPEATS, layer_heldout: bool = False,
                    progress: RunProgress | None = None, state: RunState | None = None,
                    client: Any = None) -> RelevanceRun:
    cfg = relevance_config(cfg)
    names = backbone_names(stores)
    layer_ids = [_layer_ids(s) for s in stores]
    importances: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    metrics: list[dict[str, Any]] = []
    fits: list[TaskFit] = []
    warnings: list[str] = []

    def record(aligned: AlignedTask, result: TaskRelevance) -> None:
        fits.append(result.fit)
        save_fit(run_dir, result.fit, aligned, prefix=weights_prefix)
        warnings.extend(result.warnings)
        config_doc["warnings"] = warnings
        importances.extend(result.rows)
        layers.extend(result.layer_rows)
        metrics.append(result.metrics)
        config_doc.setdefault("tasks", {})[aligned.name] = {
            "model": result.fit.model_config, "classes": aligned.classes, "grids": [list(g) for g in aligned.grids]}
        write_json(run_dir / "config.json", config_doc)
        # rewritten after each task: a crash keeps the finished ones
        write_table(importances, run_dir / "relevance")
        write_table(layers, run_dir / "layer_relevance")
        write_table(metrics, run_dir / metrics_stem)
        if state is not None:
            state.tasks[aligned.name] = DONE
            state.save(run_dir)
        if log:
            ranked = sorted(result.rows, key=lambda r: r["rank"])
            log(f"{aligned.name}: " + ", ".join(
                f"{r['backbone']} {r['importance_normalised']:.2f} (held-out drop {100 * r['heldout_drop']:+.1f} pts)"
                for r in ranked))
            for text in result.warnings:
                log(f"warning: {text}")

    options = dict(group_lambda=group_lambda, names=names, layer_ids=layer_ids, top_k=top_k,
                   heldout_repeats=heldout_repeats, layer_heldout=layer_heldout)
    if client is None:
        for aligned in aligned_tasks:
            record(aligned, relevance_of_task(aligned, cfg, device=device, log=log, progress=progress, **options))
    else:
        from .fanout import map_jobs

        remote = located_config(cfg, stores)
        results = map_jobs(client, relevance_job, {a.name: ((remote, a.name), options) for a in aligned_tasks},
                           device=cfg.device)
        failures = in_order(aligned_tasks, _announced(results, progress, "penalised"), record)
        if failures:
            if state is not None:
                for text in failures:
                    state.tasks[text.split(" (", 1)[0]] = "failed"
                state.save(run_dir)
            raise TasksFailed(failed_message(failures, len(aligned_tasks), run_dir, resumable=False))
    return RelevanceRun(run_dir=run_dir, backbones=names, importances=importances, layer_importances=layers,
                        metrics=metrics, fits=fits, warnings=warnings)


def _announced(results: Iterator[tuple[str, Any]], progress: RunProgress | None, what: str) -> Iterator[tuple[str, Any]]:
    """Tell the progress display about each fit finished on the cluster (its steps ran there)."""
    for name, outcome in results:
        if progress and not isinstance(outcome, BaseException):
            fit = outcome.fit if isinstance(outcome, TaskRelevance) else outcome
            label = f"{name}: {what}"
            progress.start(label, steps=fit.metrics["steps"])
            progress.finish(label, summary=f"{100 * fit.metrics['accuracy']:.1f}% on {fit.metrics['n']} {fit.metrics['split']}")
        yield name, outcome


def _config_doc(cfg: ProbeConfig, stores: Sequence[FeatureStore], device: torch.device, *, kind: str,
                group_lambda: float) -> dict[str, Any]:
    doc = run_config(cfg, stores, device=device)
    doc["kind"] = kind
    doc["group_lambda"] = group_lambda
    doc["backbones"] = backbone_names(stores)
    doc["train"] = asdict(cfg.train_config(group_lambda=group_lambda))
    doc["relevance_protocol"] = RELEVANCE_PROTOCOL
    doc["relevance_steps"] = relevance_config(cfg).total_steps
    doc["tasks"] = {}
    doc["warnings"] = []
    return doc


def _warnings_md(warnings: Sequence[str]) -> str:
    if not warnings:
        return ""
    return "\n## Warnings\n\n" + "".join(f"- {w}\n" for w in warnings)


def run_relevance(cfg: ProbeConfig, *, group_lambda: float = DEFAULT_LAMBDA, log: Log = None,
                  run_dir: Path | None = None, heldout_repeats: int = HELDOUT_REPEATS,
                  layer_heldout: bool = False, progress: RunProgress | None = None, client: Any = None) -> RelevanceRun:
    """Train ComBo once per task with the group penalty on the dev protocol's training split and write
    relevance.csv (s_k and the held-out drop), layer_relevance.csv and the penalised model's metrics.csv on
    the held-out split (kind "relevance" in config.json). The test split is never read. ``layer_heldout`` adds
    each layer's held-out drop to layer_relevance.csv (one evaluation per layer of every backbone). ``client`` (a
    connected `distributed.Client`) trains the tasks on its workers (probe/fanout.py); the folder is the same."""
    if group_lambda < 0:
        raise ValueError(f"--lambda must be >= 0, got {group_lambda}")
    device, stores, aligned_tasks = _open(cfg)
    names = backbone_names(stores)
    run_dir = run_dir or new_run_dir(cfg.out, "relevance-" + "+".join(names))
    doc = _config_doc(cfg, stores, device, kind="relevance", group_lambda=group_lambda)
    write_json(run_dir / "config.json", doc)
    state = new_state([a.name for a in aligned_tasks], options={})  # an interrupted run must not look finished
    state.save(run_dir)
    if progress:
        progress.plan(len(aligned_tasks))
    run = _relevance_pass(cfg, stores=stores, aligned_tasks=aligned_tasks, device=device, group_lambda=group_lambda,
                          run_dir=run_dir, config_doc=doc, metrics_stem="metrics", weights_prefix="", log=log,
                          heldout_repeats=heldout_repeats, layer_heldout=layer_heldout, progress=progress, state=state,
                          client=client)
    title = (f"ComBo with group penalty (lambda={group_lambda:g}) on {' + '.join(names)} ({stores_dataset(stores)}, "
             f"protocol {RELEVANCE_PROTOCOL}: held-out accuracy)")
    text = markdown_table(run.metrics, title=title, vtab=_is_vtab(stores, run.metrics)) + _warnings_md(run.warnings)
    (run_dir / "results.md").write_text(text)
    state.complete = True
    state.save(run_dir)
    return run


def run_select(cfg: ProbeConfig, *, select: str | Selection, group_lambda: float = DEFAULT_LAMBDA, log: Log = None,
               run_dir: Path | None = None, heldout_repeats: int = HELDOUT_REPEATS,
               layer_heldout: bool = False, progress: RunProgress | None = None, client: Any = None) -> SelectRun:
    """Relevance run, then per task keep the backbones ``select`` names and retrain ComBo on them without the
    penalty. ``select``: "top-K" (e.g. "top-2") or a threshold on normalised importance ("0.2", "ge0.2", ">=0.2").

    The run folder (kind "select") holds relevance.csv / layer_relevance.csv, penalised_metrics.csv (the
    penalised model on all backbones), selection.csv (what was kept), metrics.csv (the retrained subset) and
    comparison.csv (both accuracies per task).
    """
    selection = parse_select(select) if isinstance(select, str) else select
    if group_lambda <= 0:
        raise ValueError(f"--select needs a relevance run with --lambda > 0, got {group_lambda}")
    device, stores, aligned_tasks = _open(cfg)
    if selection.top_k is not None and selection.top_k > len(stores):
        raise SelectionError(f"--select top-{selection.top_k}: only {len(stores)} store(s) in --stores")
    names = backbone_names(stores)
    run_dir = run_dir or new_run_dir(cfg.out, f"select-{selection.describe().replace(' ', '')}-" + "+".join(names))
    doc = _config_doc(cfg, stores, device, kind="select", group_lambda=group_lambda)
    doc["select"] = {"text": str(select) if isinstance(select, str) else selection.describe(), **asdict(selection)}
    doc["selection"] = {}
    write_json(run_dir / "config.json", doc)
    state = new_state([a.name for a in aligned_tasks], options={})  # a task is done once retrained
    state.save(run_dir)
    if progress:
        progress.plan(2 * len(aligned_tasks))  # the penalised pass, then the retraining per task
    relevance = _relevance_pass(cfg, stores=stores, aligned_tasks=aligned_tasks, device=device,
                                group_lambda=group_lambda, run_dir=run_dir, config_doc=doc,
                                metrics_stem="penalised_metrics", weights_prefix="penalised-", log=log,
                                top_k=selection.top_k or 1, heldout_repeats=heldout_repeats,
                                layer_heldout=layer_heldout, progress=progress, client=client)
    chosen: dict[str, list[str]] = {}
    selection_rows: list[dict[str, Any]] = []
    metrics: list[dict[str, Any]] = []
    comparison: list[dict[str, Any]] = []
    fits: list[TaskFit] = []
    penalised = {m["task"]: m for m in relevance.metrics}
    subsets: dict[str, tuple[list[int], ProbeConfig, AlignedTask]] = {}
    for aligned in aligned_tasks:
        rows = [r for r in relevance.importances if r["task"] == aligned.name]
        keep = choose_backbones(rows, selection)
        chosen[aligned.name] = [names[k] for k in keep]
        selection_rows += selection_table(aligned.name, rows, keep, by=selection.by)
        subsets[aligned.name] = (keep, replace(cfg, stores=tuple(cfg.stores[k] for k in keep), group_lambda=0.0),
                                 align_tasks([stores[k] for k in keep], aligned.name))

    def record(aligned: AlignedTask, fit: TaskFit) -> None:
        keep, _, subset = subsets[aligned.name]
        kept_names = chosen[aligned.name]
        save_fit(run_dir, fit, subset)
        metrics.append({**fit.metrics, "backbones": "+".join(kept_names), "num_backbones": len(keep)})
        comparison.append({
            "task": aligned.name, "group": fit.metrics.get("group"), "backbones_all": "+".join(names),
            "accuracy_penalised_all": penalised[aligned.name]["accuracy"],
            "split_penalised_all": penalised[aligned.name]["split"], "backbones_selected": "+".join(kept_names),
            "accuracy_selected": fit.metrics["accuracy"], "split_selected": fit.metrics["split"],
        })
        fits.append(fit)
        doc["selection"][aligned.name] = kept_names
        doc["tasks"][aligned.name]["selected_model"] = fit.model_config
        write_json(run_dir / "config.json", doc)
        write_table(selection_rows, run_dir / "selection")
        write_table(metrics, run_dir / "metrics")
        write_table(comparison, run_dir / "comparison")
        state.tasks[aligned.name] = DONE
        state.save(run_dir)

    if client is None:
        for aligned in aligned_tasks:
            _, subset_cfg, subset = subsets[aligned.name]
            kept_names = chosen[aligned.name]
            if log:
                log(f"{aligned.name}: retraining without the penalty on {', '.join(kept_names)} ({selection.describe()})")
            record(aligned, fit_task(subset, subset_cfg, device=device, group_lambda=0.0, log=log, progress=progress,
                                     label=f"{aligned.name}: retrain on {'+'.join(kept_names)}"))
    else:
        from .fanout import map_jobs

        calls = {a.name: ((located_config(subsets[a.name][1], [stores[k] for k in subsets[a.name][0]]), a.name),
                          {"group_lambda": 0.0}) for a in aligned_tasks}
        results = _announced(map_jobs(client, fit_job, calls, device=cfg.device), progress, "retrain")
        failures = in_order(aligned_tasks, results, record)
        if failures:
            for text in failures:
                state.tasks[text.split(" (", 1)[0]] = "failed"
            state.save(run_dir)
            raise TasksFailed(failed_message(failures, len(aligned_tasks), run_dir, resumable=False))
    vtab = _is_vtab(stores, metrics)
    title = f"ComBo on the backbones chosen by relevance ({selection.describe()}) ({stores_dataset(stores)}, protocol {cfg.protocol})"
    text = markdown_table(metrics, title=title, vtab=vtab)
    text += "\n" + markdown_table(relevance.metrics, title=f"Penalised ComBo on all of {' + '.join(names)} (lambda={group_lambda:g}; protocol {RELEVANCE_PROTOCOL}: held-out accuracy)", vtab=vtab)
    (run_dir / "results.md").write_text(text + _warnings_md(relevance.warnings))
    state.complete = True
    state.save(run_dir)
    return SelectRun(run_dir=run_dir, relevance=relevance, selection=selection, chosen=chosen, metrics=metrics, fits=fits)


def _is_vtab(stores: Sequence[FeatureStore], rows: Sequence[dict[str, Any]]) -> bool:
    """VTAB when the stores say so (not the --dataset default, which only resolves short names)."""
    return stores_dataset(stores) == "vtab" or any(r.get("group") for r in rows)
