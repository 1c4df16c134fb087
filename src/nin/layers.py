"""The two building blocks of Network In Network, usable in any PyTorch model.

    from nin.layers import MLPConv, GlobalAvgPool
    block = MLPConv(3, (192, 160, 96), kernel_size=5, padding=2)   # conv1, cccp1, cccp2 of the paper

MLPConv ("mlpconv layer", NiN paper section 3.1) replaces the linear filter of a convolution with a
micro network: a k×k convolution followed by 1×1 convolutions ("cascaded cross channel parametric
pooling", cccp), each followed by a ReLU, f = max(w·x + b, 0). Slid over the input, it is a small
multilayer perceptron applied to every k×k patch.

GlobalAvgPool (section 3.2) averages each feature map into one number; when the last MLPConv emits one
map per class, these averages are the class scores and the maps are category-confidence maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["MLPConv", "GlobalAvgPool", "Dropout", "patch_whitening_"]


class MLPConv(nn.Module):
    """One mlpconv block: a k×k convolution, then 1×1 convolutions, each followed by an activation.

    Args:
        in_channels: Channels of the input.
        widths: Output channels of every layer: the k×k convolution's first, then each 1×1 layer's.
            A single width gives a plain convolution + activation (a "linear" conv layer of the paper).
        kernel_size: Size k of the first convolution. The 1×1 layers always have kernel 1.
        stride: Stride of the first convolution.
        padding: Zero padding of the first convolution; ``None`` keeps the size for odd k (k // 2).
        last_activation: Whether the last layer is followed by the activation. The paper's class-map
            layer has one (its ReLU precedes global average pooling); ``False`` leaves it linear.
        batch_norm: Insert BatchNorm2d before every activation (not in the paper). Layers with a
            norm have no bias; a last layer without an activation keeps its bias and gets no norm.
        activation: Factory of the activation module; ``nn.ReLU`` as in the paper.

    Shape:
        (N, in_channels, H, W) -> (N, widths[-1], H', W'), H' = (H + 2 padding - k) // stride + 1.

    The layers are ``convs[0]`` (the paper's conv layer), ``convs[1:]`` (its cccp layers), and
    ``norms[i]`` (``nn.Identity`` when ``batch_norm`` is off), so state_dict keys read
    ``convs.0.weight``, ``convs.1.weight``, ...
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        *,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        last_activation: bool = True,
        batch_norm: bool = False,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        # ValueErrors, not asserts: the checks hold under `python -O` too
        if in_channels <= 0:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        if not widths or any(w <= 0 for w in widths):
            raise ValueError(f"widths must be one or more positive numbers, got {widths}")
        if kernel_size <= 0 or stride <= 0:
            raise ValueError(f"kernel_size and stride must be positive, got kernel_size={kernel_size}, stride={stride}")
        if padding is None:
            padding = kernel_size // 2
        self.widths = widths
        self.last_activation = last_activation

        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.acts = nn.ModuleList()
        channels = in_channels
        for i, width in enumerate(widths):
            first = i == 0
            has_act = last_activation or i < len(widths) - 1
            norm = batch_norm and has_act
            self.convs.append(
                nn.Conv2d(
                    channels,
                    width,
                    kernel_size=kernel_size if first else 1,
                    stride=stride if first else 1,
                    padding=padding if first else 0,
                    bias=not norm,
                )
            )
            self.norms.append(nn.BatchNorm2d(width) if norm else nn.Identity())
            self.acts.append(activation() if has_act else nn.Identity())
            channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm, act in zip(self.convs, self.norms, self.acts):
            x = act(norm(conv(x)))
        return x


class GlobalAvgPool(nn.Module):
    """Global average pooling: (N, K, H, W) -> (N, K), the spatial mean of every map.

    With one map per class this is the whole classifier of NiN: no fully connected layer and no
    parameters, so nothing can overfit here (paper section 3.2).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class Dropout(nn.Dropout):
    """Inverted dropout (zero with probability p, scale the rest by 1/(1 - p)) with a cheaper random mask.

    ``nn.Dropout`` draws one random float per element (``bernoulli_``), about a sixth of a bf16 training step on
    a CPU. This draws 64 random bits per four elements and keeps an element when its 16 bits fall below
    ``round((1 - p)·65536)``: the keep probability is p rounded to 1/65536 (exact for p = 0.25, 0.5), and the
    scale is the inverse of that exact keep probability, so the expectation is unchanged. Same module, no
    state, identity in eval mode; draws from the default generator, like ``nn.Dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep_count = round((1.0 - self.p) * 65536)
        if not self.training or self.p == 0.0 or keep_count == 0 or not _dense(x):
            return super().forward(x)
        words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64, device=x.device)
        bits = words.view(torch.int16)[: x.numel()].as_strided(x.shape, x.stride())  # the mask in x's memory layout
        mask = (bits < keep_count - 32768).to(x.dtype).mul_(65536 / keep_count)
        return x.mul_(mask) if self.inplace else x * mask


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def patch_whitening_(conv: nn.Conv2d, images: torch.Tensor, *, max_patches: int = 500_000, eps: float = 5e-4) -> int:
    """Initialise a convolution's first filters to whiten its input patches; returns how many it set.

    The eigenvectors of the second moment of the k×k input patches (their covariance when the input has zero
    mean, as per-channel standardization gives), each divided by the square root of its eigenvalue (+ ``eps``),
    are filters whose outputs are decorrelated with unit variance: a well-conditioned first layer (the
    patch-whitening init of fast CIFAR-10 trainers such as airbench). Each comes with its negation, so a ReLU
    after the layer keeps both signs: ``2·d`` filters for ``d = channels·k²`` patch dimensions, largest
    eigenvalues first, at most ``out_channels`` (rounded down to an even count). The remaining filters and the
    bias keep their values. ``images`` (N, C, H, W) are the layer's input (preprocessed); the patches are taken
    with the convolution's stride and zero padding, from images evenly spaced through the set, up to
    ``max_patches`` of them.
    """
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.dilation != (1, 1):
        raise ValueError(f"patch_whitening_ needs an nn.Conv2d with groups 1 and dilation 1, got {conv!r}")
    if images.dim() != 4 or images.shape[1] != conv.in_channels or len(images) == 0:
        raise ValueError(f"images must be (N >= 1, {conv.in_channels}, H, W), got {tuple(images.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if max_patches < 1:
        raise ValueError(f"max_patches must be at least 1, got {max_patches}")
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    padding = conv.padding if conv.padding_mode == "zeros" and not isinstance(conv.padding, str) else (0, 0)
    rows = (images.shape[2] + 2 * padding[0] - kh) // sh + 1
    cols = (images.shape[3] + 2 * padding[1] - kw) // sw + 1
    if rows < 1 or cols < 1:
        raise ValueError(f"images of {images.shape[2]}×{images.shape[3]} px hold no {kh}×{kw} patch")
    count_images = max(1, min(len(images), max_patches // (rows * cols)))
    picked = torch.linspace(0, len(images) - 1, count_images, device=images.device).round().long()
    patches = nn.functional.unfold(images[picked].float(), (kh, kw), padding=padding, stride=(sh, sw))  # (n, d, L)
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
    if not torch.isfinite(patches).all():
        raise ValueError("images hold NaN or infinite values")
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))  # ascending
    count = min(conv.out_channels // 2, len(eigenvalues))
    filters = (eigenvectors.T / (eigenvalues.clamp_min(0) + eps).sqrt()[:, None]).flip(0)[:count]
    filters = filters.reshape(count, conv.in_channels, kh, kw).to(conv.weight.dtype)
    conv.weight[:count].copy_(filters)
    conv.weight[count : 2 * count].copy_(-filters)
    return 2 * count
