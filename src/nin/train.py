"""The training loop: one plain epoch function, an end-of-epoch function, and exact resume.

    from nin.train import recipe, train
    train(recipe("fast", "mnist"), "runs/mnist-fast")

`train()` is the epoch loop: `train_one_epoch`, then `end_epoch` (evaluate, apply the lr rule, log,
checkpoint on the main rank). There is no trainer class and no callback: every feature is a visible line.
Everything that changes while a run trains lives in one `RunState`, whose `state_dict()` is what a
checkpoint holds and whose `load_state_dict()` is what resuming restores, so save and resume are one
pair of calls. What does not change (config, data, loaders, the run folder) is a `Run`.

The config schema and recipes live in `nin.config`, the lr rules in `nin.schedule`, device and precision
in `nin.runtime`, the file formats in `nin.checkpoint` and the per-epoch log in `nin.metrics`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import math
import os
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from nin import distributed
from nin.checkpoint import (atomic_write_bytes, git_revision, load_checkpoint, remove_stale_temp_files,
                            save_checkpoint, save_weights)
from nin.config import (CAFFE, FAST, PAPER, RECIPES, TrainConfig, apply_overrides, recipe, small_phase_epochs,
                        validate)
from nin.data.datasets import resolve_root
from nin.errors import CheckpointError, NinError, NonFiniteLoss, TrainingStalled
from nin.evaluate import evaluate
from nin.layers import patch_whitening_
from nin.metrics import MetricsLog
from nin.models import NiN, get_model
from nin.runtime import autocast, resolve_device, select_precision
from nin.schedule import PlateauRule, lr_at, total_steps

__all__ = ["TrainConfig", "PAPER", "CAFFE", "FAST", "RECIPES", "recipe", "apply_overrides", "validate", "lr_at",
           "total_steps", "PlateauRule", "param_groups", "make_optimizer", "Ema", "train_step", "RunState", "Run",
           "train_one_epoch", "end_epoch", "train"]

RUN_FILES = ("checkpoint.safetensors", "model.safetensors", "metrics.jsonl", "metrics.csv", "config.json")


# ---------------------------------------------------------------------------------------------
# The optimizer, weight averaging, one step
# ---------------------------------------------------------------------------------------------

def param_groups(model: NiN, cfg: TrainConfig) -> list[dict]:
    """SGD groups: weights (decayed), biases (2x lr, no decay), class-map layer (0.1x), norms (no decay)."""
    class_map = {id(p) for p in model.class_map_layer.parameters()}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            is_norm = isinstance(module, nn.BatchNorm2d)
            is_bias = name == "bias"
            mult = cfg.bias_lr_mult if (is_bias and not is_norm) else 1.0
            if id(p) in class_map:
                mult *= cfg.class_map_lr_mult
            decay = 0.0 if (is_bias or is_norm) else cfg.weight_decay  # NiN paper: decay on weights only
            groups.setdefault((mult, decay), []).append(p)
    return [{"params": ps, "lr_mult": mult, "weight_decay": decay, "lr": cfg.lr * mult}
            for (mult, decay), ps in groups.items()]


def make_optimizer(model: NiN, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum over `param_groups`: fused into one kernel where torch offers it."""
    kwargs = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    try:
        return torch.optim.SGD(param_groups(model, cfg), fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.SGD(param_groups(model, cfg), foreach=True, **kwargs)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The momentum buffers, keyed "<group>.<index>" (plain SGD has no other state)."""
    return {f"{g}.{j}": optimizer.state[p]["momentum_buffer"]
            for g, group in enumerate(optimizer.param_groups) for j, p in enumerate(group["params"])
            if optimizer.state.get(p, {}).get("momentum_buffer") is not None}


def load_optimizer_state(optimizer: torch.optim.Optimizer, buffers: dict[str, torch.Tensor]) -> None:
    for g, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            if f"{g}.{j}" in buffers:
                # empty_like keeps the parameter's memory format (channels_last): the fused step walks raw memory
                optimizer.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buffers[f"{g}.{j}"])


class Ema:
    """Exponential moving average of a model's parameters and buffers (weight averaging)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = list(self.model.state_dict().values())
        live = list(model.state_dict().values())
        floats = [(e, m) for e, m in zip(ema, live) if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1.0 - self.decay)
        for e, m in zip(ema, live):
            if not e.is_floating_point():
                e.copy_(m)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, *,
               lr: float, cfg: TrainConfig, amp_dtype: torch.dtype | None,
               memory_format: torch.memory_format = torch.channels_last,
               check_finite: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One SGD step exactly as `train()` takes it: lr per group, autocast forward, fp32 loss, backward, step.

    Returns (loss, logits), or (None, logits) without stepping when ``check_finite`` finds a NaN/inf loss.
    """
    images = images.contiguous(memory_format=memory_format)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    with autocast(images.device, amp_dtype):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)  # fp32 loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if check_finite and not distributed.all_true(torch.isfinite(loss)):  # under DDP: non-finite on any rank
        return None, logits
    optimizer.step()
    return loss, logits


# ---------------------------------------------------------------------------------------------
# The state of a run, and the run around it
# ---------------------------------------------------------------------------------------------

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
    preprocessing: object  # nin.transforms.Preprocessing, fitted on the training split
    classes: list[str]
    loader: object  # nin.data.TensorLoader over the preprocessed training split
    eval_loader: object
    extra_loader: object | None  # cfg.extra_eval's images, or None
    train_model: nn.Module  # the model as trained: itself, compiled, or wrapped in DDP
    history: dict  # command, git_revision (of the start), resumes
    metrics: MetricsLog | None  # main rank only
    log: object = print
    memory_format: torch.memory_format = torch.channels_last
    meta: dict = field(default_factory=dict)  # what every checkpoint's header says about the run
    stop: threading.Event | None = None  # set by a signal handler: checkpoint at the next step, then stop

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.safetensors"

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def last_step(self) -> int:
        return total_steps(self.cfg, self.steps_per_epoch)


def dropout_seed(seed: int, rank: int, step: int) -> int:
    """The dropout stream of one step on one rank: a function of (seed, rank, step), so resuming needs no RNG state
    for it and DDP ranks draw different masks."""
    return ((seed * 1_000_003 + 7_919 * (rank + 1)) * 1_000_003 + step) % (2**63 - 1)


def _stop_requested(run: Run) -> bool:
    """True on every rank when a stop was asked for on any rank (a signal may reach the ranks at different steps)."""
    if run.stop is None:
        return False
    return not distributed.all_true(not run.stop.is_set(), run.device)


def save(run: Run, state: RunState) -> None:
    """Checkpoint the run (all ranks call: the epoch's counts are summed; the main rank writes)."""
    tensors = state.state_dict()
    if distributed.is_main():
        try:
            save_checkpoint(run.checkpoint_path, tensors, run.preprocessing, run.meta)
        except CheckpointError as e:  # disk full, quota: the atomic write leaves the previous checkpoint in place
            raise CheckpointError(f"{e} (step {state.step}); free space, then `nin train --resume {run.out}`") from None


def done(run: Run, state: RunState) -> bool:
    return state.epoch >= run.cfg.epochs or state.step >= run.last_step or state.rule.finished


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train_one_epoch(run: Run, state: RunState, interrupt_after: int | None = None) -> None:
    """Train the rest of the current epoch (from ``state.batches_done``), checkpointing as configured."""
    cfg, steps_per_epoch = run.cfg, run.steps_per_epoch
    run.train_model.train()
    run.loader.set_epoch(state.epoch)
    run.loader.skip(state.batches_done)
    batches = _progress(run, state)
    lr_drops = state.rule.drops
    small = cfg.small_size if state.epoch < small_phase_epochs(cfg) else 0  # progressive resizing: GAP takes any size
    tick = time.perf_counter()
    for images, labels in batches:
        if small:
            images = F.interpolate(images, size=(small, small), mode="bilinear", antialias=True, align_corners=False)
        lr = lr_at(state.step, cfg, steps_per_epoch, lr_drops)
        torch.manual_seed(dropout_seed(cfg.seed, distributed.rank(), state.step))  # each rank its own masks
        check = run.device.type == "cpu" or (state.step + 1) % 50 == 0  # a host sync is free on a CPU, costly on a GPU
        loss, logits = train_step(run.train_model, state.optimizer, images, labels, lr=lr, cfg=cfg,
                                  amp_dtype=run.amp_dtype, memory_format=run.memory_format, check_finite=check)
        if loss is None:
            raise NonFiniteLoss(f"the training loss became non-finite at epoch {state.epoch + 1}, step "
                                f"{state.step + 1}; the last good checkpoint stays in {run.checkpoint_path}. Lower "
                                f"the lr (--set lr=...) or turn on batch norm (--set model.batch_norm=true)")
        if state.ema is not None:
            state.ema.update(state.model)
        state.totals.add(loss, logits, labels)
        state.step += 1
        state.batches_done += 1
        if hasattr(batches, "set_postfix") and state.step % 10 == 0:
            batches.set_postfix(loss=f"{state.totals.mean_loss():.4f}", lr=f"{lr:.4g}")
        if state.epoch == 0 and cfg.stall_check_steps and (
                state.step == cfg.stall_check_steps or state.batches_done == steps_per_epoch):
            _check_stall(run, state, logits)
        if state.step >= run.last_step:
            break
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.batches_done < steps_per_epoch:
            state.partial_time += time.perf_counter() - tick
            tick = time.perf_counter()
            save(run, state)
        if interrupt_after is not None and state.step >= interrupt_after:
            raise KeyboardInterrupt(f"interrupted after step {state.step}")
        if check and _stop_requested(run):
            state.partial_time += time.perf_counter() - tick
            save(run, state)
            raise KeyboardInterrupt(f"stopped at step {state.step} and wrote its checkpoint; continue with "
                                    f"`nin train --resume {run.out}`")
    state.partial_time += time.perf_counter() - tick
    if hasattr(batches, "close"):
        batches.close()


def end_epoch(run: Run, state: RunState) -> dict:
    """Close the epoch: sum the training counts over ranks, evaluate, apply the lr rule, log, checkpoint."""
    cfg = run.cfg
    summed = state.totals.summed()
    seen = max(float(summed["seen"]), 1.0)
    train_loss, train_accuracy = float(summed["loss_sum"]) / seen, float(summed["correct"]) / seen
    if not math.isfinite(train_loss):
        raise NonFiniteLoss(f"the training loss became {train_loss} in epoch {state.epoch + 1}; the last good "
                            f"checkpoint stays in {run.checkpoint_path}. Lower the lr (--set lr=...)")
    lr = lr_at(max(state.step - 1, 0), cfg, run.steps_per_epoch, state.rule.drops)
    event = state.rule.update(train_accuracy) if cfg.schedule == "plateau" else None
    record = {"epoch": state.epoch + 1, "step": state.step, "lr": lr, "train_loss": train_loss,
              "train_error": 1.0 - train_accuracy, "images_per_s": seen / max(state.partial_time, 1e-9),
              "train_time_s": state.partial_time}
    last = state.epoch + 1 >= cfg.epochs or state.step >= run.last_step or event == "finish"
    eval_tick = time.perf_counter()
    if last or (state.epoch + 1) % cfg.eval_every == 0:
        eval_model = state.ema.model if state.ema is not None else state.model  # the module itself: no DDP collectives
        distributed.broadcast_buffers(eval_model)  # rank 0's batch-norm statistics, the ones its checkpoint saves
        for prefix, loader in ((cfg.eval_split, run.eval_loader), ("extra", run.extra_loader)):
            if loader is not None:
                result = evaluate(eval_model, loader, num_classes=state.model.config.num_classes,
                                  amp_dtype=run.amp_dtype, tta_flip=cfg.tta_flip)
                record.update({f"{prefix}_loss": result.loss, f"{prefix}_error": result.error})
    record["eval_time_s"] = time.perf_counter() - eval_tick
    state.epoch, state.batches_done, state.partial_time = state.epoch + 1, 0, 0.0
    state.totals.zero_()
    if run.metrics is not None:
        run.metrics.append(record)
        run.log(_epoch_line(record, cfg, state, event))
    save(run, state)
    return record


def _epoch_line(record: dict, cfg: TrainConfig, state: RunState, event: str | None) -> str:
    scores = "".join(f"  {name} loss {record[f'{name}_loss']:.4f} err {record[f'{name}_error']:.2%}"
                     for name in (cfg.eval_split, "extra") if f"{name}_error" in record)
    note = {"drop": f"  (training accuracy stopped improving: lr / 10, drop {state.rule.drops})",
            "finish": "  (training accuracy stopped improving after the last drop: done)"}.get(event, "")
    return (f"epoch {record['epoch']:>3}/{cfg.epochs}  train loss {record['train_loss']:.4f} "
            f"err {record['train_error']:.2%}{scores}  lr {record['lr']:.4g}  {record['images_per_s']:.0f} img/s  "
            f"{record['train_time_s']:.0f}s{note}")


def train(cfg: TrainConfig | None, out_dir: str | os.PathLike, *, resume: bool = False, epochs: int | None = None,
          checkpoint_every: int | None = None, command: str | None = None, device: torch.device | str | None = None,
          log=print, interrupt_after: int | None = None, stop: threading.Event | None = None,
          data_dir: str | os.PathLike | None = None) -> dict:
    """Train (or continue) a run in ``out_dir``; returns the last epoch's metrics record.

    With ``resume`` the run's own config is read from its checkpoint (``cfg`` is ignored; ``epochs``
    may extend it, ``checkpoint_every`` may change how often it checkpoints) and training continues from the
    exact step where the checkpoint was written.
    ``data_dir`` moves a resumed run to its data's new place (the data must be the same: checked by the
    training images' sha256 recorded at the start).
    ``interrupt_after`` stops the process-local loop with KeyboardInterrupt after that many steps, as a
    kill would (tests use it to check that resuming reproduces an uninterrupted run). Setting ``stop`` (the
    CLI's SIGINT / SIGTERM handlers do) writes a checkpoint after the current step, then raises
    KeyboardInterrupt.

    One process writes a run folder: a second one (another `nin train --out` or `--resume` on it) is refused
    with the holder's PID. A new run's folder must be absent, empty, or one that a run started and left
    before its first epoch ended; anything else is a user's, and is refused before any data is read.

    Under torchrun, call it inside ``nin.distributed.process_group()`` (the CLI does). It changes no
    process-wide setting; the CLI also keeps freed memory (`nin.runtime.keep_freed_memory`).

    Writes ``config.json``, ``metrics.jsonl`` / ``metrics.csv``, ``checkpoint.safetensors`` (every epoch and
    every ``checkpoint_every`` steps) and, at the end, ``model.safetensors`` for evaluate / predict.
    """
    if not resume:  # an impossible setting is refused before the run folder is made
        validate(dataclasses.replace(cfg, **{k: v for k, v in (("epochs", epochs),
                                                                ("checkpoint_every", checkpoint_every)) if v is not None}))
    with run_folder_lock(Path(out_dir), resume=resume) if distributed.is_main() else contextlib.nullcontext():
        run, state = start_run(cfg, Path(out_dir), resume=resume, epochs=epochs, checkpoint_every=checkpoint_every,
                               command=command, device=device, log=log, data_dir=data_dir)
        run.stop = stop
        record: dict = {}
        if done(run, state) and distributed.is_main():
            log(f"nin: {run.out} is already finished (epoch {state.epoch}, step {state.step}); nothing to do. "
                f"`--epochs N` with N > {state.epoch} trains further")
        while not done(run, state):
            train_one_epoch(run, state, interrupt_after)
            record = end_epoch(run, state)
        _finish(run, state, record)
    distributed.barrier()
    return record


def _finish(run: Run, state: RunState, record: dict) -> None:
    """The final weights (model.safetensors) and the closing line, on the main rank."""
    if run.metrics is not None:
        final = state.ema.model if state.ema is not None else state.model
        save_weights(run.out / "model.safetensors", final, run.preprocessing,
                     {**run.meta, "train_config": run.cfg.to_dict(), "epochs": state.epoch, "step": state.step})
        run.metrics.close()
        if record:
            split = run.cfg.eval_split
            run.log(f"nin: done. {split} error {record[f'{split}_error']:.2%} after {state.epoch} epochs; "
                    f"weights in {run.out / 'model.safetensors'}")


# ---------------------------------------------------------------------------------------------
# Starting or resuming a run
# ---------------------------------------------------------------------------------------------

def start_run(cfg: TrainConfig | None, out: Path, *, resume: bool, epochs: int | None, checkpoint_every: int | None,
              command: str | None, device, log, data_dir=None) -> tuple[Run, RunState]:
    """Check the folder, read the data, build model and optimizer, and restore the checkpoint when resuming."""
    if distributed.launched_by_torchrun() and not distributed.is_distributed():
        raise NinError("launched by torchrun: call train() inside `with nin.distributed.process_group(): ...`")
    device = resolve_device(device)
    main = distributed.is_main()
    saved, preprocess_state, saved_meta = (load_checkpoint(out / "checkpoint.safetensors") if resume
                                           else (None, None, {}))
    if resume:
        cfg = _checkpoint_config(out / "checkpoint.safetensors", saved, saved_meta)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("epochs", epochs), ("checkpoint_every", checkpoint_every),
                                                        ("data_dir", data_dir and str(data_dir))) if v is not None})
    validate(cfg)
    if main:
        for temp in remove_stale_temp_files(out, RUN_FILES):
            log(f"nin: removed {temp.name}, left by a write that was killed")

    torch.manual_seed(cfg.seed)
    amp_dtype = select_precision(cfg.precision, device)
    source = _load_source(cfg) if cfg.init_from and not resume else None
    if source is not None and source[1].kind == cfg.preprocessing:  # the input the source's weights expect
        preprocess_state = source[1].state_dict()
    preprocessing, classes, train_data, eval_data, identity = _prepare_data(cfg, device, preprocess_state)
    if resume and saved_meta.get("data_sha256") not in (None, identity):
        raise NinError(f"{cfg.data_dir or 'the data folder'}: its {cfg.dataset} {cfg.train_split} images are not the "
                       f"ones this run trained on (sha256 differs); point --data-dir at the run's own data")
    cfg = _fit_to_data(cfg, classes, log)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = _build_model(cfg, classes, train_data, source, log, whiten=cfg.whiten_init and not resume)
    model = model.to(device).to(memory_format=memory_format)
    state = RunState(model, make_optimizer(model, cfg), PlateauRule(cfg.plateau_patience, cfg.plateau_min_delta,
                                                                   cfg.max_lr_drops),
                     Ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None, EpochTotals.zeros(device))
    loader, eval_loader = _loaders(cfg, train_data, eval_data)
    extra_loader = _extra_loader(cfg, model, preprocessing, device)
    if resume:
        try:
            state.load_state_dict(saved)
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{out / 'checkpoint.safetensors'}: does not match its own config "
                                  f"({' '.join(str(e).split())[:300]})") from None
        _reshard(state, saved_meta.get("world_size", 1), len(loader), cfg, log)

    history = _run_history(command, resume, saved_meta)
    world = distributed.world_size()
    meta = {"train_config": cfg.to_dict(), "model_config": model.config.to_dict(), "dataset": cfg.dataset,
            "data_sha256": identity, "classes": classes, "tta_flip": cfg.tta_flip, "world_size": world, **history}
    run = Run(cfg, out, device, amp_dtype, preprocessing, classes, loader, eval_loader, extra_loader,
              _wrap(model, cfg, device), history, MetricsLog(out, keep_epochs=state.epoch) if main else None, log,
              memory_format, meta)
    if main:
        _write_config_json(run, resume)
        if not resume:
            log(f"nin: training {cfg.model} on {cfg.dataset} ({len(train_data[1])} images, {len(loader)} steps/epoch"
                f"{f' per rank × {world} ranks' if world > 1 else ''}) on {device}, "
                f"{'bf16 autocast' if amp_dtype else 'fp32'}; run folder {out}")
    return run, state


