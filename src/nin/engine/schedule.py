"""Learning-rate rules: the schedules as one pure function of the step, and the paper's plateau rule.

    lr = lr_at(step, cfg, steps_per_epoch, lr_drops=rule.drops)

`lr_at` has no state; the plateau rule's state (best training accuracy, drops so far) lives in
`PlateauRule`, saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nin.engine.config import TrainConfig
from nin.errors import NinError

__all__ = ["total_steps", "lr_at", "PlateauRule"]


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps the whole run takes: every epoch's, capped by ``max_steps``."""
    steps = cfg.epochs * steps_per_epoch
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: int, lr_drops: int = 0) -> float:
    """The base learning rate for optimizer step ``step`` (0-based). A pure function of its arguments.

    ``lr_drops`` is the plateau rule's count of drops so far (schedule "plateau" only).
    """
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "plateau":
        return cfg.lr * cfg.lr_drop ** lr_drops
    if cfg.schedule == "multistep":
        position = step if cfg.milestone_unit == "step" else step / steps_per_epoch
        passed = sum(position >= m for m in cfg.milestones)
        return cfg.lr * cfg.lr_drop ** passed
    if cfg.schedule == "onecycle":  # linear up to the peak, then linearly down to zero at the last step
        total = total_steps(cfg, steps_per_epoch)
        peak = max(1, round(cfg.warmup_fraction * total))
        if step < peak:
            return cfg.lr * (cfg.start_lr_fraction + (1 - cfg.start_lr_fraction) * step / peak)
        return cfg.lr * max(0.0, (total - step) / max(1, total - peak))
    raise NinError(f"unknown schedule {cfg.schedule!r}")


@dataclass
class PlateauRule:
    """The paper's learning-rate rule, written out.

    NiN paper, section 4: "Train until the accuracy on the training set
    stops improving, then divide the lr by 10; repeat once."

    Here "stops improving" means: no new best training accuracy (by more than ``min_delta``) for
    ``patience`` epochs. Each time that happens the lr is divided by 10 (``drops`` += 1) and the count
    starts again; after ``max_drops`` drops, the next plateau ends the run (``finished``).
    """

    patience: int = 5
    min_delta: float = 0.0
    max_drops: int = 2
    best: float = -1.0
    epochs_since_best: int = 0
    drops: int = 0
    finished: bool = False

    def update(self, train_accuracy: float) -> str | None:
        """Feed one epoch's training accuracy; returns "drop", "finish" or None."""
        if train_accuracy > self.best + self.min_delta:
            self.best = train_accuracy
            self.epochs_since_best = 0
            return None
        self.epochs_since_best += 1
        if self.epochs_since_best < self.patience:
            return None
        self.epochs_since_best = 0
        self.best = train_accuracy  # the new lr starts a new comparison
        if self.drops < self.max_drops:
            self.drops += 1
            return "drop"
        self.finished = True
        return "finish"

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
