"""Test error, per-class accuracy and the confusion matrix, each test image counted exactly once.

    result = evaluate(model, TensorLoader(images, labels, 500, shuffle=False), num_classes=10)
    print(result.error)

Under DDP every rank sees a disjoint part of the test set (no sampler padding) and the counts are
summed over ranks, so the numbers equal a single process's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from nin import distributed

__all__ = ["EvalResult", "evaluate", "autocast", "load_matching_dataset"]


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
        return 1.0 - self.accuracy

    @property
    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(dim=1).clamp(min=1)
        return (self.confusion.diagonal() / totals).tolist()

    def to_dict(self, classes: list[str] | None = None) -> dict:
        out = {"accuracy": self.accuracy, "error": self.error, "n": self.n, "correct": self.correct,
               "loss": self.loss, "per_class_accuracy": self.per_class_accuracy,
               "confusion": self.confusion.tolist()}
        if classes is not None:
            out["classes"] = list(classes)
        return out


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def predict_logits(model: nn.Module, images: torch.Tensor, *, amp_dtype: torch.dtype | None = None,
                   tta_flip: bool = False) -> torch.Tensor:
    """fp32 logits of a preprocessed batch; with ``tta_flip`` averaged with the mirrored batch's."""
    with autocast(images.device, amp_dtype):
        logits = model(images).float()
        if tta_flip:
            logits = 0.5 * (logits + model(images.flip(-1)).float())
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, num_classes: int,
             amp_dtype: torch.dtype | None = None, tta_flip: bool = False) -> EvalResult:
    """Run ``model`` in eval mode over ``batches`` of (preprocessed images, labels)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in batches:
        logits = predict_logits(model, images, amp_dtype=amp_dtype, tta_flip=tta_flip)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        confusion += torch.bincount(labels * num_classes + logits.argmax(dim=1), minlength=num_classes**2)
    distributed.all_reduce_sum(confusion)
    distributed.all_reduce_sum(loss_sum)
    model.train(was_training)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = int(confusion.sum())
    return EvalResult(loss=float(loss_sum) / max(n, 1), confusion=confusion)


def load_matching_dataset(weights, config, meta: dict, dataset: str | None, split: str, data_dir=None):
    """The split a model can be evaluated on: its own data set (or ``dataset``), checked against its shape.

    Raises NinError naming ``weights`` when the data set is unknown, its images have another shape, or its
    labels exceed the model's classes.
    """
    from nin.data import load_dataset
    from nin.errors import NinError

    dataset = dataset or meta.get("dataset")
    if not dataset:
        raise NinError(f"{weights}: names no data set; pass --dataset")
    size_args = {"image_size": config.input_size, "channels": config.in_channels} if dataset == "folder" else {}
    data = load_dataset(dataset, split, data_dir, **size_args)
    expected = (config.in_channels, config.input_size, config.input_size)
    if tuple(data.images.shape[1:]) != expected:
        raise NinError(f"{weights}: the model expects {'×'.join(map(str, expected))} images; {dataset} "
                       f"{split} has {'×'.join(map(str, data.images.shape[1:]))}")
    if len(data.labels) and int(data.labels.max()) >= config.num_classes:
        raise NinError(f"{weights}: the model has {config.num_classes} classes; {dataset} {split} has "
                       f"labels up to {int(data.labels.max())}")
    return dataset, data
