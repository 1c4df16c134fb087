"""The training engine: recipes, the learning-rate rules, one plain epoch loop, exact resume.

    from nin.train import recipe, train
    cfg = recipe("fast", "mnist")
    train(cfg, "runs/mnist-fast")

Recipes are named TrainConfig instances (PAPER, CAFFE, FAST) adjusted per data set by `recipe()`.
`train()` is the epoch loop: train one epoch, evaluate, log, checkpoint on the main rank. There is no
trainer class and no callback: every feature is a visible line below.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import shutil
import shlex
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from nin import distributed
from nin.checkpoint import git_revision, load_state, remove_stale_temp_files, save_state, save_weights
from nin.errors import NinError, NonFiniteLoss, TrainingStalled
from nin.evaluate import autocast, evaluate
from nin.models import NiN, get_model, model_config

__all__ = ["TrainConfig", "PAPER", "CAFFE", "FAST", "RECIPES", "DATASET_DEFAULTS", "recipe", "lr_at",
           "total_steps", "PlateauRule", "apply_overrides", "train", "train_step", "select_precision",
           "make_optimizer", "param_groups"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Each field: unit, and where its value comes from."""

    dataset: str = "cifar10"  # cifar10, cifar100, svhn, mnist, fashion-mnist, folder
    model: str = "nin_cifar10"  # a name from nin.models.list_models()
    model_args: dict = field(default_factory=dict)  # NiNConfig overrides, e.g. {"batch_norm": True}
    data_dir: str | None = None  # data root; None = $NIN_DATA, else the per-user cache
    train_split: str = "train"  # paper: final models retrained on all training images
    eval_split: str = "test"  # "val" evaluates on the paper's validation split instead
    train_subset: int = 0  # images; 0 = the whole split, N = its first N (quick experiments)
    eval_subset: int = 0  # images; 0 = the whole evaluation split, N = its first N
    preprocessing: str = "gcn_zca"  # nin.transforms kind; PAPER.md: GCN + ZCA for CIFAR
    epochs: int = 260  # the authors' CIFAR-10 run: 200 + 30 + 30 epochs
    batch_size: int = 128  # images per step on each rank (global batch = batch_size × world size); NiN paper: 128
    lr: float = 0.1  # base learning rate; NiN paper / cuda-convnet: 0.1
    momentum: float = 0.9  # NiN paper
    nesterov: bool = False
    weight_decay: float = 1e-4  # on conv/linear weights only; NiN paper: 1e-4
    bias_lr_mult: float = 2.0  # cuda-convnet / Caffe: biases learn 2x faster
    class_map_lr_mult: float = 0.1  # cuda-convnet / Caffe: the class-map layer (cccp6) learns at 0.1x
    label_smoothing: float = 0.0  # fraction of target mass spread over all classes
    schedule: str = "plateau"  # plateau | multistep | onecycle | constant
    milestones: tuple[float, ...] = ()  # multistep: where lr drops, in `milestone_unit`
    milestone_unit: str = "epoch"  # "epoch" or "step"
    lr_drop: float = 0.1  # NiN paper: divide the lr by 10
    max_lr_drops: int = 2  # NiN paper: "repeat once" -> two drops, final lr = 1% of the base
    plateau_patience: int = 5  # epochs without a new best training accuracy before a drop (ours; the paper gives none)
    plateau_min_delta: float = 0.0  # training-accuracy gain (fraction) that counts as improving
    warmup_fraction: float = 0.2  # onecycle: fraction of the steps spent rising to the peak lr
    start_lr_fraction: float = 0.1  # onecycle: lr at step 0 as a fraction of the peak
    max_steps: int = 0  # stop after this many optimizer steps; 0 = no limit (Caffe: 120k)
    augment: bool = False  # random translation + horizontal flip (paper: the CIFAR-10 8.81% run)
    flip: bool = True  # horizontal flips when augmenting (off for digits)
    translate: int = 4  # pixels of random pad-and-crop translation when augmenting
    ema_decay: float = 0.0  # weight averaging: exponential moving average per step; 0 = off
    tta_flip: bool = False  # test-time augmentation: average the logits of the image and its mirror
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16: bf16 autocast with fp32 master weights and an fp32 loss
    channels_last: bool = True  # NHWC memory format: faster convolutions on CPU (oneDNN) and GPU
    compile: str = "auto"  # auto | on | off: torch.compile the training model (auto = off: it did not pay here)
    eval_batch_size: int = 500  # images per evaluation batch
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = at the end of each epoch only
    stall_check_steps: int = 200  # look for dead class maps after this many steps (or at the end of epoch 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise NinError(f"unknown TrainConfig fields {sorted(unknown)}")
        data = dict(data)
        if "milestones" in data:
            data["milestones"] = tuple(data["milestones"])
        return cls(**data)


