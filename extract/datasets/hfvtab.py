"""VTAB-1k tasks from Hugging Face datasets, as the paper's authors publish them.

Sources: hub repos (`hf://datasets/ORG/REPO`, resolved in the local hub cache by `hfhub`), a
downloaded repo folder (README.md + data/<split>-*.parquet; inside a hub cache its repo and commit
are known), and a `datasets` `save_to_disk` folder (dataset_dict.json, <split>/data-*.arrow). Each
source is one task with the splits train800, val200, train800val200 and test, an `image` column
(struct {bytes, path} or binary) and a `label` ClassLabel column. The task is named after the repo
(`HF_VTAB_REPOS`: the authors' repo names -> the VTAB folder names), so the VTAB protocols, groups and
tables apply; train800val200's rows are folded onto train800 / val200 by decoded pixels, as for the
folder layout. Sample ids are "<task>/<split>/<row>", the row being the `datasets` index in that split.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

from .common import (
    VTAB_SPLITS,
    ArrowStreamReader,
    DatasetError,
    ParquetReader,
    Sample,
    TaskPlan,
    _vtab_split_plan,
    fold_duplicates,
    read_arrow_table,
    reader_digests,
)
from .hfhub import HubRepo, is_hf_root, repo_of_snapshot, resolve_hf_root
from .parquet import _describe_columns, _hf_class_names, _ParquetPart, _pick_image_column, _read_parquet_part, _split_from_filename
from .vtab import VTAB_NUM_CLASSES, VTAB_TASKS

# The repo names of the authors' upload script (scripts/upload_vtab_to_hf.py of their ComBo code:
# "vtab_" + a short name of each task_adaptation task) -> the task folder names of ../shared/VTAB.md.
# Public: vtab_cifar100, vtab_caltech101, vtab_patch_camelyon; the rest are uploaded by users themselves.
HF_VTAB_REPOS: dict[str, str] = {
    "vtab_caltech101": "caltech101",
    "vtab_cifar100": "cifar",
    "vtab_dtd": "dtd",
    "vtab_flowers102": "oxford_flowers102",
    "vtab_pets": "oxford_iiit_pet",
    "vtab_sun397": "sun397",
    "vtab_svhn": "svhn",
    "vtab_patch_camelyon": "patch_camelyon",
    "vtab_eurosat": "eurosat",
    "vtab_resisc45": "resisc45",
    "vtab_retinopathy": "diabetic_retinopathy",
    "vtab_clevr_count": "clevr_count",
    "vtab_clevr_distance": "clevr_dist",
    "vtab_dmlab": "dmlab",
    "vtab_dsprites_location": "dsprites_loc",
    "vtab_dsprites_orientation": "dsprites_ori",
    "vtab_kitti_distance": "kitti",
    "vtab_smallnorb_azimuth": "smallnorb_azi",
    "vtab_smallnorb_elevation": "smallnorb_ele",
}
_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def hf_task_name(repo_name: str) -> str | None:
    """The VTAB task a repo (or folder) name stands for: the authors' names, a VTAB folder name, or
    "vtab_" + one; None for any other name."""
    if repo_name in HF_VTAB_REPOS:
        return HF_VTAB_REPOS[repo_name]
    if repo_name in VTAB_TASKS:
        return repo_name
    if repo_name.startswith("vtab_") and repo_name[len("vtab_"):] in VTAB_TASKS:
        return repo_name[len("vtab_"):]
    return None


def is_hf_dataset_dir(path: str | os.PathLike) -> bool:
    """A save_to_disk folder, or a repo folder whose README names configs or whose parquet files are
    named after the VTAB splits (data/train800-00000-of-00001.parquet)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return True
    if "configs" in (_readme_meta(path, strict=False) or {}):
        return True
    return any(_split_from_filename(rel) in VTAB_SPLITS for _, rel in _parquet_files(path))


@dataclass(frozen=True)
class _Source:
    name: str  # how messages name it: the repo id, else the folder name
    path: str  # local folder
    kind: str  # "hub" (README + parquet files) | "save_to_disk"
    repo: HubRepo | None  # known for hf:// roots and folders inside a hub cache
    default_task: str  # the name the task gets without --task-name