def _fit_to_data(cfg: TrainConfig, classes: list[str], log) -> TrainConfig:
    """A user's folder decides the class count (and is told when its test error is measured on training images)."""
    if cfg.dataset != "folder":
        return cfg
    root = resolve_root(cfg.data_dir)
    if distributed.is_main() and not (root / cfg.eval_split).is_dir():
        log(f"nin: note: {root} has no {cfg.eval_split}/ sub-folder: the {cfg.eval_split} error is measured on the "
            f"training images (add train/ and {cfg.eval_split}/ sub-folders for a held-out score)")
    if "num_classes" in cfg.model_args:
        return cfg
    return dataclasses.replace(cfg, model_args={**cfg.model_args, "num_classes": len(classes)})


def _build_model(cfg: TrainConfig, classes: list[str], train_data: tuple[torch.Tensor, torch.Tensor], source,
                 log, *, whiten: bool = False) -> NiN:
    """The run's model: a fresh init (its first conv patch-whitened from the preprocessed training images when
    ``whiten``: the same on every rank; a resumed run's checkpoint replaces it, so it is skipped there), or the
    ``--init-from`` weights (class maps afresh where classes differ)."""
    images, labels = train_data
    model = get_model(cfg.model, **cfg.model_args)
    if int(labels.max()) >= model.config.num_classes:
        raise NinError(f"{cfg.dataset} has labels up to {int(labels.max())} but {cfg.model} has "
                       f"{model.config.num_classes} classes")
    if source is not None:
        _start_from(model, source[0], cfg.init_from, log, same_classes=source[2].get("classes") == classes)
    elif whiten:
        conv = model.blocks[0].convs[0]
        count = patch_whitening_(conv, images)
        if distributed.is_main():
            log(f"nin: whiten_init: {count} of conv1's {conv.out_channels} filters whiten its "
                f"{conv.kernel_size[0]}×{conv.kernel_size[1]} training-image patches")
    return model


