"""`combo study`: the paper's whole per-task study in one call, reading each split of each store once.

Per task: relevance (ComBo with the group penalty on the dev protocol's training split, s_k and the held-out
drop on its held-out split, as `combo relevance`), the selection it implies, then the final fits: ComBo on
all stores, on the selected ones, on each store alone, and the linear probe on each store, each trained on
the protocol's training split and measured on its evaluation split.

Reading: the rows every fit trains or is measured on before the test split (VTAB: train800val200, which
holds train800 and val200) are read once into RAM (`probe.heldsplit`) when they fit --cache-budget, and
every fit is served from there; where they do not fit, each fit streams them as `combo probe` does. The
evaluation split is streamed once: every trained head is evaluated on each batch as it arrives, taking
its stores' (and, for the linear probe, its layer's) part of the batch (`train.predict_heads`). Each
store's reader counts the bytes it returns, and io.csv records them per task, store and split.

Results equal the separate commands': a head is seeded, initialised, fed and evaluated exactly as
`combo probe` with the same options on those stores would be (tests/test_study.py checks three). The
conditions: the stores hold their samples in the same order (stores extracted from the same dataset
folder do), and every store holds every sample; otherwise a head on a subset of stores trains on that
subset's samples while every head is tested on the samples valid in all stores, so that the heads'
comparisons are paired.

The run folder (kind "study"): study.csv (one row per task and head), relevance.csv, layer_relevance.csv,
penalised_metrics.csv, selection.csv, io.csv, results.md, config.json, state.json, and heads/<head>/, a
probe (or, for the selection, a select) run folder per head with its weights and predictions, which
`combo predict` reads. fits/<task>/ keeps each trained fit of an unfinished task, so an interrupted study
resumes without retraining it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from store_schema import FeatureStore

from .data import CachePlan, SplitSource, eval_batches
from .heldout import HELDOUT_REPEATS
from .heldsplit import hold_rows, subset_task
from .progress import RunProgress
from .relevance import (DEFAULT_LAMBDA, Selection, SelectionError, TaskRelevance, _layer_ids, backbone_names,
                        check_measure, choose_backbones, in_order, parse_select, relevance_config, relevance_of_task)
from .results import GROUP_ORDER, VTAB_GROUPS, group_means, new_run_dir, write_json, write_table
from .run import (ProbeConfig, RunInterrupted, TaskFit, TasksFailed, TrainedModel, build_model, failed_message,
                  fit_metrics, located_config, model_and_prepare, resume_options, run_config, save_fit, sources_for,
                  stores_dataset, task_splits, train_task)
from .runstate import DONE, check_out_folder, new_state, open_resumed
from .stores import AlignedTask, align_tasks, common_tasks, open_stores
from .train import pick_device, predict_heads

__all__ = ["HEAD_FAMILIES", "Head", "StudyConfig", "StudyRun", "TaskStudy", "plan_heads", "run_study", "study_task"]

HEAD_FAMILIES = ("combo", "select", "single", "linear")
RELEVANCE = "relevance"  # the fit id of the penalised pass
Log = Callable[[str], None] | None


@dataclass(frozen=True)
class StudyConfig:
    """A study: probe's training options (``probe``), the selection rule and measure, and the heads to fit."""

    probe: ProbeConfig
    select: str = "top-2"
    by: str = "heldout"  # the held-out drop; "norm" (the paper's s_k) reproduces the paper
    heads: tuple[str, ...] = HEAD_FAMILIES
    group_lambda: float = DEFAULT_LAMBDA
    heldout_repeats: int = HELDOUT_REPEATS

    def __post_init__(self) -> None:
        heads = (self.heads,) if isinstance(self.heads, str) else tuple(self.heads)
        object.__setattr__(self, "heads", heads)
        unknown = [h for h in heads if h not in HEAD_FAMILIES]
        if unknown or not heads:
            raise ValueError(f"--heads {','.join(heads)}: choose from {', '.join(HEAD_FAMILIES)}")
        if self.probe.method != "combo":
            raise ValueError("a study trains ComBo and linear heads itself; --method is not one of its options")
        if self.group_lambda <= 0:
            raise ValueError(f"--lambda must be > 0 for the relevance pass, got {self.group_lambda}")
        if self.heldout_repeats < 1:
            raise ValueError(f"held-out repeats must be >= 1, got {self.heldout_repeats}")
        check_measure(self.by)
        self.selection  # noqa: B018 - bad --select syntax fails here, before anything is opened

    @property
    def selection(self) -> Selection:
        return parse_select(self.select, by=self.by)

    def options(self) -> dict[str, Any]:
        """What decides a study's results (a resumed study must be given the same)."""
        return {**resume_options(self.probe), "select": self.select, "by": self.by, "heads": list(self.heads),
                "study_lambda": self.group_lambda, "heldout_repeats": self.heldout_repeats}


