"""Starting or resuming a run: check the folder, read and preprocess the data, build the model and optimizer,
and restore the checkpoint's exact state when resuming.

    run, state = start_run(cfg, Path("runs/x"), resume=False, epochs=None, checkpoint_every=None, command=None,
                           device="cpu", log=print)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

from nin import distributed
from nin.checkpoint import git_revision, load_checkpoint
from nin.data import TensorLoader, dataset_files, folder_split_digest, load_dataset, recorded_root, resolve_root
from nin.data.folders import check_class_count
from nin.engine.config import TrainConfig, validate
from nin.engine.optim import Ema, make_optimizer
from nin.engine.run_folder import RUN_FILES, RUN_MARKER
from nin.engine.schedule import PlateauRule
from nin.engine.state import EpochTotals, Run, RunState
from nin.errors import CheckpointError, NinError
from nin.evaluate import check_image_shape, read_data_file
from nin.files import atomic_write_bytes, remove_stale_temp_files
from nin.layers import patch_whitening_
from nin.models import NiN, get_model, model_config
from nin.pretrained import load
from nin.runtime import host, resolve_device, select_precision
from nin.transforms import Augment, Preprocessing, fit_preprocessing

__all__ = ["start_run"]


def start_run(cfg: TrainConfig | None, out: Path, *, resume: bool, epochs: int | None, checkpoint_every: int | None,
              command: str | None, device, log, data_dir=None) -> tuple[Run, RunState]:
    """Check the folder, read the data, build model and optimizer, and restore the checkpoint when resuming."""
    if distributed.launched_by_torchrun() and not distributed.is_distributed():
        raise NinError("launched by torchrun: call train() inside `with nin.distributed.process_group(): ...`")
    device = resolve_device(device)
    main = distributed.is_main()
    saved, preprocess_state, saved_meta = (load_checkpoint(out / "checkpoint.safetensors") if resume
                                           else (None, None, {}))
    cfg = _run_config(cfg, out, saved, saved_meta, epochs=epochs, checkpoint_every=checkpoint_every,
                      data_dir=data_dir)
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
    cfg = _fit_to_data(cfg, classes, log, out)
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

    history = _run_history(command, resume, saved_meta, device)
    world = distributed.world_size()
    meta = {"train_config": cfg.to_dict(), "model_config": model.config.to_dict(), "dataset": cfg.dataset,
            "data_sha256": identity, "classes": classes, "tta_flip": cfg.tta_flip, "world_size": world, **history}
    meta.update(_held_out_record(cfg, saved_meta))
    run = Run(cfg, out, device, amp_dtype, preprocessing, classes, loader, eval_loader, extra_loader,
              _wrap(model, cfg, device), history, None, log,
              memory_format, meta)
    if main:
        if not resume:
            log(f"nin: training {cfg.model} on {cfg.dataset} ({len(train_data[1])} images, {len(loader)} steps/epoch"
                f"{f' per rank × {world} ranks' if world > 1 else ''}) on {device}, "
                f"{'bf16 autocast' if amp_dtype else 'fp32'}; run folder {out}")
            _note_missing_svhn_extra(cfg, log)
    return run, state


def _held_out_record(cfg: TrainConfig, saved_meta: dict) -> dict:
    """An image folder's held-out part, as files (`folder_split_digest`: their names and labels, and also their
    bytes), for `nin evaluate` to find again; on a resume, the one the run began with (a run from before the bytes
    were recorded records them from here on)."""
    if cfg.dataset != "folder" or not cfg.val_split:
        return {}
    record = {key: folder_split_digest(cfg.data_dir, cfg.eval_split, val_split=cfg.val_split, seed=cfg.seed,
                                       contents=contents)
              for key, contents in (("held_out_sha256", False), ("held_out_files_sha256", True))}
    if any(saved_meta.get(key) not in (None, digest) for key, digest in record.items()):
        raise NinError(f"{cfg.data_dir}: its held-out images are not the ones this run held out (added, removed, "
                       "renamed or rewritten since it began); point --data-dir at the run's own data")
    return record


def _run_config(cfg: TrainConfig | None, out: Path, saved: dict | None, saved_meta: dict, *, epochs: int | None,
                checkpoint_every: int | None, data_dir) -> TrainConfig:
    """The config the run trains with: the checkpoint's when resuming (a run from before --val-split held nothing
    out), with what may change on a resume (epochs, checkpoint interval, the data's new place), validated."""
    if saved is not None:
        cfg = _checkpoint_config(out / "checkpoint.safetensors", saved, saved_meta)
        done, inside = saved_meta["epoch"], saved_meta["batches_done"]
        if epochs is not None and inside and epochs <= done:  # a model from half an epoch is no result
            raise NinError(f"--epochs {epochs}: {out} is inside epoch {done + 1} (its checkpoint is from step "
                           f"{saved_meta['step']}); pass --epochs {done + 1} or more to finish that epoch")
        if "val_split" not in saved_meta["train_config"]:
            cfg = dataclasses.replace(cfg, val_split=0.0)
        if data_dir is None and recorded_root(cfg.data_dir, cfg.dataset) != cfg.data_dir:
            data_dir = recorded_root(cfg.data_dir, cfg.dataset)  # the data moved; its sha256 is checked
    else:  # a new run records its data's place as an absolute path (as `nin train` does): a resume finds it anywhere
        cfg = dataclasses.replace(cfg, **{k: str(Path(v).expanduser().resolve()) for k in ("data_dir", "extra_eval")
                                          if (v := getattr(cfg, k))})
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("epochs", epochs), ("checkpoint_every", checkpoint_every),
                                                        ("data_dir", data_dir and str(data_dir))) if v is not None})
    cfg = _held_out_split(cfg, new_run=saved is None)
    validate(cfg)
    return cfg