def _load_source(cfg: TrainConfig):
    """The weights a fine-tuning run starts from: (model, preprocessing, meta); a path or a pretrained tag."""
    from nin.checkpoint import load_weights

    return load_weights(cfg.init_from if not Path(cfg.init_from).expanduser().exists()
                        else Path(cfg.init_from).expanduser())


def _start_from(model: NiN, source: NiN, where: str, log, *, same_classes: bool) -> None:
    """Copy ``source``'s weights into ``model``; the class-map layer starts afresh where the classes differ.

    Every other tensor must match by name and shape (one line naming the first that does not). Classes differ
    when their count or their names differ: a map trained for "cat" must not answer for another class.
    """
    last_block = f"blocks.{len(model.blocks) - 1}."
    class_map = next(name for name, module in model.named_modules() if module is model.class_map_layer)
    head = (class_map + ".", class_map.replace(".convs.", ".norms.") + ".")  # the conv and its batch norm
    target, weights = model.state_dict(), source.state_dict()
    differ = sorted(k for k in set(target) | set(weights)
                    if k not in target or k not in weights or target[k].shape != weights[k].shape)
    blocking = [k for k in differ if not (k.startswith(last_block) and k in target and k in weights)]
    if blocking:
        k = blocking[0]
        found = tuple(weights[k].shape) if k in weights else "nothing"
        wanted = tuple(target[k].shape) if k in target else "nothing"
        raise NinError(f"--init-from {where}: {k} is {found} there, the model needs {wanted}; pick the same "
                       f"architecture (--model, --set model.<field>=...)")
    fresh = set(differ) | (set() if same_classes else {k for k in target if k.startswith(head)})
    model.load_state_dict({k: v for k, v in weights.items() if k not in fresh}, strict=False)
    if fresh:
        log(f"nin: started from {where}; re-initialised the class-map layer for these {model.config.num_classes} "
            "classes")


