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

The run folder, resuming and the cluster are probe/studyrun.py's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .data import CachePlan, SplitSource, eval_batches
from .heldout import HELDOUT_REPEATS
from .heldsplit import hold_rows, subset_task
from .progress import RunProgress
from .relevance import (DEFAULT_LAMBDA, Selection, TaskRelevance, check_measure, choose_backbones, parse_select,
                        relevance_config, relevance_of_task)
from .run import (ProbeConfig, TrainedModel, aligned_task, fit_metrics, model_and_prepare, resume_options, sources_for,
                  task_splits, train_task)
from .stores import AlignedTask
from .train import predict_heads

__all__ = ["HEAD_FAMILIES", "Head", "StudyConfig", "TaskStudy", "plan_heads", "study_job", "study_task"]

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


def _per_store(aligned: AlignedTask, of_part: Callable[[int], int]) -> list[int]:
    """A per-part figure summed per store over its parts (a multi-grid store's groups), in --stores order."""
    return [sum(int(of_part(j)) for j in aligned.backbone_parts(k)) for k in range(aligned.num_backbones)]


def _counts(aligned: AlignedTask) -> list[int]:
    """Bytes read so far per store."""
    return _per_store(aligned, lambda j: getattr(aligned.parts[j], "bytes_read", 0))


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
    with_relevance = aligned.num_backbones > 1
    rel_cfg = relevance_config(probe)
    rel_saved = finished.get(RELEVANCE)
    rows, label = train_rows, train_split
    if with_relevance and rel_saved is None:  # the relevance pass trains and is measured on dev rows too
        _, _, dev_train_rows, dev_eval_rows = task_splits(aligned, rel_cfg)
        rows = np.union1d(train_rows, np.union1d(dev_train_rows, dev_eval_rows))
        if rows.size > train_rows.size:
            label = f"{train_split}+{rel_cfg.protocol}"

    # the heads follow from the selection, which follows from relevance
    def heads_for(kept: Sequence[int]) -> list[Head]:
        return plan_heads(names, cfg.heads, selection, kept)

    if with_relevance and rel_saved is None:
        to_train = True
    else:
        kept = rel_saved["kept"] if rel_saved else list(range(aligned.num_backbones))
        to_train = any(h.fit_id not in finished for h in heads_for(kept))
    full = SplitSource(aligned, rows)  # every store, every layer: what holding the rows reads
    per_row = _per_store(aligned, full.store_row_bytes)
    io: list[dict[str, Any]] = []
    held_task, held_note = aligned, "nothing left to train"
    before = _counts(aligned)
    if to_train:
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
    if to_train:
        after = _counts(aligned)
        io += [{"task": aligned.name, "store": names[k], "split": label, "bytes_read": after[k] - before[k],
                "bytes_stored": int(rows.size * per_row[k])} for k in range(aligned.num_backbones)]
    del held_task  # the held rows are not needed to evaluate
    # the evaluation split, streamed once for every head
    source = SplitSource(aligned, eval_rows)
    offsets = np.cumsum([0] + [source.arrays_of(k) for k in range(len(aligned.parts))])
    fits = [(fid, next(h for h in heads if h.fit_id == fid)) for fid in trained]

    def view_of(head: Head) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
        last = head.method == "linear"
        # the linear probe reads each backbone's last part (its deepest stage), ComBo every part
        parts = [j for k in head.keep for j in (aligned.backbone_parts(k)[-1:] if last else aligned.backbone_parts(k))]

        def view(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            out = []
            for j in parts:
                for t in features[offsets[j]:offsets[j + 1]]:
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
            "bytes_stored": int(eval_rows.size * stored)} for k, stored in enumerate(_per_store(aligned, source.store_row_bytes))]
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
    result = study_task(aligned_task(cfg.probe, task), cfg, names=names, layer_ids=layer_ids, device=device,
                        finished=finished)
    for model in result.trained.values():
        model.model.to("cpu")
        model.prepare = None  # closures over the worker's store handles stay there
    if result.relevance is not None:
        result.relevance.fit.model.to("cpu")
    return result
