"""The generated VTAB task and single-process reference store that the cluster and remote extraction tests
compare against byte for byte. Import the fixtures into a test module (`from extractcase import vtab, reference`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extract.pipeline import ExtractConfig, extract
from fakedata import make_vtab_tree

MODEL = "vit_tiny_patch16_224"
SIZE = 32
ROWS = 8  # rows per shard: 95 rows -> 12 shards, one dask task each (batch 8)


def config(root: Path, out: str | Path, **kw) -> ExtractConfig:
    return ExtractConfig(model=MODEL, dataset="vtab", root=str(root), out=str(out), image_size=SIZE, random_init=True,
                         batch_size=8, num_workers=0, rows_per_shard=ROWS, **kw)


def manifest_objects(manifest: dict) -> dict[str, dict]:
    """Every object of a finished store's manifest with its sha256, except the zarr.json documents (they hold timestamps)."""
    return {k: v for k, v in manifest["objects"].items() if not k.endswith("zarr.json")}


def data_objects(store: Path) -> dict[str, dict]:
    """`manifest_objects` of a local store."""
    return manifest_objects(json.loads((Path(store) / "manifest.json").read_text()))


@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    make_vtab_tree(root, {"eurosat": 4}, n_train=10, n_val=5, n_test=80, image_size=16)
    return root


@pytest.fixture(scope="module")
def reference(vtab, tmp_path_factory) -> Path:
    """The single-process store every cluster or remote run must equal byte for byte."""
    return extract(config(vtab, tmp_path_factory.mktemp("single"))).store
