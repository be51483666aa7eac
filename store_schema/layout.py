"""Chunking, codec and checksums of the token arrays.

A *shard* (one object / file) holds `rows_per_shard` images x all layers. Format 2 sizes it
by bytes (`shard_bytes`, raw), so it does not grow with the model, and makes each inner chunk
all of the shard's rows x one layer: a probe reads a whole shard in one request, a per-layer
study (atlas, linear probe) reads one inner chunk per shard, also one request. Every inner
chunk carries a checksum any zarr v3 reader verifies (the spec's crc32c codec, after the
compressor), and never-written chunks read as NaN, not zeros. Writers own whole shards,
so two writers never touch one file (zarr's shard writes are read-modify-write). Figures
behind the defaults: store_schema/README.md and benchmarks/store_layout.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from zarr.codecs import BloscCodec, BloscShuffle, BytesCodec, Crc32cCodec, ZstdCodec

from .metadata import SUPPORTED_DTYPES

SHARD_BYTES = 32 * 2**20  # raw bytes of one shard's tokens: see README "Chunking" for the measurement


@dataclass(frozen=True)
class StoreLayout:
    dtype: str = "float16"
    rows_per_shard: int | None = None  # None: as many rows as fit in `shard_bytes`
    rows_per_chunk: int | None = None  # None: the whole shard (one inner chunk per layer per shard)
    layers_per_chunk: int = 1
    codec: str = "zstd"  # "zstd" | "blosc-zstd" | "blosc-lz4" | "none"
    clevel: int = 1
    shuffle: str = "shuffle"  # byte shuffle: float16 exponents compress, mantissas barely do
    shard_bytes: int = SHARD_BYTES
    checksum: bool = True  # format 1 stores have none
    fill_nan: bool = True  # format 1 stores fill with 0

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            hint = " (zarr 3 has no native bfloat16; store float16 or float32)" if self.dtype == "bfloat16" else ""
            raise ValueError(f"--dtype {self.dtype!r} is not supported; choose one of {SUPPORTED_DTYPES}{hint}")
        if self.rows_per_shard is not None and self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, not {self.rows_per_shard}")
        if self.rows_per_shard and self.rows_per_chunk and self.rows_per_shard % self.rows_per_chunk:
            raise ValueError(
                f"rows_per_shard ({self.rows_per_shard}) must be a multiple of rows_per_chunk ({self.rows_per_chunk})"
            )
        if self.codec not in ("blosc-zstd", "blosc-lz4", "zstd", "none"):
            raise ValueError(f"unknown codec {self.codec!r}; choose blosc-zstd, blosc-lz4, zstd or none")

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "float16" else 4

    def for_rows(self, row_bytes: int) -> "StoreLayout":
        """This layout with concrete row counts for rows of `row_bytes` (raw) each."""
        rows = self.rows_per_shard or max(1, self.shard_bytes // max(1, row_bytes))
        return replace(self, rows_per_shard=int(rows), rows_per_chunk=int(self.rows_per_chunk or rows))

    def compressors(self) -> tuple[Any, ...]:
        # crc32c (the zarr v3 spec's checksum codec, hardware-accelerated) rather than zstd's own xxh64
        # frame checksum: one codec for every compressor, and no dearer (both ~5% of a read's CPU time,
        # benchmarks/store_layout.py and store_schema/README.md)
        crc = (Crc32cCodec(),) if self.checksum else ()
        if self.codec == "zstd":
            return (ZstdCodec(level=self.clevel), *crc)
        if self.codec == "none":
            return crc
        cname = "zstd" if self.codec == "blosc-zstd" else "lz4"
        shuffle = {"shuffle": BloscShuffle.shuffle, "bitshuffle": BloscShuffle.bitshuffle, "none": BloscShuffle.noshuffle}[
            self.shuffle
        ]
        return (BloscCodec(cname=cname, clevel=self.clevel, shuffle=shuffle, typesize=self.itemsize), *crc)

    def array_kwargs(
        self, shape: tuple[int, int, int, int], *, dimension_names: tuple[str, ...] = ("sample", "layer", "token", "channel")
    ) -> dict[str, Any]:
        """Keyword arguments for `zarr.create_array` for a [N, L, T, D] array of this layout."""
        if not (self.rows_per_shard and self.rows_per_chunk):
            raise ValueError("layout has no row counts yet; call for_rows(row_bytes) first")
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
            "fill_value": float("nan") if self.fill_nan else 0,
            "dimension_names": dimension_names,
        }
        if chunks != shards:
            kwargs["shards"] = shards
        return kwargs

    def to_attrs(self) -> dict[str, Any]:
        out = asdict(self)
        out["chunk_checksum"] = ("crc32c of every inner chunk" if self.checksum else "none") + (
            "; sha256 of every object in manifest.json")
        out["fill_value"] = "NaN" if self.fill_nan else 0
        del out["fill_nan"]
        return out

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "StoreLayout":
        keys = ("dtype", "rows_per_shard", "rows_per_chunk", "layers_per_chunk", "codec", "clevel", "shuffle", "shard_bytes", "checksum")
        fields = {k: attrs[k] for k in keys if k in attrs}
        fields.setdefault("checksum", False)  # format 1: no per-chunk checksum
        fields["fill_nan"] = attrs.get("fill_value") == "NaN"
        return cls(**fields)
