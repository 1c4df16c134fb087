"""A trained model made faster for inference: batch norm folded into the convolutions, bf16 weights, NHWC.

    fast = optimize_for_inference(model, amp_dtype=torch.bfloat16)          # an nn.Module, eval only
    result = evaluate(fast, eval_loader, num_classes=10)                     # amp_dtype not needed any more

The returned module takes the same preprocessed fp32 (N, C, H, W) batches and returns fp32 logits, so
`evaluate`, `predict_logits` (test-time flips included) and the CLI can use it in place of the model. The
source model is left untouched (it keeps training); the copy is frozen at the weights it had when called.

``method``: "eager" runs the folded copy as ordinary PyTorch; "jit" also traces and freezes it with TorchScript
(one graph, constant weights); "compile" hands it to torch.compile (needs a C++ compiler, and time to compile).
docs/performance.md has the measurements behind the default.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from nin.layers import MLPConv

__all__ = ["InferenceModel", "fold_batch_norm", "optimize_for_inference", "inference_model"]

METHODS = ("eager", "jit", "compile")


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

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.dtype).contiguous(memory_format=self.memory_format)
        with torch.autocast(images.device.type, enabled=False):  # weights already in dtype; no casts per layer
            return self.runner(images).float()


def optimize_for_inference(model: nn.Module, *, amp_dtype: torch.dtype | None = torch.bfloat16,
                           channels_last: bool = True, method: str = "eager",
                           example: torch.Tensor | None = None) -> InferenceModel:
    """A faster, frozen copy of ``model`` for inference (see the module docstring).

    Args:
        model: A NiN (or any model whose blocks are MLPConv); not modified.
        amp_dtype: The weights' and activations' dtype (bf16 where `select_precision` picks it); None keeps fp32.
        channels_last: Run in NHWC (oneDNN's fast layout on CPUs).
        method: "eager", "jit" or "compile".
        example: A batch (N, C, H, W) to trace with ("jit"); default one zero image of the model's input size.
    """
    assert method in METHODS, f"method must be one of {METHODS}, got {method!r}"
    dtype = amp_dtype or torch.float32
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    device = next(model.parameters()).device
    folded = fold_batch_norm(model).to(dtype=dtype, memory_format=memory_format)
    for p in folded.parameters():
        p.requires_grad_(False)
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
    an `InferenceModel` passed in is returned as it is.
    """
    if isinstance(model, InferenceModel):
        return model
    return optimize_for_inference(model, amp_dtype=amp_dtype, channels_last=True, method="eager")