def _held_out_split(cfg: TrainConfig, *, new_run: bool = True) -> TrainConfig:
    """An image folder without a sub-folder for the evaluation split holds out 10% of each class of its training
    images for it (``val_split`` None: decided here, once, and recorded); every other data set, none. A new run
    given --val-split where the folder has that sub-folder is refused; a resumed run keeps the part it held out,
    also where the sub-folder was added since (`_fit_to_data` says so)."""
    if cfg.val_split is not None:
        if new_run and cfg.val_split and cfg.dataset == "folder" and (resolve_root(cfg.data_dir) / cfg.eval_split).is_dir():
            raise NinError(f"--val-split {cfg.val_split}: {resolve_root(cfg.data_dir)} has a {cfg.eval_split}/ "
                           "sub-folder already, which is the test split; leave --val-split out")
        return cfg
    own = cfg.dataset != "folder" or (resolve_root(cfg.data_dir) / cfg.eval_split).is_dir()
    return dataclasses.replace(cfg, val_split=0.0 if own else DEFAULT_VAL_SPLIT)


DEFAULT_VAL_SPLIT = 0.1  # of each class, for an image folder without a test/ sub-folder


def data_files(cfg: TrainConfig, *, resuming: bool = False) -> list[Path]:
    """The files a run of ``cfg`` reads, found but not read: its training and evaluation splits
    (`nin.data.dataset_files`, an image folder's held-out split decided as the run decides it) and
    ``extra_eval``. What `nin train --dry-run` checks before a long run. ``resuming``: ``cfg`` is a run's own
    (`planned_config`), whose held-out part stays its held-out part where a sub-folder for it was added since.

    Raises:
        DataError: A file the run needs is missing (the message names it), or an image folder the run would
            refuse.
    """
    cfg = _held_out_split(cfg, new_run=not resuming)
    files = dataset_files(cfg.dataset, cfg.data_dir, (cfg.train_split, cfg.eval_split), val_split=cfg.val_split or 0.0,
                          seed=cfg.seed)
    return files + ([Path(cfg.extra_eval).expanduser()] if cfg.extra_eval else [])  # `validate` found it


