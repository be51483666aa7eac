"""Training and evaluation loops for ComBo and the linear probes (PAPER.md, "Training recipe").

Independent of how features are stored: the loops take iterators of ``(features, labels)`` batches. The
sample order is defined here once (``epoch_permutation`` / ``batch_indices``) so an in-memory loader and a
streaming store reader that follow it feed the model the same batches, step for step.

Batching: each epoch is a fresh permutation cut into ceil(n / batch_size) batches, the last one smaller
(PyTorch DataLoader's ``drop_last=False``). With batch 64 this makes the paper's step counts whole epochs:
train800 -> 13 batches/epoch, 1,300 steps = 100 epochs; train800val200 -> 16 batches/epoch, 1,600 steps =
100 epochs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import ComboAdapter
from .linear import per_layer_loss
from .optim import make_optimizer
from .progress import RunProgress, report_every
from .schedule import make_scheduler

__all__ = [
    "TrainConfig",
    "TrainingDataError",
    "TrainingDivergedError",
    "DeviceUnavailableError",
    "pick_device",
    "set_seed",
    "epoch_permutation",
    "batch_indices",
    "seeded_batches",
    "ordered_batches",
    "group_penalty",
    "compute_loss",
    "train_steps",
    "evaluate",
    "evaluate_layers",
]

Features = Tensor | Sequence[Tensor]
Prepare = Callable[[Any], Tensor]

_SEED_STRIDE = 1_000_003  # epoch e of seed s uses torch seed s * stride + e: epochs independent, no replay needed


class TrainingDataError(RuntimeError):
    """The batch iterator or the data it yields cannot drive training/evaluation."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf."""


class DeviceUnavailableError(RuntimeError):
    """The requested torch device does not exist on this machine."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 42
    group_lambda: float = 0.0  # relevance penalty: loss = CE + group_lambda * sum_k s_k (paper: 0.01)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_frac: float = 0.1
    warmup_start_factor: float = 0.01
    final_factor: float = 0.001

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"TrainConfig.steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"TrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.group_lambda < 0:
            raise ValueError(f"TrainConfig.group_lambda must be >= 0, got {self.group_lambda}")


def pick_device(requested: str | None) -> torch.device:
    """None/'auto' -> cuda if present, else mps, else cpu; an explicit device must exist."""
    if requested is None or requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"unknown device {requested!r} (use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps')") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device {requested!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device {requested!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise DeviceUnavailableError(f"device {requested!r} requested but MPS is not available")
    return device


def set_seed(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random; call before building the model so its init is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- sample order


def epoch_permutation(n: int, epoch: int, seed: int) -> np.ndarray:
    """The order of the n training samples in ``epoch`` (0-based) for ``seed``; int64 array."""
    if n < 1:
        raise ValueError(f"cannot order {n} samples")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * _SEED_STRIDE + int(epoch)) % 2**63)
    return torch.randperm(int(n), generator=g).numpy().astype(np.int64)


def batch_indices(n: int, *, batch_size: int, seed: int, start_epoch: int = 0) -> Iterator[np.ndarray]:
    """Infinite stream of index batches: every epoch's permutation in chunks of ``batch_size`` (last smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    epoch = start_epoch
    while True:
        perm = epoch_permutation(n, epoch, seed)
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]
        epoch += 1