def plan_hf_vtab(
    root: str | os.PathLike,
    tasks: Iterable[str] | None = None,
    *,
    task_name: str | None = None,
    dedup: bool = True,
    num_workers: int = 0,
    download: bool = False,
) -> list[TaskPlan]:
    """Plan the VTAB tasks of an hf:// root (one repo, a comma-separated list, globs) or of one local
    Hugging Face dataset folder. `task_name` names the task of a single source (repos outside
    `HF_VTAB_REPOS`); `tasks` keeps only the tasks of those names."""
    sources = _sources(root, download=download)
    if task_name is not None:
        if len(sources) != 1:
            raise DatasetError(
                f"--task-name {task_name!r} names one repo's task, but --root names {len(sources)}"
                f" ({', '.join(s.name for s in sources)}); give one repo, or leave --task-name out"
            )
        if not _TASK_NAME.fullmatch(task_name):
            raise DatasetError(f"--task-name {task_name!r} must be a plain folder name (letters, digits, _ . -)")
    names = [task_name or s.default_task for s in sources]
    by_name: dict[str, _Source] = {}
    for name, src in zip(names, sources):
        if name in by_name:
            raise DatasetError(
                f"--root: {by_name[name].name} and {src.name} are both task {name!r}; extract them in separate runs"
                " (another --out) or give one a --task-name"
            )
        by_name[name] = src
    if tasks is not None:
        wanted = list(dict.fromkeys(tasks))
        missing = [t for t in wanted if t not in by_name]
        if missing:
            raise DatasetError(
                f"--task {', '.join(missing)}: not among the tasks of --root ({', '.join(f'{n} ({s.name})' for n, s in by_name.items())})"
            )
        by_name = {t: by_name[t] for t in wanted}
    return [_plan_source(src, name, dedup=dedup, num_workers=num_workers) for name, src in by_name.items()]


def _sources(root: str | os.PathLike, *, download: bool) -> list[_Source]:
    if is_hf_root(root):
        return [
            _Source(r.repo_id, r.path, _kind(r.path), r, hf_task_name(r.name) or r.name)
            for r in resolve_hf_root(str(root), download=download)
        ]
    path = os.path.abspath(os.path.expanduser(os.fspath(root)))
    repo = repo_of_snapshot(path)
    kind = _kind(path)
    folder = repo.name if repo else os.path.basename(path)
    task = hf_task_name(folder)
    if task is None and kind == "save_to_disk":
        info = _json(os.path.join(path, _disk_splits(path, folder)[0], "dataset_info.json"), required=False) or {}
        task = hf_task_name(str(info.get("dataset_name") or ""))
    return [_Source(repo.repo_id if repo else folder, path, kind, repo, task or folder)]


def _kind(path: str) -> str:
    return "save_to_disk" if os.path.isfile(os.path.join(path, "dataset_dict.json")) else "hub"


# --------------------------------------------------------------------------------------------------
# Which files hold which split


def _json(path: str, *, required: bool = True) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if required:
            raise DatasetError(f"{path}: missing (not a complete datasets save_to_disk folder)") from None
        return None
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read it as JSON ({err})") from None


def _readme_meta(path: str, *, strict: bool = True) -> dict | None:
    """The YAML front matter of the repo's README.md (None: no README or no front matter)."""
    readme = os.path.join(path, "README.md")
    if not os.path.isfile(readme):
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(readme)
    except Exception as err:  # noqa: BLE001 - yaml raises several types
        if not strict:
            return None
        raise DatasetError(f"{readme}: cannot parse its YAML front matter ({type(err).__name__}: {err})") from None
    return meta if isinstance(meta, dict) else None


def _parquet_files(path: str, *, depth: int = 3) -> list[tuple[str, str]]:
    """(absolute path, path relative to the folder) of every *.parquet in it and `depth` - 1 levels of
    folders below (repos keep them in data/ or <config>/), hidden folders skipped."""
    out = []
    top = path.rstrip(os.sep).count(os.sep)
    for folder, dirs, files in os.walk(path, followlinks=True):
        below = folder.rstrip(os.sep).count(os.sep) - top
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if below + 1 < depth else []
        for name in sorted(files):
            if name.endswith(".parquet"):
                full = os.path.join(folder, name)
                out.append((full, os.path.relpath(full, path).replace(os.sep, "/")))
    return out


def _config(meta: dict, where: str) -> dict | None:
    configs = meta.get("configs")
    if not configs:
        return None
    if isinstance(configs, dict):
        configs = [configs]
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise DatasetError(f"{where}: README.md's configs is not a list of configs")
    chosen = next((c for c in configs if c.get("config_name", "default") == "default"), None)
    if chosen is None and len(configs) == 1:
        chosen = configs[0]
    if chosen is None:
        raise DatasetError(
            f"{where}: README.md names the configs {', '.join(str(c.get('config_name')) for c in configs)} and none"
            " is 'default'; a VTAB task is one config"
        )
    return chosen


def _data_files(config: dict, where: str) -> dict[str, list[str]]:
    """{split: [path patterns]} of a README config's data_files (its every documented form)."""
    files = config.get("data_files")
    if isinstance(files, str):
        return {"train": [files]}
    if isinstance(files, dict):
        return {str(k): [v] if isinstance(v, str) else list(v) for k, v in files.items()}
    if isinstance(files, list) and all(isinstance(x, str) for x in files):
        return {"train": list(files)}
    if isinstance(files, list) and all(isinstance(x, dict) for x in files):
        out: dict[str, list[str]] = {}
        for entry in files:
            paths = entry.get("path")
            out.setdefault(str(entry.get("split", "train")), []).extend([paths] if isinstance(paths, str) else list(paths or []))
        return out
    raise DatasetError(f"{where}: README.md's data_files of config {config.get('config_name')!r} is not a form datasets documents")


