"""Test error, per-class accuracy and the confusion matrix, each test image counted exactly once.

    result = evaluate(model, TensorLoader(images, labels, 500, shuffle=False), num_classes=10)
    print(result.error)

Under DDP every rank sees a disjoint part of the test set (no sampler padding) and the counts are
summed over ranks, so the numbers equal a single process's.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from nin import distributed
from nin.data import ImageDataset, TensorLoader, folder_split_digest, load_dataset, recorded_root, resolve_root
from nin.data.folders import NumberedClasses, first_names
from nin.data.readers import IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC, idx_magic, read_cifar_binary, read_idx_dataset
from nin.errors import DataError, NinError, NinNote
from nin.inference import inference_model, predict_logits
from nin.pretrained import load
from nin.runtime import resolve_device, select_precision

__all__ = ["EvalResult", "evaluate", "evaluate_weights", "load_matching_dataset", "check_image_shape",
           "read_data_file"]


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per image (nats)
    confusion: torch.Tensor  # (K, K) int64 counts; row = true class, column = predicted

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        return int(self.confusion.diagonal().sum())

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)

    @property
    def error(self) -> float:
        return (self.n - self.correct) / max(self.n, 1)  # not 1 - accuracy: 0.05, not 0.050000000000000044

    @property
    def per_class_accuracy(self) -> list[float | None]:
        """Accuracy of each true class; None for a class without test images."""
        totals = self.confusion.sum(dim=1)
        return [None if int(n) == 0 else float(c) / int(n) for c, n in zip(self.confusion.diagonal(), totals)]

    def to_dict(self, classes: list[str] | None = None) -> dict:
        out = {"accuracy": self.accuracy, "error": self.error, "n": self.n, "correct": self.correct,
               "loss": self.loss, "per_class_accuracy": self.per_class_accuracy,
               "confusion": self.confusion.tolist()}
        if classes is not None:
            out["classes"] = list(classes)
        return out


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, num_classes: int,
             amp_dtype: torch.dtype | None = None, tta_flip: bool = False) -> EvalResult:
    """Score ``model`` over ``batches`` of (preprocessed images, labels) on the one inference path.

    The model runs as `nin.inference.inference_model` makes it (batch norm folded, weights in ``amp_dtype``),
    the path `nin evaluate`, `nin predict`, `nin visualize`, `Classifier` and the per-epoch evaluation of
    `train()` all take, so one set of weights gives one number everywhere.
    """
    classes = getattr(getattr(model, "config", None), "num_classes", num_classes)
    if classes != num_classes:  # a smaller confusion matrix would count past its rows, silently
        raise NinError(f"evaluate: num_classes={num_classes}, but the model has {classes} class maps")
    runner = inference_model(model, amp_dtype)  # a frozen, folded copy: ``model`` itself is left as it is
    device = next(runner.parameters()).device
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in batches:
        logits = predict_logits(runner, images, tta_flip=tta_flip)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        confusion += torch.bincount(labels * num_classes + logits.argmax(dim=1), minlength=num_classes**2)
    distributed.all_reduce_sum(confusion)
    distributed.all_reduce_sum(loss_sum)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = int(confusion.sum())
    return EvalResult(loss=float(loss_sum) / max(n, 1), confusion=confusion)


def check_image_shape(images: torch.Tensor, config, owner: str, source: str) -> None:
    """Refuse images whose (C, H, W) is not the model's input: one line naming both sides."""
    expected = (config.in_channels, config.input_size, config.input_size)
    if tuple(images.shape[1:]) != expected:
        raise NinError(f"{owner}: the model expects {'×'.join(map(str, expected))} images; {source} has "
                       f"{'×'.join(map(str, images.shape[1:]))}")