def _loaders(cfg: TrainConfig, train_data, eval_data):
    from nin.data import TensorLoader
    from nin.transforms import Augment

    rank, world = distributed.rank(), distributed.world_size()
    augment = Augment(flip=cfg.flip, translate=cfg.translate) if cfg.augment else None
    loader = TensorLoader(*train_data, cfg.batch_size, shuffle=True, seed=cfg.seed, rank=rank, world_size=world,
                          augment=augment)
    eval_loader = TensorLoader(*eval_data, cfg.eval_batch_size, shuffle=False, rank=rank, world_size=world)
    return loader, eval_loader


def _extra_loader(cfg: TrainConfig, model: NiN, preprocessing, device: torch.device):
    """The second test set (``extra_eval``), preprocessed like the first; None without one."""
    if not cfg.extra_eval:
        return None
    from nin.data import TensorLoader
    from nin.evaluate import check_image_shape, read_data_file

    data = read_data_file(cfg.extra_eval, model.config.num_classes, flag="--set extra_eval=")
    check_image_shape(data.images, model.config, f"model {cfg.model}", f"extra_eval {cfg.extra_eval}")
    return TensorLoader(preprocessing(data.images).to(device), data.labels.to(device), cfg.eval_batch_size,
                        shuffle=False, rank=distributed.rank(), world_size=distributed.world_size())


