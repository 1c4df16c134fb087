"""Every Network In Network model of the paper, built from a frozen config.

    from nin.models import get_model
    model = get_model("nin_cifar10")            # 966,986 parameters (trained weights: nin.get_model, nin.pretrained)
    maps = model.forward_features(images)       # (N, 10, 8, 8) category-confidence maps
    logits = model.forward_head(maps)           # (N, 10) by global average pooling

A model is three (four for ImageNet) MLPConv blocks; every block but the last is followed by 3×3
stride-2 pooling that rounds up (32 -> 16 -> 8, 28 -> 14 -> 7, as cuda-convnet and Caffe do), and by
dropout where the paper puts it; the last block emits one confidence map per class, and global
average pooling turns each map into its class's score.

Mapping to the original layers. The convolutions appear in the order of the authors' definitions,
so their weights map one to one onto these state_dict keys (CIFAR, SVHN and MNIST models):

    conv1 -> blocks.0.convs.0    cccp1 -> blocks.0.convs.1    cccp2 -> blocks.0.convs.2
    conv2 -> blocks.1.convs.0    cccp3 -> blocks.1.convs.1    cccp4 -> blocks.1.convs.2
    conv3 -> blocks.2.convs.0    cccp5 -> blocks.2.convs.1    cccp6 -> blocks.2.convs.2

and for the Caffe zoo ImageNet model conv1, cccp1, cccp2, conv2, cccp3, cccp4, conv3, cccp5, cccp6,
conv4-1024, cccp7-1024, cccp8-1024 in the same way over blocks.0 to blocks.3.
`original_layer_names(model)` returns this mapping. Caffe and cuda-convnet store weights as
(out, in, k, k) like PyTorch, so a copy needs no transposition.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nin.errors import NinError
from nin.layers import Dropout, GlobalAvgPool, MLPConv

__all__ = [
    "MLPConvSpec",
    "NiNConfig",
    "UnknownModelError",
    "NiN",
    "register_model",
    "get_model",
    "list_models",
    "model_config",
    "original_layer_names",
    "multiply_adds",
]


def _check(condition: bool, message: str) -> None:
    # a ValueError, not an assert: the checks hold under `python -O` too
    if not condition:
        raise ValueError(message)


def _as_bool(name: str, value: object) -> bool:
    # "no" or 0 is truthy or falsy by accident: a field that switches something is a bool (numpy's bool too)
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        value = bool(value)
    _check(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class MLPConvSpec:
    """One mlpconv block and what follows it."""

    kernel_size: int
    widths: tuple[int, ...]  # the k×k conv's width, then the widths of the 1×1 micro-MLP layers
    stride: int = 1  # of the k×k conv (4 for ImageNet conv1)
    padding: int | None = None  # of the k×k conv; None = kernel_size // 2
    pool: str | None = "max"  # "max", "avg" or None: 3×3 stride-2 pooling after the block
    dropout: bool = True  # dropout on this block's (pooled) output, as the paper puts it

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        _check(bool(self.widths) and min(self.widths) >= 1, f"widths must be one or more positive numbers, got {self.widths}")
        _check(self.kernel_size >= 1 and self.stride >= 1,
               f"kernel_size and stride must be at least 1, got {self.kernel_size} and {self.stride}")
        _check(self.pool in ("max", "avg", None), f"pool must be 'max', 'avg' or None, got {self.pool!r}")
        object.__setattr__(self, "dropout", _as_bool("dropout", self.dropout))


@dataclass(frozen=True)
class NiNConfig:
    """The architecture contract: every checkpoint stores it, and it rebuilds the exact model.

    The defaults reproduce the paper (no batch norm, ReLU on the class maps, N(0, 0.05²) init).
    """

    in_channels: int = 3
    num_classes: int = 10  # equals the last block's last width for a GAP head (checked)
    input_size: int = 32  # height = width of the input the model is built for (sizes the FC head)
    blocks: tuple[MLPConvSpec, ...] = ()
    pool_kernel: int = 3  # NiN paper / cuda-convnet: 3×3 pooling, stride 2, rounding up
    pool_stride: int = 2
    dropout: float = 0.5  # rate of every dropout layer; paper: 0.5 between mlpconv blocks
    batch_norm: bool = False  # False reproduces the paper; the fast recipe turns it on
    class_map_relu: bool = True  # paper: the class-map layer has a ReLU before GAP
    init: str = "paper"  # "paper": N(0, init_std²) weights, zero biases; "kaiming": He normal, class maps N(0, 0.01²)
    init_std: float | tuple[float, ...] = 0.05  # paper std; a tuple gives one std per conv, in order
    head: str = "gap"  # "gap" (NiN); "fc": a fully connected layer on the flattened maps (paper section 4.6)
    head_hidden: tuple[int, ...] = ()  # hidden widths of the FC head (ReLU between), () = one linear layer
    head_dropout: float = 0.0  # dropout before each FC layer of the FC head

    def __post_init__(self) -> None:
        blocks = tuple(b if isinstance(b, MLPConvSpec) else MLPConvSpec(**b) for b in self.blocks)
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "head_hidden", tuple(int(w) for w in self.head_hidden))
        if isinstance(self.init_std, list):
            object.__setattr__(self, "init_std", tuple(float(s) for s in self.init_std))
        _check(bool(blocks), "NiNConfig needs at least one block")
        object.__setattr__(self, "batch_norm", _as_bool("batch_norm", self.batch_norm))
        object.__setattr__(self, "class_map_relu", _as_bool("class_map_relu", self.class_map_relu))
        _check(blocks[-1].pool is None, "the last block feeds the head directly: its pool must be None")
        _check(self.head in ("gap", "fc"), f"head must be 'gap' or 'fc', got {self.head!r}")
        _check(self.init in ("paper", "kaiming"), f"init must be 'paper' or 'kaiming', got {self.init!r}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(0.0 <= self.head_dropout < 1.0, f"head_dropout must be in [0, 1), got {self.head_dropout}")
        _check(self.num_classes >= 1, f"num_classes must be at least 1, got {self.num_classes}")
        _check(self.in_channels >= 1, f"in_channels must be at least 1, got {self.in_channels}")
        _check(1 <= self.input_size <= 4096, f"input_size must be in [1, 4096], got {self.input_size}")
        _check(self.pool_kernel >= 1 and self.pool_stride >= 1, (
            f"pool_kernel and pool_stride must be at least 1, got {self.pool_kernel} and {self.pool_stride}"))
        stds = self.init_std if isinstance(self.init_std, tuple) else (self.init_std,)
        _check(all(s > 0 for s in stds), f"init_std must be positive, got {self.init_std}")
        _check(all(w >= 1 for w in self.head_hidden), f"head_hidden widths must be positive, got {self.head_hidden}")
        if self.head == "gap":
            _check(blocks[-1].widths[-1] == self.num_classes, (
                f"with global average pooling the last block must emit one map per class: "
                f"last width {blocks[-1].widths[-1]} != num_classes {self.num_classes}"
            ))
        if isinstance(self.init_std, tuple):
            _check(len(self.init_std) == self.num_convs,
                   f"init_std gives {len(self.init_std)} stds for {self.num_convs} convolutions")

    @property
    def num_convs(self) -> int:
        return sum(len(b.widths) for b in self.blocks)

    def feature_size(self, input_size: int | None = None) -> int:
        """Height (= width) of the confidence maps for a square input (default: input_size)."""
        size = self.input_size if input_size is None else input_size
        for block in self.blocks:
            padding = block.kernel_size // 2 if block.padding is None else block.padding
            size = (size + 2 * padding - block.kernel_size) // block.stride + 1
            if block.pool is not None:  # ceil mode, as cuda-convnet and Caffe
                size = math.ceil((size - self.pool_kernel) / self.pool_stride) + 1
        return size

    def to_dict(self) -> dict:
        """Plain JSON-ready dict; `NiNConfig.from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NiNConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown NiNConfig fields: {sorted(unknown)}")
        data = dict(data)
        data["blocks"] = tuple(MLPConvSpec(**b) if isinstance(b, dict) else b for b in data.get("blocks", ()))
        for key in ("head_hidden",):
            if key in data:
                data[key] = tuple(data[key])
        if isinstance(data.get("init_std"), list):
            data["init_std"] = tuple(data["init_std"])
        return cls(**data)


class NiN(nn.Module):
    """Network In Network: stacked MLPConv blocks, then global average pooling (or an FC head).

    ``forward_features`` gives the last block's maps (N, K, h, w), one category-confidence map per
    class; ``forward_head`` turns them into logits (N, K); ``forward`` does both.
    """

    def __init__(self, config: NiNConfig) -> None:
        super().__init__()
        self.config = config
        self.classes: list[str] | None = None  # the class names, when trained weights say them (nin.pretrained)
        blocks = config.blocks
        self.blocks = nn.ModuleList()
        self.pools = nn.ModuleList()
        self.drops = nn.ModuleList()
        channels = config.in_channels
        for i, spec in enumerate(blocks):
            last = i == len(blocks) - 1
            self.blocks.append(
                MLPConv(
                    channels,
                    spec.widths,
                    kernel_size=spec.kernel_size,
                    stride=spec.stride,
                    padding=spec.padding,
                    last_activation=config.class_map_relu if last else True,
                    batch_norm=config.batch_norm,
                )
            )
            self.pools.append(_pool(spec.pool, config.pool_kernel, config.pool_stride))
            self.drops.append(Dropout(config.dropout) if spec.dropout and config.dropout > 0 else nn.Identity())
            channels = spec.widths[-1]

        if config.head == "gap":
            self.head = GlobalAvgPool()
        else:
            layers: list[nn.Module] = [nn.Flatten()]
            width = channels * config.feature_size() ** 2
            outputs = (*config.head_hidden, config.num_classes)
            for i, hidden in enumerate(outputs):
                if config.head_dropout > 0:
                    layers.append(nn.Dropout(config.head_dropout))
                layers.append(nn.Linear(width, hidden))
                if i < len(outputs) - 1:  # ReLU between hidden layers, none after the scores
                    layers.append(nn.ReLU(inplace=True))
                width = hidden
            self.head = nn.Sequential(*layers)
        self.reset_parameters()

    @property
    def class_map_layer(self) -> nn.Conv2d:
        """The last convolution: it emits the category-confidence maps (the paper's cccp6)."""
        return self.blocks[-1].convs[-1]

    def reset_classifier(self, num_classes: int, classes: list[str] | None = None) -> None:
        """Give the model ``num_classes`` fresh class maps (timm's ``reset_classifier``): the class-map layer (and the
        FC head's last layer) is rebuilt at the new width and initialised as ``config.init`` says; every other
        weight is kept, so trained features can be fine-tuned on new classes. ``config`` follows; ``classes``
        (names) replaces the model's class names (None when not given)."""
        _check(num_classes >= 1, f"num_classes must be at least 1, got {num_classes}")
        config = self.config
        if config.head == "gap":
            last = config.blocks[-1]
            blocks = (*config.blocks[:-1], dataclasses.replace(last, widths=(*last.widths[:-1], num_classes)))
            config = dataclasses.replace(config, num_classes=num_classes, blocks=blocks)
            block = self.blocks[-1]
            old = block.convs[-1]
            conv = nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None)
            norm = nn.BatchNorm2d(num_classes) if isinstance(block.norms[-1], nn.BatchNorm2d) else nn.Identity()
            block.convs[-1], block.norms[-1] = conv.to(old.weight), norm.to(old.weight)
            block.widths = (*block.widths[:-1], num_classes)
            self._init_class_map(conv, len(self.convs()) - 1)
            if isinstance(norm, nn.BatchNorm2d):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
        else:
            config = dataclasses.replace(config, num_classes=num_classes)
            old = self.head[-1]
            linear = nn.Linear(old.in_features, num_classes).to(old.weight)
            self.head[-1] = linear
            self._init_linear(linear)
        self.config = config
        self.classes = list(classes) if classes is not None else None

    def convs(self) -> list[nn.Conv2d]:
        """Every convolution, in the order of the authors' definitions (conv1, cccp1, ...)."""
        return [conv for block in self.blocks for conv in block.convs]

    def _init_class_map(self, conv: nn.Conv2d, index: int) -> None:
        """The ``index``-th conv as the paper initialises it (N(0, std²)), or the class maps as kaiming does."""
        config = self.config
        stds = config.init_std if isinstance(config.init_std, tuple) else (config.init_std,) * (index + 1)
        if config.init == "paper":
            nn.init.normal_(conv.weight, 0.0, stds[index])  # NiN paper / cuda-convnet: N(0, 0.05²), zero biases
        else:
            nn.init.normal_(conv.weight, 0.0, 0.01)  # small class maps at start, as SqueezeNet's final conv
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)

    def _init_linear(self, linear: nn.Linear) -> None:
        if self.config.init == "paper":
            nn.init.normal_(linear.weight, 0.0, 0.05)  # the paper's std
        else:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)

    def reset_parameters(self) -> None:
        """Initialize every conv / linear layer as ``config.init`` says; batch-norm layers get (1, 0)."""
        config = self.config
        for index, conv in enumerate(self.convs()):
            if config.init == "paper" or conv is self.class_map_layer:
                self._init_class_map(conv, index)  # paper: N(0, std²) for every conv; kaiming: the class maps only
            else:
                nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                self._init_linear(module)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, h, w): the last block's maps, one confidence map per class."""
        for block, pool, drop in zip(self.blocks, self.pools, self.drops):
            x = drop(pool(block(x)))
        return x

    def forward_head(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, K, h, w) -> (N, K) logits: global average pooling (or the FC head of the ablation)."""
        return self.head(maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _pool(kind: str | None, kernel: int, stride: int) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(kernel, stride, ceil_mode=True)
    if kind == "avg":
        # Caffe divides a border window clipped by ceil mode by its clipped size; so does PyTorch with padding 0
        return nn.AvgPool2d(kernel, stride, ceil_mode=True)
    return nn.Identity()


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_MODELS: dict[str, Callable[..., NiNConfig]] = {}


class UnknownModelError(NinError, KeyError):
    """A model name the registry does not have, or a NiNConfig field that does not exist (a KeyError too)."""

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0]) if self.args else ""


def register_model(fn: Callable[..., NiNConfig]) -> Callable[..., NiNConfig]:
    """Register a function returning a NiNConfig under its own name; names must be unique."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def model_config(name: str, **overrides) -> NiNConfig:
    """The NiNConfig of a registered model, with fields replaced by ``overrides``.

    ``num_classes`` also changes the class-map layer's width (the last block's last width).
    """
    if name not in _MODELS:
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    config = _MODELS[name]()
    known = {f.name for f in dataclasses.fields(NiNConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise UnknownModelError(f"unknown NiNConfig field(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
    if "num_classes" in overrides and config.head == "gap" and "blocks" not in overrides:
        last = config.blocks[-1]
        widths = (*last.widths[:-1], int(overrides["num_classes"]))
        overrides["blocks"] = (*config.blocks[:-1], dataclasses.replace(last, widths=widths))
    return dataclasses.replace(config, **overrides)


def get_model(name: str, **overrides) -> NiN:
    """Build a registered model, freshly initialised: ``get_model("nin_cifar10", batch_norm=True, dropout=0.3)``.

    Architectures only: trained weights are `nin.get_model(name, weights=...)` (`nin.pretrained`), one layer up.
    """
    if "weights" in overrides or "pretrained" in overrides:
        raise TypeError("nin.models.get_model builds architectures; for trained weights use "
                        "nin.get_model(name, weights=...) (nin.pretrained.get_model)")
    return NiN(model_config(name, **overrides))


def multiply_adds(model: nn.Module, image_shape: tuple[int, int, int] | None = None) -> int:
    """Multiply-adds of one image's forward pass, counted over Conv2d and Linear layers.

    Args:
        model: Any module; a NiN's own input shape is used when ``image_shape`` is None.
        image_shape: (C, H, W) of one input image.
    """
    if image_shape is None:
        image_shape = (model.config.in_channels, model.config.input_size, model.config.input_size)
    total = 0

    def count(module: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += output[0].numel() * module.weight[0].numel()  # outputs of one image × inputs per output

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return total


def original_layer_names(model: NiN) -> dict[str, str]:
    """Map the authors' layer names (conv1, cccp1, ...) to this model's state_dict prefixes."""
    names: dict[str, str] = {}
    conv_index, cccp_index = 0, 0
    for b, block in enumerate(model.blocks):
        suffix = "-1024" if b == 3 else ""  # the zoo's ImageNet model: conv4-1024, cccp7-1024, cccp8-1024
        for i, _ in enumerate(block.convs):
            if i == 0:
                conv_index += 1
                name = f"conv{conv_index}{suffix}"
            else:
                cccp_index += 1
                name = f"cccp{cccp_index}{suffix}"
            names[name] = f"blocks.{b}.convs.{i}"
    return names


_CIFAR_BLOCKS = (
    MLPConvSpec(5, (192, 160, 96), pool="max"),  # conv1, cccp1, cccp2, pool1, dropout
    MLPConvSpec(5, (192, 192, 192), pool="max"),  # conv2, cccp3, cccp4, pool2, dropout
    MLPConvSpec(3, (192, 192, 10), pool=None, dropout=False),  # conv3, cccp5, cccp6 = class maps
)


@register_model
def nin_cifar10() -> NiNConfig:
    """CIFAR-10, the paper's definition (cuda-convnet): max, max, GAP 8×8; 966,986 parameters."""
    return NiNConfig(in_channels=3, num_classes=10, input_size=32, blocks=_CIFAR_BLOCKS)


@register_model
def nin_cifar10_caffe() -> NiNConfig:
    """CIFAR-10, the authors' Caffe zoo port: the second pooling is average pooling."""
    blocks = (_CIFAR_BLOCKS[0], dataclasses.replace(_CIFAR_BLOCKS[1], pool="avg"), _CIFAR_BLOCKS[2])
    return NiNConfig(in_channels=3, num_classes=10, input_size=32, blocks=blocks)


@register_model
def nin_cifar100() -> NiNConfig:
    """CIFAR-100: as CIFAR-10 with 100 class maps; cuda-convnet init conv1 0.001, cccp1-2 0.01."""
    blocks = (*_CIFAR_BLOCKS[:2], dataclasses.replace(_CIFAR_BLOCKS[2], widths=(192, 192, 100)))
    init_std = (0.001, 0.01, 0.01, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05)
    return NiNConfig(in_channels=3, num_classes=100, input_size=32, blocks=blocks, init_std=init_std)


@register_model
def nin_svhn() -> NiNConfig:
    """SVHN: wider blocks, 5×5 kernels throughout; 1,986,026 parameters."""
    blocks = (
        MLPConvSpec(5, (128, 96, 64), pool="max"),
        MLPConvSpec(5, (320, 256, 128), pool="max"),
        MLPConvSpec(5, (384, 256, 10), pool=None, dropout=False),
    )
    return NiNConfig(in_channels=3, num_classes=10, input_size=32, blocks=blocks)


@register_model
def nin_mnist() -> NiNConfig:
    """MNIST, 1×28×28: 28 -> 14 -> 7, GAP 7×7; 349,674 parameters."""
    blocks = (
        MLPConvSpec(5, (96, 64, 48), pool="max"),
        MLPConvSpec(5, (128, 96, 48), pool="max"),
        MLPConvSpec(5, (128, 96, 10), pool=None, dropout=False),
    )
    return NiNConfig(in_channels=1, num_classes=10, input_size=28, blocks=blocks)


@register_model
def nin_imagenet() -> NiNConfig:
    """ImageNet, the Caffe zoo model (224×224): 224 -> 54 -> 27 -> 13 -> 6, GAP 6×6; 7,595,176 parameters.

    Dropout only before the last block (after pool3), as in the zoo definition; He init.
    """
    blocks = (
        MLPConvSpec(11, (96, 96, 96), stride=4, padding=0, pool="max", dropout=False),
        MLPConvSpec(5, (256, 256, 256), padding=2, pool="max", dropout=False),
        MLPConvSpec(3, (384, 384, 384), padding=1, pool="max", dropout=True),
        MLPConvSpec(3, (1024, 1024, 1000), padding=1, pool=None, dropout=False),
    )
    # The paper gives no init for its ImageNet model; N(0, 0.05²) explodes through its 1024-wide layers, so He init
    return NiNConfig(in_channels=3, num_classes=1000, input_size=224, blocks=blocks, init="kaiming")


# The paper's section 4.6 ablations (Table 5), CIFAR-10. Same blocks, only the head differs: the FC head
# replaces global average pooling by a learned linear map of the flattened 10×8×8 maps.
@register_model
def nin_cifar10_fc() -> NiNConfig:
    """mlpconv + fully connected head (no dropout in the head)."""
    return dataclasses.replace(nin_cifar10(), head="fc")


@register_model
def nin_cifar10_fc_dropout() -> NiNConfig:
    """mlpconv + fully connected head with dropout 0.5 before it."""
    return dataclasses.replace(nin_cifar10(), head="fc", head_dropout=0.5)


# A conventional CNN of linear convolutions (one k×k conv + ReLU per block) with the same layout.
_CNN_BLOCKS = (
    MLPConvSpec(5, (192,), pool="max"),
    MLPConvSpec(5, (192,), pool="max"),
    MLPConvSpec(3, (10,), pool=None, dropout=False),
)


@register_model
def cnn_cifar10_gap() -> NiNConfig:
    """Conventional CNN (three linear convs) with a global average pooling head."""
    return NiNConfig(in_channels=3, num_classes=10, input_size=32, blocks=_CNN_BLOCKS)


@register_model
def cnn_cifar10_fc() -> NiNConfig:
    """Conventional CNN with a fully connected head."""
    return dataclasses.replace(cnn_cifar10_gap(), head="fc")


@register_model
def cnn_cifar10_fc_dropout() -> NiNConfig:
    """Conventional CNN with a fully connected head and dropout 0.5 before it."""
    return dataclasses.replace(cnn_cifar10_gap(), head="fc", head_dropout=0.5)