# ------------------------------------------------------------------------------------------------------ heads


@dataclass(frozen=True)
class Head:
    """One final fit of a task: ``method`` on stores ``keep`` (indices into --stores)."""

    family: str  # combo | select | single | linear
    method: str  # combo | linear
    keep: tuple[int, ...]
    name: str  # as study.csv shows it: combo[a+b+c], combo[top-2: b+c], combo[a], linear[a]
    column: str  # the same for every task (the selection's stores vary): combo[top-2]

    @property
    def fit_id(self) -> str:
        """Heads with the same method and stores are one fit (e.g. top-2 of two stores is ComBo on both)."""
        return f"{self.method}:{'+'.join(str(k) for k in self.keep)}"

    @property
    def folder(self) -> str:
        return "heads/" + re.sub(r"[^A-Za-z0-9_.+-]+", "-", self.column.replace("[", "-").rstrip("]")).strip("-")


def _rule(selection: Selection) -> str:
    return f"top-{selection.top_k}" if selection.top_k is not None else f">={selection.threshold:g}"


def plan_heads(names: Sequence[str], families: Sequence[str], selection: Selection, kept: Sequence[int]) -> list[Head]:
    """The task's heads in the order study.csv lists them. With one store there is nothing to select, and the
    store alone is ComBo on all stores: those heads are left out."""
    every = tuple(range(len(names)))
    if len(names) == 1:
        families = [f for f in families if f not in ("select", "single")] or ["combo"]
    heads: list[Head] = []
    if "combo" in families:
        label = f"combo[{'+'.join(names)}]"
        heads.append(Head("combo", "combo", every, label, label))
    if "select" in families:
        chosen = "+".join(names[k] for k in kept)
        heads.append(Head("select", "combo", tuple(int(k) for k in kept), f"combo[{_rule(selection)}: {chosen}]",
                          f"combo[{_rule(selection)}]"))
    for family, method in (("single", "combo"), ("linear", "linear")):
        if family in families:
            heads += [Head(family, method, (k,), f"{method}[{n}]", f"{method}[{n}]") for k, n in enumerate(names)]
    return heads


# ------------------------------------------------------------------------------------------------- one task


@dataclass
class TaskStudy:
    """One task's study: the relevance pass, the selection, and every head's fit and predictions."""

    task: str
    relevance: TaskRelevance | None
    kept: list[int]
    heads: list[Head]
    trained: dict[str, TrainedModel]  # fit id -> trained model
    metrics: dict[str, dict[str, Any]]  # fit id -> its metrics row (probe's metrics.csv columns)
    predictions: dict[str, np.ndarray]  # fit id -> predicted class per evaluation row
    eval_rows: np.ndarray
    io: list[dict[str, Any]]
    held: str = ""  # how the training rows were read (for the log and config.json)


def _row_bytes(part: Any) -> int:
    """Bytes of one stored sample of a task (every layer; every array of a compact encoding)."""
    arrays = part.encoded if part.compact is not None else [part.tokens]
    return int(sum(np.prod(a.shape[1:]) * a.dtype.itemsize for a in arrays))


def _head_config(cfg: StudyConfig, head: Head) -> ProbeConfig:
    return replace(cfg.probe, method=head.method, stores=tuple(cfg.probe.stores[k] for k in head.keep),
                   group_lambda=0.0, pool="mean")


def _restore(sub: AlignedTask, hcfg: ProbeConfig, saved: dict[str, Any]) -> TrainedModel:
    """A fit trained before an interruption: its model rebuilt from the saved config and weights."""
    train_split, eval_split, train_rows, eval_rows = task_splits(sub, hcfg)
    kind, model_config, model, prepare = model_and_prepare(sub, sources_for(sub, train_rows, hcfg.method), hcfg)
    model.load_state_dict(saved["state_dict"])
    train = saved["train"]
    plan = CachePlan(mode=str(train.get("cache", "")), window_rows=train.get("shuffle_window"), split_bytes=0)
    history = {"loss": [float(train["final_loss"])], "seconds": float(train["train_seconds"])}
    return TrainedModel(sub.name, kind, model, {"kind": kind, **model_config}, prepare, history, plan, train_split,
                        eval_split, train_rows, eval_rows, started=time.perf_counter())


