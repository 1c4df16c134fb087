"""The paper's preprocessing (pylearn2's GCN, ZCA, LeCun LCN), batched augmentation, and the image preset.

Preprocessing runs once per data set on whole tensors; augmentation runs once per batch, never per image.

    preprocessing = fit_preprocessing("gcn_zca", train.images)   # an nn.Module: uint8 (N, C, H, W) -> float32
    batch = ImageTransform(preprocessing, 32, 3)(["cat.jpg", pil_image, uint8_tensor])   # what weights.transforms() is

`Preprocessing` is the one copy of the arithmetic: training, evaluation, `Classifier`, the exported graphs and
`nin serve` all run it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from nin.data.datasets import LIGHT_ON_DARK
from nin.data.images import model_pixels, read_image, square_of
from nin.errors import NinError

PREPROCESSING_KINDS = ("gcn_zca", "gcn_lcn", "scale", "standardize")
FITTED_KINDS = ("gcn_zca", "standardize")  # the kinds with statistics fitted on the training images
GCN_SCALE = 55.0  # pylearn2 CIFAR-10 gcn=55.: global_contrast_normalize(scale=55, sqrt_bias=0, use_std=False)
ZCA_FILTER_BIAS = 0.1  # pylearn2 ZCA(filter_bias=0.1), as in the Maxout CIFAR-10 setup
APPLY_CHUNK = 8192  # images per chunk when preprocessing a whole split (bounds float32 temporaries)


def gcn(x: torch.Tensor, scale: float = GCN_SCALE, eps: float = 1e-8) -> torch.Tensor:
    """Global contrast normalization, exactly pylearn2's `global_contrast_normalize(scale, sqrt_bias=0, use_std=False)`.

    Each image (all C*H*W values together) has its mean subtracted and is divided by `norm / scale`, where norm is
    its L2 norm; divisors below `eps` (pylearn2's min_divisor) are replaced by 1, so a constant image becomes 0.

    Args:
        x: (N, ...) images, any numeric dtype (pixel units do not matter except for `eps`).
        scale: Target L2 norm of every image.
        eps: pylearn2's min_divisor.

    Returns:
        float tensor of x's shape (float32 unless x is float64).
    """
    flat = x.flatten(1)  # not reshape(len(x), -1): a traced len() would freeze the batch size of an exported graph
    flat = flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32)
    centered = flat - flat.mean(dim=1, keepdim=True)
    divisor = centered.square().sum(dim=1, keepdim=True).sqrt() / scale
    divisor = torch.where(divisor < eps, torch.ones_like(divisor), divisor)
    return (centered / divisor).reshape_as(x)


class Zca(nn.Module):
    """ZCA whitening as pylearn2's `ZCA(filter_bias=0.1)`: W = V diag(1/sqrt(λ + bias)) Vᵀ of the data covariance.

    The covariance is XᵀX / N of the mean-centred data (pylearn2 divides by N, not N - 1); it is accumulated with
    float32 matrix products in chunks summed in float64, and eigendecomposed in float64 by `torch.linalg.eigh`.
    Buffers ``mean`` (D,), ``matrix`` (D, D) and ``filter_bias`` (a 0-d tensor) are its state_dict.
    """

    def __init__(self, filter_bias: float = ZCA_FILTER_BIAS) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(0))  # (D,) float32
        self.register_buffer("matrix", torch.zeros(0, 0))  # (D, D) float32, symmetric
        self.register_buffer("filter_bias", torch.tensor(float(filter_bias)))
        self.eigenvalues: torch.Tensor | None = None  # (D,) float64 covariance spectrum, ascending; fit() only

    @property
    def fitted(self) -> bool:
        return self.matrix.numel() > 0

    def fit(self, x: torch.Tensor, chunk_size: int = 10_000) -> Zca:
        """Fit the mean and whitening matrix on (N, D) training features (float), and return self."""
        assert x.ndim == 2, f"Zca.fit expects (N, D) features, got shape {tuple(x.shape)}"
        mean = x.double().mean(dim=0)
        covariance = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        for start in range(0, len(x), chunk_size):
            centered = (x[start : start + chunk_size].double() - mean).float()
            covariance += (centered.T @ centered).double()
        covariance /= len(x)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clamp_min(0.0)  # round-off can make the null directions (GCN) slightly negative
        bias = float(self.filter_bias)
        matrix = (eigenvectors / (eigenvalues + bias).sqrt()) @ eigenvectors.T
        self.mean, self.matrix, self.eigenvalues = mean.float(), matrix.float(), eigenvalues
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten (N, D) features: (x - mean) @ W, in float32."""
        if not torch.jit.is_tracing():  # a trace records no Python check
            assert self.fitted, "Zca is not fitted; call fit() or load its state first"
        return (x.float() - self.mean.to(x.device)) @ self.matrix.to(x.device)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from a state_dict (a file's ``preprocess.zca.*`` tensors); an old file without filter_bias keeps
        the default."""
        self.mean, self.matrix = state["mean"].float(), state["matrix"].float()
        if "filter_bias" in state:
            self.filter_bias = state["filter_bias"].float().reshape(())


def gaussian_kernel(kernel_size: int = 7, sigma: float = 2.0) -> torch.Tensor:
    """pylearn2's `gaussian_filter`: a (k, k) Gaussian with sigma 2 pixels, normalised to sum 1."""
    offsets = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    kernel = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    return kernel / kernel.sum()


def lcn(x: torch.Tensor, kernel_size: int = 7, threshold: float = 1e-4) -> torch.Tensor:
    """LeCun local contrast normalization, as pylearn2's `lecun_lcn`, on every channel separately.

    Per channel: subtract the Gaussian-weighted local mean; divide by max(per-image mean of d, d, threshold)
    where d = sqrt(Gaussian-weighted local sum of x²). pylearn2 takes d from x², not from the centred values,
    and pads with zeros ("full" convolution cropped back to the image); both are kept here.

    Args:
        x: float (N, C, H, W).
        kernel_size: Gaussian window (odd); the paper uses 7.
        threshold: Smallest divisor.

    Returns:
        float tensor of x's shape and dtype.
    """
    # one (1, 1, k, k) kernel over every channel as an image of its own: a constant kernel, so exported graphs
    # (ONNX, TorchScript) hold it as a constant and take any number of channels and any image size
    weight = gaussian_kernel(kernel_size).to(device=x.device, dtype=x.dtype)[None, None]

    def local(values: torch.Tensor) -> torch.Tensor:  # Gaussian-weighted neighbourhood sum, zero padding
        planes = values.reshape(-1, 1, values.shape[-2], values.shape[-1])
        return F.conv2d(planes, weight, padding=kernel_size // 2).reshape_as(values)

    centered = x - local(x)
    local_norm = local(x.square()).clamp_min(0.0).sqrt()
    per_image_mean = local_norm.mean(dim=(2, 3), keepdim=True)
    divisor = torch.maximum(local_norm, per_image_mean).clamp_min(threshold)
    return centered / divisor


class Preprocessing(nn.Module):
    """A fitted preprocessing as a module: uint8 (N, C, H, W) -> float32 (N, C, H, W), the same for train and test.

    Kinds:
        "gcn_zca": GCN (scale 55) then ZCA (filter bias 0.1) fitted on the training split. CIFAR-10/100.
        "gcn_lcn": GCN (scale 55) then 7x7 LeCun LCN per channel. SVHN. Nothing to fit.
        "scale": x / 255. MNIST.
        "standardize": per-channel (x / 255 - mean) / std, mean and std of the training split.

    Float input (values on the 0..255 scale) is accepted too. The fitted statistics are buffers (``zca.mean``,
    ``zca.matrix``, ``zca.filter_bias``; or ``mean``, ``std``), so its state_dict is what weights files store
    under ``preprocess.``, and its forward is written in traceable operations: the exported graphs and `nin
    serve` run this very module. A whole split goes through in chunks of `APPLY_CHUNK` images.
    """

    def __init__(self, kind: str, state: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        assert kind in PREPROCESSING_KINDS, f"kind must be one of {PREPROCESSING_KINDS}, got {kind!r}"
        self.kind = kind
        self.zca: Zca | None = Zca() if kind == "gcn_zca" else None
        if kind == "standardize":
            self.register_buffer("mean", torch.zeros(0))  # (C,)
            self.register_buffer("std", torch.ones(0))
        else:
            self.mean = self.std = None
        if state is not None:
            self.load_state(state)

    def _transform(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "scale":
            return images.float() / 255.0
        if self.kind == "standardize":
            mean, std = self.mean.to(images.device), self.std.to(images.device)
            return (images.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        normalized = gcn(images.float())
        if self.kind == "gcn_lcn":
            return lcn(normalized)
        return self.zca(normalized.flatten(1)).reshape_as(normalized)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocess a uint8 (or 0..255 float) (N, C, H, W) batch or split, on images' device."""
        assert images.ndim == 4, f"expected (N, C, H, W), got shape {tuple(images.shape)}"
        if torch.jit.is_tracing() or len(images) <= APPLY_CHUNK:
            return self._transform(images)
        return torch.cat([self._transform(chunk) for chunk in images.split(APPLY_CHUNK)])

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the fitted statistics from a state_dict (e.g. a weights file's ``preprocess.`` tensors)."""
        if self.kind == "gcn_zca":
            self.zca.load_state({key[len("zca."):]: value for key, value in state.items() if key.startswith("zca.")})
        elif self.kind == "standardize":
            self.mean, self.std = state["mean"].float(), state["std"].float()

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def fit_preprocessing(kind: str, train_images: torch.Tensor) -> Preprocessing:
    """Fit a preprocessing on the training split (uint8 (N, C, H, W)).

    Args:
        kind: One of "gcn_zca", "gcn_lcn", "scale", "standardize".
        train_images: The training split only; the fitted statistics are then applied unchanged to the test set.

    Returns:
        The fitted `Preprocessing`.
    """
    if len(train_images) == 0 and kind in FITTED_KINDS:
        raise NinError(f"no training images to fit the {kind!r} preprocessing on")
    preprocessing = Preprocessing(kind)
    if kind == "gcn_zca":
        flat = torch.cat([gcn(chunk.float()).reshape(len(chunk), -1) for chunk in train_images.split(APPLY_CHUNK)])
        preprocessing.zca = Zca().fit(flat)
    elif kind == "standardize":
        scaled = train_images.float() / 255.0
        preprocessing.mean = scaled.mean(dim=(0, 2, 3))
        values = scaled[:, :1].numel()  # per channel
        std = scaled.std(dim=(0, 2, 3), correction=int(values > 1))  # 0 for one value or a constant channel
        # ... where the divisor is 1, as gcn does
        preprocessing.std = torch.where(torch.isfinite(std) & (std > 1e-8), std, torch.ones_like(std))
    return preprocessing


def looks_dark_on_light(images: torch.Tensor) -> torch.Tensor:
    """Which images of a batch (N, C, H, W), on the 0..255 scale, are mostly light: dark ink on light paper, the
    opposite of MNIST's light strokes on black. The median pixel decides (a frame or a desk edge does not)."""
    assert images.ndim == 4, f"expected a batch (N, C, H, W), got shape {tuple(images.shape)}"
    return images.flatten(1).float().median(dim=1).values > 127


def invert_ink(images: torch.Tensor) -> torch.Tensor:
    """Dark ink on light paper -> light on black, as MNIST draws it: 255 - each pixel, then each image's levels
    stretched so that its paper (the median, the paper being most of the image) is 0 and its strongest ink (the
    darkest pixel, a dark scanner edge included) 255: grey, noisy or unevenly lit paper becomes black too.
    uint8 (N, C, H, W) in, uint8 out."""
    assert images.ndim == 4, f"expected a batch (N, C, H, W), got shape {tuple(images.shape)}"
    flat = 255.0 - images.flatten(1).float()
    paper = flat.median(dim=1, keepdim=True).values
    ink = flat.amax(dim=1, keepdim=True)
    stretched = (flat - paper) * 255.0 / (ink - paper).clamp_min(1.0)
    return stretched.clamp(0, 255).round().to(torch.uint8).view_as(images)


def odd_polarity(images: torch.Tensor, dataset: str | None, invert: bool) -> torch.Tensor:
    """Which images look the other way round from what weights trained on ``dataset`` expect, given ``invert``:
    for MNIST-style (light on black) weights, dark-on-light images without ``invert`` and light-on-dark ones with
    it; for other data sets none. A bool per image of the batch (N, C, H, W)."""
    if dataset not in LIGHT_ON_DARK:
        return torch.zeros(len(images), dtype=torch.bool)
    return looks_dark_on_light(images) != invert


def batch_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image left-right with probability 0.5, the whole batch at once.

    Args:
        images: (N, C, H, W) on any device.
        generator: A CPU generator; the draws are made on the CPU so every device gives the same result.

    Returns:
        A new tensor of the same shape and dtype.
    """
    flip = torch.rand(len(images), generator=generator) < 0.5
    flip = flip.to(images.device).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


def _translate_and_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding`, then read each image's crop (mirrored when flipped) with one `gather`."""
    count, channels, height, width = images.shape
    device = images.device
    offsets = torch.randint(0, 2 * padding + 1, (2, count), generator=generator).to(device)  # crop corner (row, col)
    columns = torch.arange(width, device=device).expand(count, width)
    if flip:
        mirrored = (torch.rand(count, generator=generator) < 0.5).to(device).view(-1, 1)
        columns = torch.where(mirrored, width - 1 - columns, columns)
    columns = columns + offsets[1].view(-1, 1)  # (N, W)
    rows = torch.arange(height, device=device).view(1, height) + offsets[0].view(-1, 1)  # (N, H)
    padded_width = width + 2 * padding
    flat_index = (rows.view(count, height, 1) * padded_width + columns.view(count, 1, width)).view(count, 1, -1)
    padded = F.pad(images, (padding, padding, padding, padding)).view(count, channels, -1)
    return padded.gather(2, flat_index.expand(count, channels, height * width)).view(count, channels, height, width)


def batch_translate(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to `padding` pixels each way: zero-pad, then crop at a random offset per image.

    Maxout's CIFAR-10 augmentation (random 32x32 crops of an 8-pixel-padded image) is `padding=8`. One gather
    does the whole batch.

    Args:
        images: (N, C, H, W) on any device.
        padding: Largest shift in pixels; 0 returns the input.
        generator: A CPU generator.

    Returns:
        A new tensor of the same shape and dtype.
    """
    if padding == 0:
        return images
    return _translate_and_flip(images, padding, False, generator)


class Augment:
    """The paper's augmentation for the CIFAR-10 8.81% run: random translation, then horizontal flip."""

    def __init__(self, flip: bool = True, translate: int = 0) -> None:
        self.flip = flip
        self.translate = translate

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a (N, C, H, W) batch with draws from `generator`."""
        if self.translate:
            return _translate_and_flip(images, self.translate, self.flip, generator)  # one gather does both
        return batch_flip(images, generator) if self.flip else images

    def __repr__(self) -> str:
        return f"Augment(flip={self.flip}, translate={self.translate})"


# ---------------------------------------------------------------------------------------------
# The preset: what a user holds -> the preprocessed batch (torchvision's weights.transforms())
# ---------------------------------------------------------------------------------------------

class ImageTransform(nn.Module):
    """Whatever a user holds -> the model's preprocessed float batch (N, C, H, W).

    Accepts a uint8 tensor (C, H, W) or (N, C, H, W) with values 0..255, a float tensor of the same shapes
    with values in [0, 1], a PIL image, a path, or a list of images and paths. Images of another size, mode or
    channel count are converted as `nin predict` converts files (`nin.data.images`: EXIF orientation, alpha,
    16-bit; the centre square, resized): a tensor of another size goes through the same Pillow resize as a PIL
    image (a float tensor per channel in Pillow's 32-bit float mode, so nothing is rounded to 8 bits).
    """

    def __init__(self, preprocessing, input_size: int, in_channels: int) -> None:
        super().__init__()
        self.preprocessing = preprocessing
        self.input_size = input_size
        self.in_channels = in_channels

    def to_pixels(self, images) -> torch.Tensor:
        """The raw pixels (N, C, H, W) on the 0..255 scale: uint8, or float for a float batch in [0, 1] (× 255,
        unrounded)."""
        if isinstance(images, (str, os.PathLike)):
            return read_image(Path(images), self.input_size, self.in_channels).unsqueeze(0)
        if _is_pil(images):
            return model_pixels(images, self.input_size, self.in_channels)[0].unsqueeze(0)
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
        if batch.ndim != 4 or batch.shape[1] not in (1, 3) or 0 in batch.shape:
            raise NinError(f"expected images of shape (C, H, W) or (N, C, H, W) with C = 1 or 3, got "
                           f"{tuple(images.shape)}")
        if batch.dtype != torch.uint8:
            if not batch.is_floating_point():
                raise NinError(f"expected uint8 (0..255) or float (0..1) images, got {batch.dtype}")
            if not torch.isfinite(batch).all():
                raise NinError("float images hold NaN or infinite values")
            if batch.min() < 0 or batch.max() > 1:
                raise NinError(f"float images must lie in [0, 1] (got {float(batch.min()):.3g}.."
                               f"{float(batch.max()):.3g}); pass uint8 for 0..255")
            batch = batch.float() * 255.0  # preprocessing reads values on the 0..255 scale; no rounding, no loss
        if tuple(batch.shape[1:]) == (self.in_channels, self.input_size, self.input_size):
            return batch
        return torch.stack([_tensor_pixels(image, self.input_size, self.in_channels) for image in batch])

    def forward(self, images) -> torch.Tensor:
        return self.preprocessing(self.to_pixels(images))


def _tensor_pixels(image: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """One (C, H, W) tensor on the 0..255 scale as the model sees it: through the decoder's own geometry and Pillow
    resize (`nin.data.images.model_pixels`); uint8 as an 8-bit image, floats channel by channel in mode "F"."""
    if image.dtype == torch.uint8:
        array = image.permute(1, 2, 0).contiguous().numpy()
        mode = "L" if image.shape[0] == 1 else "RGB"
        return model_pixels(Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode), size, channels)[0]
    if image.shape[0] != channels:  # float RGB <-> gray as Pillow's convert does (ITU-R 601-2 luma)
        image = (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True) if channels == 1 \
            else image.expand(3, -1, -1)
    planes = [np.asarray(square_of(Image.fromarray(plane.numpy().astype(np.float32), "F"), size)) for plane in image]
    return torch.from_numpy(np.stack(planes))


def _is_pil(obj) -> bool:
    return type(obj).__module__.startswith("PIL.")
