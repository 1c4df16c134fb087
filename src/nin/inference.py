"""The one inference path: a trained model with batch norm folded into its convolutions, bf16 weights, NHWC.

    fast = inference_model(model, torch.bfloat16)                            # an nn.Module, eval only
    logits = predict_logits(fast, batch, tta_flip=True)                      # what `nin evaluate` scores
    pipeline = InferencePipeline(preprocessing, fast, tta_flip=True)         # uint8 images -> (logits, class maps)

The folded module takes the same preprocessed fp32 (N, C, H, W) batches and returns fp32 logits, so
`evaluate`, `predict_logits` (test-time flips included) and the CLI can use it in place of the model. The
source model is left untouched (it keeps training); the copy is frozen at the weights it had when called.
`InferencePipeline` puts the fitted preprocessing in front and returns the class maps too: `Classifier`,
`nin predict`, `nin serve` and the exported graphs (in fp32) are this one module.

``method``: "eager" runs the folded copy as ordinary PyTorch; "jit" also traces and freezes it with TorchScript
(one graph, constant weights); "compile" hands it to torch.compile (needs a C++ compiler, and time to compile).
docs/performance.md has the measurements behind the default.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from nin import runtime
from nin.layers import MLPConv
from nin.runtime import autocast, keep_freed_memory
from nin.transforms import Preprocessing

__all__ = ["InferenceModel", "FusedConvReLU", "fuse_conv_relu", "fold_batch_norm", "optimize_for_inference", "inference_model", "predict_logits",
           "InferencePipeline", "BF16_TOLERANCE_PER_10000", "accuracy_tolerance", "agrees_with_record"]

# bf16 kernels round differently on different CPUs (AMX tiles and AVX-512 BF16 accumulate in other orders), so
# an accuracy recorded on one CPU can move by a few images on another: those whose two highest scores lie within
# bf16's rounding of each other. How many, at most, per 10,000 test images. Measured (docs/performance.md): the
# same fast-cifar10 weights scored 8,971 here (AMD EPYC) and 8,972 on an AMX Xeon; bf16 against fp32, a larger
# change than any two bf16 kernels make, moved the shipped weights by 0 to 8 images of 10,000 (8: the authors'
# model, no batch norm, ZCA inputs).
BF16_TOLERANCE_PER_10000 = 10

METHODS = ("eager", "jit", "compile")


class FusedConvReLU(nn.Module):
    """A convolution with its ReLU applied inside oneDNN's kernel (a post-op on the accumulator, before the output
    is rounded to bf16): one pass over the output instead of two, the same numbers (ReLU commutes with rounding).
    CPU only: `torch.ops.mkldnn._convolution_pointwise`, the op torch.compile's CPU backend emits."""

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        self.conv, self.attr = conv, "relu" if relu else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        x = x.to(c.weight.dtype)  # what autocast does for the plain conv (a custom op is outside autocast's lists)
        return _CONV_POINTWISE(x, c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups, self.attr, [], "")


_CONV_POINTWISE = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)


def fuse_conv_relu(model: nn.Module) -> nn.Module:
    """``model`` (folded, in eval mode, on the CPU) with each MLPConv's conv + ReLU as one `FusedConvReLU`, in place;
    unchanged where this torch has no oneDNN pointwise convolution, or where the model is bf16 and this CPU has no
    oneDNN bf16 kernels (no AVX-512 or AVX-NE-CONVERT: an AVX2-only CPU runs bf16 convs only outside oneDNN)."""
    if _CONV_POINTWISE is None or not torch.backends.mkldnn.is_available():
        return model
    if any(p.dtype == torch.bfloat16 for p in model.parameters()) and not runtime.onednn_has_bf16():
        return model
    for block in model.modules():
        if isinstance(block, MLPConv):
            for i, (conv, norm, act) in enumerate(zip(block.convs, block.norms, block.acts)):
                if isinstance(norm, nn.Identity) and isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros":
                    block.convs[i] = FusedConvReLU(conv, isinstance(act, nn.ReLU))
                    block.acts[i] = nn.Identity()
    return model


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every MLPConv's BatchNorm2d folded into the conv before it."""
    model = copy.deepcopy(model).eval()
    for block in model.modules():
        if isinstance(block, MLPConv):
            for i, (conv, norm) in enumerate(zip(block.convs, block.norms)):
                if isinstance(norm, nn.BatchNorm2d):
                    block.convs[i] = fuse_conv_bn_eval(conv, norm)  # conv now has a bias
                    block.norms[i] = nn.Identity()
    return model


class InferenceModel(nn.Module):
    """fp32 images in, fp32 logits out; inside, the folded model runs in ``dtype`` and channels_last."""

    def __init__(self, model: nn.Module, runner, dtype: torch.dtype, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.model = model  # the folded copy: gives evaluate() its parameters (device) and a state_dict
        self.runner = runner  # the callable that does the work: the copy itself, its TorchScript, or its compiled form
        self.dtype, self.memory_format = dtype, memory_format

    def train(self, mode: bool = True) -> InferenceModel:
        super().train(False)  # evaluate() toggles modes; this model only ever infers
        return self

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.dtype).contiguous(memory_format=self.memory_format)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = self._input(images)
        with torch.autocast(images.device.type, enabled=False):  # weights already in dtype; no casts per layer
            return self.runner(images).float()

    @torch.no_grad()
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The class maps (N, K, h, w) in the model's dtype: `forward_head` of them is exactly `forward`'s logits."""
        images = self._input(images)
        with torch.autocast(images.device.type, enabled=False):
            return self.model.forward_features(images)

    @torch.no_grad()
    def forward_head(self, maps: torch.Tensor) -> torch.Tensor:
        """fp32 logits (N, K) of `forward_features`' maps."""
        with torch.autocast(maps.device.type, enabled=False):
            return self.model.forward_head(maps).float()