def _wrap(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The model as the loop calls it: compiled when asked, in DDP under torchrun."""
    if cfg.compile:
        model = torch.compile(model)
    if distributed.is_distributed():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _reshard(state: RunState, saved_world: int, steps_per_epoch: int, cfg: TrainConfig, log) -> None:
    """A checkpoint from another world size counts batches of other shards: restart its epoch in progress."""
    world = distributed.world_size()
    if saved_world == world:
        return
    if distributed.is_main():
        log(f"nin: resuming a {saved_world}-process run with {world} process(es): the global batch changes "
            f"from {cfg.batch_size * saved_world} to {cfg.batch_size * world} (the lr is not rescaled)"
            + (f"; epoch {state.epoch + 1} was interrupted after {state.batches_done} of its steps and restarts "
               f"from its first batch" if state.batches_done else ""))
    state.restart_epoch(steps_per_epoch)


def _prepare_data(cfg: TrainConfig, device: torch.device, preprocess_state: dict | None):
    """Read the splits, fit (or restore) the preprocessing, and keep both splits preprocessed on the device."""
    from nin.data import load_dataset
    from nin.evaluate import check_image_shape
    from nin.models import model_config
    from nin.transforms import build_preprocessing, fit_preprocessing

    model_cfg = model_config(cfg.model, **cfg.model_args)
    size_args = ({"image_size": model_cfg.input_size, "channels": model_cfg.in_channels}
                 if cfg.dataset == "folder" else {})
    with distributed.main_first():
        train_set = load_dataset(cfg.dataset, cfg.train_split, cfg.data_dir, **size_args)
        eval_set = load_dataset(cfg.dataset, cfg.eval_split, cfg.data_dir, **size_args)
    check_image_shape(train_set.images, model_cfg, f"model {cfg.model}", f"{cfg.dataset} {cfg.train_split}")
    train_images, train_labels = _first(train_set.images, train_set.labels, cfg.train_subset)
    eval_images, eval_labels = _first(eval_set.images, eval_set.labels, cfg.eval_subset)
    if preprocess_state is None:
        fitted = fit_preprocessing(cfg.preprocessing, train_images).state_dict() if distributed.is_main() else None
        preprocess_state = distributed.broadcast_object(fitted)  # rank 0 fits; every rank applies the same
    preprocessing = build_preprocessing(cfg.preprocessing, preprocess_state)
    return (preprocessing, train_set.classes, (preprocessing(train_images).to(device), train_labels.to(device)),
            (preprocessing(eval_images).to(device), eval_labels.to(device)), _data_identity(train_images, train_labels))


def _data_identity(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the raw training images and labels as trained on: what a resumed run must find again."""
    import hashlib

    digest = hashlib.sha256()
    for tensor in (images, labels):
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _first(images: torch.Tensor, labels: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (images[:count], labels[:count]) if count else (images, labels)


def _checkpoint_config(path: Path, saved: dict, meta: dict) -> TrainConfig:
    """The run's TrainConfig from its checkpoint's header, checked against the checkpoint's own model tensors."""
    try:
        cfg = TrainConfig.from_dict(meta["train_config"])
        validate(cfg)
        PlateauRule().load_state_dict(meta["plateau_rule"])
        expected = {k: v.shape for k, v in get_model(cfg.model, **cfg.model_args).state_dict().items()}
    except (KeyError, TypeError, ValueError, AttributeError, NinError) as e:
        raise CheckpointError(f"{path}: damaged training state ({e})") from None
    found = {k: v.shape for k, v in saved["model"].items()}
    wrong = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
    if wrong:
        raise CheckpointError(f"{path}: its model tensors do not match its own config ({cfg.model} "
                              f"{cfg.model_args}; first difference: {wrong[0]})")
    return cfg


def _run_history(command: str | None, resume: bool, saved_meta: dict) -> dict:
    """The command and git revision that started the run, and each resume since (command, revision, step).

    config.json and results quote the command that started the run, not the last ``--resume``.
    """
    this = command or shlex.join(["nin", *sys.argv[1:]])
    if not resume:
        return {"command": this, "git_revision": git_revision(), "resumes": []}
    resumes = [*saved_meta.get("resumes", []), {"command": this, "git_revision": git_revision(),
                                                 "step": saved_meta.get("step")}]
    return {"command": saved_meta.get("command"), "git_revision": saved_meta.get("git_revision"), "resumes": resumes}


def _write_config_json(run: Run, resume: bool) -> None:
    config = {RUN_MARKER: True, "train_config": run.cfg.to_dict(), "model_config": run.meta["model_config"],
              **run.history,
              "device": str(run.device), "autocast": str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "fp32",
              "world_size": run.meta["world_size"], "torch": torch.__version__, "resumed": resume}
    atomic_write_bytes(run.out / "config.json", (json.dumps(config, indent=2) + "\n").encode())


def _progress(run: Run, state: RunState):
    """The epoch's batches, behind a progress bar on an interactive terminal (main rank only)."""
    batches = iter(run.loader)
    if not (distributed.is_main() and sys.stderr.isatty()):
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=run.steps_per_epoch, initial=state.batches_done, leave=False, dynamic_ncols=True,
                desc=f"epoch {state.epoch + 1}/{run.cfg.epochs}")


def _check_stall(run: Run, state: RunState, logits: torch.Tensor) -> None:
    num_classes = state.model.config.num_classes
    mean_loss = state.totals.mean_loss()
    if distributed.all_true(_stalled(logits.detach(), mean_loss, num_classes), run.device):
        raise TrainingStalled(f"after {state.step} steps the loss is {mean_loss:.4f} ≈ ln {num_classes} = "
                              f"{math.log(num_classes):.4f}: {STALL_ADVICE}")


def _stalled(logits: torch.Tensor, mean_loss: float, num_classes: int) -> bool:
    """Dead start: the loss sits at ln K because every image gets the same (usually all-zero) scores."""
    same_for_all = bool((logits.float().std(dim=0) < 1e-6).all()) if logits.shape[0] > 1 else False
    return same_for_all and abs(mean_loss - math.log(num_classes)) < 0.05


STALL_ADVICE = ("every class map is dead (the same scores for every image), the failure many NiN ports hit. "
                "Change: --set model.class_map_relu=false (no ReLU on the class maps), or a lower --set lr=0.01, "
                "or --set model.init=kaiming, or use --recipe fast (batch norm)")


RUN_MARKER = "nin_run"  # a key of config.json: this folder was made by `nin train`


@contextlib.contextmanager
def run_folder_lock(out: Path, *, resume: bool):
    """Hold an exclusive OS lock on the run folder itself (released by the kernel when the process dies, kill -9
    too); no lock file is left behind.

    Checks first that the folder may be written (`check_output_dir`); a second writer gets one line naming
    the holder's PID. A folder this call made is removed again when the run fails before writing into it.
    """
    created = not out.exists()
    check_output_dir(out, resume=resume)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NinError(f"--out {out}: another nin process (PID {_lock_holder(fd)}) is writing this run folder; "
                           "wait for it or stop it first") from None
        check_output_dir(out, resume=resume)  # what the holder before us may have left
        yield
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):  # failed before writing anything
            out.rmdir()
        raise
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """The PID holding a flock on ``fd``'s file, from /proc/locks (Linux); "unknown" elsewhere."""
    info = os.fstat(fd)
    where = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and where in fields:
                return fields[fields.index(where) - 1]
    except OSError:
        pass
    return "unknown"


