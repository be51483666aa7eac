"""Held-out importance: what a trained probe loses, on data it never trained on, without one backbone.

The paper's s_k (the norm of Lambda's slice for backbone k) says how much the penalised probe *uses*
backbone k, not whether that use helps: a probe that memorised its training set can lean on pure
noise, and s_k then ranks the noise first. Here each backbone's features are made uninformative at
evaluation time, by shuffling them across the held-out samples (each sample keeps its label and its
other backbones' features), and the accuracy drop is measured on the held-out split. A backbone that
carries nothing the probe can use on new data costs nothing when shuffled. It costs evaluations
(backbones x repeats passes over the held-out split), not training.

Uncertainty: per held-out sample, d_i = correct_i - (mean over repeats of correct_i when shuffled);
the drop is mean(d) and its 95% interval mean(d) +- 1.96 sd(d) / sqrt(n) (paired, so the sampling
noise of the held-out set largely cancels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data import SplitSource, eval_batches
from .train import Prepare, evaluate

HELDOUT_REPEATS = 5
Z95 = 1.96


@dataclass
class ShuffledSource(SplitSource):
    """A split whose backbone `shuffled` (every part of it, with one permutation) is read in the order
    `permutation` (positions 0..n-1): that backbone's features keep their distribution but no longer belong
    to the sample's label."""

    shuffled: int = 0  # a backbone (index into task.stores)
    permutation: np.ndarray | None = None
    layer: int | None = None  # shuffle only this layer (a position in what backbone `shuffled` reads, over its parts)

    def _layer_in(self, k: int) -> int | None:
        """The position of `layer` in part k's layers, None when it is in another part of the backbone."""
        assert self.layer is not None
        start = 0
        for j in self.task.backbone_parts(self.shuffled):
            count = len(self.layers_of(j)) if self.layers_of(j) is not None else self.task.parts[j].store.num_layers
            if j == k:
                return self.layer - start if start <= self.layer < start + count else None
            start += count
        return None

    def read(self, positions: np.ndarray, *, direct: bool = False) -> list[np.ndarray]:
        """As `SplitSource.read`; backbone `shuffled` moved. A compact store moves every one of its encoded arrays
        (all hold rows on axis 0 and layers on axis 1), so its decoded maps move exactly as full-size ones do."""
        positions = np.asarray(positions, dtype=np.int64)
        arrays: list[np.ndarray] = []
        for k, row_map in enumerate(self.task.row_maps):
            if self.task.backbone_of_part[k] != self.shuffled or self.permutation is None:
                arrays += self.read_part(k, row_map[self.rows[positions]], direct=direct)
                continue
            moved = row_map[self.rows[self.permutation[positions]]]
            if self.layer is None:
                arrays += self.read_part(k, moved, direct=direct)
                continue
            data = self.read_part(k, row_map[self.rows[positions]], direct=direct)
            pos = self._layer_in(k)
            if pos is not None:
                layers = self.layers_of(k)
                stored_layer = pos if layers is None else layers[pos]
                for block, other in zip(data, self.read_part(k, moved, layers=[stored_layer])):
                    block[:, pos] = other[:, 0]
            arrays += data
        return arrays


@dataclass(frozen=True)
class HeldoutDrop:
    """Held-out accuracy lost when one backbone is shuffled: mean and 95% interval (fractions, not %)."""

    drop: float
    low: float
    high: float
    shuffled_accuracy: float


def heldout_drops(model: torch.nn.Module, source: SplitSource, predictions: np.ndarray, *, device: torch.device | str,
                  prepare: Prepare | None, batch_size: int, repeats: int = HELDOUT_REPEATS, seed: int = 0) -> list[HeldoutDrop]:
    """One `HeldoutDrop` per backbone of `source` (all its parts shuffled together), from the model's
    `predictions` on it (positions order)."""
    if repeats < 1:
        raise ValueError(f"held-out repeats must be >= 1, got {repeats}")
    rng = np.random.default_rng(seed)
    return [_shuffled_drop(model, source, predictions, store=k, layer=None, repeats=repeats, rng=rng, device=device,
                           prepare=prepare, batch_size=batch_size)
            for k in range(source.task.num_backbones)]


def layer_heldout_drops(model: torch.nn.Module, source: SplitSource, predictions: np.ndarray, *,
                        layers_per_store: Sequence[int], device: torch.device | str, prepare: Prepare | None,
                        batch_size: int, repeats: int = 1, seed: int = 0) -> list[list[HeldoutDrop]]:
    """Per backbone, per layer position (over its parts): the held-out drop when only that layer is shuffled
    (costs one evaluation per layer and repeat)."""
    rng = np.random.default_rng(seed + 1)
    return [[_shuffled_drop(model, source, predictions, store=k, layer=pos, repeats=repeats, rng=rng, device=device,
                            prepare=prepare, batch_size=batch_size)
             for pos in range(num_layers)]
            for k, num_layers in enumerate(layers_per_store)]


def _shuffled_drop(model: torch.nn.Module, source: SplitSource, predictions: np.ndarray, *, store: int,
                   layer: int | None, repeats: int, rng: np.random.Generator, device: torch.device | str,
                   prepare: Prepare | None, batch_size: int) -> HeldoutDrop:
    """The drop when store `store` (or only its layer `layer`) is shuffled, over `repeats` permutations."""
    labels = source.labels.astype(np.int64)
    n = labels.size
    hits = np.zeros(n)
    for _ in range(repeats):
        shuffled = ShuffledSource(source.task, source.rows, layers=source.layers, prefix=source.prefix,
                                  shuffled=store, permutation=rng.permutation(n), layer=layer)
        _, _, preds = evaluate(model, eval_batches(shuffled, batch_size=batch_size), device=device, prepare=prepare)
        hits += preds == labels
    return _paired((np.asarray(predictions) == labels).astype(np.float64), hits / repeats)


def _paired(correct: np.ndarray, shuffled_hits: np.ndarray) -> HeldoutDrop:
    d = correct - shuffled_hits
    n = d.size
    mean = float(d.mean())
    half = Z95 * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
    return HeldoutDrop(drop=mean, low=mean - half, high=mean + half, shuffled_accuracy=float(shuffled_hits.mean()))


def chance_accuracy(labels: np.ndarray) -> float:
    """Accuracy of always answering the most frequent class of `labels` (what a probe that learnt nothing gets)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return 0.0
    return float(np.unique(labels, return_counts=True)[1].max() / labels.size)


def near_chance(accuracy: float, chance: float, n: int) -> bool:
    """True when `accuracy` on n samples is not clearly (one-sided 95%) above `chance`."""
    if n <= 0:
        return True
    return accuracy <= chance + 1.645 * math.sqrt(max(chance * (1 - chance), 1e-12) / n)


def descending_ranks(values: Sequence[float]) -> list[int]:
    """Rank of each value, 1 = largest; ties keep their order (--stores order for backbones)."""
    order = sorted(range(len(values)), key=lambda k: -values[k])
    ranks = [0] * len(values)
    for r, k in enumerate(order):
        ranks[k] = r + 1
    return ranks
