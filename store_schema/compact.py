"""Compact token encodings: int8, per-layer PCA, or both. Numpy only, so any reader can decode.

Every compact encoding starts from each (image, layer) map's own statistics, the ones ComBo
normalises with (PAPER.md: mean and variance over all tokens and channels of the map), computed on
the original values and stored exactly (float32, array ``map_stats`` [N, L, 2]: mean, std):

    u = (x - mean) / std                                  the standardised map (std 0 -> 1)

and then encodes u, so every image and layer is compressed on the same scale:

- **PCA-R** (``pca``): per layer l, ``z = (u - pca_mean[l]) @ pca_components[l]``, the R leading
  principal directions of the standardised patch tokens of the task's *training split only*
  (``train800`` for VTAB, ``train`` elsewhere: the rows with ``in_<split>`` and ``valid``; the task
  attribute ``compact`` records ``fit_split``, ``fit_rows`` and the variance kept per layer). ``pca_components`` [L, D, R] and ``pca_mean`` [L, D] are arrays of the task.
- **int8** (``int8``): per (image, layer), v (u, or z with PCA) is split into
  * ``outlier_index`` / ``outlier_value`` [N, L, T, k]: each token's k = 2 largest values (after
    the scaling below), kept at float16 with their channel (int16);
  * ``channel_scale`` [N, L, C]: the median over tokens of |v| per channel (float16; a "massive"
    channel hundreds of times larger than the rest is divided down to the others' size, and the
    median ignores a few high-norm outlier tokens);
  * ``token_scale`` [N, L, T]: the largest remaining scaled value of each token / 127 (float16), so
    an outlier token gets its own range instead of crushing the others. Each token is quantised with
    and without the channel scales and keeps the way with the smaller squared error; *without* is
    stored as a negative token scale (a token whose channel profile is not the map's typical one,
    e.g. a register-like high-norm token, keeps its own massive values precise);
  * ``codes`` [N, L, T, C] int8 = round(v / channel_scale / |token_scale|), |codes| <= 127 (0 where
    the value is kept in ``outlier_value``).

Decoding (what ``decode`` does; C = D without PCA, R with it)::

    v = codes * |token_scale|[..., None] * (channel_scale[:, :, None, :] where token_scale > 0, else 1)
    v[..., outlier_index] = outlier_value                               (int8; else v = codes, float16)
    v[never] = NaN                                                      (int8; `never_written`)
    u = v @ pca_components[l].T + pca_mean[l]                           (PCA; else u = v)
    x = u * std + mean                                                  (the map, original units)

Never written (a lost shard, a skipped image) reads as NaN, as full-size tokens do: every float array is
NaN-filled, and from format 2.2 the integer arrays are filled with values the encoder never writes, int8
codes with ``CODE_FILL`` = -128 (codes are -127..127) and ``outlier_index`` with ``INDEX_FILL`` = -1. A token
any of whose int8 arrays holds its fill value is ``never`` written and decodes to NaN in every channel, so a
missing shard of any one array reads as missing, not as data; a float16 (PCA) code or a map statistic that is
NaN makes its values NaN by itself. Format 2.1 filled both integer arrays with 0, which decoded as data; its
stores hold neither marker, so the same decoding reads them as before.

ComBo's normalised map is ``u * std / sqrt(std**2 + 1e-5)``: exact statistics, and only u carries
the compression error. What is exact: mean and std of every map, labels, sample table, prefix (cls)
tokens (stored at full precision). What is approximate: the token values (u).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

CODES = "codes"
TOKEN_SCALE = "token_scale"
CHANNEL_SCALE = "channel_scale"
MAP_STATS = "map_stats"
OUTLIER_INDEX = "outlier_index"
OUTLIER_VALUE = "outlier_value"
MEDIAN_TOKENS = 64  # tokens a channel scale's median is taken over (evenly spaced), for speed
OUTLIERS = 2  # values per token kept at float16 beside the int8 codes (8 bytes a token)
PCA_COMPONENTS = "pca_components"
PCA_MEAN = "pca_mean"
INT8_MAX = 127
CODE_FILL = -128  # format 2.2: fill value of int8 codes, which are -127..127: "never written"
INDEX_FILL = -1  # format 2.2: fill value of outlier_index (no channel): "never written"
FP16_TINY, FP16_MAX = float(np.finfo(np.float16).tiny), float(np.finfo(np.float16).max)
FORMATS = ("int8", "pca")


class CompactSpecError(ValueError):
    """A --compact / --pca / --int8 choice that cannot be used."""


@dataclass(frozen=True)
class CompactSpec:
    """How a store's tokens are encoded: ``pca`` components per layer (None: all channels) and/or int8."""

    pca: int | None = None
    int8: bool = False

    def __post_init__(self) -> None:
        if self.pca is not None and int(self.pca) < 1:
            raise CompactSpecError(f"PCA needs at least 1 component per layer, not {self.pca}")
        if self.pca is None and not self.int8:
            raise CompactSpecError("a compact encoding needs PCA (pca:R) and/or int8")

    @classmethod
    def parse(cls, text: str) -> "CompactSpec":
        """'int8', 'pca:128', 'pca:128,int8' (order free)."""
        pca: int | None = None
        int8 = False
        items = [t.strip().lower() for t in str(text).split(",") if t.strip()]
        if not items:
            raise CompactSpecError(f"--compact {text!r}: give int8, pca:R or pca:R,int8")
        for item in items:
            if item == "int8":
                int8 = True
            elif item.startswith("pca"):
                _, _, number = item.partition(":")
                try:
                    pca = int(number)
                except ValueError:
                    raise CompactSpecError(f"--compact {text!r}: {item!r} needs a component count, e.g. pca:128") from None
                if pca < 1:
                    raise CompactSpecError(f"--compact {text!r}: PCA needs at least 1 component per layer, not {pca}")
            else:
                raise CompactSpecError(f"--compact {text!r}: unknown format {item!r}; choose int8, pca:R or pca:R,int8")
        return cls(pca=pca, int8=int8)

    def check_dim(self, feature_dim: int, *, where: str = "") -> None:
        if self.pca is not None and self.pca > feature_dim:
            raise CompactSpecError(f"{where}PCA to {self.pca} components is more than the features' {feature_dim} channels; "
                                   f"choose at most {feature_dim}")

    @property
    def name(self) -> str:
        """'int8', 'pca128', 'pca128-int8'."""
        return "-".join([f"pca{self.pca}"] * (self.pca is not None) + ["int8"] * self.int8)

    def describe(self) -> str:
        parts = []
        if self.pca is not None:
            parts.append(f"PCA to {self.pca} components per layer")
        if self.int8:
            parts.append("int8 with per-channel and per-token scales")
        return ", then ".join(parts)

    def code_dtype(self) -> np.dtype:
        return np.dtype(np.int8) if self.int8 else np.dtype(np.float16)

    def code_dim(self, feature_dim: int) -> int:
        return int(self.pca) if self.pca is not None else int(feature_dim)

    def arrays(self) -> list[str]:
        """The per-row arrays of a compact task, in the order `encode` returns and `decode` takes them."""
        return [CODES, *([TOKEN_SCALE, CHANNEL_SCALE, OUTLIER_INDEX, OUTLIER_VALUE] if self.int8 else []), MAP_STATS]

    def row_bytes(self, num_layers: int, num_tokens: int, feature_dim: int) -> int:
        """Raw bytes of one image's encoded tokens (all arrays)."""
        c = self.code_dim(feature_dim)
        total = num_layers * num_tokens * c * self.code_dtype().itemsize + num_layers * 2 * 4
        if self.int8:
            total += num_layers * (num_tokens + c) * 2 + num_layers * num_tokens * min(OUTLIERS, c) * 4
        return total

    def array_specs(self, num_rows: int, num_layers: int, num_tokens: int, feature_dim: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype of every per-row array of a compact task, in `arrays()` order."""
        c = self.code_dim(feature_dim)
        n, lay, t, kept = num_rows, num_layers, num_tokens, min(OUTLIERS, self.code_dim(feature_dim))
        specs = {CODES: ((n, lay, t, c), self.code_dtype().name), TOKEN_SCALE: ((n, lay, t), "float16"),
                 CHANNEL_SCALE: ((n, lay, c), "float16"), OUTLIER_INDEX: ((n, lay, t, kept), "int16"),
                 OUTLIER_VALUE: ((n, lay, t, kept), "float16"), MAP_STATS: ((n, lay, 2), "float32")}
        return {name: specs[name] for name in self.arrays()}

    def to_attrs(self) -> dict:
        return {"pca_components": self.pca, "int8": self.int8, "name": self.name, "description": self.describe()}

    @classmethod
    def from_attrs(cls, attrs: dict | None) -> "CompactSpec | None":
        if not attrs:
            return None
        pca = attrs.get("pca_components")
        return cls(pca=None if pca is None else int(pca), int8=bool(attrs.get("int8")))


@dataclass(frozen=True)
class PcaBasis:
    """Per-layer principal directions of standardised patch tokens: components [L, D, R], mean [L, D] (float32)."""

    components: np.ndarray
    mean: np.ndarray

    def select(self, layers: Sequence[int] | None) -> "PcaBasis":
        if layers is None:
            return self
        idx = np.asarray(list(layers), dtype=np.int64)
        return PcaBasis(self.components[idx], self.mean[idx])


def map_stats(x: np.ndarray) -> np.ndarray:
    """[N, L, 2] float32: mean and (biased) std of every (image, layer) map of x [N, L, T, D], in float64."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    mean = flat.mean(axis=2, dtype=np.float64)
    var = np.square(flat - mean[..., None].astype(np.float32), dtype=np.float32).mean(axis=2, dtype=np.float64)
    return np.stack([mean, np.sqrt(var)], axis=-1).astype(np.float32)


def standardise(x: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """u = (x - mean) / std per map, float32 (a map with std 0 is only centred)."""
    mean = stats[..., 0][..., None, None]
    std = stats[..., 1][..., None, None]
    return ((x.astype(np.float32) - mean) / np.where(std > 0, std, 1.0)).astype(np.float32, copy=False)


def _fp16_scale(values: np.ndarray) -> np.ndarray:
    """Positive float16 scales: zeros become 1, the rest clamped into float16's normal range."""
    values = np.where(values > 0, values, 1.0)
    return np.clip(values, FP16_TINY, FP16_MAX).astype(np.float16)


def _quantise_rows(scaled: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token int8 of `scaled` [N, L, T, C] with each token's k largest |values| set aside: codes,
    float16 token scales, and the set-aside channel indices."""
    rest = scaled.copy()
    magnitude = np.abs(scaled)
    picks = []
    for _ in range(k):  # k argmax passes: far cheaper than a partition for the few values kept
        pick = magnitude.argmax(axis=3)[..., None]
        np.put_along_axis(magnitude, pick, -1.0, axis=3)
        picks.append(pick)
    index = np.concatenate(picks, axis=3) if picks else np.zeros((*scaled.shape[:3], 0), dtype=np.int64)
    np.put_along_axis(rest, index, 0.0, axis=3)  # the rest's range no longer stretches to the outliers
    token16 = _fp16_scale(np.abs(rest).max(axis=3) / INT8_MAX)
    codes = np.rint(rest / token16.astype(np.float32)[..., None])
    np.clip(codes, -INT8_MAX, INT8_MAX, out=codes)  # float16 rounding of the scale may overshoot by one ulp
    return codes, token16, index


def quantise(v: np.ndarray, *, outliers: int = OUTLIERS) -> list[np.ndarray]:
    """int8 codes [N, L, T, C], token scales [N, L, T] and channel scales [N, L, C] (float16), and each token's
    `outliers` largest values kept at float16: channel index and value [N, L, T, k] (int16, float16).

    Each token is quantised two ways and keeps the one with the smaller squared error: with the channel
    scales (a massive channel is divided down to the others' size) or without (a token whose channel
    profile differs from the image's typical one, e.g. a high-norm outlier token, whose massive
    values the channel scales would make coarse). The second way is marked by a negative token scale."""
    # [N, L, C] median over (at most MEDIAN_TOKENS evenly spaced) tokens: it ignores up to half of them being outliers
    step = max(1, v.shape[2] // MEDIAN_TOKENS)
    channel = np.median(np.abs(v[:, :, ::step]), axis=2)
    sparse = channel <= 0
    if sparse.any():  # a channel zero on most tokens: its largest value instead
        channel = np.where(sparse, np.abs(v).max(axis=2), channel)
    channel16 = _fp16_scale(channel)
    c32 = channel16.astype(np.float32)[:, :, None, :]
    k = min(outliers, v.shape[3])
    codes_a, token_a, index_a = _quantise_rows(v / c32, k)
    codes_b, token_b, index_b = _quantise_rows(v, k)
    err_a = np.square((codes_a * token_a.astype(np.float32)[..., None]) * c32 - v)
    np.put_along_axis(err_a, index_a, 0.0, axis=3)
    err_b = np.square(codes_b * token_b.astype(np.float32)[..., None] - v)
    np.put_along_axis(err_b, index_b, 0.0, axis=3)
    plain = err_b.sum(axis=3) < err_a.sum(axis=3)  # [N, L, T]
    codes = np.where(plain[..., None], codes_b, codes_a).astype(np.int8)
    token16 = np.where(plain, -token_b, token_a).astype(np.float16)
    index = np.where(plain[..., None], index_b, index_a)
    index.sort(axis=3)
    value = np.take_along_axis(v, index, axis=3).astype(np.float16)
    return [codes, token16, channel16, index.astype(np.int16), value]


def fill_value(name: str, dtype: str | np.dtype, *, markers: bool = True) -> float | int:
    """The fill value a compact array is created with: NaN for a float array; for the integer ones the
    never-written marker (``markers``, format 2.2: `CODE_FILL`, `INDEX_FILL`) or 0 (format 2.1)."""
    if np.dtype(dtype).kind == "f":
        return float("nan")
    if not markers:
        return 0
    return {CODES: CODE_FILL, OUTLIER_INDEX: INDEX_FILL}[name]


def never_written(codes: np.ndarray, token_scale: np.ndarray, channel_scale: np.ndarray, outlier_index: np.ndarray,
                  outlier_value: np.ndarray) -> np.ndarray:
    """[N, L, T] bool: tokens any of whose int8 arrays holds its fill value (NaN; codes -128 and outlier_index -1
    from format 2.2), i.e. a shard of one of them was never written or is lost. `dequantise` makes them NaN."""
    lost = np.isnan(token_scale) | np.isnan(channel_scale).any(axis=-1)[:, :, None]
    lost |= np.isnan(outlier_value).any(axis=-1) | (outlier_index == INDEX_FILL).any(axis=-1)
    lost |= (codes == CODE_FILL).any(axis=-1)
    return lost


def dequantise(codes: np.ndarray, token_scale: np.ndarray, channel_scale: np.ndarray, outlier_index: np.ndarray,
               outlier_value: np.ndarray) -> np.ndarray:
    """v from the int8 arrays (see `quantise`); a negative token scale means "no channel scales". A token that
    was never written (`never_written`) is NaN in every channel."""
    token = token_scale.astype(np.float32)
    channel = np.where(token[..., None] < 0, 1.0, channel_scale.astype(np.float32)[:, :, None, :])
    v = codes.astype(np.float32) * np.abs(token)[..., None] * channel
    index = np.maximum(outlier_index, 0).astype(np.int64)  # a never-written -1 is masked below
    np.put_along_axis(v, index, outlier_value.astype(np.float32), axis=3)
    v[never_written(codes, token_scale, channel_scale, outlier_index, outlier_value)] = np.nan
    return v


def encode(x: np.ndarray, spec: CompactSpec, basis: PcaBasis | None = None, *, workers: int | None = None) -> list[np.ndarray]:
    """Encode token maps x [N, L, T, D] (all layers) into `spec.arrays()`, in that order.

    Layers are encoded independently, on up to `workers` threads (default: one per CPU, numpy releases
    the GIL); the bytes do not depend on the number of threads."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"encode: expected [N, L, T, D] tokens, got shape {x.shape}")
    if spec.pca is not None and basis is None:
        raise ValueError("encode: a PCA encoding needs the task's fitted basis")
    workers = min(x.shape[1], workers or _cpus())
    with one_blas_thread():
        if workers <= 1 or x.shape[1] == 1:
            return _encode(x, spec, basis)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="combo-encode") as pool:
            parts = list(pool.map(lambda l: _encode(x[:, l : l + 1], spec, None if basis is None else basis.select([l])),
                                  range(x.shape[1])))
    return [np.concatenate([p[i] for p in parts], axis=1) for i in range(len(parts[0]))]


def one_blas_thread():
    """numpy's BLAS on one thread: its sums (PCA fit, projection) then come out the same bits whatever the
    machine's or the process's thread count (a dask worker runs 1, a laptop 8), so a compact store's bytes
    depend on its inputs alone. Encoding still uses every CPU, one layer per thread."""
    return threadpool_limits(limits=1, user_api="blas")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _encode(x: np.ndarray, spec: CompactSpec, basis: PcaBasis | None) -> list[np.ndarray]:
    stats = map_stats(x)
    v = standardise(x, stats)
    if spec.pca is not None:
        if basis is None:
            raise ValueError("encode: a PCA encoding needs the task's fitted basis")
        v = np.einsum("nltd,ldr->nltr", v - basis.mean[None, :, None, :], basis.components, optimize=True)
        v = v.astype(np.float32, copy=False)
    if spec.int8:
        return [*quantise(v), stats]
    return [v.astype(np.float16), stats]


def decode(arrays: Sequence[np.ndarray], spec: CompactSpec, basis: PcaBasis | None = None, *,
           layers: Sequence[int] | None = None, normalised: bool = False, eps: float = 1e-5) -> np.ndarray:
    """Token maps [N, L, T, D] float32 from `spec.arrays()` (read for `layers`, if a subset).

    ``normalised``: ComBo's per-map normalisation of the original maps, with their stored statistics,
    instead of the maps in original units."""
    arrays = list(arrays)
    if len(arrays) != len(spec.arrays()):
        raise ValueError(f"decode: {spec.name} needs {len(spec.arrays())} arrays ({', '.join(spec.arrays())}), got {len(arrays)}")
    stats = arrays[-1].astype(np.float32)
    v = dequantise(*arrays[:5]) if spec.int8 else arrays[0].astype(np.float32)
    if spec.pca is not None:
        if basis is None:
            raise ValueError("decode: a PCA encoding needs the task's basis (pca_components, pca_mean)")
        chosen = basis.select(layers)
        v = np.einsum("nltr,ldr->nltd", v, chosen.components, optimize=True) + chosen.mean[None, :, None, :]
    std = stats[..., 1][..., None, None]
    if normalised:
        return (v * (std / np.sqrt(std * std + eps))).astype(np.float32, copy=False)
    return (v * np.where(std > 0, std, 1.0) + stats[..., 0][..., None, None]).astype(np.float32, copy=False)


class PcaFit:
    """Running per-layer mean and covariance of standardised patch tokens, fed a block of rows at a time.

    Memory is L x D x D float64 whatever the number of images; the result depends only on the rows given
    and their order, so a rerun fits the same basis."""

    def __init__(self, num_layers: int, feature_dim: int):
        self.count = 0
        self.rows = 0
        self.sum = np.zeros((num_layers, feature_dim), dtype=np.float64)
        self.outer = np.zeros((num_layers, feature_dim, feature_dim), dtype=np.float64)

    def add(self, x: np.ndarray) -> None:
        """Rows of token maps [n, L, T, D] (original units)."""
        if x.shape[0] == 0:
            return
        u = standardise(x, map_stats(x))
        n, num_layers, t, d = u.shape
        with one_blas_thread():  # the same bits on any machine (see one_blas_thread)
            for layer in range(num_layers):
                flat = u[:, layer].reshape(n * t, d)
                self.sum[layer] += flat.sum(axis=0, dtype=np.float64)
                self.outer[layer] += (flat.T @ flat).astype(np.float64)
        self.count += n * t
        self.rows += n

    def basis(self, components: int) -> PcaBasis:
        if self.count < 2:
            raise CompactSpecError(f"PCA needs training tokens to fit on; got {self.count}")
        d = self.sum.shape[1]
        if components > d:
            raise CompactSpecError(f"PCA to {components} components is more than the features' {d} channels")
        mean = self.sum / self.count
        comps = np.empty((self.sum.shape[0], d, components), dtype=np.float32)
        for layer in range(self.sum.shape[0]):
            cov = self.outer[layer] / self.count - np.outer(mean[layer], mean[layer])
            with one_blas_thread():
                values, vectors = np.linalg.eigh((cov + cov.T) / 2)
            top = vectors[:, np.argsort(values)[::-1][:components]]
            # a fixed sign per direction (largest entry positive), so the basis is reproducible
            signs = np.sign(top[np.abs(top).argmax(axis=0), np.arange(components)])
            comps[layer] = (top * np.where(signs == 0, 1.0, signs)).astype(np.float32)
        return PcaBasis(components=comps, mean=mean.astype(np.float32))

    def fitted(self, components: int, split: str) -> tuple[PcaBasis, dict]:
        """The basis, with the record a task keeps of its fit (task attribute ``compact``)."""
        basis = self.basis(components)
        return basis, {"fit_split": split, "fit_rows": int(self.rows),
                       "explained_variance": [round(float(v), 6) for v in self.explained(basis)]}

    def explained(self, basis: PcaBasis) -> np.ndarray:
        """Fraction of each layer's variance the basis keeps, [L]."""
        mean = self.sum / self.count
        out = np.empty(self.sum.shape[0])
        for layer in range(self.sum.shape[0]):
            cov = self.outer[layer] / self.count - np.outer(mean[layer], mean[layer])
            p = basis.components[layer].astype(np.float64)
            out[layer] = float(np.trace(p.T @ cov @ p) / max(np.trace(cov), 1e-30))
        return out


def fitted_groups(fits: Sequence[PcaFit], components: int, split: str) -> tuple[PcaBasis | list[PcaBasis], dict]:
    """A task's fitted basis and record from its grid groups' fits: one fit (a single-grid task) gives
    `PcaFit.fitted`; several (a multi-grid task, format 2.3, each group encoded on its own) give a list of bases
    in group order and one record whose explained_variance runs over every stored layer, group after group."""
    fitted = [fit.fitted(components, split) for fit in fits]
    if len(fitted) == 1:
        return fitted[0]
    record = {**fitted[0][1], "explained_variance": [v for _, r in fitted for v in r["explained_variance"]]}
    return [basis for basis, _ in fitted], record


def fit_split(protocols: dict, splits: Sequence[str]) -> str | None:
    """The split PCA is fitted on: the training split of the dev protocol (train800 for VTAB, train
    elsewhere), so neither dev nor final evaluation rows are ever used. None when there is none."""
    dev = protocols.get("dev")
    if dev and dev[0] in splits:
        return str(dev[0])
    for name in ("train800", "train"):
        if name in splits:
            return name
    return None


__all__ = [
    "CHANNEL_SCALE", "CODES", "CODE_FILL", "INDEX_FILL", "MAP_STATS", "OUTLIER_INDEX", "OUTLIER_VALUE",
    "PCA_COMPONENTS", "PCA_MEAN", "TOKEN_SCALE",
    "CompactSpec", "CompactSpecError", "PcaBasis", "PcaFit", "decode", "dequantise", "encode", "fill_value",
    "fit_split", "fitted_groups", "map_stats", "never_written", "quantise", "standardise",
]
