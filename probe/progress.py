"""What a long probe run reports while it works: which fit of how many, its step and loss.

The paper's protocol is 1,600 steps on each of 19 tasks, hours on a CPU, so every command that trains
(probe, relevance, select, atlas, demo) passes a `RunProgress` down to `train.train_steps`. The library only
calls these hooks; the CLI renders them (`combo/progress.py`: rich bars on a terminal, a line every few
percent when piped). The base class reports nothing, so library callers need not care.
"""

from __future__ import annotations


class RunProgress:
    """Hooks a training run calls; override what you want to show. Calls arrive in the order
    ``plan`` (once), then per fit ``start``, ``step``... , ``finish``."""

    def plan(self, total: int) -> None:
        """``total`` more fits (tasks x passes) are coming (a demo runs several probes: the counts add up)."""

    def start(self, label: str, *, steps: int) -> None:
        """A fit begins: ``label`` names it (e.g. ``cifar`` or ``cifar: retrain``)."""

    def step(self, done: int, *, loss: float) -> None:
        """``done`` steps of the current fit are finished; ``loss`` is the last step's (a device sync, so
        `train_steps` calls this only every ~1% of the steps and at the last one)."""

    def finish(self, label: str, *, summary: str = "") -> None:
        """The current fit is done (``summary``: e.g. its accuracy)."""


def report_every(steps: int) -> int:
    """Steps between `RunProgress.step` calls: about 100 per fit, so a sync costs nothing measurable."""
    return max(1, steps // 100)


__all__ = ["RunProgress", "report_every"]
