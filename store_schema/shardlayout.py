"""Combo's shard layout, read from a zarr array's metadata: what the shard reader (shardread.py) and the
shard writer (shardwrite.py) both take, and zarr handles everything else.

The layout: `sharding_indexed` with its index at the end (uint64 offset and length per inner chunk, little
endian, then crc32c), inner codecs `bytes` (little endian) [+ `zstd`] [+ `crc32c`], a numeric dtype, on a
little-endian host. `ShardSpec.of` returns None for any other array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

ABSENT = 2**64 - 1  # offset and length in the index of a chunk the shard does not hold (the spec's marker)


@dataclass(frozen=True)
class ShardSpec:
    """One array's shard layout, from its zarr metadata: what the shard reader and the shard writer need."""

    shape: tuple[int, ...]
    shard_shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    zstd: ZstdCodec | None  # the compressor, None for none
    checksum: bool  # crc32c after it

    @property
    def chunks_per_shard(self) -> tuple[int, ...]:
        return tuple(s // c for s, c in zip(self.shard_shape, self.chunk_shape))

    @property
    def index_bytes(self) -> int:
        return int(np.prod(self.chunks_per_shard)) * 16 + 4

    @property
    def chunk_nbytes(self) -> int:
        return int(np.prod(self.chunk_shape)) * self.dtype.itemsize

    @classmethod
    def of(cls, array: zarr.Array) -> "ShardSpec | None":
        """The spec of a combo-layout sharded array, or None when zarr must read it."""
        meta = array.metadata
        if getattr(meta, "zarr_format", None) != 3 or len(meta.codecs) != 1 or not isinstance(meta.codecs[0], ShardingCodec):
            return None
        shard = meta.codecs[0]
        index = list(shard.index_codecs)
        if (shard.index_location != ShardingCodecIndexLocation.end or len(index) != 2
                or not isinstance(index[0], BytesCodec) or not isinstance(index[1], Crc32cCodec)
                or getattr(index[0].endian, "value", index[0].endian) not in ("little", None)):
            return None
        inner = list(shard.codecs)
        if not inner or not isinstance(inner[0], BytesCodec):
            return None
        endian = getattr(inner[0].endian, "value", inner[0].endian)
        dtype = np.dtype(array.dtype)
        if dtype.itemsize > 1 and endian != "little" or dtype.kind not in "fiub":
            return None
        rest = inner[1:]
        zstd = rest[0] if rest and isinstance(rest[0], ZstdCodec) else None
        rest = rest[1:] if zstd is not None else rest
        checksum = bool(rest) and isinstance(rest[0], Crc32cCodec)
        rest = rest[1:] if checksum else rest
        if rest or np.little_endian is False:
            return None
        shard_shape = tuple(int(v) for v in meta.chunk_grid.chunk_shape)
        chunk_shape = tuple(int(v) for v in shard.chunk_shape)
        if any(s % c for s, c in zip(shard_shape, chunk_shape)):
            return None
        return cls(shape=tuple(int(v) for v in array.shape), shard_shape=shard_shape, chunk_shape=chunk_shape,
                   dtype=dtype, fill_value=array.fill_value, zstd=zstd, checksum=checksum)
