"""Miniature datasets for tests, written into a temporary folder.

    from fakedata import make_vtab_tree, make_image_folder, make_parquet, signal_image
    from fakedata import odd_mode_image, ODD_MODES, write_corrupt
    from fakedata import make_hf_vtab_repo, make_save_to_disk  # Hugging Face hub cache / save_to_disk

(pytest's default import mode puts tests/ on sys.path for the test modules in it.) Every image carries its label as a
bright square whose grid cell is the label, on faint noise that differs per image, so a
probe can learn the task and no two images are identical by accident. Images are tiny PNGs
(lossless, so pixel-identical copies are easy) unless asked otherwise.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import zlib
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

VTAB_SPLIT_NAMES = ("train800", "val200", "train800val200", "test")


def signal_image(label: int, *, num_classes: int, size: int = 20, seed: int = 0) -> Image.Image:
    """RGB image: noise in 0..59 plus a bright square in grid cell `label` of a ceil(sqrt(K)) grid."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    grid = max(1, math.ceil(math.sqrt(num_classes)))
    cell = max(1, size // grid)
    side = max(1, (cell * 2) // 3)
    r, c = divmod(int(label) % (grid * grid), grid)
    y0, x0 = r * cell + (cell - side) // 2, c * cell + (cell - side) // 2
    arr[y0 : y0 + side, x0 : x0 + side] = (255, 230, 200)
    return Image.fromarray(arr, mode="RGB")


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _save(img: Image.Image, path: Path, ext: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG" if ext in ("jpg", "jpeg") else ext.upper(), **kw)


def write_corrupt(path: str | Path) -> Path:
    """Overwrite `path` with bytes no decoder accepts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image\x00\xff")
    return path


ODD_MODES = ("1", "L", "LA", "P", "P+transparency", "PA", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr")


def odd_mode_image(mode: str, *, size: int = 8) -> Image.Image:
    """A size x size image in an unusual PIL mode (one of ODD_MODES) with a left/right split:
    the left half is "dark" and the right half "bright" in that mode's own value range, so a
    converter that clips or ignores the range shows up. "P+transparency" is a palette image
    whose index 0 is transparent."""
    half = np.zeros((size, size), dtype=np.uint8)
    half[:, size // 2 :] = 1
    if mode == "1":
        return Image.fromarray(half * 255, mode="L").convert("1")
    if mode in ("L", "LA", "RGBA", "CMYK", "YCbCr"):
        grey = Image.fromarray(np.where(half == 1, 200, 40).astype(np.uint8), mode="L")
        return grey.convert(mode)
    if mode in ("P", "P+transparency", "PA"):
        img = Image.fromarray(half, mode="P")
        img.putpalette([10, 20, 30, 250, 128, 5] + [0] * 762)
        if mode == "P+transparency":
            img.info["transparency"] = 0
        return img.convert("PA") if mode == "PA" else img
    if mode == "I;16":
        return Image.fromarray(np.where(half == 1, 65535, 257 * 40).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(np.where(half == 1, 65535, 257 * 40).astype(np.int32))
    if mode == "F":
        return Image.fromarray(np.where(half == 1, 1.0, 40 / 255).astype(np.float32))
    raise ValueError(f"unknown odd mode {mode!r}; choose from {ODD_MODES}")


def make_vtab_tree(
    root: str | Path,
    tasks: Mapping[str, int] | Iterable[str] = ("dtd", "eurosat"),
    *,
    n_train: int = 6,
    n_val: int = 3,
    n_test: int = 4,
    image_size: int = 20,
    ext: str = "png",
    copies: str = "resave",
    n_unmatched: int = 0,
    crlf: bool = False,
    corrupt: Iterable[tuple[str, int]] = (),
) -> dict[str, dict[str, list[tuple[str, int]]]]:
    """Write <root>/<task>/{split}.txt and images/<split>/NNNNNN.<ext> in the VTAB-1k layout.

    tasks: names (3 classes each) or {name: num_classes}. Labels cycle 0..K-1 in each split.
    train800val200 lists n_train + n_val copies of train800 then val200 (same labels), written as
      copies="resave": decoded and re-saved (PNG at another compression level: other bytes,
        same pixels; with ext="jpg" the copy is a PNG file named .jpg, which PIL still opens);
      copies="bytes": byte-for-byte file copies.
    n_unmatched: the last n copies get fresh noise, so they match nothing (their own rows).
    crlf: Windows line ends. corrupt: (split, index) files overwritten with garbage after copying.
    Returns {task: {split: [(relative path, label), ...]}}.
    """
    if copies not in ("resave", "bytes"):
        raise ValueError(f"copies must be 'resave' or 'bytes', got {copies!r}")
    root = Path(root)
    tasks = dict(tasks) if isinstance(tasks, Mapping) else {t: 3 for t in tasks}
    counts = {"train800": n_train, "val200": n_val, "test": n_test}
    out: dict[str, dict[str, list[tuple[str, int]]]] = {}
    for task, k in tasks.items():
        tdir = root / task
        listing: dict[str, list[tuple[str, int]]] = {}
        for split, n in counts.items():
            listing[split] = []
            for i in range(n):
                rel = f"images/{split}/{i:06d}.{ext}"
                label = i % k
                img = signal_image(label, num_classes=k, size=image_size, seed=_seed(task, split, i))
                _save(img, tdir / rel, ext)
                listing[split].append((rel, label))
        originals = listing["train800"] + listing["val200"]
        listing["train800val200"] = []
        for j, (src_rel, label) in enumerate(originals):
            rel = f"images/train800val200/{j:06d}.{ext}"
            dst = tdir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if j >= len(originals) - n_unmatched:
                img = signal_image(label, num_classes=k, size=image_size, seed=_seed(task, "odd", j))
                _save(img, dst, ext)
            elif copies == "bytes":
                shutil.copyfile(tdir / src_rel, dst)
            else:
                with Image.open(tdir / src_rel) as im:
                    im.load()
                im.save(dst, format="PNG", compress_level=1, optimize=False)
            listing["train800val200"].append((rel, label))
        for split in VTAB_SPLIT_NAMES:
            eol = "\r\n" if crlf else "\n"
            text = eol.join(f"{rel} {label}" for rel, label in listing[split]) + eol
            (tdir / f"{split}.txt").write_bytes(text.encode())
        for split, i in corrupt:
            write_corrupt(tdir / listing[split][i][0])
        out[task] = listing
    return out


def make_image_folder(
    root: str | Path,
    classes: Sequence[str] = ("cat", "dog", "fox"),
    n_per_class: int = 10,
    *,
    with_splits: bool = False,
    split_counts: Mapping[str, int] | None = None,
    image_size: int = 20,
    ext: str = "png",
) -> dict[str, list[tuple[str, int]]]:
    """Write <root>/<class>/NNN.<ext> (or <root>/<split>/<class>/NNN.<ext> with_splits).

    with_splits uses split_counts images per class (default train=n_per_class, val=2, test=3;
    leave a split out of split_counts to omit its folder). Labels = index in sorted(classes).
    Returns {split or "all": [(path relative to root, label), ...]}.
    """
    root = Path(root)
    names = sorted(classes)
    k = len(names)
    if with_splits:
        plan = dict(split_counts or {"train": n_per_class, "val": 2, "test": 3})
    else:
        plan = {"all": n_per_class}
    out: dict[str, list[tuple[str, int]]] = {}
    for split, n in plan.items():
        out[split] = []
        for label, cls in enumerate(names):
            for i in range(n):
                rel = f"{cls}/{i:03d}.{ext}" if split == "all" else f"{split}/{cls}/{i:03d}.{ext}"
                img = signal_image(label, num_classes=k, size=image_size, seed=_seed(split, cls, i))
                _save(img, root / rel, ext)
                out[split].append((rel, label))
    return out


def make_parquet(
    path: str | Path,
    n: int = 12,
    *,
    num_classes: int = 3,
    image_size: int = 20,
    layout: str = "hf",
    image_column: str = "image",
    label_column: str = "label",
    splits: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    with_paths: bool = True,
    row_group_size: int | None = None,
) -> list[tuple[int, str | None]]:
    """Write a parquet file of n PNG-encoded signal images.

    layout="hf": image column is struct<bytes: binary, path: string> as HF `datasets` exports it
    (path "img_NNNN.png", or null without with_paths); layout="bytes": plain binary column.
    splits: values for a "split" column, cycled over the rows (None: no such column).
    class_names: written as HF ClassLabel metadata. Images differ between files of other names (the
    file name seeds the noise), so no two files hold the same image by accident. Returns [(label, split), ...] per row.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if layout not in ("hf", "bytes"):
        raise ValueError(f"layout must be 'hf' or 'bytes', got {layout!r}")
    labels = [i % num_classes for i in range(n)]
    blobs = []
    for i, label in enumerate(labels):
        buf = io.BytesIO()
        signal_image(label, num_classes=num_classes, size=image_size, seed=_seed("pq", Path(path).name, i)).save(buf, "PNG")
        blobs.append(buf.getvalue())
    if layout == "hf":
        struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        image = pa.array(
            [{"bytes": b, "path": f"img_{i:04d}.png" if with_paths else None} for i, b in enumerate(blobs)],
            type=struct,
        )
    else:
        image = pa.array(blobs, type=pa.binary())
    columns = {image_column: image, label_column: pa.array(labels, type=pa.int64())}
    split_values = None
    if splits is not None:
        split_values = [splits[i % len(splits)] for i in range(n)]
        columns["split"] = pa.array(split_values, type=pa.string())
    table = pa.table(columns)
    if class_names is not None:
        meta = {"info": {"features": {
            image_column: {"_type": "Image"},
            label_column: {"names": list(class_names), "_type": "ClassLabel"},
        }}}  # fmt: skip
        table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return [(label, None if split_values is None else split_values[i]) for i, label in enumerate(labels)]


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets: hub cache repos and save_to_disk folders, as the paper's authors' VTAB copies


def _hf_split_rows(repo_name: str, num_classes: int, n_train: int, n_val: int, n_test: int, image_size: int,
                   copies: str) -> dict[str, list[tuple[bytes, int]]]:
    """{split: [(PNG bytes, label)]}: train800val200 = train800 + val200 (byte copies, or re-encoded)."""
    def png(img: Image.Image, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "PNG", **kw)
        return buf.getvalue()

    rows: dict[str, list[tuple[bytes, int]]] = {}
    for split, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
        rows[split] = [(png(signal_image(i % num_classes, num_classes=num_classes, size=image_size,
                                         seed=_seed("hf", repo_name, split, i))), i % num_classes) for i in range(n)]
    originals = rows["train800"] + rows["val200"]
    if copies == "bytes":
        rows["train800val200"] = list(originals)
    else:
        rows["train800val200"] = [(png(Image.open(io.BytesIO(b)), compress_level=1), label) for b, label in originals]
    return {s: rows[s] for s in VTAB_SPLIT_NAMES}


def _hf_table(rows: list[tuple[bytes, int]], class_names: Sequence[str] | None, *, metadata: bool):
    import pyarrow as pa

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": b, "path": None} for b, _ in rows], type=struct),
        "label": pa.array([label for _, label in rows], type=pa.int64()),
    })
    if metadata and class_names is not None:  # what datasets' ArrowWriter puts in every file it writes
        features = {"image": {"decode": True, "id": None, "_type": "Image"},
                    "label": {"names": list(class_names), "id": None, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    return table


def hf_readme(splits: Mapping[str, int], class_names: Sequence[str] | None) -> str:
    """README.md as datasets' push_to_hub writes it: dataset_info (ClassLabel names) and configs."""
    lines = ["---", "dataset_info:", "  features:", "  - name: image", "    dtype: image", "  - name: label"]
    if class_names is None:
        lines += ["    dtype: int64"]
    else:
        lines += ["    dtype:", "      class_label:", "        names:"]
        lines += [f"          '{k}': {json.dumps(str(name))}" for k, name in enumerate(class_names)]
    lines += ["  splits:"]
    for split, n in splits.items():
        lines += [f"  - name: {split}", "    num_bytes: 1000", f"    num_examples: {n}"]
    lines += ["configs:", "- config_name: default", "  data_files:"]
    for split in splits:
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
    return "\n".join(lines + ["---", "", "# VTAB-1k task (test copy)", ""])


def make_hf_vtab_repo(
    cache: str | Path,
    repo_id: str,
    *,
    num_classes: int = 3,
    class_names: Sequence[str] | None = None,
    n_train: int = 6,
    n_val: int = 3,
    n_test: int = 4,
    image_size: int = 16,
    commit: str | None = None,
    readme: bool = True,
    metadata: bool = True,
    copies: str = "bytes",
    omit_splits: Iterable[str] = (),
    bad_labels: Mapping[tuple[str, int], int] | None = None,
    corrupt: Iterable[tuple[str, int]] = (),
) -> dict:
    """Write a dataset repo into a hub cache in its real layout: datasets--ORG--REPO/refs/main holds the
    commit, snapshots/<commit>/{README.md, data/<split>-00000-of-00001.parquet} are symlinks into blobs/.

    class_names: the ClassLabel names (default "c0".."cK-1"); written into each parquet file's
    `huggingface` schema metadata (metadata=True) and the README's dataset_info (readme=True; without a
    README the split files are found by their names). bad_labels: {(split, row): label} written instead;
    corrupt: (split, row) images replaced by bytes no decoder accepts. Returns {"commit", "snapshot",
    "rows": {split: [(bytes, label)]}}.
    """
    import hashlib

    import pyarrow.parquet as pq

    cache = Path(cache)
    names = list(class_names) if class_names is not None else [f"c{k}" for k in range(num_classes)]
    org_repo = repo_id.split("/")
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    base = cache / ("datasets--" + "--".join(org_repo))
    rows = _hf_split_rows(org_repo[-1], len(names), n_train, n_val, n_test, image_size, copies)
    for (split, i), label in (bad_labels or {}).items():
        rows[split][i] = (rows[split][i][0], label)
    for split, i in corrupt:
        rows[split][i] = (b"this is not an image\x00\xff", rows[split][i][1])
    snap = base / "snapshots" / commit
    blobs = base / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(rel: str, data: bytes) -> None:
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))

    kept = [s for s in VTAB_SPLIT_NAMES if s not in set(omit_splits)]
    for split in kept:
        buf = io.BytesIO()
        pq.write_table(_hf_table(rows[split], names, metadata=metadata), buf)
        put(f"data/{split}-00000-of-00001.parquet", buf.getvalue())
    if readme:
        put("README.md", hf_readme({s: len(rows[s]) for s in kept}, names).encode())
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    return {"commit": commit, "snapshot": snap, "rows": rows}


def make_save_to_disk(folder: str | Path, *, num_classes: int = 3, class_names: Sequence[str] | None = None,
                      n_train: int = 6, n_val: int = 3, n_test: int = 4, image_size: int = 16,
                      copies: str = "resave") -> dict[str, list[tuple[bytes, int]]]:
    """A DatasetDict.save_to_disk folder: dataset_dict.json, <split>/{data-00000-of-00001.arrow (Arrow IPC
    stream), dataset_info.json, state.json}. Returns {split: [(bytes, label)]}."""
    import pyarrow as pa

    folder = Path(folder)
    names = list(class_names) if class_names is not None else [f"c{k}" for k in range(num_classes)]
    rows = _hf_split_rows(folder.name, len(names), n_train, n_val, n_test, image_size, copies)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(VTAB_SPLIT_NAMES)}))
    for split in VTAB_SPLIT_NAMES:
        d = folder / split
        d.mkdir()
        table = _hf_table(rows[split], names, metadata=True)
        with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            for batch in table.to_batches(max_chunksize=4):
                w.write_batch(batch)
        features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        (d / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": features,
                                                         "homepage": "", "license": ""}))
        (d / "state.json").write_text(json.dumps({
            "_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": f"fp-{split}",
            "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
            "_split": split}))
    return rows