# The paper's recipe (PAPER.md, "Training recipe"): SGD + momentum, batch 128, lr 0.1 with biases at 2x and
# the class-map layer at 0.1x, weight decay 1e-4 on weights only, N(0, 0.05²) init, the plateau rule.
PAPER = TrainConfig()

# The authors' Caffe zoo solver for CIFAR-10: lr 0.1 for 100k iterations, 0.01 up to 120k, on nin_cifar10_caffe.
CAFFE = TrainConfig(model="nin_cifar10_caffe", schedule="multistep", milestones=(100_000,), milestone_unit="step",
                    max_steps=120_000, epochs=308)

# Fast: the same NiN blocks, trained for accuracy per CPU minute. Batch norm (and no ReLU on the class maps,
# so they cannot die), He init, per-channel standardization, Nesterov SGD with a one-cycle (triangular) lr,
# label smoothing, flip + translate, test-time flips; weight averaging available (ema_decay) but off.
FAST = TrainConfig(
    model_args={"batch_norm": True, "class_map_relu": False, "init": "kaiming", "dropout": 0.25},
    preprocessing="standardize",
    epochs=30,
    lr=0.2,  # peak; batch norm tolerates the larger step
    nesterov=True,
    weight_decay=5e-4,
    bias_lr_mult=1.0,
    class_map_lr_mult=1.0,
    label_smoothing=0.1,
    schedule="onecycle",
    augment=True,
    translate=2,
    tta_flip=True,
)

RECIPES = {"paper": PAPER, "caffe": CAFFE, "fast": FAST}

# Per data set: the matching paper model, its paper preprocessing, which augmentations make sense, and
# the fast recipe's default epochs.
DATASET_DEFAULTS: dict[str, dict] = {
    "cifar10": {"model": "nin_cifar10", "preprocessing": "gcn_zca", "flip": True, "fast_epochs": 30},
    "cifar100": {"model": "nin_cifar100", "preprocessing": "gcn_zca", "flip": True, "fast_epochs": 40,
                 "paper": {"lr": 0.02, "weight_decay": 5e-4}},  # cuda-convnet CIFAR-100 params
    "svhn": {"model": "nin_svhn", "preprocessing": "gcn_lcn", "flip": False, "fast_epochs": 15},
    "mnist": {"model": "nin_mnist", "preprocessing": "scale", "flip": False, "fast_epochs": 8},
    "fashion-mnist": {"model": "nin_mnist", "preprocessing": "scale", "flip": True, "fast_epochs": 20},
    "folder": {"model": "nin_cifar10", "preprocessing": "standardize", "flip": True, "fast_epochs": 30},
}


def recipe(name: str, dataset: str) -> TrainConfig:
    """The named recipe ("paper", "caffe", "fast") for a data set, with that data set's defaults."""
    if name not in RECIPES:
        raise NinError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    if dataset not in DATASET_DEFAULTS:
        raise NinError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASET_DEFAULTS)}")
    if name == "caffe" and dataset != "cifar10":
        raise NinError("the caffe recipe is the Caffe zoo's CIFAR-10 solver: use it with --dataset cifar10")
    base, defaults = RECIPES[name], DATASET_DEFAULTS[dataset]
    changes: dict = {"dataset": dataset, "flip": defaults["flip"]}
    if name == "paper":
        changes.update(model=defaults["model"], preprocessing=defaults["preprocessing"], **defaults.get("paper", {}))
    elif name == "fast":
        changes.update(model=defaults["model"], epochs=defaults["fast_epochs"], tta_flip=defaults["flip"])
        if dataset in ("mnist", "fashion-mnist"):
            changes["preprocessing"] = "scale"  # the paper's MNIST input; standardizing adds nothing here
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------------------------------------
# Overrides: --set key=value, parsed with the field's own type
# ---------------------------------------------------------------------------------------------

