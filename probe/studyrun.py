"""`combo study`'s run folder: one study (probe/study.py) per task, written, resumed and fanned out.

The folder (kind "study"): study.csv (one row per task and head), relevance.csv, layer_relevance.csv,
penalised_metrics.csv, selection.csv, io.csv, results.md, config.json, state.json, and heads/<head>/, a probe
(or, for the selection, a select) run folder per head with its weights and predictions, which `combo predict`
reads. fits/<task>/ keeps each trained fit of an unfinished task, so an interrupted study resumes without
retraining it; a finished task is not read again.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from store_schema import FeatureStore

from .progress import RunProgress
from .relevance import (SelectionError, TaskRelevance, _layer_ids, backbone_names, in_order, relevance_config,
                        selection_table)
from .results import GROUP_ORDER, VTAB_GROUPS, new_run_dir, write_json, write_table
from .run import (ProbeConfig, RunInterrupted, TaskFit, TasksFailed, build_model, failed_message, located_config,
                  run_config, save_fit, stores_dataset, task_splits, weights_of)
from .runstate import DONE, check_out_folder, new_state, open_resumed
from .stores import AlignedTask, align_tasks, common_tasks, open_stores
from .studyreport import heads_grid, markdown_grid
from .study import RELEVANCE, Head, Log, StudyConfig, TaskStudy, _head_config, plan_heads, study_job, study_task
from .heldsplit import subset_task
from .train import pick_device

__all__ = ["StudyRun", "results_markdown", "run_study"]

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
    done = set(done)
    return [r for r in pq.read_table(path).to_pylist() if r.get("task") in done]


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
        save_file(weights_of(model), str(self.folder / weights))
        write_json(self.index, doc)

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _head_folder_config(cfg: StudyConfig, head: Head, stores: Sequence[FeatureStore], names: Sequence[str],
                        device: torch.device) -> dict[str, Any]:
    """config.json of heads/<head>/: a probe run folder (a select one for the selection, whose stores vary
    by task), so `combo predict` and `combo report` read it as they read those."""
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
            hdoc = head_docs.get(head.column) or (json.loads(path.read_text()) if path.is_file()  # a resumed study's
                                                  else _head_folder_config(cfg, head, stores, names, device))
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
            save_file(weights_of(rel.fit.model),
                      str(run_dir / f"penalised-adapter-{task}.safetensors"),
                      metadata={"task": task, "config": json.dumps(rel.fit.model_config)})
            tables["selection"] += selection_table(task, rel.rows, result.kept, by=cfg.by)
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
        _mark_running(state, run_dir, "interrupted")
        raise RunInterrupted(run_dir, len(state.done), len(planned)) from None
    except BaseException:
        _mark_running(state, run_dir, "failed")
        raise
    (run_dir / "results.md").write_text(results_markdown(tables["study"], title=study_title(names, stores, probe),
                                                         warnings=doc.get("warnings", [])))
    state.complete = True
    state.save(run_dir)
    return StudyRun(run_dir=run_dir, backbones=names, rows=tables["study"], io=tables["io"],
                    importances=tables["relevance"], selection=dict(doc["selection"]),
                    warnings=list(doc.get("warnings", [])), resumed=resumed)


def _mark_running(state: Any, run_dir: Path, as_: str) -> None:
    """The tasks still running when a study stops, marked so (best effort: a full disk may refuse this too)."""
    for name, value in state.tasks.items():
        if value == "running":
            state.tasks[name] = as_
    try:
        state.save(run_dir)
    except OSError:
        pass


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
    """Accuracy per task with the heads as columns, then the group means and the overall score for VTAB (the
    table `combo report` puts in report.md)."""
    vtab = any((r.get("group") or "") in GROUP_ORDER for r in rows)
    lines = [f"# {title}", "", *markdown_grid(*heads_grid(rows, vtab=vtab, partial=False))]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"
