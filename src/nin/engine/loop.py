"""The training loop: one plain epoch function, an end-of-epoch function, and exact resume.

    from nin.engine import recipe, train
    train(recipe("fast", "mnist"), "runs/mnist-fast")

`train()` is the epoch loop: `train_one_epoch`, then `end_epoch` (evaluate, apply the lr rule, log,
checkpoint on the main rank). There is no trainer class and no callback: every feature is a visible line.
Everything that changes while a run trains lives in one `RunState` (`nin.engine.state`), whose `state_dict()`
is what a checkpoint holds and whose `load_state_dict()` is what resuming restores, so save and resume are one
pair of calls. Starting and resuming (`start_run`) live in `nin.engine.start`, the run folder's lock and checks
in `nin.engine.run_folder`, the optimizer in `nin.engine.optim`, the lr rules in `nin.engine.schedule`, the
per-epoch log in `nin.engine.metrics`, the config schema and recipes in `nin.engine.config`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from nin import distributed
from nin.checkpoint import save_checkpoint, save_weights
from nin.engine.config import TrainConfig, small_phase_epochs, validate
from nin.engine.metrics import MetricsLog
from nin.engine.run_folder import run_folder_lock
from nin.engine.schedule import lr_at
from nin.engine.start import start_run, write_config_json
from nin.engine.state import Run, RunState
from nin.errors import CheckpointError, NinError, NonFiniteLoss, TrainingStalled
from nin.evaluate import evaluate
from nin.runtime import autocast, keep_freed_memory

__all__ = ["train_step", "checks_finite", "dropout_seed", "train_one_epoch", "end_epoch", "train", "dead_class_maps"]


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


def checks_finite(device_type: str, step: int, checkpoint_every: int, *, end_of_epoch: bool, last: bool) -> bool:
    """Whether training step ``step`` (1-based) checks its loss for NaN/inf before applying it: every step on a CPU,
    where the host sync is free; on a GPU every 50th step and every step a checkpoint follows (mid-epoch, at an
    epoch's end, the last), so that no checkpoint is written after an unchecked step."""
    return (device_type == "cpu" or step % 50 == 0 or end_of_epoch or last
            or bool(checkpoint_every and step % checkpoint_every == 0))


def dropout_seed(seed: int, rank: int, step: int) -> int:
    """The dropout stream of one step on one rank: a function of (seed, rank, step), so resuming needs no RNG state
    for it and DDP ranks draw different masks."""
    return ((seed * 1_000_003 + 7_919 * (rank + 1)) * 1_000_003 + step) % (2**63 - 1)


def _stop_requested(run: Run) -> bool:
    """True on every rank when a stop was asked for on any rank (a signal may reach the ranks at different steps)."""
    if run.stop is None:
        return False
    return not distributed.all_true(not run.stop.is_set(), run.device)


def check_run_folder(run: Run) -> None:
    """Before the main rank writes to the run folder: refuse one that is gone (removed or moved while the run
    trained), rather than make it again holding a checkpoint and no config.json."""
    if distributed.is_main() and not (run.out / "config.json").is_file():
        raise NinError(f"{run.out}: the run folder is gone (its config.json is not there any more: removed or moved "
                       "while training); stopped without writing to it. A moved folder continues from its last "
                       "checkpoint with `nin train --resume NEW_PLACE`")


def save(run: Run, state: RunState) -> None:
    """Checkpoint the run (all ranks call: the epoch's counts are summed; the main rank writes)."""
    tensors = state.state_dict()
    check_run_folder(run)
    if distributed.is_main():
        try:
            save_checkpoint(run.checkpoint_path, tensors, run.preprocessing, run.meta)
        except CheckpointError as e:  # disk full, quota: the atomic write leaves the previous checkpoint in place
            raise CheckpointError(f"{e} (step {state.step}); free space, then `nin train --resume {run.out}`") from None


def _last_good(run: Run) -> str:
    """Where a stopped run can be taken up: its last checkpoint, or (none written yet) a fresh start."""
    if run.checkpoint_path.is_file():
        return f"the last good checkpoint stays in {run.checkpoint_path}"
    return f"no checkpoint was written before it (nothing to resume; {run.out} may be reused by a new run)"


def done(run: Run, state: RunState) -> bool:
    return state.epoch >= run.cfg.epochs or state.step >= run.last_step or state.rule.finished


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
        check = checks_finite(run.device.type, state.step + 1, cfg.checkpoint_every,
                              end_of_epoch=state.batches_done + 1 == steps_per_epoch, last=state.step + 1 >= run.last_step)
        loss, logits = train_step(run.train_model, state.optimizer, images, labels, lr=lr, cfg=cfg,
                                  amp_dtype=run.amp_dtype, memory_format=run.memory_format, check_finite=check)
        if loss is None:
            raise NonFiniteLoss(f"the training loss became non-finite at epoch {state.epoch + 1}, step "
                                f"{state.step + 1}; {_last_good(run)}. Lower the lr (--set lr=...)"
                                + ("" if run.meta["model_config"].get("batch_norm") else
                                   " or turn on batch norm (--set model.batch_norm=true)"))
        if state.ema is not None:
            state.ema.update(state.model)
        state.totals.add(loss, logits, labels)
        state.step += 1
        state.batches_done += 1
        if hasattr(batches, "set_postfix") and state.step % 10 == 0:
            batches.set_postfix(loss=f"{state.totals.mean_loss():.4f}", lr=f"{lr:.4g}")
        if cfg.stall_check_steps and ((state.epoch == 0 and state.step == cfg.stall_check_steps)
                                      or state.batches_done == steps_per_epoch):
            _check_stall(run, state, logits, labels)
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
        raise NonFiniteLoss(f"the training loss became {train_loss} in epoch {state.epoch + 1}; {_last_good(run)}. "
                            f"Lower the lr (--set lr=...)")
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
    check_run_folder(run)
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
    process-wide setting but the malloc policy (`nin.runtime.keep_freed_memory`), which it applies as the CLI does.

    Writes ``config.json``, ``metrics.jsonl`` / ``metrics.csv``, ``checkpoint.safetensors`` (every epoch and
    every ``checkpoint_every`` steps) and, at the end, ``model.safetensors`` for evaluate / predict.
    """
    if not resume:  # an impossible setting is refused before the run folder is made
        validate(dataclasses.replace(cfg, **{k: v for k, v in (("epochs", epochs),
                                                                ("checkpoint_every", checkpoint_every)) if v is not None}))
    keep_freed_memory()  # the step's speed was measured with it (docs/performance.md)
    with run_folder_lock(Path(out_dir), resume=resume) if distributed.is_main() else contextlib.nullcontext():
        run, state = start_run(cfg, Path(out_dir), resume=resume, epochs=epochs, checkpoint_every=checkpoint_every,
                               command=command, device=device, log=log, data_dir=data_dir)
        run.stop = stop
        record: dict = {}
        main = distributed.is_main()
        if done(run, state) and resume and (run.out / "model.safetensors").is_file():  # nothing to do, nothing written
            if main:
                log(f"nin: {run.out} is already finished (epoch {state.epoch}, step {state.step}); nothing to do. "
                    f"`--epochs N` with N > {state.epoch} trains further")
        else:
            if main:  # the run's files: config.json, and its metrics so far (a resumed run's first epochs)
                run.metrics = MetricsLog(run.out, keep_epochs=state.epoch)  # first: it refuses a log it cannot read
                write_config_json(run, resume)
            while not done(run, state):
                train_one_epoch(run, state, interrupt_after)
                record = end_epoch(run, state)
            _finish(run, state, record)
    distributed.barrier()
    return record


def _finish(run: Run, state: RunState, record: dict) -> None:
    """The final weights (model.safetensors) and the closing line, on the main rank."""
    check_run_folder(run)
    if run.metrics is not None:
        final = state.ema.model if state.ema is not None else state.model
        save_weights(run.out / "model.safetensors", final, run.preprocessing,
                     {**run.meta, "train_config": run.cfg.to_dict(), "epochs": state.epoch, "step": state.step})
        run.metrics.close()
        if record:
            split = run.cfg.eval_split
            run.log(f"nin: done. {split} error {record[f'{split}_error']:.2%} after {state.epoch} epochs; "
                    f"weights in {run.out / 'model.safetensors'}")


def _progress(run: Run, state: RunState):
    """The epoch's batches, behind a progress bar on an interactive terminal (main rank only)."""
    batches = iter(run.loader)
    if not (distributed.is_main() and sys.stderr.isatty()):
        return batches
    return tqdm(batches, total=run.steps_per_epoch, initial=state.batches_done, leave=False, dynamic_ncols=True,
                desc=f"epoch {state.epoch + 1}/{run.cfg.epochs}")


def _check_stall(run: Run, state: RunState, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Early in the first epoch and at the end of every epoch: all class maps dead, or some of them."""
    num_classes = state.model.config.num_classes
    mean_loss = state.totals.mean_loss()
    # a whole first epoch of at least stall_check_steps steps: enough training to call a loss at ln K dead
    whole_epoch = state.batches_done == run.steps_per_epoch and state.step >= run.cfg.stall_check_steps
    if state.epoch == 0 and distributed.all_true(
            _stalled(logits.detach(), mean_loss, num_classes, whole_epoch=whole_epoch), run.device):
        raise TrainingStalled(f"after {state.step} steps the loss is {mean_loss:.4f} ≈ ln {num_classes} = "
                              f"{math.log(num_classes):.4f}: {STALL_ADVICE}")
    # a class map dead at two epoch ends in a row, both after stall_check_steps steps: early in training a ReLU
    # map can be all zero for a while and come back; one that stays so through a whole epoch does not
    end = state.batches_done == run.steps_per_epoch and state.step >= run.cfg.stall_check_steps
    dead = sorted(set(dead_class_maps(logits.detach(), labels)) & run.dead_maps) if end else []
    if end:
        run.dead_maps = set(dead_class_maps(logits.detach(), labels))
    if distributed.all_true(bool(dead), run.device):  # every rank sees it: all stop together
        names = ", ".join(run.classes[k] if k < len(run.classes) else str(k) for k in dead)
        raise TrainingStalled(f"epoch {state.epoch + 1}: the class map of {names} is dead (zero for every image of "
                              f"the last batch of this epoch and of the one before, its own class's included), so "
                              f"that class can never be predicted again; "
                              f"the last checkpoint stays in {run.checkpoint_path}. {DEAD_MAP_ADVICE}")


def dead_class_maps(logits: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """The classes whose score is exactly 0 for every image of the batch although the batch holds images of them:
    a class map behind a ReLU that no longer fires for anything (the paper's form), which nothing can revive."""
    zero = (logits.float() == 0).all(dim=0)
    present = torch.bincount(labels, minlength=logits.shape[1]) > 0
    return [int(k) for k in torch.nonzero(zero & present).flatten()]


def _stalled(logits: torch.Tensor, mean_loss: float, num_classes: int, *, whole_epoch: bool = False) -> bool:
    """Dead start: the loss sits at ln K because every image gets the same (usually all-zero) scores.

    Early (``stall_check_steps``) the scores must be equal to 1e-6; after a whole first epoch, a mean loss within
    0.005 of ln K with scores that differ by under 0.01 is as dead: a model that learns leaves ln K within an
    epoch (the paper's CIFAR-10 model: 2.267 after its first), a dead one stays (the paper's MNIST model on [0, 1]
    pixels: 2.302, its scores spread by 0.001).
    """
    if logits.shape[0] < 2:
        return False
    spread = float(logits.float().std(dim=0).max())
    if whole_epoch:
        return spread < 0.01 and abs(mean_loss - math.log(num_classes)) < 0.005
    return spread < 1e-6 and abs(mean_loss - math.log(num_classes)) < 0.05


DEAD_MAP_ADVICE = ("The paper's ReLU on the class maps allows it; a run with another --seed may not meet it, "
                   "--set model.class_map_relu=false rules it out, and --set stall_check_steps=0 lets the run go on")
STALL_ADVICE = ("every class map is dead (the same scores for every image), the failure many NiN ports hit. "
                "Change: --set model.class_map_relu=false (no ReLU on the class maps), or a lower --set lr=0.01, "
                "or --set model.init=kaiming, or use --recipe fast (batch norm); a run that is only slow to start "
                "can turn this check off with --set stall_check_steps=0")