def _parse_value(text: str, annotation, where: str):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise NinError(f"{where}: expected true or false, got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise NinError(f"{where}: expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            value = float(text)
        except ValueError:
            raise NinError(f"{where}: expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise NinError(f"{where}: expected a finite number, got {text!r}")
        return value
    if annotation is str:
        return text
    if origin is tuple:
        item = args[0]
        parts = [p for p in text.replace(" ", "").split(",") if p]
        return tuple(_parse_value(p, item, where) for p in parts)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse_value(text, arg, where)
            except NinError as e:
                errors.append(str(e))
        raise NinError(errors[0] if errors else f"{where}: cannot parse {text!r}")
    raise NinError(f"{where}: cannot be set from the command line")


def apply_overrides(cfg: TrainConfig, assignments: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings: TrainConfig fields, or ``model.<field>`` for NiNConfig fields."""
    from nin.models import NiNConfig

    train_types = typing.get_type_hints(TrainConfig)
    model_types = typing.get_type_hints(NiNConfig)
    changes: dict = {}
    model_args = dict(cfg.model_args)
    for item in assignments:
        if "=" not in item:
            raise NinError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        where = f"--set {key}"
        if key.startswith("model."):
            name = key[len("model."):]
            if name not in model_types or name == "blocks":
                raise NinError(f"{where}: unknown model field {name!r}; known: "
                               f"{', '.join(sorted(k for k in model_types if k != 'blocks'))}")
            model_args[name] = _parse_value(text, model_types[name], where)
        elif key in train_types and key != "model_args":
            changes[key] = _parse_value(text, train_types[key], where)
        else:
            known = sorted(k for k in train_types if k != "model_args")
            raise NinError(f"{where}: unknown field {key!r}; known: {', '.join(known)}, or model.<field>")
    return dataclasses.replace(cfg, **changes, model_args=model_args)


def validate(cfg: TrainConfig) -> None:
    """Refuse impossible settings before any data is read."""
    checks = [
        (cfg.epochs >= 1, f"epochs must be at least 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch_size must be at least 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"lr must be positive, got {cfg.lr}"),
        (0 <= cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum}"),
        (cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}"),
        (0 <= cfg.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}"),
        (cfg.schedule in ("plateau", "multistep", "onecycle", "constant"),
         f"schedule must be plateau, multistep, onecycle or constant, got {cfg.schedule!r}"),
        (cfg.milestone_unit in ("epoch", "step"), f"milestone_unit must be epoch or step, got {cfg.milestone_unit!r}"),
        (cfg.precision in ("auto", "fp32", "bf16"), f"precision must be auto, fp32 or bf16, got {cfg.precision!r}"),
        (cfg.compile in ("auto", "on", "off"), f"compile must be auto, on or off, got {cfg.compile!r}"),
        (0 <= cfg.ema_decay < 1, f"ema_decay must be in [0, 1), got {cfg.ema_decay}"),
        (cfg.train_subset >= 0, f"train_subset must be >= 0, got {cfg.train_subset}"),
        (cfg.eval_subset >= 0, f"eval_subset must be >= 0, got {cfg.eval_subset}"),
        (cfg.translate >= 0, f"translate must be >= 0, got {cfg.translate}"),
        (cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0 = every epoch), got {cfg.checkpoint_every}"),
        (0 < cfg.warmup_fraction < 1, f"warmup_fraction must be in (0, 1), got {cfg.warmup_fraction}"),
    ]
    from nin.data.datasets import SPLITS
    from nin.transforms import PREPROCESSING_KINDS

    checks += [(getattr(cfg, key) in SPLITS, f"{key} must be one of {', '.join(SPLITS)}, got {getattr(cfg, key)!r}")
               for key in ("train_split", "eval_split")]
    checks.append((cfg.preprocessing in PREPROCESSING_KINDS,
                   f"preprocessing must be one of {', '.join(PREPROCESSING_KINDS)}, got {cfg.preprocessing!r}"))
    for ok, message in checks:
        if not ok:
            raise NinError(message)
    if cfg.dataset not in DATASET_DEFAULTS:
        raise NinError(f"unknown dataset {cfg.dataset!r}; choose one of: {', '.join(DATASET_DEFAULTS)}")
    try:
        model_config(cfg.model, **cfg.model_args)
    except (KeyError, AssertionError, TypeError) as e:
        raise NinError(str(e).strip("'\"")) from None


# ---------------------------------------------------------------------------------------------
# Learning-rate rules
# ---------------------------------------------------------------------------------------------

def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
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

    NiN paper, section 4 (as PAPER.md quotes the recipe): "Train until the accuracy on the training set
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


# ---------------------------------------------------------------------------------------------
# Pieces of a run
# ---------------------------------------------------------------------------------------------

def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def select_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where the hardware runs it fast (AMX / AVX512-BF16 CPUs, bf16 GPUs)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if _cpu_has_bf16() else None


def param_groups(model: NiN, cfg: TrainConfig) -> list[dict]:
    """SGD groups: weights (decayed), biases (2x lr, no decay), class-map layer (0.1x), norms (no decay)."""
    class_map = {id(p) for p in model.class_map_layer.parameters()}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            is_norm = isinstance(module, (nn.BatchNorm2d,))
            is_bias = name == "bias"
            mult = cfg.bias_lr_mult if (is_bias and not is_norm) else 1.0
            if id(p) in class_map:
                mult *= cfg.class_map_lr_mult
            decay = 0.0 if (is_bias or is_norm) else cfg.weight_decay  # NiN paper: decay on weights only
            groups.setdefault((mult, decay), []).append(p)
    return [{"params": ps, "lr_mult": mult, "weight_decay": decay, "lr": cfg.lr * mult}
            for (mult, decay), ps in groups.items()]


def make_optimizer(model: NiN, cfg: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    try:
        return torch.optim.SGD(param_groups(model, cfg), fused=True, **kwargs)  # one kernel for every tensor
    except (RuntimeError, TypeError):
        return torch.optim.SGD(param_groups(model, cfg), foreach=True, **kwargs)


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


def check_output_dir(out: Path, *, resume: bool) -> None:
    """Fail now, not after an hour: the folder must be writable, with room for checkpoints."""
    if out.exists() and not out.is_dir():
        raise NinError(f"--out {out}: exists and is not a folder")
    if not resume and (out / "checkpoint.safetensors").exists():
        raise NinError(f"--out {out}: already holds a run; continue it with --resume {out} or choose another --out")
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


class MetricsLog:
    """metrics.jsonl (one record per epoch), metrics.csv, and TensorBoard events when available."""

    def __init__(self, out: Path, keep_epochs: int) -> None:
        self.out = out
        self.records: list[dict] = []
        jsonl = out / "metrics.jsonl"
        if jsonl.exists():  # a resumed run keeps the epochs its checkpoint already covers
            for line in jsonl.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # blank, or the tail of a line torn by a kill mid-append
                    continue
                if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] <= keep_epochs:
                    self.records.append(record)
        self._rewrite()
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "tensorboard"))
        except (ImportError, ModuleNotFoundError):
            pass

    def _rewrite(self) -> None:
        from nin.checkpoint import atomic_write_bytes  # a kill mid-rewrite must not lose the earlier epochs

        atomic_write_bytes(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records).encode())
        if self.records:
            with open(self.out / "metrics.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(self.records[0]))
                writer.writeheader()
                writer.writerows(self.records)

    def append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.out / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.records[0]))
            writer.writeheader()
            writer.writerows(self.records)
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["epoch"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for index, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[f"optim.{index}.{j}"] = buf
    return out


def _load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    for index, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            key = f"optim.{index}.{j}"
            if key in tensors:
                # empty_like keeps the parameter's memory format (channels_last): the fused step walks raw memory
                optimizer.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(tensors[key])


def _stalled(logits: torch.Tensor, mean_loss: float, num_classes: int) -> bool:
    """Dead start: the loss sits at ln K because every image gets the same (usually all-zero) scores."""
    same_for_all = bool((logits.float().std(dim=0) < 1e-6).all()) if logits.shape[0] > 1 else False
    return same_for_all and abs(mean_loss - math.log(num_classes)) < 0.05


STALL_ADVICE = ("every class map is dead (the same scores for every image), the failure many NiN ports hit. "
                "Change: --set model.class_map_relu=false (no ReLU on the class maps), or a lower --set lr=0.01, "
                "or --set model.init=kaiming, or use --recipe fast (batch norm)")


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
# The run
# ---------------------------------------------------------------------------------------------

def _prepare_data(cfg: TrainConfig, device: torch.device, preprocess_state: dict | None):
    """Read the splits, fit (or restore) the preprocessing, and keep both splits preprocessed on the device."""
    from nin.data import load_dataset
    from nin.transforms import build_preprocessing, fit_preprocessing

    model_cfg = model_config(cfg.model, **cfg.model_args)
    size_args = {}
    if cfg.dataset == "folder":
        size_args = {"image_size": model_cfg.input_size, "channels": model_cfg.in_channels}
    with distributed.main_first():
        train_set = load_dataset(cfg.dataset, cfg.train_split, cfg.data_dir, **size_args)
        eval_set = load_dataset(cfg.dataset, cfg.eval_split, cfg.data_dir, **size_args)
    train_images, train_labels = train_set.images, train_set.labels
    if cfg.train_subset:
        train_images, train_labels = train_images[: cfg.train_subset], train_labels[: cfg.train_subset]
    if train_images.shape[1] != model_cfg.in_channels or train_images.shape[-1] != model_cfg.input_size:
        raise NinError(f"model {cfg.model} expects {model_cfg.in_channels}×{model_cfg.input_size}×{model_cfg.input_size} "
                       f"images; {cfg.dataset} has {tuple(train_images.shape[1:])}")
    if preprocess_state is None:
        state = None
        if distributed.is_main():  # rank 0 fits; every rank applies the same transform
            state = fit_preprocessing(cfg.preprocessing, train_images).state_dict()
        preprocess_state = distributed.broadcast_object(state)
    preprocessing = build_preprocessing(cfg.preprocessing, preprocess_state)
    eval_images, eval_labels = eval_set.images, eval_set.labels
    if cfg.eval_subset:
        eval_images, eval_labels = eval_images[: cfg.eval_subset], eval_labels[: cfg.eval_subset]
    train_x = preprocessing(train_images).to(device)
    eval_x = preprocessing(eval_images).to(device)
    return (preprocessing, train_set.classes, (train_x, train_labels.to(device)), (eval_x, eval_labels.to(device)))


def _checkpoint_config(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> TrainConfig:
    """The run's TrainConfig from its checkpoint, once the checkpoint is known to hold all that resuming reads."""
    from nin.errors import CheckpointError

    try:
        cfg = TrainConfig.from_dict(meta["train_config"])
        validate(cfg)
        for key in ("epoch", "batches_done", "step"):
            if not isinstance(meta[key], int) or meta[key] < 0:
                raise ValueError(f"{key} is {meta[key]!r}")
        float(meta["partial_time"])
        PlateauRule().load_state_dict(meta["plateau_rule"])
        expected = {k: v.shape for k, v in get_model(cfg.model, **cfg.model_args).state_dict().items()}
    except (KeyError, TypeError, ValueError, AttributeError, NinError) as e:
        reason = f"no {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{path}: damaged training state ({reason})") from None
    saved = {k[len("model."):]: v.shape for k, v in tensors.items() if k.startswith("model.")}
    wrong = sorted(set(expected) ^ set(saved)) or [k for k in expected if expected[k] != saved[k]]
    if wrong:
        raise CheckpointError(f"{path}: its model tensors do not match its own config ({cfg.model} "
                              f"{cfg.model_args}; first difference: {wrong[0]})")
    missing = [k for k in ("rng.cpu", "partial.loss_sum", "partial.correct", "partial.seen") if k not in tensors]
    if missing:
        raise CheckpointError(f"{path}: damaged training state (no {missing[0]})")
    return cfg


def _run_history(out: Path, command: str | None, resume: bool, saved_meta: dict) -> tuple[str | None, str | None, list]:
    """The command and git revision that started the run, and each resume since (command, revision, step).

    config.json and results quote the command that started the run, not the last ``--resume``. Checkpoints
    carry the history; for checkpoints written before they did, it comes from config.json when that still
    holds the starting command (None when it does not).
    """
    this = command or shlex.join(["nin", *sys.argv[1:]])
    if not resume:
        return this, git_revision(), []
    if "command" in saved_meta:
        started, revision, resumes = saved_meta["command"], saved_meta.get("started_revision"), saved_meta.get("resumes", [])
    else:
        try:
            previous = json.loads((out / "config.json").read_text())
        except (OSError, ValueError):
            previous = {}
        fresh = isinstance(previous, dict) and previous.get("resumed") is False
        started = previous.get("command") if fresh else None
        revision = previous.get("git_revision") if fresh else None
        resumes = []
    resumes = [*resumes, {"command": this, "git_revision": git_revision(), "step": saved_meta.get("step")}]
    return started, revision, resumes


def train(cfg: TrainConfig | None, out_dir: str | os.PathLike, *, resume: bool = False, epochs: int | None = None,
          checkpoint_every: int | None = None, command: str | None = None, device: torch.device | None = None, log=print,
          interrupt_after: int | None = None) -> dict:
    """Train (or continue) a run in ``out_dir``; returns the last epoch's metrics record.

    With ``resume`` the run's own config is read from its checkpoint (``cfg`` is ignored; ``epochs``
    may extend it, ``checkpoint_every`` may change how often it checkpoints) and training continues from the
    exact step where the checkpoint was written.
    ``interrupt_after`` stops the process-local loop with KeyboardInterrupt after that many steps, as a
    user's Ctrl-C would (tests use it to check that resuming reproduces an uninterrupted run).

    Writes ``config.json``, ``metrics.jsonl`` / ``metrics.csv``, ``checkpoint.safetensors`` (every epoch and
    every ``checkpoint_every`` steps) and, at the end, ``model.safetensors`` for evaluate / predict.
    """
    from nin.data import TensorLoader
    from nin.runtime import keep_freed_memory
    from nin.transforms import Augment

    keep_freed_memory()  # reuse each step's activation memory (nin.runtime); NIN_KEEP_FREED_MEMORY=0 turns it off
    out = Path(out_dir)
    device = distributed.setup(device)
    main = distributed.is_main()
    checkpoint_path = out / "checkpoint.safetensors"

    saved_tensors, saved_meta = {}, {}
    if resume:
        saved_tensors, saved_meta = load_state(checkpoint_path)
        if saved_meta.get("kind") != "checkpoint":
            raise NinError(f"{checkpoint_path}: not a training checkpoint")
        cfg = _checkpoint_config(checkpoint_path, saved_tensors, saved_meta)
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    if checkpoint_every is not None:
        cfg = dataclasses.replace(cfg, checkpoint_every=checkpoint_every)
    validate(cfg)
    if main:
        check_output_dir(out, resume=resume)
        for temp in remove_stale_temp_files(out, ("checkpoint.safetensors", "model.safetensors", "metrics.jsonl",
                                                  "metrics.csv", "config.json")):
            log(f"nin: removed {temp.name}, left by a write that was killed")

    torch.manual_seed(cfg.seed)
    amp_dtype = select_precision(cfg.precision, device)
    preprocess_state = ({k[len("preprocess."):]: v for k, v in saved_tensors.items() if k.startswith("preprocess.")}
                        if resume else None)
    preprocessing, classes, (train_x, train_y), (eval_x, eval_y) = _prepare_data(cfg, device, preprocess_state)

    model = get_model(cfg.model, **cfg.model_args).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    num_classes = model.config.num_classes
    if int(train_y.max()) >= num_classes:
        raise NinError(f"{cfg.dataset} has labels up to {int(train_y.max())} but {cfg.model} has {num_classes} classes")
    optimizer = make_optimizer(model, cfg)
    ema = Ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    rule = PlateauRule(cfg.plateau_patience, cfg.plateau_min_delta, cfg.max_lr_drops)

    augment = Augment(flip=cfg.flip, translate=cfg.translate) if cfg.augment else None
    rank, world = distributed.rank(), distributed.world_size()
    run_command, started_revision, resumes = _run_history(out, command, resume, saved_meta)
    loader = TensorLoader(train_x, train_y, cfg.batch_size, shuffle=True, seed=cfg.seed, rank=rank,
                          world_size=world, augment=augment)
    eval_loader = TensorLoader(eval_x, eval_y, cfg.eval_batch_size, shuffle=False, rank=rank, world_size=world)
    steps_per_epoch = len(loader)
    last_step = total_steps(cfg, steps_per_epoch)

    epoch, batches_done, step = 0, 0, 0
    partial = {"loss_sum": torch.zeros((), dtype=torch.float64, device=device),
               "correct": torch.zeros((), dtype=torch.int64, device=device),
               "seen": torch.zeros((), dtype=torch.int64, device=device)}
    partial_time = 0.0
    if resume:
        model.load_state_dict({k[len("model."):]: v for k, v in saved_tensors.items() if k.startswith("model.")})
        _load_optimizer_tensors(optimizer, saved_tensors)
        if ema is not None:
            ema.model.load_state_dict({k[len("ema."):]: v for k, v in saved_tensors.items() if k.startswith("ema.")})
        rule.load_state_dict(saved_meta["plateau_rule"])
        epoch, batches_done, step = saved_meta["epoch"], saved_meta["batches_done"], saved_meta["step"]
        for key in partial:  # the checkpoint holds the counts summed over ranks: rank 0 carries them on
            if main:
                partial[key] = saved_tensors[f"partial.{key}"].to(device)
        partial_time = saved_meta["partial_time"]
        _restore_rng(saved_tensors, device)
        saved_world = saved_meta.get("world_size", 1)
        if saved_world != world:  # batches_done counts per-rank batches of the old shards: restart the epoch
            if main:
                log(f"nin: resuming a {saved_world}-process run with {world} process(es): the global batch changes "
                    f"from {cfg.batch_size * saved_world} to {cfg.batch_size * world} (the lr is not rescaled)"
                    + (f"; epoch {epoch + 1} was interrupted after {batches_done} of its steps and restarts from "
                       f"its first batch" if batches_done else ""))
            batches_done, step, partial_time = 0, epoch * steps_per_epoch, 0.0
            for key in partial:
                partial[key].zero_()

    train_model: nn.Module = model
    if cfg.compile == "on":
        train_model = torch.compile(model)
    if distributed.is_distributed():
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    def save_checkpoint() -> None:
        summed = {k: distributed.all_reduce_sum(v.clone()) for k, v in partial.items()}  # every rank's counts
        if not main:
            return
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"preprocess.{k}": v for k, v in preprocessing.state_dict().items()})
        tensors.update(_optimizer_tensors(optimizer))
        tensors.update(_rng_tensors(device))
        tensors.update({f"partial.{k}": v for k, v in summed.items()})
        if ema is not None:
            tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
        meta = {"kind": "checkpoint", "train_config": cfg.to_dict(), "model_config": model.config.to_dict(),
                "preprocessing": cfg.preprocessing, "dataset": cfg.dataset, "classes": classes,
                "epoch": epoch, "batches_done": batches_done, "step": step, "partial_time": partial_time,
                "plateau_rule": rule.state_dict(), "use_ema": ema is not None, "tta_flip": cfg.tta_flip,
                "git_revision": git_revision(), "world_size": world,
                "command": run_command, "started_revision": started_revision, "resumes": resumes}
        save_state(checkpoint_path, tensors, meta)

    metrics = MetricsLog(out, keep_epochs=epoch) if main else None
    if main:
        (out / "config.json").write_text(json.dumps({
            "train_config": cfg.to_dict(), "model_config": model.config.to_dict(),
            "command": run_command, "git_revision": started_revision,
            "device": str(device), "autocast": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "world_size": world, "torch": torch.__version__, "resumed": resume,
            "resumes": resumes,
        }, indent=2) + "\n")
        if not resume:
            log(f"nin: training {cfg.model} on {cfg.dataset} ({len(train_x)} images, {steps_per_epoch} steps/epoch"
                f"{f' per rank × {world} ranks' if world > 1 else ''}) on {device}, "
                f"{'bf16 autocast' if amp_dtype else 'fp32'}; run folder {out}")

    use_bar = main and sys.stderr.isatty()
    record: dict = {}
    finished = step >= last_step or rule.finished
    while epoch < cfg.epochs and not finished:
        train_model.train()
        loader.set_epoch(epoch)
        start_batch = batches_done
        loader.skip(start_batch)
        batches = iter(loader)
        if use_bar:
            from tqdm import tqdm

            batches = tqdm(batches, total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           leave=False, dynamic_ncols=True)
        lr_drops = rule.drops
        tick = time.perf_counter()
        for images, labels in batches:
            lr = lr_at(step, cfg, steps_per_epoch, lr_drops)
            check = device.type == "cpu" or (step + 1) % 50 == 0  # a host sync is free on the CPU, costly on a GPU
            loss, logits = train_step(train_model, optimizer, images, labels, lr=lr, cfg=cfg, amp_dtype=amp_dtype,
                                      memory_format=memory_format, check_finite=check)
            if loss is None:
                raise NonFiniteLoss(
                    f"the training loss became non-finite at epoch {epoch + 1}, step {step + 1}; the last good "
                    f"checkpoint stays in {checkpoint_path}. Lower the lr (--set lr=...) or turn on batch norm "
                    f"(--set model.batch_norm=true)")
            if ema is not None:
                ema.update(model)
            n = labels.shape[0]
            partial["loss_sum"] += loss.detach().double() * n
            partial["correct"] += (logits.detach().argmax(dim=1) == labels).sum()
            partial["seen"] += n
            step += 1
            batches_done += 1
            if use_bar and step % 10 == 0:
                batches.set_postfix(loss=f"{float(partial['loss_sum']) / max(int(partial['seen']), 1):.4f}", lr=f"{lr:.4g}")
            if epoch == 0 and cfg.stall_check_steps and (step == cfg.stall_check_steps or batches_done == steps_per_epoch):
                mean_loss = float(partial["loss_sum"]) / max(int(partial["seen"]), 1)
                if distributed.all_true(_stalled(logits.detach(), mean_loss, num_classes), device):
                    raise TrainingStalled(f"after {step} steps the loss is {mean_loss:.4f} ≈ ln {num_classes} = "
                                          f"{math.log(num_classes):.4f}: {STALL_ADVICE}")
            if step >= last_step:
                finished = True
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and batches_done < steps_per_epoch:
                partial_time += time.perf_counter() - tick
                tick = time.perf_counter()
                save_checkpoint()
            if interrupt_after is not None and step >= interrupt_after:
                raise KeyboardInterrupt(f"interrupted after step {step}")
        partial_time += time.perf_counter() - tick
        if use_bar:
            batches.close()

        # end of epoch: reduce the training counts over ranks, evaluate, apply the lr rule, log, checkpoint
        totals = torch.stack([partial["loss_sum"], partial["correct"].double(), partial["seen"].double()])
        distributed.all_reduce_sum(totals)
        train_loss, train_correct, seen = float(totals[0]) / max(float(totals[2]), 1), float(totals[1]), float(totals[2])
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(f"the training loss became {train_loss} in epoch {epoch + 1}; the last good "
                                f"checkpoint stays in {checkpoint_path}. Lower the lr (--set lr=...)")
        train_time = partial_time
        eval_tick = time.perf_counter()
        eval_model = ema.model if ema is not None else train_model
        if isinstance(eval_model, nn.parallel.DistributedDataParallel):
            eval_model = eval_model.module  # no collectives per batch: ranks may hold different numbers of batches
        distributed.broadcast_buffers(eval_model)  # rank 0's batch-norm statistics, the ones its checkpoint saves
        result = evaluate(eval_model, eval_loader, num_classes=num_classes, amp_dtype=amp_dtype, tta_flip=cfg.tta_flip)
        eval_time = time.perf_counter() - eval_tick
        train_accuracy = train_correct / max(seen, 1)
        event = rule.update(train_accuracy) if cfg.schedule == "plateau" else None
        record = {
            "epoch": epoch + 1, "step": step, "lr": lr_at(max(step - 1, 0), cfg, steps_per_epoch, lr_drops),
            "train_loss": train_loss, "train_error": 1.0 - train_accuracy,
            f"{cfg.eval_split}_loss": result.loss, f"{cfg.eval_split}_error": result.error,
            "images_per_s": seen / max(train_time, 1e-9), "train_time_s": train_time, "eval_time_s": eval_time,
        }
        epoch += 1
        batches_done = 0
        for key in partial:
            partial[key].zero_()
        partial_time = 0.0
        if event == "finish":
            finished = True
        if main:
            metrics.append(record)
            note = {"drop": f"  (training accuracy stopped improving: lr / 10, drop {rule.drops})",
                    "finish": "  (training accuracy stopped improving after the last drop: done)"}.get(event, "")
            log(f"epoch {record['epoch']:>3}/{cfg.epochs}  train loss {train_loss:.4f} err {record['train_error']:.2%}  "
                f"{cfg.eval_split} loss {result.loss:.4f} err {result.error:.2%}  lr {record['lr']:.4g}  "
                f"{record['images_per_s']:.0f} img/s  {train_time:.0f}s{note}")
        save_checkpoint()

    if main:
        final_model = ema.model if ema is not None else model
        save_weights(out / "model.safetensors", final_model, preprocessing,
                     {"dataset": cfg.dataset, "classes": classes, "tta_flip": cfg.tta_flip,
                      "train_config": cfg.to_dict(), "git_revision": git_revision(), "epochs": epoch, "step": step})
        metrics.close()
        if record:
            log(f"nin: done. {cfg.eval_split} error {record[f'{cfg.eval_split}_error']:.2%} after {epoch} epochs; "
                f"weights in {out / 'model.safetensors'}")
    distributed.barrier()
    return record