def _as_tensor(a: Tensor | np.ndarray) -> Tensor:
    return a if isinstance(a, Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def _check_lengths(features: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> int:
    n = len(features)
    if len(labels) != n:
        raise TrainingDataError(f"{n} feature rows but {len(labels)} labels")
    if n == 0:
        raise TrainingDataError("no samples")
    return n


def seeded_batches(
    features: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    *,
    batch_size: int,
    seed: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Infinite shuffled ``(features, labels)`` batches from in-memory arrays, in the ``batch_indices`` order."""
    n = _check_lengths(features, labels)
    labels_t = _as_tensor(labels).long()
    for idx in batch_indices(n, batch_size=batch_size, seed=seed):
        if isinstance(features, Tensor):
            x = features[torch.from_numpy(idx)]
        else:
            x = torch.from_numpy(np.ascontiguousarray(features[idx]))
        yield x, labels_t[torch.from_numpy(idx)]


def ordered_batches(
    features: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    *,
    batch_size: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One pass in stored order (for evaluation)."""
    n = _check_lengths(features, labels)
    labels_t = _as_tensor(labels).long()
    for start in range(0, n, batch_size):
        yield _as_tensor(features[start : start + batch_size]), labels_t[start : start + batch_size]


# ------------------------------------------------------------------------------------------------------ loss


def group_penalty(model: ComboAdapter) -> Tensor:
    """sum_k s_k: the group-lasso penalty over backbones' Lambda slices (PAPER.md, relevance)."""
    if not isinstance(model, ComboAdapter):
        raise TypeError(f"group_penalty needs a ComboAdapter, got {type(model).__name__}")
    return model.backbone_norms().sum()


def compute_loss(model: nn.Module, logits: Tensor, labels: Tensor, *, group_lambda: float = 0.0) -> tuple[Tensor, Tensor]:
    """(loss, cross-entropy). Logits [B, C] -> CE; [B, L, C] (per-layer probe) -> sum of per-layer CEs.

    With ``group_lambda == 0`` the penalty is not even computed, so the loss *is* the cross-entropy.
    """
    if logits.ndim == 2:
        ce = F.cross_entropy(logits.float(), labels)
    elif logits.ndim == 3:
        ce = per_layer_loss(logits, labels)
    else:
        raise TrainingDataError(f"logits must be [B, C] or [B, L, C], got shape {tuple(logits.shape)}")
    if group_lambda == 0:
        return ce, ce
    return ce + group_lambda * group_penalty(model), ce


# ---------------------------------------------------------------------------------------------------- loops


def _to_device(features: Features, device: torch.device) -> Features:
    if isinstance(features, Tensor):
        return features.to(device, non_blocking=True)
    if isinstance(features, (list, tuple)):
        return type(features)(f.to(device, non_blocking=True) for f in features)
    raise TrainingDataError(f"features must be a Tensor or a list/tuple of Tensors, got {type(features).__name__}")


def _autocast(device: torch.device):
    # bf16 mixed precision on GPU only (PAPER.md); CPU/MPS run in float32.
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_steps(
    model: nn.Module,
    batches: Iterator[tuple[Features, Tensor]],
    cfg: TrainConfig,
    *,
    device: torch.device | str,
    prepare: Prepare | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    progress: RunProgress | None = None,
) -> dict[str, Any]:
    """Run exactly ``cfg.steps`` AdamW steps on batches pulled from ``batches`` (trains ``model`` in place).

    ``prepare`` runs on the device in float32 before autocast (e.g. ``align.make_prepare``). ``on_step(step,
    stats)`` forces a device sync every step, so pass it only for logging; ``progress.step`` is called about
    100 times per fit (see `probe.progress`). Returns ``{"loss", "ce", "lr"}``
    lists (one value per step; ``lr`` is the rate used by that step) plus ``steps`` and ``seconds``.
    """
    device = torch.device(device)
    if cfg.group_lambda > 0 and not isinstance(model, ComboAdapter):
        raise ValueError(f"group_lambda={cfg.group_lambda} needs a ComboAdapter, got {type(model).__name__}")
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    scheduler = make_scheduler(
        optimizer,
        total_steps=cfg.steps,
        warmup_frac=cfg.warmup_frac,
        warmup_start_factor=cfg.warmup_start_factor,
        final_factor=cfg.final_factor,
    )
    it = iter(batches)
    losses: list[Tensor] = []
    ces: list[Tensor] = []
    lrs: list[float] = []
    every = report_every(cfg.steps)
    start = time.perf_counter()
    for step in range(cfg.steps):
        try:
            features, labels = next(it)
        except StopIteration:
            raise TrainingDataError(
                f"the batch iterator ran out at step {step} of {cfg.steps}; pass an infinite one (seeded_batches)"
            ) from None
        x = _to_device(features, device)
        y = labels.to(device, non_blocking=True).long()
        if prepare is not None:
            x = prepare(x)
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        with _autocast(device):
            logits = model(x)
        loss, ce = compute_loss(model, logits, y, group_lambda=cfg.group_lambda)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach())
        ces.append(ce.detach())
        if on_step is not None:
            on_step(step, {"loss": float(loss.detach()), "ce": float(ce.detach()), "lr": lrs[-1]})
        if progress is not None and ((step + 1) % every == 0 or step + 1 == cfg.steps):
            progress.step(step + 1, loss=float(loss.detach()))
    loss_values = torch.stack(losses).float().cpu()
    if not torch.isfinite(loss_values).all():
        first = int((~torch.isfinite(loss_values)).nonzero()[0, 0])
        raise TrainingDivergedError(f"loss became {loss_values[first].item()} at step {first} of {cfg.steps}")
    return {
        "loss": loss_values.tolist(),
        "ce": torch.stack(ces).float().cpu().tolist(),
        "lr": lrs,
        "steps": cfg.steps,
        "seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def _predict(
    model: nn.Module,
    batches: Iterable[tuple[Features, Tensor]],
    *,
    device: torch.device | str,
    prepare: Prepare | None,
) -> tuple[np.ndarray, np.ndarray]:
    device = torch.device(device)
    model.to(device)
    model.eval()
    preds, labels_all = [], []
    for features, labels in batches:
        x = _to_device(features, device)
        if prepare is not None:
            x = prepare(x)
        with _autocast(device):
            logits = model(x)
        preds.append(logits.float().argmax(dim=-1).cpu())
        labels_all.append(torch.as_tensor(labels).long().cpu())
    if not preds:
        raise TrainingDataError("evaluation got no batches")
    return torch.cat(preds).numpy(), torch.cat(labels_all).numpy()


@torch.no_grad()
def predict_heads(
    heads: Sequence[tuple[nn.Module, Prepare | None, Callable[[Features], Features]]],
    batches: Iterable[tuple[Features, Tensor]],
    *,
    device: torch.device | str,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Predictions of several models on ONE pass over ``batches``: each head is ``(model, prepare, view)``, where
    ``view`` takes its part of a batch (its stores, its layers) before ``prepare``; per head exactly what
    `evaluate` computes on that part. Returns one prediction array per head, and the labels."""
    device = torch.device(device)
    for model, _, _ in heads:
        model.to(device)
        model.eval()
    preds: list[list[Tensor]] = [[] for _ in heads]
    labels_all = []
    for features, labels in batches:
        for h, (model, prepare, view) in enumerate(heads):
            x = _to_device(view(features), device)
            if prepare is not None:
                x = prepare(x)
            with _autocast(device):
                logits = model(x)
            preds[h].append(logits.float().argmax(dim=-1).cpu())
        labels_all.append(torch.as_tensor(labels).long().cpu())
    if not labels_all:
        raise TrainingDataError("evaluation got no batches")
    return [torch.cat(p).numpy() for p in preds], torch.cat(labels_all).numpy()


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Features, Tensor]],
    *,
    device: torch.device | str,
    prepare: Prepare | None = None,
) -> tuple[float, int, np.ndarray]:
    """(top-1 accuracy, number of samples, predicted class per sample in batch order)."""
    preds, labels = _predict(model, batches, device=device, prepare=prepare)
    if preds.ndim != 1:
        raise TrainingDataError("this model predicts per layer ([B, L, C] logits); use evaluate_layers")
    return float((preds == labels).mean()), int(len(labels)), preds


def evaluate_layers(
    model: nn.Module,
    batches: Iterable[tuple[Features, Tensor]],
    *,
    device: torch.device | str,
    prepare: Prepare | None = None,
) -> tuple[np.ndarray, int, np.ndarray]:
    """For per-layer probes: (accuracy per layer [L], number of samples, predictions [n, L])."""
    preds, labels = _predict(model, batches, device=device, prepare=prepare)
    if preds.ndim != 2:
        raise TrainingDataError("this model predicts one class per sample ([B, C] logits); use evaluate")
    return (preds == labels[:, None]).mean(axis=0), int(len(labels)), preds
