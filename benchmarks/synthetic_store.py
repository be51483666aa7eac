"""The provenance of a synthetic benchmark store: one StoreInfo for every benchmark that writes features of no
real backbone (random-init, ViT-style 16 px patches, square grid)."""

from __future__ import annotations

from store_schema import BackboneInfo, FeatureInfo, Preprocessing, StoreInfo


def synthetic_info(*, alias: str, dataset: str, grid: tuple[int, int], layers: int, dim: int) -> StoreInfo:
    return StoreInfo(
        backbone=BackboneInfo(alias=alias, timm_name="synthetic", pretrained_tag=None, weights_source="random-init",
                              weights_sha256=None, seed=0),
        preprocessing=Preprocessing(image_size=grid[0] * 16, mean=(0.5,) * 3, std=(0.5,) * 3),
        features=FeatureInfo(token_grid=grid, num_prefix_tokens=0, layers=tuple(range(layers)), feature_dim=dim),
        dataset=dataset,
    )
