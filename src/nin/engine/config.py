"""A run's configuration: the `TrainConfig` schema, the named recipes, and `--set` overrides.

    from nin.engine.config import recipe, apply_overrides
    cfg = apply_overrides(recipe("fast", "cifar10"), ["lr=0.1", "model.dropout=0.5"])

A recipe is a named TrainConfig (PAPER, CAFFE, FAST); `recipe()` adapts it to a data set from the data-set
registry (`nin.data.datasets.DATASETS`). Every field says its unit and where its value comes from.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nin.checkpoint import load_state, weights_architecture
from nin.data.datasets import DATASET_NAMES, SPLITS, dataset_info
from nin.errors import NinError
from nin.models import NiN, NiNConfig, list_models, model_config
from nin.pretrained import PRETRAINED, resolve
from nin.runtime import PRECISIONS
from nin.transforms import PREPROCESSING_KINDS

__all__ = ["TrainConfig", "PAPER", "CAFFE", "FAST", "RECIPES", "recipe", "apply_overrides", "validate",
           "small_phase_epochs", "starting_from", "MAX_PARAMETERS"]

# The most parameters a run's model may have: 2**28 is 1 GiB of fp32 weights (optimizer state doubles it), 35 times
# nin_imagenet; a larger one is a typo (model.num_classes=100000000), refused before anything is allocated.
MAX_PARAMETERS = 2**28


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Each field: unit, and where its value comes from."""

    dataset: str = "cifar10"  # cifar10, cifar100, svhn, mnist, fashion-mnist, folder
    model: str = "nin_cifar10"  # a name from nin.models.list_models()
    model_args: dict = field(default_factory=dict)  # NiNConfig overrides, e.g. {"batch_norm": True}
    init_from: str = ""  # weights file or run folder the run starts from (fine-tuning); "" = a fresh init
    data_dir: str | None = None  # data root; None = $NIN_DATA, else the per-user cache
    train_split: str = "train"  # paper: final models retrained on all training images
    eval_split: str = "test"  # "val" evaluates on the paper's validation split instead
    val_split: float | None = None  # image folders: the fraction of each class of the training images held out as
    # the test split (stratified, seeded by `seed`); None = 0.1 for a folder without a test/ sub-folder, else 0
    train_subset: int = 0  # images; 0 = the whole split, N = its first N (quick experiments; a folder: N drawn)
    eval_subset: int = 0  # images; 0 = the whole evaluation split, N = its first N (a folder: N drawn)
    preprocessing: str = "gcn_zca"  # nin.transforms kind; NiN paper section 4.2: GCN + ZCA for CIFAR
    epochs: int = 260  # the authors' CIFAR-10 run: 200 + 30 + 30 epochs
    batch_size: int = 128  # images per step on each rank (global batch = batch_size × world size); NiN paper: 128
    lr: float = 0.1  # base learning rate; NiN paper / cuda-convnet: 0.1
    momentum: float = 0.9  # NiN paper
    nesterov: bool = False
    weight_decay: float = 1e-4  # on conv/linear weights only; NiN paper: 1e-4
    bias_lr_mult: float = 2.0  # cuda-convnet / Caffe: biases learn 2x faster
    class_map_lr_mult: float = 0.1  # cuda-convnet / Caffe: the class-map layer (cccp6) learns at 0.1x
    # the class-map layer's bias: class_map_lr_mult × this (in place of bias_lr_mult). The authors' Caffe definition
    # gives cccp6 blobs_lr 0.1 and 0.1: its bias learns at 0.1x, as its weights. A run configured before this field
    # existed reads it as bias_lr_mult (from_dict), which is how it trained (0.2x in the paper recipe)
    class_map_bias_lr_mult: float = 1.0
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
    whiten_init: bool = False  # conv1's first filters whiten its training-image patches (nin.layers.patch_whitening_)
    ema_decay: float = 0.0  # weight averaging: exponential moving average per step; 0 = off
    tta_flip: bool = False  # test-time augmentation: average the logits of the image and its mirror
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16: bf16 autocast with fp32 master weights and an fp32 loss
    channels_last: bool = True  # NHWC memory format: faster convolutions on CPU (oneDNN) and GPU
    compile: bool = False  # torch.compile the training model (off: it was slower here, docs/performance.md)
    eval_batch_size: int = 500  # images per evaluation batch
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    extra_eval: str = ""  # a CIFAR binary batch file also scored at each evaluation (column extra_error), e.g.
    # the pixel-exact first 1,000 official CIFAR-10 test images; "" = none
    small_size: int = 0  # progressive resizing: pixels of the (downscaled) training images of the first epochs; 0 = off
    small_epochs: int = 0  # progressive resizing: how many first epochs train at small_size
    small_fraction: float = 0.0  # ... or, when small_epochs is 0, this fraction of the epochs (rounded down)
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
        if "class_map_bias_lr_mult" not in data:  # a run configured before the field: its bias took bias_lr_mult
            data["class_map_bias_lr_mult"] = data.get("bias_lr_mult", cls.bias_lr_mult)
        if "milestones" in data:
            data["milestones"] = tuple(data["milestones"])
        return cls(**data)


