"""Grid groups of a store (format 2.3): which stored layers share one token grid and width.

A hierarchical model's stage outputs have different grids and widths (ConvNeXt-T at 224: 56x56x96 ...
7x7x768). Each (grid, width) group gets arrays of its own, named with the group's suffix (`grid_array`):
one array per group rather than per layer, as benchmarks/grid_layout.py measured (README "Format versions").
A single-grid store has one group named "" whose arrays keep their plain names (`tokens`, `layer`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_SUFFIX = re.compile(r"^(?P<base>.+)_(?P<grid>g[0-9]+)$")


@dataclass(frozen=True)
class GridSpec:
    """One group of layers with one token grid and width; `name` is "" for a single-grid store, else g0, g1 ..."""

    name: str
    token_grid: tuple[int, int]
    feature_dim: int
    layers: tuple[int, ...]  # model layer indices held by this group, ascending

    @property
    def num_tokens(self) -> int:
        return int(self.token_grid[0] * self.token_grid[1])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def to_attrs(self) -> dict[str, Any]:
        """The group's entry of the root attribute's `features.grids`."""
        return {"name": self.name, "token_grid": [int(v) for v in self.token_grid], "num_tokens": self.num_tokens,
                "feature_dim": int(self.feature_dim), "layers": [int(v) for v in self.layers]}

    @classmethod
    def from_attrs(cls, doc: dict[str, Any]) -> "GridSpec":
        h, w = doc["token_grid"]
        return cls(str(doc["name"]), (int(h), int(w)), int(doc["feature_dim"]), tuple(int(v) for v in doc["layers"]))


def grid_array(base: str, grid: str) -> str:
    """The name of array (or dimension) `base` of group `grid`: "tokens", "g1" -> "tokens_g1"; "" -> "tokens"."""
    return f"{base}_{grid}" if grid else base


def split_array(name: str) -> tuple[str, str]:
    """Inverse of `grid_array`: "tokens_g1" -> ("tokens", "g1"); "tokens" -> ("tokens", "")."""
    match = _SUFFIX.match(name)
    return (match["base"], match["grid"]) if match else (name, "")


def group_layers(layers: Sequence[int], grids: Sequence[Sequence[int]], widths: Sequence[int]) -> list[GridSpec]:
    """The grouping rule of format 2.3: layers (with each one's (h, w) grid and width) grouped by (grid, width)
    in order of layer index, groups named g0, g1, ...; one group only is named "" (a single-grid store).

    A group's layers must be contiguous in index order (a model's stages): a grid that comes back after
    another is refused, since its group could not be one run of layers."""
    if not (len(layers) == len(grids) == len(widths)):
        raise ValueError(f"group_layers: {len(layers)} layers, {len(grids)} grids and {len(widths)} widths; "
                         "give one grid and one width per layer")
    if not layers:
        raise ValueError("group_layers: no layers to group")
    rows = sorted((int(l), (int(g[0]), int(g[1])), int(w)) for l, g, w in zip(layers, grids, widths))
    indices = [r[0] for r in rows]
    if len(set(indices)) != len(indices):
        raise ValueError(f"group_layers: layer indices {indices} repeat")
    runs: list[tuple[tuple[int, int], int, list[int]]] = []
    for layer, grid, width in rows:
        if runs and runs[-1][:2] == (grid, width):
            runs[-1][2].append(layer)
        else:
            runs.append((grid, width, [layer]))
    seen: dict[tuple[tuple[int, int], int], list[int]] = {}
    for grid, width, members in runs:
        key = (grid, width)
        if key in seen:
            raise ValueError(
                f"layers {seen[key]} and {members} share grid {grid[0]}x{grid[1]} and width {width} but are not "
                "contiguous (other grids lie between them): a store's grid groups are runs of consecutive layers "
                "(a model's stages); choose layers (--layers) whose grids do not come back"
            )
        seen[key] = members
    named = len(runs) > 1
    return [GridSpec(f"g{k}" if named else "", grid, width, tuple(members)) for k, (grid, width, members) in enumerate(runs)]


def grid_problems(grids: Iterable[GridSpec], *, layers: Sequence[int], token_grid: Sequence[int], feature_dim: int,
                  num_prefix_tokens: int) -> list[str]:
    """Ways a multi-grid description disagrees with the rest of `features` (one sentence each): what the writer
    refuses to record and `combo store validate` reports."""
    grids = list(grids)
    out: list[str] = []
    if len(grids) < 2:
        out.append(f"features.grids lists {len(grids)} group(s); a multi-grid store has at least 2 (one grid: no 'grids')")
        return out
    names = [g.name for g in grids]
    if names != [f"g{k}" for k in range(len(grids))]:
        out.append(f"features.grids are named {names}; expected g0 .. g{len(grids) - 1} in order")
    held = [layer for g in grids for layer in g.layers]
    if held != sorted(int(v) for v in layers) or len(set(held)) != len(held):
        out.append(f"features.grids hold layers {held}; expected features.layers {list(layers)}, each once, "
                   "group by group in index order")
    for g in grids:
        if not g.layers:
            out.append(f"features.grids group {g.name} holds no layers")
    last = grids[-1]
    if list(last.token_grid) != [int(v) for v in token_grid] or last.feature_dim != int(feature_dim):
        out.append(f"features.token_grid {list(token_grid)} / feature_dim {feature_dim} are not the last group's "
                   f"({list(last.token_grid)} / {last.feature_dim})")
    if int(num_prefix_tokens):
        out.append(f"features.num_prefix_tokens is {num_prefix_tokens}; a multi-grid store holds no prefix tokens")
    return out


def grids_of(features: dict[str, Any]) -> list[GridSpec]:
    """The groups a root attribute's `features` describes: its `grids`, or for a single-grid store one group
    named "" from token_grid / feature_dim / layers."""
    if features.get("grids"):
        return [GridSpec.from_attrs(doc) for doc in features["grids"]]
    h, w = features["token_grid"]
    return [GridSpec("", (int(h), int(w)), int(features["feature_dim"]), tuple(int(v) for v in features["layers"]))]


def multi_grids(features: dict[str, Any]) -> tuple[GridSpec, ...] | None:
    """The groups of a multi-grid store's `features`; None for a single-grid store (no `grids`)."""
    return tuple(grids_of(features)) if features.get("grids") else None


def grid_features(features: dict[str, Any], grid: GridSpec) -> dict[str, Any]:
    """`features` as one group sees it: its grid, width and layers, no prefix tokens and no `grids`."""
    out = {k: v for k, v in features.items() if k != "grids"}
    out.update(token_grid=list(grid.token_grid), num_tokens=grid.num_tokens, feature_dim=grid.feature_dim,
               layers=list(grid.layers), num_layers=grid.num_layers, num_prefix_tokens=0)
    return out


__all__ = ["GridSpec", "grid_array", "grid_features", "grid_problems", "grids_of", "group_layers", "multi_grids", "split_array"]
