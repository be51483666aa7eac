"""scikit-learn's bundled digits with VTAB-like splits (offline demo data)."""

from __future__ import annotations

import numpy as np

from .common import DigitsReader, Sample, TaskPlan, _digits_arrays, _vtab_split_plan


# --------------------------------------------------------------------------------------------------
# Digits


def plan_digits() -> list[TaskPlan]:
    """sklearn's 1,797 8x8 digits with VTAB-like splits, so the VTAB protocols apply unchanged.

    A seed-0 `RandomState` permutation (NumPy keeps that stream stable across versions) picks
    train800 / val200 / test (the remaining 797); rows are in ascending original index per split.
    """
    images, targets = _digits_arrays()
    perm = np.random.RandomState(0).permutation(len(images))
    parts = [
        (sorted(perm[:800].tolist()), ("train800", "train800val200")),
        (sorted(perm[800:1000].tolist()), ("val200", "train800val200")),
        (sorted(perm[1000:].tolist()), ("test",)),
    ]
    samples = tuple(
        Sample(f"digits/{k:04d}", int(targets[k]), splits, k) for idx, splits in parts for k in idx
    )
    return [
        _vtab_split_plan(
            dataset="digits", task="digits", root=None, samples=samples,
            classes=tuple(str(c) for c in range(10)), reader=DigitsReader(),
        )
    ]
