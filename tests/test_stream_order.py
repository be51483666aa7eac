"""Streaming must not see the classes in order (extract/order.py, probe/epochorder.py).

A 10-class image folder stored class by class (24 images per class: 170 train + 20 val = 190
trainval rows, 50 test), extracted with a tiny random-init ViT at 32px (2x2 tokens) in shards of 16
rows, once as combo does now (training rows in a seeded shuffled order) and once as it did before
(natural order: `extract.order.natural_order`).
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

import extract.pipeline as pipeline
import probe.epochorder
from extract.datasets import ParquetReader, plan_dataset
from extract.order import ROW_ORDER_METHOD, ShuffledParquetReader, natural_order, row_order
from extract.pipeline import ExtractConfig, extract
from fakedata import make_image_folder, make_parquet
from probe.data import SplitSource, epoch_order, label_clustered, piece_rows, stream_batches
from probe.run import ProbeConfig, run_probe
from probe.stores import align_tasks, open_stores
from probe.train import epoch_permutation
from store_schema import StoreLayout, StoreMismatchError, open_store, validate_store
from store_schema import samples as sample_table

MODEL = "vit_tiny_patch16_224"
CLASSES = [f"class{i}" for i in range(10)]
LAYOUT = StoreLayout(rows_per_shard=16, rows_per_chunk=8)
BATCH = 32
WINDOW = 16  # one shard: far smaller than the 190-row trainval split


def run_extract(root, out, progress=None, **kw):
    return extract(ExtractConfig(model=MODEL, dataset="folder", root=str(root), out=str(out), image_size=32,
                                 random_init=True, num_workers=0, layout=LAYOUT, **kw), progress=progress)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    make_image_folder(root, classes=CLASSES, n_per_class=24, image_size=32)
    return root


@pytest.fixture(scope="module")
def stores(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores")
    shuffled = run_extract(folder, out / "shuffled").store
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "row_order", natural_order)  # what an older combo wrote
        natural = run_extract(folder, out / "natural").store
    return {"shuffled": shuffled, "natural": natural}


def trainval(path) -> SplitSource:
    aligned = align_tasks(open_stores([str(path)]), "default")
    return SplitSource(aligned, aligned.rows("trainval"))


def mean_distinct(labels: np.ndarray, batches) -> float:
    return float(np.mean([len(np.unique(labels[b])) for b in batches]))


def test_training_rows_are_shuffled_within_their_splits_and_source_index_recovers_the_order(folder, stores):
    plan = plan_dataset("folder", root=folder)[0]
    task = open_store(stores["shuffled"]).task("default")
    index = task.samples.column("source_index").to_numpy()
    assert [task.sample_ids[r] for r in np.argsort(index)] == [s.sample_id for s in plan.samples]
    for split in plan.splits:  # every split keeps the rows it has in natural order: train, val, test contiguous
        assert np.array_equal(task.rows(split), plan.split_rows(split))
    train = task.rows("train")
    assert not np.array_equal(index[train], train)  # shuffled...
    assert np.array_equal(np.sort(index[train]), train)  # ...among the train rows only
    assert np.array_equal(index[task.rows("test")], task.rows("test"))  # nothing trains on test: natural order
    assert not label_clustered(task.labels[task.rows("trainval")])
    assert task.attrs["row_order"] == {"method": ROW_ORDER_METHOD, "seed": 0, "shuffled_splits": ["train", "trainval"]}
    assert validate_store(stores["shuffled"]).ok
    old = open_store(stores["natural"]).task("default")  # before: class by class, no source_index
    assert "source_index" not in old.samples.column_names and "row_order" not in old.attrs
    assert np.array_equal(sample_table.source_index(old.samples), np.arange(old.num_samples))
    assert old.sample_ids == [s.sample_id for s in plan.samples]
    assert label_clustered(old.labels[old.rows("trainval")])


def test_streamed_batches_mix_the_classes_like_a_uniform_shuffle(stores):
    source = trainval(stores["shuffled"])
    assert source.n == 190 and piece_rows(source) == 16
    epochs = 20
    per_epoch = -(-source.n // BATCH)
    stream = stream_batches(source, batch_size=BATCH, seed=0, window_rows=WINDOW)
    streamed = [next(stream)[1].numpy() for _ in range(epochs * per_epoch)]
    stream.close()
    uniform = [o[s : s + BATCH] for e in range(epochs) for o in [epoch_permutation(source.n, e, 0)]
               for s in range(0, source.n, BATCH)]
    got = float(np.mean([len(np.unique(b)) for b in streamed]))
    want = mean_distinct(source.labels, uniform)
    print(f"\ndistinct labels per batch of {BATCH}: streamed (window {WINDOW}) {got:.2f}, uniform shuffle {want:.2f}")
    assert abs(got / want - 1) <= 0.05

    # a store in natural order (class by class): windows of 8-row pieces instead of whole 16-row shards
    old = trainval(stores["natural"])
    assert piece_rows(old) == 8
    orders = [epoch_order(old, epoch=e, seed=0, window_rows=WINDOW) for e in range(epochs)]
    pieces = mean_distinct(old.labels, [o[s : s + BATCH] for o in orders for s in range(0, old.n, BATCH)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probe.epochorder, "label_clustered", lambda labels: False)  # the reader before: whole shards
        orders = [epoch_order(old, epoch=e, seed=0, window_rows=WINDOW) for e in range(epochs)]
    shards = mean_distinct(old.labels, [o[s : s + BATCH] for o in orders for s in range(0, old.n, BATCH)])
    print(f"natural-order store: whole-shard windows {shards:.2f}, 8-row pieces {pieces:.2f}")
    # pieces mix more classes than whole shards (more so with larger classes: benchmarks/stream_order.py),
    # but only the shuffled row order gives a uniform shuffle's mix
    assert shards < 0.6 * want and shards + 0.5 < pieces < 0.8 * want


def test_streaming_with_a_small_window_reaches_the_cached_accuracy(stores, tmp_path):
    """Tolerance: 0.1 (5 of the 50 test images); seed 42 gives the same accuracy here."""
    common = dict(dataset="folder", width=32, depth=1, num_heads=2, grid=(2, 2), batch_size=BATCH, steps=500, lr=3e-3,
                  device="cpu", seed=42)
    store = str(stores["shuffled"])
    streamed = run_probe(ProbeConfig(stores=(store,), out=str(tmp_path / "s"), cache="stream", shuffle_window=WINDOW,
                                     **common)).metrics[0]
    cached = run_probe(ProbeConfig(stores=(store,), out=str(tmp_path / "c"), cache="ram", **common)).metrics[0]
    assert streamed["cache"] == "stream" and streamed["shuffle_window"] == WINDOW and streamed["n_train"] == 190
    assert cached["cache"] == "ram" and cached["n"] == 50
    print(f"\naccuracy: streamed (window {WINDOW}) {streamed['accuracy']:.3f}, cached {cached['accuracy']:.3f}")
    assert cached["accuracy"] >= 0.8
    assert abs(streamed["accuracy"] - cached["accuracy"]) <= 0.1


def test_row_order_is_a_pure_function_of_the_dataset(folder, stores, tmp_path):
    a, b = row_order(plan_dataset("folder", root=folder)[0]), row_order(plan_dataset("folder", root=folder)[0])
    assert a.plan.samples == b.plan.samples and a.source_index == b.source_index
    again = run_extract(folder, tmp_path, batch_size=5)  # other batches: same rows, same bytes
    first, second = open_store(stores["shuffled"]).task("default"), open_store(again.store).task("default")
    assert first.samples.equals(second.samples)
    assert np.array_equal(first.read(slice(None)), second.read(slice(None)))


class Stop(Exception):
    pass


def stop_after_first_batch(task, total):
    def advance(n):
        raise Stop
    return advance


def test_a_task_begun_in_natural_order_is_not_finished_in_another(folder, stores, tmp_path):
    # finished by an older combo: a valid store, left as it is
    done = run_extract(folder, stores["natural"].parent.parent)
    assert done.tasks[0].status == "already complete"
    assert "source_index" not in open_store(stores["natural"]).task("default").samples.column_names
    # begun by an older combo and interrupted: refused, saying why and what to do
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "row_order", natural_order)
        with pytest.raises(Stop):
            run_extract(folder, tmp_path, progress=stop_after_first_batch)
    with pytest.raises(StoreMismatchError, match=r"begun by an older combo.*natural.*--overwrite"):
        run_extract(folder, tmp_path)
    redone = run_extract(folder, tmp_path, overwrite=True)
    assert redone.tasks[0].status == "extracted"
    assert "source_index" in open_store(redone.store).task("default").samples.column_names


def test_a_shuffled_parquet_plan_reads_each_row_group_once(tmp_path):
    path = tmp_path / "data.parquet"
    make_parquet(path, n=60, num_classes=3, layout="bytes", row_group_size=8)
    plan = plan_dataset("parquet", root=path)[0]
    assert isinstance(plan.reader, ParquetReader) and pq.ParquetFile(path).num_row_groups == 8
    ordered = row_order(plan).plan
    reader = ordered.reader
    assert isinstance(reader, ShuffledParquetReader)
    calls = []
    original = reader.base.read_bytes
    reader.base.read_bytes = lambda key: calls.append(key) or original(key)
    fresh = plan_dataset("parquet", root=path)[0].reader
    for row, sample in enumerate(ordered.samples):
        assert ordered.load_image(row).tobytes() == fresh.open(sample.source).tobytes()
    assert sorted(calls) == list(range(60))  # each row group decoded once, every image read once