# The paper's recipe (NiN paper, section 4): SGD + momentum, batch 128, lr 0.1 with biases at 2x and
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


def small_phase_epochs(cfg: TrainConfig) -> int:
    """How many first epochs train at ``small_size`` (progressive resizing): ``small_epochs``, else
    ``small_fraction`` of the epochs; 0 when ``small_size`` is 0."""
    if not cfg.small_size:
        return 0
    return cfg.small_epochs or int(cfg.small_fraction * cfg.epochs)


def recipe(name: str, dataset: str) -> TrainConfig:
    """The named recipe ("paper", "caffe", "fast") for a data set, with that data set's defaults."""
    if name not in RECIPES:
        raise NinError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    if dataset not in DATASET_NAMES:
        raise NinError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASET_NAMES)}")
    if name == "caffe" and dataset != "cifar10":
        raise NinError("the caffe recipe is the Caffe zoo's CIFAR-10 solver: use it with --dataset cifar10")
    info = dataset_info(dataset)
    changes: dict = {"dataset": dataset, "flip": info.flip}
    if name == "paper":
        changes.update(model=info.paper_model, preprocessing=info.paper_preprocessing, **dict(info.paper_overrides))
    elif name == "fast":
        changes.update(model=info.paper_model, epochs=info.fast_epochs, tta_flip=info.flip,
                       preprocessing=info.fast_preprocessing, **dict(info.fast_overrides))
    base = RECIPES[name]
    # a data set's model changes ((key, value) pairs) add to the recipe's; always a new dict, never the recipe's own
    changes["model_args"] = {**base.model_args, **dict(changes.get("model_args", ()))}
    return dataclasses.replace(base, **changes)


def fitted_to_model(cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """A recipe's setting the chosen model cannot take, turned off, and a line saying so (None when nothing was):
    progressive resizing (``small_size``, the fast recipe's CIFAR-10 default) for a fully connected head, which
    takes one input size (the model as ``model_args`` make it). `nin train` applies it unless the user set
    ``small_size``, which `validate` then checks."""
    if not cfg.small_size:
        return cfg, None
    try:
        config = model_config(cfg.model, **cfg.model_args)
    except (KeyError, AssertionError, TypeError, ValueError):
        return cfg, None  # validate() names what is wrong with the model
    if config.head == "gap":
        return cfg, None
    size = config.input_size
    return (dataclasses.replace(cfg, small_size=0),
            f"{cfg.model}: its fully connected head takes {size}×{size} inputs only, so every epoch trains at full "
            f"size (not the recipe's first epochs at {cfg.small_size}×{cfg.small_size})")


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
        (cfg.precision in PRECISIONS, f"precision must be auto, fp32 or bf16, got {cfg.precision!r}"),
        (isinstance(cfg.compile, bool), f"compile must be true or false, got {cfg.compile!r}"),
        (0 <= cfg.ema_decay < 1, f"ema_decay must be in [0, 1), got {cfg.ema_decay}"),
        (cfg.train_subset >= 0, f"train_subset must be >= 0, got {cfg.train_subset}"),
        (cfg.val_split is None or 0 <= cfg.val_split < 1, f"--val-split must be in [0, 1), got {cfg.val_split}"),
        (not cfg.val_split or cfg.dataset == "folder",
         f"--val-split holds out part of an image folder; {cfg.dataset} has its own test split"),
        (cfg.eval_subset >= 0, f"eval_subset must be >= 0, got {cfg.eval_subset}"),
        (cfg.translate >= 0, f"translate must be >= 0, got {cfg.translate}"),
        (cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0 = every epoch), got {cfg.checkpoint_every}"),
        (0 < cfg.warmup_fraction < 1, f"warmup_fraction must be in (0, 1), got {cfg.warmup_fraction}"),
        (cfg.eval_batch_size >= 1, f"eval_batch_size must be at least 1, got {cfg.eval_batch_size}"),
        (cfg.eval_every >= 1, f"eval_every must be at least 1, got {cfg.eval_every}"),
        (cfg.max_steps >= 0, f"max_steps must be >= 0 (0 = no limit), got {cfg.max_steps}"),
        (0 < cfg.lr_drop < 1, f"lr_drop must be in (0, 1), got {cfg.lr_drop}"),
        (cfg.max_lr_drops >= 0 and cfg.plateau_patience >= 1,
         f"max_lr_drops must be >= 0 and plateau_patience >= 1, got {cfg.max_lr_drops} and {cfg.plateau_patience}"),
        (cfg.small_size >= 0 and cfg.small_epochs >= 0,
         f"small_size and small_epochs must be >= 0, got {cfg.small_size} and {cfg.small_epochs}"),
        (0 <= cfg.small_fraction < 1, f"small_fraction must be in [0, 1), got {cfg.small_fraction}"),
        (0 <= cfg.seed < 2**63, f"seed must be in [0, 2**63), got {cfg.seed}"),
        (not (cfg.whiten_init and cfg.init_from),
         f"whiten_init initialises a fresh model; --init-from {cfg.init_from} brings its own first layer: use one"),
    ]
    checks += [(getattr(cfg, key) in SPLITS, f"{key} must be one of {', '.join(SPLITS)}, got {getattr(cfg, key)!r}")
               for key in ("train_split", "eval_split")]
    checks.append((cfg.preprocessing in PREPROCESSING_KINDS,
                   f"preprocessing must be one of {', '.join(PREPROCESSING_KINDS)}, got {cfg.preprocessing!r}"))
    if cfg.init_from and not Path(cfg.init_from).expanduser().exists() and cfg.init_from not in PRETRAINED:
        checks.append((False, f"--init-from {cfg.init_from}: no such weights file or run folder"))
    if cfg.extra_eval and not Path(cfg.extra_eval).expanduser().is_file():
        checks.append((False, f"extra_eval {cfg.extra_eval}: no such file"))
    for ok, message in checks:
        if not ok:
            raise NinError(message)
    if cfg.dataset not in DATASET_NAMES:
        raise NinError(f"unknown dataset {cfg.dataset!r}; choose one of: {', '.join(DATASET_NAMES)}")
    _check_shapes(cfg)


