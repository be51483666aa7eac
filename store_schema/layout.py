"""Chunking and codec of the token arrays.

A *shard* (one object / file) holds `rows_per_shard` images x all layers; inside it,
inner chunks of `rows_per_chunk` images x `layers_per_chunk` layers are compressed
separately. Probing reads whole shards (a batch of images, every layer); a per-layer
study reads one inner chunk per shard. Writers own whole shards, so two writers never
touch one file (zarr's shard writes are read-modify-write). Figures behind the defaults:
store_schema/README.md and benchmarks/store_layout.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from zarr.codecs import BloscCodec, BloscShuffle, BytesCodec, ZstdCodec

from .metadata import SUPPORTED_DTYPES


@dataclass(frozen=True)
class StoreLayout:
    dtype: str = "float16"
    rows_per_shard: int = 32
    rows_per_chunk: int = 8
    layers_per_chunk: int = 1
    codec: str = "zstd"  # "zstd" | "blosc-zstd" | "blosc-lz4" | "none"
    clevel: int = 1
    shuffle: str = "shuffle"  # byte shuffle: float16 exponents compress, mantissas barely do

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            hint = " (zarr 3 has no native bfloat16; store float16 or float32)" if self.dtype == "bfloat16" else ""
            raise ValueError(f"--dtype {self.dtype!r} is not supported; choose one of {SUPPORTED_DTYPES}{hint}")
        if self.rows_per_shard % self.rows_per_chunk:
            raise ValueError(
                f"rows_per_shard ({self.rows_per_shard}) must be a multiple of rows_per_chunk ({self.rows_per_chunk})"
            )
        if self.codec not in ("blosc-zstd", "blosc-lz4", "zstd", "none"):
            raise ValueError(f"unknown codec {self.codec!r}; choose blosc-zstd, blosc-lz4, zstd or none")

    def compressors(self) -> tuple[Any, ...]:
        typesize = 2 if self.dtype == "float16" else 4
        if self.codec == "none":
            return ()
        if self.codec == "zstd":
            return (ZstdCodec(level=self.clevel),)
        cname = "zstd" if self.codec == "blosc-zstd" else "lz4"
        shuffle = {"shuffle": BloscShuffle.shuffle, "bitshuffle": BloscShuffle.bitshuffle, "none": BloscShuffle.noshuffle}[
            self.shuffle
        ]
        return (BloscCodec(cname=cname, clevel=self.clevel, shuffle=shuffle, typesize=typesize),)

    def array_kwargs(self, shape: tuple[int, int, int, int]) -> dict[str, Any]:
        """Keyword arguments for `zarr.create_array` for a [N, L, T, D] array of this layout."""
        n, num_layers, tokens, dim = shape
        layers_per_chunk = min(self.layers_per_chunk or num_layers, max(num_layers, 1))
        chunks = (self.rows_per_chunk, layers_per_chunk, max(tokens, 1), max(dim, 1))
        shards = (self.rows_per_shard, max(num_layers, 1), max(tokens, 1), max(dim, 1))
        kwargs: dict[str, Any] = {
            "shape": shape,
            "dtype": self.dtype,
            "chunks": chunks,
            "compressors": self.compressors(),
            "serializer": BytesCodec(endian="little"),
            "fill_value": 0,
            "dimension_names": ("sample", "layer", "token", "channel"),
        }
        if chunks != shards:
            kwargs["shards"] = shards
        return kwargs

    def to_attrs(self) -> dict[str, Any]:
        out = asdict(self)
        out["chunk_checksum"] = "sha256 of each stored shard object"
        return out

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "StoreLayout":
        fields = {k: attrs[k] for k in ("dtype", "rows_per_shard", "rows_per_chunk", "layers_per_chunk", "codec", "clevel", "shuffle") if k in attrs}
        return cls(**fields)