def _hub_split_files(src: _Source) -> tuple[dict[str, list[tuple[str, str]]], str]:
    """{split: [(absolute, relative) parquet path]} of a repo folder and how the splits were named."""
    meta = _readme_meta(src.path) or {}
    config = _config(meta, src.name)
    if config is not None:
        out = {}
        for split, patterns in _data_files(config, src.name).items():
            found: dict[str, None] = {}
            for pattern in patterns:
                for full in sorted(glob.glob(os.path.join(src.path, pattern), recursive=True)):
                    if os.path.isfile(full):
                        found[full] = None
            if split in VTAB_SPLITS and not found:
                raise DatasetError(
                    f"{src.name}: split {split!r} is {', '.join(patterns)} in README.md's configs, but no file there"
                    " matches (an incomplete download? fill the cache again)"
                )
            out[split] = [(f, os.path.relpath(f, src.path).replace(os.sep, "/")) for f in found]
        return out, "its README.md's configs name"
    out = {}
    for full, rel in _parquet_files(src.path):
        split = _split_from_filename(rel)
        if split is not None:
            out.setdefault(split, []).append((full, rel))
    return out, "its parquet file names name"


def _disk_splits(path: str, where: str) -> list[str]:
    splits = (_json(os.path.join(path, "dataset_dict.json")) or {}).get("splits")
    if not isinstance(splits, list) or not splits:
        raise DatasetError(f"{where}: dataset_dict.json lists no splits")
    return [str(s) for s in splits]


def _disk_split_files(src: _Source) -> tuple[dict[str, list[tuple[str, str]]], str]:
    out = {}
    for split in _disk_splits(src.path, src.name):
        folder = os.path.join(src.path, split)
        state = _json(os.path.join(folder, "state.json"), required=False)
        if state and state.get("_data_files"):
            names = [str(d["filename"]) for d in state["_data_files"]]
        else:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".arrow")) if os.path.isdir(folder) else []
        out[split] = [(os.path.join(folder, n), f"{split}/{n}") for n in names]
    return out, "its dataset_dict.json names"


# --------------------------------------------------------------------------------------------------
# Class names


def _names_from_feature(feature: Any) -> list[str] | None:
    """ClassLabel names from a feature as README YAML (dtype: class_label: names: {'0': a}) or
    dataset_info.json ({"_type": "ClassLabel", "names": [...]}) spell it."""
    if not isinstance(feature, dict):
        return None
    if feature.get("_type") == "ClassLabel":
        names = feature.get("names")
    else:
        dtype = feature.get("dtype")
        names = dtype.get("class_label", {}).get("names") if isinstance(dtype, dict) else None
    if isinstance(names, dict):
        try:
            ordered = sorted(names.items(), key=lambda kv: int(kv[0]))
        except (TypeError, ValueError):
            return None
        if [int(k) for k, _ in ordered] != list(range(len(ordered))):
            return None
        return [str(v) for _, v in ordered]
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _readme_class_names(meta: dict, config_name: str, label: str) -> list[str] | None:
    info = meta.get("dataset_info")
    if isinstance(info, list):
        info = next((i for i in info if isinstance(i, dict) and i.get("config_name", "default") == config_name), None)
    features = info.get("features") if isinstance(info, dict) else None
    if isinstance(features, list):
        feature = next((f for f in features if isinstance(f, dict) and f.get("name") == label), None)
        return _names_from_feature(feature)
    return None


# --------------------------------------------------------------------------------------------------
# Planning one source


def _read_arrow_part(f: str, rel: str) -> _ParquetPart:
    import pyarrow as pa

    try:
        table = read_arrow_table(f)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise DatasetError(f"{f}: cannot read it as an Arrow file ({err})") from None
    schema = table.schema
    img_col, struct = _pick_image_column(f, schema, None)
    if "label" not in schema.names:
        raise DatasetError(f"{f}: no label column 'label'. Columns: {_describe_columns(schema)}")
    labels = table.column("label")
    if not pa.types.is_integer(labels.type):
        raise DatasetError(f"{f}: label column has type {labels.type}; a VTAB repo's label is a ClassLabel (integers)")
    return _ParquetPart(
        path=f, rel=rel, image_column=img_col, struct=struct, labels=labels.to_pylist(), label_kind="int",
        splits=[], paths=[], row_group_starts=[0], class_names=_hf_class_names(schema, "label"),
    )


