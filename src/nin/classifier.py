"""One way in for inference: weights + their fitted preprocessing + their test-time flips, images in.

    from nin.classifier import Classifier
    classifier = Classifier.load("fast-cifar10")            # a pretrained tag, a weights file or a run folder
    probabilities = classifier.predict(["cat.jpg", pil_image, uint8_batch, float_batch_in_0_1])
    batch = classifier.transforms(["cat.jpg"])              # the preprocessed (N, C, H, W) batch alone

`nin evaluate`, `nin predict`, `nin serve` and `nin visualize` compute exactly what `Classifier.logits`
computes: the same decoder (`nin.data.images`), the same preprocessing module, the same flips, and the same
model, `nin.inference.inference_model` (batch norm folded, bf16 where the hardware runs it fast), assembled as
one `nin.inference.InferencePipeline`; so one set of weights gives one answer everywhere. A Classifier is frozen
at the weights its model held when it was made.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from nin.errors import NinError
from nin.inference import InferencePipeline, inference_model
from nin.pretrained import load
from nin.runtime import resolve_device, select_precision
from nin.transforms import ImageTransform, invert_ink

__all__ = ["Classifier"]


class Classifier:
    """A model with its preprocessing and test-time augmentation: `logits`, `predict`, `top`, `classes`."""

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
        self.pipeline = InferencePipeline(preprocessing.to(self.device), self.runner, self.tta_flip)

    @classmethod
    def load(cls, weights: str | os.PathLike, *, device: torch.device | str | None = None,
             precision: str = "auto") -> Classifier:
        """From a pretrained tag (`nin.pretrained.list_pretrained()`), a weights file or a run folder."""
        model, preprocessing, meta = load(weights)
        return cls(model, preprocessing, meta, device=device, precision=precision)

    def _pixels(self, images, invert: bool):
        """``images`` as they go in: with ``invert``, decoded and inverted as `nin predict --invert` does (dark
        ink on light paper, for weights trained on light-on-black images)."""
        return invert_ink(self.transforms.to_pixels(images)) if invert else images

    @torch.no_grad()
    def logits(self, images, *, invert: bool = False) -> torch.Tensor:
        """fp32 logits (N, K), exactly as `nin evaluate` computes them (``invert``: as `nin predict --invert`)."""
        return self.pipeline.logits(self.transforms(self._pixels(images, invert)).to(self.device))

    @torch.no_grad()
    def logits_and_maps(self, images, *, invert: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits (N, K) and class maps (N, K, h, w) (flip-averaged with the weights' test-time flips)."""
        return self.pipeline(self.transforms.to_pixels(self._pixels(images, invert)).to(self.device))

    def predict(self, images, *, invert: bool = False) -> torch.Tensor:
        """Class probabilities (N, K) on the CPU."""
        return self.logits(images, invert=invert).softmax(dim=1).cpu()

    def top(self, images, k: int = 5, *, invert: bool = False) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable classes of each image, as (class name, probability)."""
        if k < 1:
            raise NinError(f"k must be at least 1, got {k}")
        probabilities = self.predict(images, invert=invert)
        values, indices = probabilities.topk(min(k, len(self.classes)), dim=1)
        return [[(self.classes[i], float(p)) for p, i in zip(v.tolist(), ix.tolist())]
                for v, ix in zip(values, indices)]