def _counts(aligned: AlignedTask) -> list[int]:
    return [int(getattr(p, "bytes_read", 0)) for p in aligned.parts]


def study_task(aligned: AlignedTask, cfg: StudyConfig, *, names: Sequence[str], layer_ids: Sequence[Sequence[int]],
               device: torch.device, finished: dict[str, Any] | None = None,
               on_trained: Callable[[str, Any], None] | None = None, log: Log = None,
               progress: RunProgress | None = None) -> TaskStudy:
    """Relevance, selection and every head of one task; ``finished`` (fit id -> saved fit) are not retrained,
    ``on_trained(fit_id, fit)`` hears each new fit as soon as it is trained (to save it)."""
    finished = dict(finished or {})
    probe = cfg.probe
    final_cfg = replace(probe, group_lambda=0.0)
    train_split, eval_split, train_rows, eval_rows = task_splits(aligned, final_cfg)
    selection = cfg.selection
    with_relevance = len(aligned.parts) > 1
    rel_cfg = relevance_config(probe)
    need = [train_rows]
    label = train_split
    if with_relevance and RELEVANCE not in finished:
        _, dev_eval, dev_train_rows, dev_eval_rows = task_splits(aligned, rel_cfg)
        extra = np.setdiff1d(np.union1d(dev_train_rows, dev_eval_rows), train_rows)
        if extra.size:
            need.append(extra)
            label = f"{train_split}+{rel_cfg.protocol}"

    # the heads follow from the selection, which follows from relevance
    def heads_for(kept: Sequence[int]) -> list[Head]:
        return plan_heads(names, cfg.heads, selection, kept)

    rel_saved = finished.get(RELEVANCE)
    kept0 = rel_saved["kept"] if rel_saved else list(range(len(aligned.parts)))
    todo_known = not with_relevance or rel_saved is not None
    pending = [h for h in heads_for(kept0) if h.fit_id not in finished] if todo_known else ["relevance"]
    io: list[dict[str, Any]] = []
    held_task, held_note = aligned, "nothing left to train"
    before = _counts(aligned)
    if pending:
        rows = np.unique(np.concatenate(need))
        per_row = [_row_bytes(p) for p in aligned.parts]
        total = rows.size * sum(per_row)
        if total <= probe.cache_budget:
            held_task = hold_rows(aligned, rows)
            held_note = (f"{rows.size} {label} rows ({total / 2**20:.1f} MiB) read once into RAM for every fit")
        else:
            held_note = (f"{label} ({total / 2**20:.1f} MiB) does not fit --cache-budget "
                         f"({probe.cache_budget / 2**20:.1f} MiB): each fit streams it")
        if log:
            log(f"{aligned.name}: {held_note}")
    relevance: TaskRelevance | None = None
    if with_relevance:
        if rel_saved is None:
            relevance = relevance_of_task(held_task, rel_cfg, device=device, group_lambda=cfg.group_lambda, names=names,
                                          layer_ids=layer_ids, top_k=selection.top_k or 1,
                                          heldout_repeats=cfg.heldout_repeats, log=log, progress=progress)
            relevance.fit.source = relevance.fit.prepare = None  # the held rows go with the task, not with the result
            kept = choose_backbones(relevance.rows, selection)
            if on_trained:
                on_trained(RELEVANCE, {"relevance": relevance, "kept": kept})
        else:
            relevance = rel_saved["relevance"]
            kept = list(rel_saved["kept"])
    else:
        kept = [0]
    heads = heads_for(kept)
    trained: dict[str, TrainedModel] = {}
    for head in heads:
        if head.fit_id in trained:
            continue
        sub = subset_task(held_task, head.keep)
        hcfg = _head_config(cfg, head)
        if head.fit_id in finished:
            trained[head.fit_id] = _restore(sub, hcfg, finished[head.fit_id])
            continue
        fit_label = f"{aligned.name}: {head.name}"
        model = train_task(sub, hcfg, device=device, log=log, progress=progress, label=fit_label)
        if progress:
            progress.finish(fit_label, summary=f"trained; evaluated with the other heads on {eval_split}")
        trained[head.fit_id] = model
        if on_trained:
            on_trained(head.fit_id, model)
    if pending:
        after = _counts(aligned)
        io += [{"task": aligned.name, "store": names[k], "split": label, "bytes_read": after[k] - before[k],
                "bytes_stored": int(np.unique(np.concatenate(need)).size * _row_bytes(p))}
               for k, p in enumerate(aligned.parts)]
    del held_task  # the held rows are not needed to evaluate
    # the evaluation split, streamed once for every head
    source = SplitSource(aligned, eval_rows)
    offsets = np.cumsum([0] + [source.arrays_of(k) for k in range(len(aligned.parts))])
    fits = [(fid, next(h for h in heads if h.fit_id == fid)) for fid in trained]

    def view_of(head: Head) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
        last = head.method == "linear"

        def view(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            out = []
            for k in head.keep:
                for t in features[offsets[k]:offsets[k + 1]]:
                    out.append(t[:, -1:].contiguous() if last else t)
            return out

        return view

    before = _counts(aligned)
    if log:
        log(f"{aligned.name}: evaluating {len(fits)} fit(s) of {len(heads)} head(s) on one pass over {eval_rows.size} "
            f"{eval_split} rows")
    preds, labels = predict_heads([(trained[fid].model, trained[fid].prepare, view_of(h)) for fid, h in fits],
                                  eval_batches(source, batch_size=probe.eval_batch_size), device=device)
    after = _counts(aligned)
    io += [{"task": aligned.name, "store": names[k], "split": eval_split, "bytes_read": after[k] - before[k],
            "bytes_stored": int(eval_rows.size * _row_bytes(p))} for k, p in enumerate(aligned.parts)]
    predictions: dict[str, np.ndarray] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for (fid, head), p in zip(fits, preds):
        predictions[fid] = p
        accuracy = float((p == labels).mean())
        metrics[fid] = fit_metrics(subset_task(aligned, head.keep), _head_config(cfg, head), trained[fid],
                                   accuracy=accuracy, n=int(labels.size))
    return TaskStudy(aligned.name, relevance, kept, heads, trained, metrics, predictions, eval_rows, io, held=held_note)


def study_job(cfg: StudyConfig, task: str, *, device: torch.device, names: Sequence[str],
              layer_ids: Sequence[Sequence[int]], finished: dict[str, Any] | None = None) -> TaskStudy:
    """`study_task` on a dask worker (probe/fanout.py): the task's fits stay together, as they share its rows."""
    from .fanout import aligned_task

    result = study_task(aligned_task(cfg.probe, task), cfg, names=names, layer_ids=layer_ids, device=device,
                        finished=finished)
    for model in result.trained.values():
        model.model.to("cpu")
        model.prepare = None  # closures over the worker's store handles stay there
    if result.relevance is not None:
        result.relevance.fit.model.to("cpu")
    return result


# -------------------------------------------------------------------------------------------------- folder


@dataclass
class StudyRun:
    run_dir: Path
    backbones: list[str]
    rows: list[dict[str, Any]]  # study.csv
    io: list[dict[str, Any]]  # io.csv
    importances: list[dict[str, Any]]  # relevance.csv
    selection: dict[str, list[str]]  # task -> kept backbones
    warnings: list[str] = field(default_factory=list)
    resumed: int = 0


TABLES = ("study", "relevance", "layer_relevance", "penalised_metrics", "selection", "io")


def _read_table(run_dir: Path, stem: str, done: Sequence[str]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = run_dir / f"{stem}.parquet"
    if not path.is_file():
        return []
    return [r for r in pq.read_table(path).to_pylist() if r.get("task") in set(done)]


class _Checkpoint:
    """fits/<task>/: each fit of an unfinished task, written as soon as it is trained, so a resumed study
    loads it instead of training it again (removed once the task is recorded)."""

    def __init__(self, run_dir: Path, task: str):
        self.folder = run_dir / "fits" / task
        self.index = self.folder / "trained.json"

    def load(self) -> dict[str, Any]:
        if not self.index.is_file():
            return {}
        doc = json.loads(self.index.read_text())
        out: dict[str, Any] = {}
        for fid, entry in doc.items():
            if fid == RELEVANCE:
                model = build_model("combo", entry["model_config"])
                model.load_state_dict(load_file(str(self.folder / entry["weights"])))
                fit = TaskFit(entry["task"], model, entry["model_config"], entry["metrics"],
                              np.asarray(entry["predictions"]), np.asarray(entry["eval_rows"]), {})
                relevance = TaskRelevance(fit, entry["rows"], entry["layer_rows"], entry["metrics"], entry["warnings"])
                out[fid] = {"relevance": relevance, "kept": entry["kept"]}
            else:
                out[fid] = {"state_dict": load_file(str(self.folder / entry["weights"])), "train": entry["train"]}
        return out

    def save(self, fid: str, fit: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        doc = json.loads(self.index.read_text()) if self.index.is_file() else {}
        weights = re.sub(r"[^A-Za-z0-9_.+-]+", "-", fid) + ".safetensors"
        if fid == RELEVANCE:
            rel: TaskRelevance = fit["relevance"]
            model = rel.fit.model
            doc[fid] = {"task": rel.fit.task, "model_config": rel.fit.model_config, "metrics": rel.metrics,
                        "predictions": rel.fit.predictions.tolist(), "eval_rows": rel.fit.eval_rows.tolist(),
                        "rows": rel.rows, "layer_rows": rel.layer_rows, "warnings": rel.warnings,
                        "kept": [int(k) for k in fit["kept"]], "weights": weights}
        else:
            model = fit.model
            plan = fit.plan
            doc[fid] = {"weights": weights, "model_config": fit.model_config,
                        "train": {"final_loss": float(fit.history["loss"][-1]),
                                  "train_seconds": round(float(fit.history["seconds"]), 3),
                                  "cache": plan.mode if plan else "", "shuffle_window": plan.window_rows if plan else None}}
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(self.folder / weights))
        write_json(self.index, doc)

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _head_folder_config(cfg: StudyConfig, head: Head, stores: Sequence[FeatureStore], names: Sequence[str],
                        device: torch.device, previous: dict[str, Any] | None) -> dict[str, Any]:
    """config.json of heads/<head>/: a probe run folder (a select one for the selection, whose stores vary
    by task), so `combo predict` and `combo report` read it as they read those."""
    if previous is not None:
        return previous
    if head.family == "select":
        doc = run_config(replace(cfg.probe, group_lambda=0.0), stores, device=device)
        doc.update(kind="select", backbones=list(names), selection={}, group_lambda=cfg.group_lambda,
                   select={"text": cfg.select, **asdict(cfg.selection)})
    else:
        hcfg = _head_config(cfg, head)
        doc = run_config(hcfg, [stores[k] for k in head.keep], device=device)
        doc["kind"] = "probe"
    doc.update(tasks={}, study_head=head.column)
    return doc


def run_study(cfg: StudyConfig, *, log: Log = None, run_dir: Path | None = None, progress: RunProgress | None = None,
              resume: str | os.PathLike | None = None, client: Any = None) -> StudyRun:
    """Run the study on every requested task; write (or, with ``resume``, finish) the run folder. ``client`` (a
    connected `distributed.Client`) studies the tasks on its workers, one dask task per task."""
    probe = cfg.probe
    if resume is None:
        check_out_folder(run_dir.parent if run_dir is not None else probe.out)
    device = pick_device(probe.device)
    stores = open_stores(probe.stores, store_root=probe.store_root, dataset=probe.dataset,
                         storage_options=probe.storage_options)
    selection = cfg.selection
    if len(stores) > 1 and selection.top_k is not None and selection.top_k > len(stores):
        raise SelectionError(f"--select top-{selection.top_k}: only {len(stores)} store(s) in --stores")
    tasks = common_tasks(stores, probe.tasks)
    aligned_tasks = [align_tasks(stores, t) for t in tasks]  # every task checked before anything trains
    for aligned in aligned_tasks:
        task_splits(aligned, probe)
        if len(stores) > 1:
            task_splits(aligned, relevance_config(probe))
    names = backbone_names(stores)
    layer_ids = [_layer_ids(s) for s in stores]
    planned = [a.name for a in aligned_tasks]
    if resume is not None:
        run_dir = Path(resume)
        state, doc = open_resumed(run_dir, cfg.options(), planned)
    else:
        run_dir = run_dir or new_run_dir(probe.out, "study-" + "+".join(names))
        state = new_state(planned, cfg.options())
        state.save(run_dir)
        doc = run_config(probe, stores, device=device)
        doc.update(kind="study", backbones=names, group_lambda=cfg.group_lambda, heads=list(cfg.heads),
                   select={"text": cfg.select, **asdict(selection)}, relevance_protocol=relevance_config(probe).protocol,
                   relevance_steps=relevance_config(probe).total_steps, heldout_repeats=cfg.heldout_repeats,
                   selection={}, warnings=[], tasks={}, held={})
        write_json(run_dir / "config.json", doc)
    tables = {stem: _read_table(run_dir, stem, state.done) for stem in TABLES}
    resumed = len(state.done)
    todo = [a for a in aligned_tasks if a.name not in state.done]
    if progress:
        per_task = (len(stores) > 1) + len(plan_heads(names, cfg.heads, selection, list(range(min(2, len(stores))))))
        progress.plan(per_task * len(todo))
    head_docs: dict[str, dict[str, Any]] = {}

    def record(aligned: AlignedTask, result: TaskStudy) -> None:
        """The folder after one more finished task (heads, tables, config, state), then its checkpoint goes."""
        task = aligned.name
        group = aligned.reference.attrs.get("group") or VTAB_GROUPS.get(task)
        for head in result.heads:
            folder = run_dir / head.folder
            folder.mkdir(parents=True, exist_ok=True)
            fid = head.fit_id
            model, metrics = result.trained[fid], result.metrics[fid]
            fit = TaskFit(task, model.model, model.model_config, metrics, result.predictions[fid], result.eval_rows,
                          model.history)
            save_fit(folder, fit, aligned)
            path = folder / "config.json"
            hdoc = head_docs.get(head.column) or _head_folder_config(
                cfg, head, stores, names, device, json.loads(path.read_text()) if path.is_file() else None)
            entry = {"model": model.model_config, "classes": aligned.classes,
                     "grids": [list(g) for g in subset_task(aligned, head.keep).grids]}
            if head.family == "select":
                entry["selected_model"] = model.model_config
                hdoc["selection"][task] = [names[k] for k in head.keep]
            hdoc["tasks"][task] = entry
            head_docs[head.column] = hdoc
            write_json(path, hdoc)
            head_rows = [r for r in tables["study"] if r["column"] == head.column and r["task"] != task]
            row = {"task": task, "group": group, "head": head.name, "column": head.column, "family": head.family,
                   "method": head.method, "stores": "+".join(names[k] for k in head.keep),
                   "grid": metrics.get("grid", ""), "split": metrics["split"], "n": metrics["n"],
                   "accuracy": metrics["accuracy"], "folder": head.folder, "train_split": metrics["train_split"],
                   "n_train": metrics["n_train"], "steps": metrics["steps"], "final_loss": metrics["final_loss"],
                   "train_seconds": metrics["train_seconds"], "seconds": metrics["seconds"], "cache": metrics["cache"]}
            tables["study"].append(row)
            write_table([{**r, "backbones": r["stores"]} for r in head_rows + [row]], folder / "metrics")
        if result.relevance is not None:
            rel = result.relevance
            tables["relevance"] += rel.rows
            tables["layer_relevance"] += rel.layer_rows
            tables["penalised_metrics"].append(rel.metrics)
            save_file({k: v.detach().cpu().contiguous() for k, v in rel.fit.model.state_dict().items()},
                      str(run_dir / f"penalised-adapter-{task}.safetensors"),
                      metadata={"task": task, "config": json.dumps(rel.fit.model_config)})
            for r in rel.rows:
                tables["selection"].append({"task": task, "backbone": r["backbone"], "store_index": r["store_index"],
                                            "importance_normalised": r["importance_normalised"], "rank": r["rank"],
                                            "heldout_drop": r.get("heldout_drop"), "heldout_rank": r.get("heldout_rank"),
                                            "by": cfg.by, "selected": r["store_index"] in result.kept})
            doc["warnings"] = list(dict.fromkeys([*doc.get("warnings", []), *rel.warnings]))
        tables["io"] += result.io
        for stem in TABLES:
            write_table(tables[stem], run_dir / stem)
        doc["selection"][task] = [names[k] for k in result.kept]
        doc["held"][task] = result.held
        doc["tasks"][task] = {"classes": aligned.classes, "grids": [list(g) for g in aligned.grids]}
        write_json(run_dir / "config.json", doc)
        state.tasks[task] = DONE
        state.save(run_dir)
        _Checkpoint(run_dir, task).remove()
        if log:
            shown = ", ".join(f"{h.name} {100 * result.metrics[h.fit_id]['accuracy']:.1f}%" for h in result.heads)
            log(f"{task}: {shown}")

    try:
        if client is None:
            for aligned in todo:
                state.tasks[aligned.name] = "running"
                state.save(run_dir)
                checkpoint = _Checkpoint(run_dir, aligned.name)
                record(aligned, study_task(aligned, cfg, names=names, layer_ids=layer_ids, device=device,
                                           finished=checkpoint.load(), on_trained=checkpoint.save, log=log,
                                           progress=progress))
        else:
            _study_on_cluster(client, cfg, stores, todo, record, state=state, run_dir=run_dir, names=names,
                              layer_ids=layer_ids)
    except KeyboardInterrupt:
        for name, value in state.tasks.items():
            if value == "running":
                state.tasks[name] = "interrupted"
        try:
            state.save(run_dir)
        except OSError:
            pass
        raise RunInterrupted(run_dir, len(state.done), len(planned)) from None
    except BaseException:
        for name, value in state.tasks.items():
            if value == "running":
                state.tasks[name] = "failed"
        try:
            state.save(run_dir)
        except OSError:
            pass
        raise
    (run_dir / "results.md").write_text(results_markdown(tables["study"], title=study_title(names, stores, probe),
                                                         warnings=doc.get("warnings", [])))
    state.complete = True
    state.save(run_dir)
    return StudyRun(run_dir=run_dir, backbones=names, rows=tables["study"], io=tables["io"],
                    importances=tables["relevance"], selection=dict(doc["selection"]),
                    warnings=list(doc.get("warnings", [])), resumed=resumed)


def _study_on_cluster(client: Any, cfg: StudyConfig, stores: Sequence[FeatureStore], todo: Sequence[AlignedTask],
                      record: Callable[[AlignedTask, TaskStudy], None], *, state: Any, run_dir: Path,
                      names: Sequence[str], layer_ids: Sequence[Sequence[int]]) -> None:
    """One dask task per task (its fits share its held rows); this process writes the folder. Fits a worker
    finished before an interruption are sent to it, so they are not trained again."""
    from .fanout import map_jobs

    remote = replace(cfg, probe=located_config(cfg.probe, stores))
    calls = {a.name: ((remote, a.name), {"names": list(names), "layer_ids": [list(i) for i in layer_ids],
                                         "finished": _Checkpoint(run_dir, a.name).load()}) for a in todo}
    for name in calls:
        state.tasks[name] = "running"
    state.save(run_dir)
    failures = in_order(todo, map_jobs(client, study_job, calls, device=cfg.probe.device), record)
    if failures:
        for text in failures:
            state.tasks[text.split(" (", 1)[0]] = "failed"
        state.save(run_dir)
        raise TasksFailed(failed_message(failures, len(todo), run_dir))


# ------------------------------------------------------------------------------------------------- summary


def study_title(names: Sequence[str], stores: Sequence[FeatureStore], probe: ProbeConfig) -> str:
    return f"Study of {' + '.join(names)} ({stores_dataset(stores)}, protocol {probe.protocol})"


def results_markdown(rows: Sequence[dict[str, Any]], *, title: str, warnings: Sequence[str] = ()) -> str:
    """Accuracy per task with the heads as columns, then the group means and the overall score for VTAB."""
    columns = list(dict.fromkeys(r["column"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cell = {(r["task"], r["column"]): r for r in rows}
    lines = [f"# {title}", "", "| task | group | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for task in tasks:
        group = next((r.get("group") or "" for r in rows if r["task"] == task), "")
        cells = [f"{100 * float(cell[(task, c)]['accuracy']):.1f}" if (task, c) in cell else "-" for c in columns]
        lines.append(f"| {task} | {group} | " + " | ".join(cells) + " |")
    vtab = any((r.get("group") or "") in GROUP_ORDER for r in rows)
    if rows:
        means = []
        for c in columns:
            chosen = [r for r in rows if r["column"] == c]
            if vtab:
                means.append(group_means(chosen)[1])
            else:
                means.append(float(np.mean([float(r["accuracy"]) for r in chosen])))
        label = "Overall (mean of group means)" if vtab else "mean over tasks"
        lines.append(f"| **{label}** | | " + " | ".join("-" if m is None else f"{100 * m:.1f}" for m in means) + " |")
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"