def _plan_source(src: _Source, task: str, *, dedup: bool, num_workers: int) -> TaskPlan:
    if src.kind == "save_to_disk":
        split_files, how = _disk_split_files(src)
    else:
        split_files, how = _hub_split_files(src)
    missing = [s for s in VTAB_SPLITS if not split_files.get(s)]
    if missing:
        named = ", ".join(s for s in split_files if split_files[s]) or "no split"
        raise DatasetError(
            f"{src.name}: no split {missing[0]!r} ({how} {named}); a VTAB-1k task needs train800, val200,"
            " train800val200 and test"
        )
    parts: list[tuple[str, _ParquetPart]] = []
    for split in VTAB_SPLITS:
        for full, rel in split_files[split]:
            if src.kind == "save_to_disk":
                part = _read_arrow_part(full, rel)
            else:
                part = _read_parquet_part(full, rel, None, "label")
            if part.label_kind != "int":
                raise DatasetError(f"{full}: its label column holds strings; a VTAB repo's label is a ClassLabel (integers)")
            parts.append((split, part))

    names = next((p.class_names for _, p in parts if p.class_names), None)
    if names is None and src.kind == "hub":
        meta = _readme_meta(src.path) or {}
        config = _config(meta, src.name) or {}
        names = _readme_class_names(meta, str(config.get("config_name", "default")), "label")
    if names is None and src.kind == "save_to_disk":
        info = _json(os.path.join(src.path, "train800", "dataset_info.json"), required=False) or {}
        names = _names_from_feature((info.get("features") or {}).get("label"))

    samples: list[Sample] = []
    reader_names: list[tuple[str, int]] = []
    offsets, key, max_label = [], 0, -1
    for split in VTAB_SPLITS:
        row = 0
        for s, part in parts:
            if s != split:
                continue
            offsets.append(key)
            reader_names.append((f"{src.name}, split {split}", row))
            for label in part.labels:
                label = int(label)
                if label < 0 or (names is not None and label >= len(names)):
                    bound = f"the ClassLabel's {len(names)} classes (0..{len(names) - 1})" if names else "the classes (0 and up)"
                    raise DatasetError(f"{src.name}, split {split}, row {row}: label {label} is outside {bound}")
                samples.append(Sample(f"{task}/{split}/{row}", label, (split,), key))
                max_label = max(max_label, label)
                row += 1
                key += 1
    ordered = [p for _, p in parts]
    Reader = ArrowStreamReader if src.kind == "save_to_disk" else ParquetReader
    reader = Reader(
        [p.path for p in ordered], [p.image_column for p in ordered], [p.struct for p in ordered],
        [p.row_group_starts for p in ordered], offsets, num_rows=key, names=reader_names,
    )
    if names is not None:
        classes = tuple(names)
    else:  # no ClassLabel metadata: numbered classes, at least the VTAB task's count
        classes = tuple(str(k) for k in range(max(VTAB_NUM_CLASSES.get(task, 0), max_label + 1)))
    plan = _vtab_split_plan(dataset="vtab", task=task, root=src.path, samples=tuple(samples), classes=classes, reader=reader)
    notes: tuple[str, ...] = ()
    if dedup:
        folded, merged = fold_duplicates(plan.samples, reader_digests(reader, num_workers=num_workers), splits=("train800val200",))
        copies = sum(1 for s in samples if s.splits == ("train800val200",))
        unmatched = copies - merged.get("train800val200", 0)
        if unmatched:
            notes = (
                f"{src.name}: {unmatched} of {copies} train800val200 rows match no train800 / val200 image (decoded pixels"
                " and label) and are stored as rows of their own",
            )
        plan = _vtab_split_plan(dataset="vtab", task=task, root=src.path, samples=folded, classes=classes, reader=reader)
    return dataclasses.replace(plan, source=_provenance(src, split_files), notes=notes)


def _provenance(src: _Source, split_files: dict[str, list[tuple[str, str]]]) -> dict[str, Any] | None:
    """What the store records of where the task came from: repo id, commit and files, never a local path."""
    files = {s: [rel for _, rel in split_files[s]] for s in VTAB_SPLITS}
    if src.repo is not None:
        return {"kind": "huggingface", "repo": src.repo.repo_id, "revision": src.repo.revision, "data_files": files}
    if src.kind == "save_to_disk":  # datasets' fingerprint of each split identifies its content
        prints = {}
        for s in VTAB_SPLITS:
            state = _json(os.path.join(src.path, s, "state.json"), required=False) or {}
            if state.get("_fingerprint"):
                prints[s] = str(state["_fingerprint"])
        return {"kind": "datasets-save_to_disk", "data_files": files, **({"fingerprints": prints} if prints else {})}
    return None  # a repo folder outside a hub cache: no commit to name, and its path is not recorded