def planned_config(cfg: TrainConfig | None, out: Path, *, resume: bool = False, epochs: int | None = None,
                   checkpoint_every: int | None = None, data_dir: str | None = None) -> tuple[TrainConfig, dict]:
    """The config `start_run` would train with, decided as it decides it (a resume's checkpoint, the data's
    place, an image folder's held-out split), and the checkpoint's header when resuming ({} else); nothing is
    written. What `nin train --dry-run` prints.
    """
    saved, _, saved_meta = load_checkpoint(out / "checkpoint.safetensors") if resume else (None, None, {})
    return _run_config(cfg, out, saved, saved_meta, epochs=epochs, checkpoint_every=checkpoint_every,
                       data_dir=data_dir), saved_meta


def _note_missing_svhn_extra(cfg: TrainConfig, log) -> None:
    """SVHN's train split is train + extra where extra_32x32.mat is there; say so where it is not."""
    root = resolve_root(cfg.data_dir)
    if cfg.dataset == "svhn" and cfg.train_split in ("train", "train_minus_val") and \
            not (root / "svhn" / "extra_32x32.mat").is_file():
        log(f"nin: note: no svhn/extra_32x32.mat in {root}: training on train_32x32.mat alone (the paper's SVHN "
            "model trained on train + extra; `nin download svhn-extra` fetches it, 1.3 GB)")


def _fit_to_data(cfg: TrainConfig, classes: list[str], log, out: Path) -> TrainConfig:
    """A user's folder decides the class count (and is told which images its test error is measured on)."""
    if cfg.dataset != "folder":
        return cfg
    root = resolve_root(cfg.data_dir)
    check_class_count(classes, root / cfg.train_split if (root / cfg.train_split).is_dir() else root)
    if distributed.is_main() and cfg.val_split and (root / cfg.eval_split).is_dir():  # added since the run began
        log(f"nin: note: {root / cfg.eval_split} was added since this run began: the run goes on measuring its "
            f"{cfg.eval_split} error on the {cfg.val_split:.0%} of each class it held out, one curve to its end; "
            f"`nin evaluate {out} --data-dir {root / cfg.eval_split}` scores {cfg.eval_split}/")
    elif distributed.is_main() and not (root / cfg.eval_split).is_dir():
        if cfg.val_split:
            log(f"nin: note: {root} has no {cfg.eval_split}/ sub-folder: the {cfg.eval_split} error is measured on "
                f"{cfg.val_split:.0%} of each class held out from training (--val-split, seed {cfg.seed})")
        else:
            log(f"nin: note: {root} has no {cfg.eval_split}/ sub-folder and --val-split is 0: the {cfg.eval_split} "
                f"error is measured on the training images (add a {cfg.eval_split}/ sub-folder, or --val-split 0.1)")
    if "num_classes" in cfg.model_args:  # one map a class, or the weights could not name each map's class
        if cfg.model_args["num_classes"] != len(classes):
            raise NinError(f"--set model.num_classes={cfg.model_args['num_classes']}: {root} has {len(classes)} "
                           f"classes, expected {len(classes)} class maps (leave it out: the folder decides)")
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
    return load(cfg.init_from)


