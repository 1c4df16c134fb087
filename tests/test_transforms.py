"""nin.transforms: pylearn2 GCN / ZCA / LCN semantics, Preprocessing round trips, batched augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from nin.data import load_dataset
from nin.errors import NinError
from nin.transforms import (
    Augment,
    Preprocessing,
    Zca,
    batch_flip,
    batch_translate,
    fit_preprocessing,
    gaussian_kernel,
    gcn,
    invert_ink,
    lcn,
    looks_dark_on_light,
)


def test_gcn_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    centered = torch.tensor([-2.0, -1.0, 0.0, 3.0])  # mean 3
    expected = centered / (math.sqrt(14.0) / 55.0)
    out = gcn(x)
    assert torch.allclose(out[0], expected)
    assert torch.equal(out[1], torch.zeros(4))  # constant image: divisor below 1e-8 replaced by 1
    assert torch.allclose(gcn(x, scale=1.0)[0].norm(), torch.tensor(1.0))


def test_zca_hand_computed():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]], dtype=torch.float64)
    zca = Zca(filter_bias=0.1).fit(x)
    # mean 0; covariance XᵀX/N = diag(0.5, 2): W = diag(1/sqrt(0.6), 1/sqrt(2.1))
    assert torch.allclose(zca.matrix, torch.diag(torch.tensor([0.6, 2.1]) ** -0.5).float())
    assert torch.allclose(zca(x)[0], torch.tensor([0.6**-0.5, 0.0]))


def test_zca_whitens_correlated_data():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(8, 8, generator=generator)
    x = torch.randn(20_000, 8, generator=generator) @ mixing + 3.0
    zca = Zca(filter_bias=1e-6).fit(x)
    y = zca(x).double()
    covariance = (y - y.mean(0)).T @ (y - y.mean(0)) / len(y)
    assert torch.allclose(covariance, torch.eye(8, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(zca.matrix, zca.matrix.T, atol=1e-5)  # ZCA, not PCA whitening: symmetric


@pytest.fixture(scope="module")
def cifar_slice(data_root):
    return load_dataset("cifar10", "train", data_root).images[:5000]


def test_real_cifar_gcn_and_zca_spectrum(cifar_slice):
    normalized = gcn(cifar_slice.float())
    flat = normalized.reshape(len(cifar_slice), -1)
    assert torch.allclose(flat.norm(dim=1), torch.full((5000,), 55.0), rtol=1e-4)
    assert flat.mean(dim=1).abs().max() < 1e-4
    # ZCA on the central 16x16 crop (768 features): a 3072² float64 eigh takes 10-40 s on 2 cores
    features = normalized[:, :, 8:24, 8:24].reshape(len(cifar_slice), -1)
    zca = Zca().fit(features)

    def covariance(values: torch.Tensor) -> torch.Tensor:
        centered = values.double() - values.double().mean(0)
        return centered.T @ centered / len(values)

    gcn_covariance, whitened_covariance = covariance(features), covariance(zca(features))
    eigenvalues = zca.eigenvalues
    assert torch.isclose(eigenvalues.sum(), gcn_covariance.trace(), rtol=1e-5)
    expected = eigenvalues / (eigenvalues + 0.1)
    whitened_eigenvalues = torch.linalg.eigvalsh(whitened_covariance)
    assert torch.allclose(whitened_eigenvalues, expected, atol=1e-3)
    # and the same eigenvectors: W C W = C (C + 0.1 I)^-1
    identity = torch.eye(len(gcn_covariance), dtype=torch.float64)
    assert torch.allclose(whitened_covariance @ (gcn_covariance + 0.1 * identity), gcn_covariance, atol=1e-2)


def test_lcn_matches_pylearn2_formula():
    kernel = gaussian_kernel(7)
    assert torch.isclose(kernel.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.isclose(kernel[3, 3] / kernel[3, 4], torch.tensor(math.exp(1 / 8), dtype=torch.float64))  # sigma 2
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = lcn(x)
    # pixel (0, 1, 4, 4): its 7x7 window lies inside the image, so no zero padding enters
    window = x[0, 1, 1:8, 1:8]
    centered = x[0, 1, 4, 4] - (window * kernel).sum()
    local_norm_all = torch.nn.functional.conv2d(x[:, 1:2] ** 2, kernel.view(1, 1, 7, 7), padding=3).sqrt()
    divisor = max(local_norm_all[0, 0, 4, 4], local_norm_all[0, 0].mean(), torch.tensor(1e-4))
    assert torch.isclose(out[0, 1, 4, 4], centered / divisor)
    assert torch.equal(lcn(torch.zeros(1, 1, 5, 5)), torch.zeros(1, 1, 5, 5))  # threshold avoids 0 / 0


@pytest.mark.parametrize("kind", ["gcn_zca", "gcn_lcn", "scale", "standardize"])
def test_preprocessing_round_trip(kind):
    images = torch.randint(0, 256, (200, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    fitted = fit_preprocessing(kind, images)
    out = fitted(images[:50])
    assert out.shape == (50, 3, 8, 8) and out.dtype == torch.float32 and torch.isfinite(out).all()
    state = fitted.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    rebuilt = Preprocessing(kind, {key: value.clone() for key, value in state.items()})
    assert rebuilt.kind == kind and torch.equal(rebuilt(images[:50]), out)


def test_standardize_and_scale_values():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    assert torch.equal(fit_preprocessing("scale", images)(images)[1], torch.ones(1, 2, 2))
    standardized = fit_preprocessing("standardize", images)(images)
    assert abs(float(standardized.mean())) < 1e-6 and standardized[1, 0, 0, 0] > 0


@pytest.mark.parametrize("kind", ["gcn_zca", "gcn_lcn", "scale", "standardize"])
def test_fitting_on_no_images(kind):
    none = torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    if kind in ("gcn_zca", "standardize"):  # statistics of the training images: none to fit them on is an error
        with pytest.raises(NinError, match=f"no training images to fit the '{kind}' preprocessing"):
            fit_preprocessing(kind, none)
    else:  # nothing to fit: the preprocessing works on other images
        images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(fit_preprocessing(kind, none)(images)).all()


def test_invert_ink_makes_grey_paper_black_and_ink_white():
    images = torch.full((2, 1, 10, 10), 200, dtype=torch.uint8)  # grey paper
    images[:, :, 3:7, 4:6] = 20  # dark ink
    images[1, :, 3:7, 6] = 110  # and a half-tone edge on the second
    out = invert_ink(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert (out[:, :, 0] == 0).all() and (out[:, :, 3:7, 4:6] == 255).all()
    assert int(out[1, 0, 4, 6]) == 128  # halfway between paper and ink stays halfway
    blank = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    assert (invert_ink(blank) == 0).all()  # nothing drawn: black, no division by zero


def test_invert_ink_on_noisy_unevenly_lit_paper():
    generator = torch.Generator().manual_seed(0)
    light = torch.linspace(-20, 20, 28).view(1, 1, 1, 28)  # lighter on the right
    paper = (210 + light + 12 * torch.randn(4, 1, 28, 28, generator=generator)).clamp(0, 255)
    ink = torch.zeros(4, 1, 28, 28, dtype=torch.bool)
    ink[:, :, 6:22, 12:16] = True  # a stroke, 8% of the image
    images = torch.where(ink, torch.full_like(paper, 30), paper).round().to(torch.uint8)
    out = invert_ink(images).float()
    assert out[~ink].median() == 0 and out[~ink].mean() < 25  # the paper becomes (nearly) black
    assert out[ink].mean() > 200  # the ink bright

def test_looks_dark_on_light_ignores_frames():
    digit = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    digit[:, :, 8:20, 12:16] = 255  # light strokes on black, as MNIST
    framed = digit.clone()
    framed[1, :, :3] = 255  # a white frame's top rows
    paper = 255 - digit
    paper[2, :, :, :2] = 0  # dark ink on white paper with a dark scanner edge
    assert looks_dark_on_light(torch.cat([digit[:1], framed[1:2], paper[2:]])).tolist() == [False, False, True]


def test_flip_and_translate():
    images = torch.arange(4 * 2 * 5 * 5, dtype=torch.float32).view(4, 2, 5, 5)
    flipped = batch_flip(images, torch.Generator().manual_seed(0))
    for original, out in zip(images, flipped):
        assert torch.equal(out, original) or torch.equal(out, original.flip(-1))
    many = torch.zeros(256, 1, 1, 2)
    many[:, :, :, 0] = 1
    assert 0 < batch_flip(many, torch.Generator().manual_seed(0))[:, 0, 0, 1].sum() < 256  # some flipped, some not
    shifted = batch_translate(images, 2, torch.Generator().manual_seed(1))
    assert shifted.shape == images.shape and shifted.dtype == images.dtype
    for original, out in zip(images, shifted):  # each output is the input shifted by (dy, dx), zeros outside
        padded = torch.nn.functional.pad(original, (2, 2, 2, 2))
        matches = [
            (dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out, padded[:, dy : dy + 5, dx : dx + 5])
        ]
        assert matches
    assert not torch.equal(shifted, images)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_augment_shape_dtype_reproducible(dtype):
    images = torch.randint(0, 200, (128, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(dtype)
    augment = Augment(flip=True, translate=4)
    first = augment(images, torch.Generator().manual_seed(7))
    assert first.shape == images.shape and first.dtype == dtype
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(8)))
    assert torch.equal(Augment(flip=False)(images, torch.Generator()), images)
