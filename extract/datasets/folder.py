"""An image-folder tree: <root>/<class>/**/<image>, optionally under train/, val/, test/."""

from __future__ import annotations

import os

from .common import IMAGE_EXTENSIONS, DatasetError, TaskPlan, _existing_dir, _generic_plan


_VAL_DIR_NAMES = ("val", "valid", "validation")


# --------------------------------------------------------------------------------------------------
# Image folder


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _walk_images(folder: str) -> list[str]:
    """Image files under folder, recursively, sorted by relative path (deterministic)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return sorted(out, key=lambda p: os.path.relpath(p, folder).replace(os.sep, "/"))


def plan_folder(root: str | os.PathLike) -> list[TaskPlan]:
    """Plan an ImageFolder tree: <root>/<class>/**/<image>, classes = sorted folder names.

    If <root>/train/ exists the tree is read as <root>/{train,val|valid|validation,test}/<class>/
    (missing val: 1/8 of train, stratified by a hash of the path; missing test: error); other
    folders beside them are ignored. Otherwise the images are cut 70/10/20 per class by a hash of
    their relative path. Splits: train, val, trainval (= train | val), test.
    """
    root = _existing_dir(root, option="root")
    top = _subdirs(root)
    if "train" in top and _subdirs(os.path.join(root, "train")):
        split_dirs = {"train": "train", "test": "test" if "test" in top else None}
        split_dirs["val"] = next((d for d in _VAL_DIR_NAMES if d in top), None)
        if split_dirs["test"] is None:
            raise DatasetError(f"{root}: has a train/ folder but no test/ folder")
        used = {s: d for s, d in split_dirs.items() if d is not None}
        classes = tuple(sorted({c for d in used.values() for c in _subdirs(os.path.join(root, d))}))
        parts = [
            (split, os.path.join(used[split], c))
            for split in ("train", "val", "test")
            if split in used
            for c in _subdirs(os.path.join(root, used[split]))
        ]
    else:
        classes = tuple(top)
        parts = [(None, c) for c in top]
    label_of = {c: k for k, c in enumerate(classes)}
    items: list[tuple[str, int, str | int, str | None]] = []
    for split, rel_dir in parts:
        label = label_of[os.path.basename(rel_dir)]
        for path in _walk_images(os.path.join(root, rel_dir)):
            sid = os.path.relpath(path, root).replace(os.sep, "/")
            items.append((sid, label, os.path.abspath(path), split))
    if not items:
        loose = [f for f in os.listdir(root) if _is_image(f)]
        hint = (
            f"; {len(loose)} images lie directly in it, but each class needs its own sub-folder"
            if loose
            else ""
        )
        raise DatasetError(
            f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders{hint}"
        )
    return [_generic_plan(dataset="folder", root=root, items=items, classes=classes, where=root)]
