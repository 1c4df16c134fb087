"""One way in for inference: weights + their fitted preprocessing + their test-time flips, images in.

    from nin.classifier import Classifier
    classifier = Classifier.load("fast-cifar10")            # a pretrained tag, a weights file or a run folder
    probabilities = classifier.predict(["cat.jpg", pil_image, uint8_batch, float_batch_in_0_1])
    batch = classifier.transforms(["cat.jpg"])              # the preprocessed (N, C, H, W) batch alone

`nin evaluate`, `nin predict` and `nin visualize`'s confusion matrix compute exactly what
`Classifier.logits` computes: the same preprocessing, the same flips, and the same model,
`nin.inference.inference_model` (batch norm folded, bf16 where the hardware runs it fast), so one set of
weights gives one answer everywhere. A Classifier is frozen at the weights its model held when it was made.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from nin.errors import NinError
from nin.inference import inference_model
from nin.runtime import resolve_device, select_precision

__all__ = ["ImageTransform", "Classifier"]


class ImageTransform(nn.Module):
    """Whatever a user holds -> the model's preprocessed float batch (N, C, H, W).

    Accepts a uint8 tensor (C, H, W) or (N, C, H, W) with values 0..255, a float tensor of the same shapes
    with values in [0, 1], a PIL image, a path, or a list of images and paths. Images of another size or mode
    are converted as `nin predict` converts files (EXIF orientation, alpha, 16-bit; resized, center-cropped).
    """

    def __init__(self, preprocessing, input_size: int, in_channels: int) -> None:
        super().__init__()
        self.preprocessing = preprocessing
        self.input_size = input_size
        self.in_channels = in_channels

    def to_pixels(self, images) -> torch.Tensor:
        """The raw pixels (N, C, H, W) on the 0..255 scale: uint8, or float for a float batch in [0, 1] (× 255,
        unrounded)."""
        from nin.data.readers import image_to_tensor, read_image

        if isinstance(images, (str, os.PathLike)):
            return read_image(Path(images), self.input_size, self.in_channels).unsqueeze(0)
        if _is_pil(images):
            return image_to_tensor(images, self.input_size, self.in_channels).unsqueeze(0)
        if isinstance(images, (list, tuple)):
            if not images:
                raise NinError("no images given")
            parts = [self.to_pixels(item) for item in images]
            if any(part.is_floating_point() for part in parts):
                parts = [part.float() for part in parts]
            return torch.cat(parts)
        if not isinstance(images, torch.Tensor):
            raise NinError(f"expected a tensor, a PIL image, a path or a list of them, got {type(images).__name__}")
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        expected = (self.in_channels, self.input_size, self.input_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise NinError(f"expected images of shape {expected} or (N, {', '.join(map(str, expected))}), "
                           f"got {tuple(images.shape)}")
        if batch.dtype == torch.uint8:
            return batch
        if not batch.is_floating_point():
            raise NinError(f"expected uint8 (0..255) or float (0..1) images, got {batch.dtype}")
        if not torch.isfinite(batch).all():
            raise NinError("float images hold NaN or infinite values")
        if batch.numel() and (batch.min() < 0 or batch.max() > 1):
            raise NinError(f"float images must lie in [0, 1] (got {float(batch.min()):.3g}..{float(batch.max()):.3g}); "
                           "pass uint8 for 0..255")
        return batch * 255.0  # preprocessing reads values on the 0..255 scale; no rounding, no loss

    def forward(self, images) -> torch.Tensor:
        return self.preprocessing(self.to_pixels(images))


def _is_pil(obj) -> bool:
    return type(obj).__module__.startswith("PIL.")


class Classifier:
    """A model with its preprocessing and test-time augmentation: `logits`, `predict`, `classes`."""

    def __init__(self, model: nn.Module, preprocessing, meta: dict, *, device: torch.device | str | None = None,
                 precision: str = "auto") -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta
        config = model.config
        self.classes = list(meta.get("classes") or [str(k) for k in range(config.num_classes)])
        self.tta_flip = bool(meta.get("tta_flip"))
        self.amp_dtype = select_precision(precision, self.device)
        self.transforms = ImageTransform(preprocessing, config.input_size, config.in_channels)
        self.runner = inference_model(self.model, self.amp_dtype)  # frozen at the weights it holds now

    @classmethod
    def load(cls, weights: str | os.PathLike, *, device: torch.device | str | None = None,
             precision: str = "auto") -> Classifier:
        """From a pretrained tag (`nin.pretrained.list_pretrained()`), a weights file or a run folder."""
        from nin.checkpoint import load_weights  # a tag, a weights file or a run folder

        model, preprocessing, meta = load_weights(weights)
        return cls(model, preprocessing, meta, device=device, precision=precision)

    @torch.no_grad()
    def logits(self, images) -> torch.Tensor:
        """fp32 logits (N, K), exactly as `nin evaluate` computes them."""
        from nin.evaluate import predict_logits

        batch = self.transforms(images).to(self.device)
        return predict_logits(self.runner, batch, tta_flip=self.tta_flip)

    def predict(self, images) -> torch.Tensor:
        """Class probabilities (N, K) on the CPU."""
        return self.logits(images).softmax(dim=1).cpu()

    def top(self, images, k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable classes of each image, as (class name, probability)."""
        if k < 1:
            raise NinError(f"k must be at least 1, got {k}")
        probabilities = self.predict(images)
        values, indices = probabilities.topk(min(k, len(self.classes)), dim=1)
        return [[(self.classes[i], float(p)) for p, i in zip(v.tolist(), ix.tolist())]
                for v, ix in zip(values, indices)]