def _start_from(model: NiN, source: NiN, where: str, log, *, same_classes: bool) -> None:
    """Copy ``source``'s weights into ``model``; the class-map layer starts afresh where the classes differ.

    Every other tensor must match by name and shape (one line naming the first that does not). Classes differ
    when their count or their names differ: a map trained for "cat" must not answer for another class.
    """
    if model.config.head == "gap":  # the class maps: the last conv and its batch norm, in the last block
        class_map = next(name for name, module in model.named_modules() if module is model.class_map_layer)
        head = (class_map + ".", class_map.replace(".convs.", ".norms.") + ".")
        may_differ = f"blocks.{len(model.blocks) - 1}."
    else:  # a fully connected head: its last layer gives the classes
        head = may_differ = next(name for name, module in model.named_modules() if module is model.head[-1]) + "."
    target, weights = model.state_dict(), source.state_dict()
    differ = sorted(k for k in set(target) | set(weights)
                    if k not in target or k not in weights or target[k].shape != weights[k].shape)
    blocking = [k for k in differ if not (k.startswith(may_differ) and k in target and k in weights)]
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
    model_cfg = model_config(cfg.model, **cfg.model_args)
    size_args = ({"image_size": model_cfg.input_size, "channels": model_cfg.in_channels,
                  "val_split": cfg.val_split or 0.0, "seed": cfg.seed} if cfg.dataset == "folder" else {})
    with distributed.main_first():
        train_set = load_dataset(cfg.dataset, cfg.train_split, cfg.data_dir, **size_args)
        eval_set = load_dataset(cfg.dataset, cfg.eval_split, cfg.data_dir, **size_args)
    check_image_shape(train_set.images, model_cfg, f"model {cfg.model}", f"{cfg.dataset} {cfg.train_split}")
    drawn = cfg.dataset == "folder"
    train_images, train_labels = _subset(train_set.images, train_set.labels, cfg.train_subset, drawn, cfg.seed)
    eval_images, eval_labels = _subset(eval_set.images, eval_set.labels, cfg.eval_subset, drawn, cfg.seed)
    if preprocess_state is None:
        fitted = fit_preprocessing(cfg.preprocessing, train_images).state_dict() if distributed.is_main() else None
        preprocess_state = distributed.broadcast_object(fitted)  # rank 0 fits; every rank applies the same
    preprocessing = Preprocessing(cfg.preprocessing, preprocess_state)
    return (preprocessing, train_set.classes, (preprocessing(train_images).to(device), train_labels.to(device)),
            (preprocessing(eval_images).to(device), eval_labels.to(device)), _data_identity(train_images, train_labels))


def _data_identity(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the raw training images and labels as trained on: what a resumed run must find again."""
    digest = hashlib.sha256()
    for tensor in (images, labels):
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _subset(images: torch.Tensor, labels: torch.Tensor, count: int, drawn: bool,
            seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images of a split (0: all): a named data set's first ones (its files are in no class order), or
    with ``drawn`` (a folder, read class by class, whose first ones would be one class) ``count`` drawn with
    ``seed``, in the split's order."""
    if not count or count >= len(labels):
        return images, labels
    if not drawn:
        return images[:count], labels[:count]
    chosen = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return images[chosen], labels[chosen]


def _checkpoint_config(path: Path, saved: dict, meta: dict) -> TrainConfig:
    """The run's TrainConfig from its checkpoint's header, checked against the checkpoint's own model tensors."""
    extra = (meta.get("train_config") or {}).get("extra_eval") if isinstance(meta.get("train_config"), dict) else None
    if isinstance(extra, str) and extra and not Path(extra).expanduser().is_absolute() and not Path(extra).is_file():
        # runs before nin recorded it as an absolute path kept it as given: found only from where they started
        raise NinError(f"{path}: its extra_eval {extra} is relative to the folder the run was started in and is not "
                       f"found from {Path.cwd()}; resume from that folder")
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


def _run_history(command: str | None, resume: bool, saved_meta: dict, device: torch.device) -> dict:
    """The command, git revision and host that started the run, and each resume since (command, revision, host,
    the step it resumed at, when): the run's segments, which `nin reproduce record` reports one by one.

    config.json and results quote the command that started the run, not the last ``--resume``.
    """
    this = {"command": command or shlex.join(["nin", *sys.argv[1:]]), "git_revision": git_revision(),
            "host": host(device), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not resume:
        return {**this, "resumes": []}
    resumes = [*saved_meta.get("resumes", []), {**this, "step": saved_meta.get("step")}]
    started = {key: saved_meta[key] for key in ("host", "started") if key in saved_meta}
    return {"command": saved_meta.get("command"), "git_revision": saved_meta.get("git_revision"), **started,
            "resumes": resumes}


def write_config_json(run: Run, resume: bool) -> None:
    """The run's config.json: its config, model, command history and host (`train` writes it as the run starts)."""
    config = {RUN_MARKER: True, "train_config": run.cfg.to_dict(), "model_config": run.meta["model_config"],
              **run.history,
              "device": str(run.device), "autocast": str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "fp32",
              "world_size": run.meta["world_size"], "torch": torch.__version__, "resumed": resume}
    atomic_write_bytes(run.out / "config.json", (json.dumps(config, indent=2) + "\n").encode())
