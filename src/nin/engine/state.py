"""What a run is while it trains: `RunState` (everything that changes; what a checkpoint holds) and `Run` (what
does not: config, folder, data, loaders).

    tensors = state.state_dict()        # a checkpoint's content
    state.load_state_dict(tensors)      # resuming restores exactly that
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nin import distributed
from nin.data import TensorLoader
from nin.engine.config import TrainConfig
from nin.engine.metrics import MetricsLog
from nin.engine.optim import Ema, load_optimizer_state, optimizer_state
from nin.engine.schedule import PlateauRule, total_steps
from nin.models import NiN
from nin.transforms import Preprocessing

__all__ = ["EpochTotals", "RunState", "Run"]


@dataclass
class EpochTotals:
    """Training loss and accuracy of the epoch so far, counted on this rank's batches."""

    loss_sum: torch.Tensor  # float64, nats summed over images
    correct: torch.Tensor  # int64
    seen: torch.Tensor  # int64

    @classmethod
    def zeros(cls, device: torch.device) -> EpochTotals:
        return cls(torch.zeros((), dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device), torch.zeros((), dtype=torch.int64, device=device))

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss.detach().double() * labels.shape[0]
        self.correct += (logits.detach().argmax(dim=1) == labels).sum()
        self.seen += labels.shape[0]

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(int(self.seen), 1)

    def summed(self) -> dict[str, torch.Tensor]:
        """Every rank's counts added up (a collective: all ranks call it)."""
        return {k: distributed.all_reduce_sum(v.clone()) for k, v in dataclasses.asdict(self).items()}

    def zero_(self) -> None:
        for value in (self.loss_sum, self.correct, self.seen):
            value.zero_()


@dataclass
class RunState:
    """Everything that changes while a run trains; `state_dict()` is exactly what a checkpoint holds."""

    model: NiN
    optimizer: torch.optim.Optimizer
    rule: PlateauRule
    ema: Ema | None
    totals: EpochTotals  # the epoch in progress
    epoch: int = 0  # finished epochs
    batches_done: int = 0  # this rank's batches of the epoch in progress
    step: int = 0  # optimizer steps so far
    partial_time: float = 0.0  # seconds of training in the epoch in progress

    def state_dict(self) -> dict:
        """The state to checkpoint. A collective under DDP: the epoch's counts are summed over the ranks."""
        return {"model": self.model.state_dict(), "ema": self.ema.model.state_dict() if self.ema else None,
                "optimizer": optimizer_state(self.optimizer), "rng": _rng_state(self.totals.seen.device),
                "partial": self.totals.summed(), "plateau_rule": self.rule.state_dict(), "epoch": self.epoch,
                "batches_done": self.batches_done, "step": self.step, "partial_time": self.partial_time}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint's state; the counts of the epoch in progress go to rank 0 (they are summed)."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.model.load_state_dict(state["ema"] or state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.rule.load_state_dict(state["plateau_rule"])
        self.epoch, self.batches_done, self.step = state["epoch"], state["batches_done"], state["step"]
        self.partial_time = state["partial_time"]
        if distributed.is_main():
            for key, value in state["partial"].items():
                getattr(self.totals, key).copy_(value)
        _restore_rng(state["rng"], self.totals.seen.device)

    def restart_epoch(self, steps_per_epoch: int) -> None:
        """Drop the epoch in progress (resuming with another world size: its shards changed)."""
        self.batches_done, self.step, self.partial_time = 0, self.epoch * steps_per_epoch, 0.0
        self.totals.zero_()


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


@dataclass
class Run:
    """What stays fixed while a run trains: its config, folder, device, data and loaders."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    amp_dtype: torch.dtype | None
    preprocessing: Preprocessing  # fitted on the training split
    classes: list[str]
    loader: TensorLoader  # over the preprocessed training split
    eval_loader: TensorLoader
    extra_loader: TensorLoader | None  # cfg.extra_eval's images, or None
    train_model: nn.Module  # the model as trained: itself, compiled, or wrapped in DDP
    history: dict  # command, git_revision (of the start), resumes
    metrics: MetricsLog | None = None  # main rank only; train() opens it once the run has work to do
    log: object = print
    memory_format: torch.memory_format = torch.channels_last
    meta: dict = field(default_factory=dict)  # what every checkpoint's header says about the run
    stop: threading.Event | None = None  # set by a signal handler: checkpoint at the next step, then stop
    dead_maps: set = field(default_factory=set)  # classes whose map was all zero at the last epoch's end

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.safetensors"

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def last_step(self) -> int:
        return total_steps(self.cfg, self.steps_per_epoch)