def read_data_file(path: str | os.PathLike, num_classes: int, flag: str = "--data-file"):
    """One file as a test set: a CIFAR binary batch file (CIFAR-10's 1 label byte a record, or CIFAR-100's 2, fine
    label, for a 100-class model), or an IDX images file (MNIST's and Fashion-MNIST's format, told by its magic
    number, gzipped or not) read with its labels file beside it: the same name with ``images`` -> ``labels`` and
    ``idx3`` -> ``idx1`` (``t10k-images-idx3-ubyte.gz`` -> ``t10k-labels-idx1-ubyte.gz``), gzipped or not."""
    path = Path(path)
    if not path.is_file():
        raise NinError(f"{flag} {path}: no such file")
    magic = idx_magic(path)
    if magic == IDX_LABEL_MAGIC:
        raise NinError(f"{flag} {path}: an IDX labels file; give the images file (e.g. t10k-images-idx3-ubyte.gz), "
                       "whose labels file lies beside it")
    if magic == IDX_IMAGE_MAGIC:
        images, labels = read_idx_dataset(path, _idx_labels_file(path, flag), num_classes)
    else:
        images, labels = read_cifar_binary(path, num_classes, label_bytes=2 if num_classes == 100 else 1)
    return ImageDataset(images, labels, [str(k) for k in range(num_classes)], path.name)


def _idx_labels_file(images: Path, flag: str) -> Path:
    stem = images.name[:-3] if images.name.endswith(".gz") else images.name
    labels = stem.replace("images", "labels").replace("idx3", "idx1")
    found = next((images.with_name(name) for name in (labels, labels + ".gz", stem.replace("images", "labels"))
                  if name != images.name and images.with_name(name).is_file()), None)
    if found is None and labels == stem:
        raise NinError(f"{flag} {images}: an IDX images file; its labels file is found beside it by name (images -> "
                       "labels, idx3 -> idx1: t10k-images-idx3-ubyte.gz -> t10k-labels-idx1-ubyte.gz), and this "
                       "name has neither: rename the pair so")
    if found is None:
        raise NinError(f"{flag} {images}: an IDX images file, read with its labels file {labels}[.gz] beside it, "
                       "which is not there")
    return found


def _model_classes(meta: dict) -> list[str] | None:
    """The class list a folder is labelled by: the model's; numbered placeholders of a model imported without
    names (no data set) marked as such, so that a complete folder of synsets is labelled in sorted order."""
    classes = meta.get("classes") or None
    if classes and not meta.get("dataset") and classes == [str(i) for i in range(len(classes))]:
        return NumberedClasses(classes)
    return classes


def _holds_the_held_out_part(meta: dict, data_dir, split: str) -> bool:
    """``data_dir``, another folder than the one a folder run recorded, gives the held-out part the run held out
    (the same files, by name and label): the run's folder moved or copied, whose whole would hold trained images."""
    train = meta.get("train_config") or {}
    if meta.get("dataset") != "folder" or not train.get("val_split") or not meta.get("held_out_sha256") \
            or split == "train":
        return False
    try:
        return folder_split_digest(data_dir, split, val_split=train["val_split"], seed=train.get("seed", 0),
                                   classes=_model_classes(meta)) == meta["held_out_sha256"]
    except (DataError, OSError):  # not a folder of the run's layout: another folder
        return False


def _check_held_out(weights, meta: dict, data_dir, split: str, size_args: dict, *, names: bool = True) -> None:
    """The held-out part of a run's own folder is the one it held out: no image added, removed or renamed since
    (``names``; a moved folder was found by them already), and none written over (runs from before either record
    was kept are not checked for it)."""
    digest = functools.partial(folder_split_digest, data_dir, split, val_split=size_args["val_split"],
                               seed=size_args["seed"], classes=size_args["classes"])
    if (names and meta.get("held_out_sha256") and digest() != meta["held_out_sha256"]) or \
            (meta.get("held_out_files_sha256") and digest(contents=True) != meta["held_out_files_sha256"]):
        raise NinError(f"{weights}: {resolve_root(data_dir)} changed since training (images added, removed, renamed "
                       f"or rewritten), so its held-out {size_args['val_split']:.0%} is no longer the part the run "
                       "held out and could hold trained images; score a folder of new images with --data-dir")