def optimize_for_inference(model: nn.Module, *, amp_dtype: torch.dtype | None = torch.bfloat16,
                           channels_last: bool = True, method: str = "eager",
                           example: torch.Tensor | None = None, fuse_relu: bool = True) -> InferenceModel:
    """A faster, frozen copy of ``model`` for inference (see the module docstring).

    Args:
        model: A NiN (or any model whose blocks are MLPConv); not modified.
        amp_dtype: The weights' and activations' dtype (bf16 where `select_precision` picks it); None keeps fp32.
        channels_last: Run in NHWC (oneDNN's fast layout on CPUs).
        method: "eager", "jit" or "compile".
        example: A batch (N, C, H, W) to trace with ("jit"); default one zero image of the model's input size.
        fuse_relu: On the CPU with method "eager", run each conv + ReLU as one oneDNN kernel (`fuse_conv_relu`:
            the same numbers, one memory pass fewer); exports pass False (the fused op is not ONNX).
    """
    assert method in METHODS, f"method must be one of {METHODS}, got {method!r}"
    dtype = amp_dtype or torch.float32
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    device = next(model.parameters()).device
    folded = fold_batch_norm(model).to(dtype=dtype, memory_format=memory_format)
    for p in folded.parameters():
        p.requires_grad_(False)
    if fuse_relu and method == "eager" and device.type == "cpu":
        folded = fuse_conv_relu(folded)
    runner: nn.Module = folded
    if method == "jit":
        if example is None:
            config = getattr(model, "config", None)
            size = (1, config.in_channels, config.input_size, config.input_size) if config else (1, 3, 32, 32)
            example = torch.zeros(size, device=device)
        example = example.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript; it still works
            runner = torch.jit.freeze(torch.jit.trace(folded, example))
    elif method == "compile":
        runner = torch.compile(folded)
    return InferenceModel(folded, runner, dtype, memory_format)


def inference_model(model: nn.Module, amp_dtype: torch.dtype | None) -> nn.Module:
    """The one inference path of nin: ``model`` as `evaluate`, `Classifier`, `nin predict` and `nin visualize` run it.

    An `InferenceModel` (batch norm folded, weights and activations in ``amp_dtype`` or fp32, channels_last,
    eager: the fastest method that needs no compiler, docs/performance.md) built from ``model``'s weights now;
    an `InferenceModel` passed in is returned as it is. Sets the process's malloc policy
    (`nin.runtime.keep_freed_memory`; ``NIN_KEEP_FREED_MEMORY=0`` leaves malloc alone).
    """
    if isinstance(model, InferenceModel):
        return model
    keep_freed_memory()  # the malloc policy the path's speed was measured with, whichever door built it
    return optimize_for_inference(model, amp_dtype=amp_dtype, channels_last=True, method="eager")


def predict_logits(model: nn.Module, images: torch.Tensor, *, amp_dtype: torch.dtype | None = None,
                   tta_flip: bool = False) -> torch.Tensor:
    """fp32 logits of a preprocessed batch; with ``tta_flip`` averaged with the mirrored batch's."""
    with autocast(images.device, amp_dtype):
        logits = model(images).float()
        if tta_flip:
            logits = 0.5 * (logits + model(images.flip(-1)).float())
    return logits


class InferencePipeline(nn.Module):
    """Images in, (fp32 logits (N, K), fp32 class maps (N, K, h, w)) out: preprocessing, the folded model, flips.

    ``images`` are uint8 (N, C, H, W), or floats on the 0..255 scale. The logits are exactly `predict_logits`'
    (what `nin evaluate` scores): the maps are computed once and the head applied to them, which is the folded
    model's own forward. With ``tta_flip`` the maps are the average of the image's maps and the mirrored image's
    maps mirrored back, so that (with the GAP head) their spatial means are the flip-averaged logits.
    """

    def __init__(self, preprocessing: Preprocessing, model: InferenceModel, tta_flip: bool) -> None:
        super().__init__()
        self.preprocessing = preprocessing
        self.model = model
        self.tta_flip = bool(tta_flip)

    @property
    def config(self):
        """The architecture's NiNConfig."""
        return self.model.model.config

    def train(self, mode: bool = True) -> InferencePipeline:
        super().train(False)  # inference only: dropout stays off whatever the caller asks
        return self

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """fp32 logits of an already preprocessed batch (= `predict_logits`)."""
        return predict_logits(self.model, batch, tta_flip=self.tta_flip)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocessing(images)
        maps = self.model.forward_features(x)  # (N, K, h, w) in the model's dtype
        logits = self.model.forward_head(maps)
        maps = maps.float()
        if self.tta_flip:
            mirrored = self.model.forward_features(x.flip(-1))
            logits = 0.5 * (logits + self.model.forward_head(mirrored))
            maps = 0.5 * (maps + mirrored.float().flip(-1))
        return logits, maps


def accuracy_tolerance(n: int) -> int:
    """How many of ``n`` test images another CPU's bf16 kernels may score differently from the recorded run's."""
    return max(1, math.ceil(n * BF16_TOLERANCE_PER_10000 / 10_000))


def agrees_with_record(correct: int, n: int, recorded_accuracy: float) -> bool:
    """Whether ``correct`` of ``n`` is the recorded accuracy, to within `accuracy_tolerance(n)` images: how every
    test and `nin reproduce` compare an accuracy measured here with one recorded on another CPU."""
    return abs(correct - round(recorded_accuracy * n)) <= accuracy_tolerance(n)