def _check_shapes(cfg: TrainConfig) -> None:
    """The model builds (on the meta device: no weight allocated), within the size limit, with a class map for
    each class, and every input size the run feeds it fits through its layers."""
    if cfg.model not in list_models():  # the name alone is wrong: its fields would be noise
        raise NinError(f"unknown model {cfg.model!r}; choose one of: {', '.join(list_models())}")
    where = f"model {cfg.model} {cfg.model_args}"
    try:
        config = model_config(cfg.model, **cfg.model_args)
        with torch.device("meta"):  # builds every layer (their checks run) without allocating any weight
            model = NiN(config).eval()
    except (KeyError, AssertionError, TypeError, ValueError, RuntimeError) as e:
        raise NinError(f"{where}: {_one_line(e)}") from None
    parameters = sum(p.numel() for p in model.parameters())
    if parameters > MAX_PARAMETERS:
        raise NinError(f"{where}: {parameters:,} parameters, more than the {MAX_PARAMETERS:,} a run may have "
                       f"(model.num_classes {config.num_classes}, widths {[b.widths for b in config.blocks]})")
    info = dataset_info(cfg.dataset)
    classes = info.num_classes  # 0: an image folder, whose sub-folders decide
    if classes and config.num_classes != classes:  # one map a class: the weights name each map's class
        raise NinError(f"{where}: {config.num_classes} class maps for {cfg.dataset}'s {classes} classes, expected "
                       f"{classes}")
    named = (info.in_channels, info.image_size, info.image_size)  # a named data set's images have one shape
    if classes and (config.in_channels, config.input_size, config.input_size) != named:
        raise NinError(f"model {cfg.model}: the model expects {config.in_channels}×{config.input_size}×"
                       f"{config.input_size} images; {cfg.dataset} has {'×'.join(map(str, named))}")
    size = config.input_size
    if cfg.augment and cfg.translate >= size:
        raise NinError(f"translate must be smaller than the {size}-pixel input (a larger shift leaves none of the "
                       f"image), got {cfg.translate}")
    if cfg.small_size > size:
        raise NinError(f"small_size must be at most the {size}-pixel input, got {cfg.small_size}")
    for side in sorted({size, cfg.small_size} - {0}):  # every size the run feeds the model must fit its layers
        try:
            model(torch.empty(1, config.in_channels, side, side, device="meta"))
        except (RuntimeError, ValueError) as e:
            hint = "; `--set small_size=0` trains every epoch at full size" if side == cfg.small_size else ""
            raise NinError(f"{where}: a {side}×{side} input does not fit through its layers "
                           f"({_one_line(e)}){hint}") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).strip("'\"").split())


def starting_from(cfg: TrainConfig, weights: str, *, keep_model: bool = False) -> TrainConfig:
    """The config of a run that starts from ``weights`` (`nin train --init-from`: fine-tuning): their
    architecture, unless ``keep_model`` (``--model`` was given), and their preprocessing. The class count is the
    data set's, so the class-map layer is re-initialised when it differs.

    Args:
        cfg: The config so far (recipe, data set, named flags).
        weights: A pretrained tag, a weights file or a run folder.
    """
    try:
        _, meta = load_state(resolve(weights))
        name, model_args = weights_architecture(meta)
    except NinError as e:
        raise NinError(f"--init-from {weights}: {e}") from None
    model_args.pop("num_classes", None)  # the data set decides (a folder: its sub-folders)
    classes = dataset_info(cfg.dataset).num_classes
    if classes and classes != model_config(name, **model_args).num_classes:  # CIFAR-10 weights for CIFAR-100
        model_args["num_classes"] = classes
    changes = {"init_from": str(weights), "preprocessing": meta.get("preprocessing", cfg.preprocessing)}
    if not keep_model:
        changes.update(model=name, model_args=model_args)
    return dataclasses.replace(cfg, **changes)
