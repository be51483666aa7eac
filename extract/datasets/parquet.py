"""Parquet files with an image-bytes column and a label column (e.g. a Hugging Face export)."""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    _SPLIT_ALIASES,
    VTAB_SPLITS,
    DatasetError,
    ParquetReader,
    Sample,
    TaskPlan,
    _generic_plan,
    _vtab_split_plan,
    fold_duplicates,
    reader_digests,
)


# --------------------------------------------------------------------------------------------------
# Parquet


def _is_binary(t: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _image_column_kind(t: Any) -> bool | None:
    """True for an HF image struct ({bytes, path}), False for plain binary, None otherwise."""
    import pyarrow as pa

    if _is_binary(t):
        return False
    if pa.types.is_struct(t):
        idx = t.get_field_index("bytes")
        if idx >= 0 and _is_binary(t.field(idx).type):
            return True
    return None


def _describe_columns(schema: Any) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def _hf_class_names(schema: Any, column: str) -> list[str] | None:
    """Class names from the ClassLabel feature HF `datasets` stores in the schema metadata."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feats = json.loads(meta)["info"]["features"][column]
        names = feats.get("names") if feats.get("_type") == "ClassLabel" else None
        return [str(n) for n in names] if names else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _split_from_filename(rel: str) -> str | None:
    """HF exports name shards '<split>-00000-of-00003.parquet' or keep them in '<split>/' dirs."""
    stem = posixpath.basename(rel)[: -len(".parquet")]
    m = re.fullmatch(r"(.+?)-\d+-of-\d+", stem)
    for candidate in ([m.group(1)] if m else []) + [stem] + rel.split("/")[:-1][::-1]:
        if candidate.lower() in _SPLIT_ALIASES or candidate in VTAB_SPLITS:
            return candidate
    return None


@dataclass
class _ParquetPart:
    """What planning reads from one parquet file (everything but the image bytes)."""

    path: str
    rel: str
    image_column: str
    struct: bool
    labels: list[Any]
    label_kind: str  # "int" | "str"
    splits: list[str | None]
    paths: list[str | None]
    row_group_starts: list[int]
    class_names: list[str] | None


def _pick_image_column(f: str, schema: Any, image_column: str | None) -> tuple[str, bool]:
    if image_column is not None:
        if image_column not in schema.names:
            raise DatasetError(
                f"{f}: no image column {image_column!r}; columns: {_describe_columns(schema)}"
            )
        kind = _image_column_kind(schema.field(image_column).type)
        if kind is None:
            raise DatasetError(
                f"{f}: column {image_column!r} has type {schema.field(image_column).type}, not"
                " image bytes (binary or struct<bytes, path>)"
            )
        return image_column, kind
    usual = ("image", "img", "image_bytes", "jpg", "png", "bytes")
    preferred = [n for n in usual if n in schema.names]
    for name in preferred + schema.names:
        kind = _image_column_kind(schema.field(name).type)
        if kind is not None:
            return name, kind
    raise DatasetError(
        f"{f}: no image column (binary or struct<bytes, path>); set --image-column (image_column=)."
        f" Columns: {_describe_columns(schema)}"
    )


def _read_parquet_part(
    f: str, rel: str, image_column: str | None, label_column: str | None, split_column: str | None = None
) -> _ParquetPart:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise DatasetError(f"{f}: cannot read parquet file ({e})") from None
    schema = pf.schema_arrow
    img_col, struct = _pick_image_column(f, schema, image_column)
    lab_col = label_column or next(
        (n for n in ("label", "labels", "target") if n in schema.names), None
    )
    if lab_col is None or lab_col not in schema.names:
        what = (
            f"no label column {lab_col!r}"
            if lab_col
            else "no label column (label/labels/target); set --label-column (label_column=)"
        )
        raise DatasetError(f"{f}: {what}. Columns: {_describe_columns(schema)}")
    lt = schema.field(lab_col).type
    if pa.types.is_dictionary(lt):
        lt = lt.value_type
    if pa.types.is_integer(lt):
        label_kind = "int"
    elif pa.types.is_string(lt) or pa.types.is_large_string(lt):
        label_kind = "str"
    else:
        raise DatasetError(f"{f}: label column {lab_col!r} has type {lt}; need integers or strings")

    if split_column is not None and split_column not in schema.names:
        raise DatasetError(f"{f}: no split column {split_column!r}. Columns: {_describe_columns(schema)}")
    split_col = split_column or "split"
    has_split = split_col in schema.names and lab_col != split_col
    has_path = struct and schema.field(img_col).type.get_field_index("path") >= 0
    read = [lab_col] + ([split_col] if has_split else []) + ([f"{img_col}.path"] if has_path else [])
    table = pf.read(columns=read)  # nested "col.path" reads the names, not the image bytes
    labels = table.column(0)
    if labels.null_count:
        raise DatasetError(f"{f}: row {pc.index(pc.is_null(labels), True).as_py()}: label is null")
    n = table.num_rows
    if has_split:
        splits = [None if v is None else str(v) for v in table.column(1).to_pylist()]
    else:
        splits = [_split_from_filename(rel)] * n
    paths: list[str | None] = [None] * n
    if has_path:
        col = table.column(table.num_columns - 1)
        if pa.types.is_struct(col.type):
            col = col.combine_chunks().field("path")
        paths = col.to_pylist()
    starts = np.cumsum(
        [0] + [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
    )[:-1]
    return _ParquetPart(
        path=f,
        rel=rel,
        image_column=img_col,
        struct=struct,
        labels=labels.to_pylist(),
        label_kind=label_kind,
        splits=splits,
        paths=paths,
        row_group_starts=[int(x) for x in starts],
        class_names=_hf_class_names(schema, lab_col),
    )


def plan_parquet(
    path_or_dir: str | os.PathLike,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    split_column: str | None = None,
    dedup: bool = True,
    num_workers: int = 0,
) -> list[TaskPlan]:
    """Plan one parquet file, or every *.parquet under a folder (sorted, recursive).

    Image column: an HF image struct {bytes, path} or plain binary; auto-detected ("image", "img",
    ... or the first column of such a type) unless given. Label column: "label" / "labels" /
    "target" unless given; integers (class names from HF ClassLabel metadata when present) or
    strings (classes = sorted distinct values). Splits: a "split" column (or `split_column`), else the HF shard file
    name ("train-00000-of-00001.parquet") or folder; VTAB split names keep the VTAB protocols, other
    names map to train/val/test. With `dedup`, a row whose decoded pixels and label equal a row of an
    earlier split (train800val200's copies of train800 / val200, or one image in train and test) is
    stored once: that row gets both splits and the copy's id as an alias, and the plan's `notes` say
    how many were merged. `num_workers` threads hash images (0: min(8, CPU count)). Sample id: the
    struct's path when every row has one and they are unique, else "<file relative to the folder>#<row>".
    """
    p = Path(path_or_dir).expanduser()
    if p.is_file():
        base, files = os.path.abspath(p.parent), [os.path.abspath(p)]
    elif p.is_dir():
        base = os.path.abspath(p)
        files = sorted(
            (os.path.abspath(f) for f in p.rglob("*.parquet")),
            key=lambda f: os.path.relpath(f, base),
        )
        if not files:
            raise DatasetError(f"{base}: no *.parquet files")
    else:
        raise DatasetError(f"option root: {os.path.abspath(p)} does not exist")
    where = os.path.abspath(p)

    parts = [
        _read_parquet_part(
            f, os.path.relpath(f, base).replace(os.sep, "/"), image_column, label_column, split_column
        )
        for f in files
    ]
    kinds = {part.label_kind for part in parts}
    if len(kinds) > 1:
        raise DatasetError(f"{where}: label columns are integers in some files, strings in others")
    offsets = np.cumsum([0] + [len(part.labels) for part in parts])
    num_rows = int(offsets[-1])
    if not num_rows:
        raise DatasetError(f"{where}: parquet files hold no rows")

    paths = [x for part in parts for x in part.paths]
    if all(x is not None for x in paths) and len(set(paths)) == len(paths):
        ids = [str(x) for x in paths]
    else:
        ids = [f"{part.rel}#{r}" for part in parts for r in range(len(part.labels))]
    raw = [v for part in parts for v in part.labels]
    if kinds == {"str"}:
        classes = tuple(sorted(set(raw)))
        index = {c: k for k, c in enumerate(classes)}
        labels = [index[v] for v in raw]
    else:
        labels = [int(v) for v in raw]
        neg = next((k for k, v in enumerate(labels) if v < 0), None)
        if neg is not None:
            fi = int(np.searchsorted(offsets, neg, side="right")) - 1
            raise DatasetError(
                f"{files[fi]}: row {neg - int(offsets[fi])}: label {labels[neg]}"
                " (unlabelled rows are not supported)"
            )
        k = max(labels) + 1
        names = next((part.class_names for part in parts if part.class_names), None)
        classes = tuple(names) if names and len(names) >= k else tuple(str(c) for c in range(k))

    reader = ParquetReader(
        files,
        [part.image_column for part in parts],
        [part.struct for part in parts],
        [part.row_group_starts for part in parts],
        [int(x) for x in offsets[:-1]],
        num_rows=num_rows,
    )
    given = [s for part in parts for s in part.splits]
    present = {s for s in given if s is not None}
    if present and present <= set(VTAB_SPLITS) and None not in given:
        order = sorted(range(num_rows), key=lambda k: VTAB_SPLITS.index(given[k]))  # stable
        samples = tuple(Sample(ids[k], labels[k], (given[k],), k) for k in order)
        plan = _vtab_split_plan(dataset="parquet", task="default", root=where, samples=samples, classes=classes, reader=reader)
        return [_fold(plan, where, dedup=dedup, num_workers=num_workers)]
    unknown = sorted({s for s in present if s.lower() not in _SPLIT_ALIASES})
    if unknown:
        raise DatasetError(
            f"{where}: unrecognised split names {unknown}; use train/val/test"
            f" (or validation/valid/dev) or the VTAB names {list(VTAB_SPLITS)}"
        )
    items = [
        (ids[k], labels[k], k, None if given[k] is None else _SPLIT_ALIASES[given[k].lower()])
        for k in range(num_rows)
    ]
    plan = _generic_plan(
        dataset="parquet", root=where, items=items, classes=classes, reader=reader, where=where
    )
    return [_fold(plan, where, dedup=dedup, num_workers=num_workers)]


def _fold(plan: TaskPlan, where: str, *, dedup: bool, num_workers: int) -> TaskPlan:
    """The plan with each image that several splits hold stored once (`fold_duplicates`), and a note."""
    if not dedup:
        return plan
    samples, merged = fold_duplicates(plan.samples, reader_digests(plan.reader, num_workers=num_workers))
    if not merged:
        return plan
    total = sum(merged.values())
    detail = ", ".join(f"{n} of {split}" for split, n in merged.items())
    note = (
        f"{where}: merged {total} duplicate row{'s' if total != 1 else ''} ({detail}) into rows of earlier splits"
        " that hold the same image (decoded pixels) and label: each image is stored once, in both splits,"
        " with the other ids as aliases"
    )
    splits = {s: sum(s in x.splits for x in samples) for s in plan.splits}
    return dataclasses.replace(plan, samples=samples, splits=splits, notes=plan.notes + (note,))