def load_matching_dataset(weights, config, meta: dict, dataset: str | None, split: str, data_dir=None,
                          data_file: str | os.PathLike | None = None):
    """The images a model can be evaluated on: its own data set (or ``dataset``, or one ``data_file``: a CIFAR batch
    file or an MNIST-format IDX images file, `read_data_file`).

    Returns (name, ImageDataset). Raises NinError naming ``weights`` when the data set is unknown, its images
    have another shape, or its labels exceed the model's classes.
    """
    if data_file is not None:
        data, dataset = read_data_file(data_file, config.num_classes), Path(data_file).name
    else:
        own = dataset is None or dataset == meta.get("dataset")
        dataset = dataset or meta.get("dataset")
        if not dataset:
            raise NinError(f"{weights}: names no data set; pass --dataset")
        recorded = (meta.get("train_config") or {}).get("data_dir")
        # the run's held-out part (--val-split) is of its own folder; another folder is scored whole
        same_place = data_dir is None or resolve_root(data_dir).resolve() == resolve_root(recorded).resolve()
        by_record = own and not same_place and _holds_the_held_out_part(meta, data_dir, split)  # moved or copied
        own_folder = own and (same_place or by_record)
        if own and data_dir is None:  # the data folder the model was trained on, as its run recorded it
            data_dir = recorded_root(recorded, dataset)
        size_args = {}
        # A user's folder: the model's input size, the model's own class list (also for another model's folder: a
        # sub-folder is labelled by its name's index there, not by its sorted position), and the held-out part
        # its run was scored on (--val-split).
        if dataset == "folder":
            train = meta.get("train_config") or {}
            size_args = {"image_size": config.input_size, "channels": config.in_channels,
                         "classes": _model_classes(meta),
                         "val_split": (train.get("val_split") or 0.0) if own_folder else 0.0,
                         "seed": train.get("seed", 0)}
        if size_args.get("val_split") and split != "train":
            _check_held_out(weights, meta, data_dir, split, size_args, names=not by_record)  # by_record: found by them
            folder = resolve_root(data_dir) / split
            if folder.is_dir():  # added since the run began, or another split than the run's: not what is scored
                warnings.warn(NinNote(f"{weights} is scored on the {size_args['val_split']:.0%} of each class it "
                                      f"held out from training, not on the images in {folder}/ (--data-dir "
                                      f"{folder} scores those)"), stacklevel=2)
        data = load_dataset(dataset, split, data_dir, **size_args)
    check_image_shape(data.images, config, str(weights), f"{dataset} {split}")
    theirs = meta.get("classes")
    if data_file is None and dataset not in ("folder", meta.get("dataset")) and theirs \
            and list(theirs) != list(data.classes):  # a Fashion-MNIST model scored on MNIST digits: refused
        raise NinError(f"{weights}: its classes ({first_names(theirs)}) are not {dataset}'s ({first_names(data.classes)}); "
                       "--dataset takes a data set with the model's own classes")
    if len(data.labels) and int(data.labels.max()) >= config.num_classes:
        raise NinError(f"{weights}: the model has {config.num_classes} classes; {dataset} {split} has "
                       f"labels up to {int(data.labels.max())}")
    return dataset, data


def evaluate_weights(weights: str | os.PathLike, *, dataset: str | None = None, split: str = "test",
                     data_dir: str | os.PathLike | None = None, data_file: str | os.PathLike | None = None,
                     subset: int = 0, batch_size: int = 500, precision: str = "auto",
                     device: torch.device | str | None = None) -> tuple[EvalResult, str, list[str]]:
    """Evaluate weights as `nin evaluate` does: (result, data set name, class names).

    Args:
        weights: A pretrained tag, a weights file or a run folder.
        dataset: The data set to score (default: the model's own); ``data_file`` replaces it with one
            CIFAR binary batch file.
        subset: Score only the first ``subset`` images (0: all).
        precision: "auto" (bf16 where the hardware runs it fast), "fp32" or "bf16".

    Warns:
        NinNote: A folder run is scored on the part it held out while its folder has a sub-folder for
            ``split`` (added since training, say), which is not what is scored.
    """
    if batch_size < 1:
        raise NinError(f"--batch-size must be at least 1, got {batch_size}")
    if subset < 0:
        raise NinError(f"subset={subset}: expected 0 (all images) or a positive count")
    device = resolve_device(device)
    model, preprocessing, meta = load(weights, device)
    name, data = load_matching_dataset(weights, model.config, meta, dataset, split, data_dir, data_file)
    images, labels = (data.images[:subset], data.labels[:subset]) if subset else (data.images, data.labels)
    images = preprocessing(images).to(device).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    result = evaluate(model, TensorLoader(images, labels.to(device), batch_size, shuffle=False),
                      num_classes=model.config.num_classes, amp_dtype=select_precision(precision, device),
                      tta_flip=bool(meta.get("tta_flip")))
    classes = meta.get("classes") or data.classes
    return result, name, list(classes)