def check_output_dir(out: Path, *, resume: bool) -> None:
    """Fail now, not after an hour: the folder is ours (or new), writable, with room for checkpoints."""
    if out.exists() and not out.is_dir():
        raise NinError(f"--out {out}: exists and is not a folder")
    links = [name for name in RUN_FILES if (out / name).is_symlink()]
    if links:
        raise NinError(f"--out {out}: {links[0]} is a symbolic link; a run folder holds its own files")
    if not resume and out.is_dir():
        _check_new_run_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise NinError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    free = shutil.disk_usage(out).free
    if free < 64 * 2**20:
        raise NinError(f"--out {out}: only {free // 2**20} MiB free; checkpoints need at least 64 MiB")


def _check_new_run_folder(out: Path) -> None:
    """A new run may only take an empty folder, or one a run started and left before finishing an epoch."""
    if (out / "checkpoint.safetensors").exists():
        raise NinError(f"--out {out}: already holds a run; continue it with --resume {out} or choose another --out")
    entries = sorted(p.name for p in out.iterdir() if p.name != ".write-test")
    if not entries:
        return
    try:
        ours = json.loads((out / "config.json").read_text()).get(RUN_MARKER) is True
    except (OSError, ValueError, AttributeError):
        ours = False
    results = [name for name in ("model.safetensors", "metrics.jsonl") if (out / name).is_file()
               and (out / name).stat().st_size > 0]
    if not ours or results:
        kept = results[0] if results and ours else entries[0]
        raise NinError(f"--out {out}: not empty and not a run this program left unfinished (it holds {kept}); "
                       "choose another --out")
