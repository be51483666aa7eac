"""The bundled offline demo: the whole pipeline on sklearn's digits with two random-init ViTs.

Nothing can be downloaded offline, so the backbones have random weights: the numbers only show that
extraction, storage, ComBo and the linear baseline run end to end, not what ComBo can do. The defaults
(32px inputs, a 64-wide 2-block adapter, 300 steps) keep the whole demo to well under three minutes on
two CPU cores; the paper's recipe is 224px, width 128, depth 6, 1,600 steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.pipeline import ExtractConfig, extract
from probe.progress import RunProgress
from probe.run import ProbeConfig, run_probe

__all__ = ["DemoConfig", "DemoResult", "REAL_WEIGHTS_HELP", "run_demo"]

REAL_WEIGHTS_HELP = (
    "With real weights: extract each backbone once, then probe as often as you like, e.g.\n"
    "  combo extract --model dinov2 --dataset vtab --root /data/vtab-1k      # pretrained weights from the HF cache\n"
    "  combo extract --model clip --dataset vtab --root /data/vtab-1k --weights /ckpt/clip.safetensors\n"
    "  combo probe --stores dinov2,clip --dataset vtab                      # ComBo, the paper's recipe\n"
    "  combo probe --stores dinov2,clip --dataset vtab --method linear       # the linear baseline\n"
    "Pretrained weights are read from the Hugging Face cache (fill it on a machine with network, copy it here and "
    "set HF_HUB_OFFLINE=1) or from a local file with --weights."
)


@dataclass(frozen=True)
class DemoConfig:
    out: str = "combo-demo"
    models: tuple[str, ...] = ("vit_tiny_patch16_224", "deit_tiny_patch16_224")
    image_size: int = 32
    steps: int = 300
    batch_size: int = 64
    width: int = 64
    depth: int = 2
    num_heads: int = 2
    device: str | None = None
    seed: int = 42
    methods: tuple[str, ...] = ("combo", "linear")

    def __post_init__(self) -> None:
        if len(self.models) < 1:
            raise ValueError("--models: give at least one timm ViT name")
        if self.image_size < 16:
            raise ValueError(f"--image-size {self.image_size}: use at least one 16px patch")
        for method in self.methods:  # ProbeConfig's own checks (steps, batch, adapter), before anything is extracted
            self.probe_config(("<demo store>",), method)

    def probe_config(self, stores: tuple[str, ...], method: str) -> ProbeConfig:
        return ProbeConfig(stores=stores, dataset="digits", method=method, steps=self.steps, batch_size=self.batch_size,
                           seed=self.seed, device=self.device, out=str(Path(self.out) / "runs"), width=self.width,
                           depth=self.depth, num_heads=self.num_heads)

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": "sklearn digits (bundled): 1,000 train800val200 -> 797 test, 10 classes",
            "backbones": ", ".join(f"{m} (seed {i})" for i, m in enumerate(self.models)) + ": RANDOM weights",
            "image size": f"{self.image_size}px (paper: 224)",
            "adapter": f"width {self.width}, depth {self.depth}, {self.num_heads} heads (paper: 128, 6, 2)",
            "steps": f"{self.steps}, batch {self.batch_size} (paper: 1,600, batch 64)",
            "common grid": "the stores' shared token grid (else the smallest), as the authors ran it",
            "output": f"{self.out}/stores, {self.out}/runs",
        }


@dataclass
class DemoResult:
    store_root: Path
    stores: list[Path]
    run_dirs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0


def run_demo(cfg: DemoConfig, *, log: Callable[[str], None] | None = None,
             progress: RunProgress | None = None) -> DemoResult:
    """Extract every model on digits (afresh: the demo shows the whole pipeline), then probe with each method."""
    started = time.perf_counter()
    out = Path(cfg.out)
    store_root = out / "stores"
    stores: list[Path] = []
    for seed, model in enumerate(cfg.models):
        if log:
            log(f"extracting {model} (random-init, seed {seed}) on digits at {cfg.image_size}px")
        # one seed per backbone: two architectures that are the same ViT would otherwise get the same weights
        result = extract(ExtractConfig(model=model, dataset="digits", out=str(store_root), image_size=cfg.image_size,
                                       random_init=True, seed=seed, device=cfg.device, num_workers=0, batch_size=64,
                                       overwrite=True))  # a rerun with other settings must not trip over old stores
        stores.append(result.store)
    demo = DemoResult(store_root=store_root, stores=stores)
    for method in cfg.methods:
        run = run_probe(cfg.probe_config(tuple(str(s) for s in stores), method), log=log, progress=progress)
        demo.run_dirs[method] = run.run_dir
        demo.metrics[method] = run.metrics
    demo.seconds = time.perf_counter() - started
    return demo
