"""Reliability round 2, the data side (issue 18): one class list per image folder, pixels as the user sees them,
reads bounded by what the file can hold, and one-line `DataError`s naming the file.

Real images come from shared/data (MNIST, CIFAR-10); tests that need them are skipped where it is absent.
"""

from __future__ import annotations

import builtins
import gzip
import io
import os
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import (
    idx_bytes,
    random_images,
    write_cifar_python,
    write_idx,
    write_image_folder,
    write_svhn_mat,
)
from nin.data import DataError, load_dataset
from nin.data.folders import read_image_folder
from nin.data.images import read_image
from nin.data.readers import (
    read_cifar_binary,
    read_cifar_python,
    read_cifar_python_names,
    read_idx,
    read_pickle_dict,
    read_svhn_mat,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SHARED = SHARED if SHARED.is_dir() else Path("/work/shared/data")
needs_shared = pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="needs shared/data (MNIST, CIFAR-10)")


def _raises_naming(path: Path, call, match: str | None = None) -> str:
    with pytest.raises(DataError, match=match) as caught:
        call()
    message = str(caught.value)
    assert str(path) in message and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def mnist_digits() -> np.ndarray:
    """Three real MNIST test digits of different classes, uint8 (3, 28, 28), each spanning 0..255."""
    dataset = load_dataset("mnist", "test", SHARED)
    chosen = [int(torch.nonzero(dataset.labels == digit)[0]) for digit in (1, 4, 7)]
    digits = dataset.images[chosen, 0].numpy()
    assert all(digit.min() == 0 and digit.max() == 255 for digit in digits)
    return digits


@pytest.fixture(scope="module")
def cifar_images() -> np.ndarray:
    """Three real CIFAR-10 test images, uint8 (3, 32, 32, 3) (HWC, as Pillow writes them)."""
    return load_dataset("cifar10", "test", SHARED).images[:3].permute(0, 2, 3, 1).numpy().copy()


# ---- case 1: one class list for train/ and test/ --------------------------------------------------------------


def test_folder_test_labels_use_the_train_class_list(tmp_path):
    write_image_folder(tmp_path / "train", {"a_one": 2, "b_zero": 2}, size=(8, 8))
    write_image_folder(tmp_path / "test", {"b_zero": 3}, size=(8, 8))  # a class missing from test/ is fine
    train, test = load_dataset("folder", "train", tmp_path), load_dataset("folder", "test", tmp_path)
    assert train.classes == test.classes == ["a_one", "b_zero"]
    assert train.labels.tolist() == [0, 0, 1, 1] and test.labels.tolist() == [1, 1, 1]

    given = ["b_zero", "a_one", "c_unused"]  # e.g. the classes stored in a model's weights
    test = load_dataset("folder", "test", tmp_path, classes=given)
    assert test.classes == given and test.labels.tolist() == [0, 0, 0]
    images, labels, classes = read_image_folder(tmp_path / "train", 8, 3, classes=given)
    assert labels.tolist() == [1, 1, 0, 0] and classes == given

    write_image_folder(tmp_path / "test", {"c_new": 1}, size=(8, 8))
    message = _raises_naming(tmp_path / "test" / "c_new", lambda: load_dataset("folder", "test", tmp_path))
    assert "c_new" in message and str(tmp_path / "train") in message
    only_a = ["a_one"]
    _raises_naming(tmp_path / "train" / "b_zero", lambda: read_image_folder(tmp_path / "train", 8, 3, classes=only_a))


def test_folder_missing_test_split_is_named(tmp_path):
    write_image_folder(tmp_path / "train", {"a": 1, "b": 1}, size=(8, 8))
    message = _raises_naming(tmp_path / "test", lambda: load_dataset("folder", "test", tmp_path), "missing")
    assert "empty class folder" not in message
    flat = tmp_path / "flat"
    write_image_folder(flat, {"a": 1, "b": 1}, size=(8, 8))
    assert load_dataset("folder", "test", flat).classes == ["a", "b"]  # no split folders: the root is every split


# ---- case 2: pixels as the user sees them ---------------------------------------------------------------------


@needs_shared
def test_16_bit_png_scaled_by_full_range(tmp_path, mnist_digits):
    decoded = []
    for index, digit in enumerate(mnist_digits):
        path = tmp_path / f"{index}.png"
        Image.fromarray(digit.astype(np.uint16) * 257).save(path)  # 0..255 -> 0..65535
        assert Image.open(path).mode in ("I;16", "I")
        decoded.append(read_image(path, 28, 1)[0].numpy())
        assert np.array_equal(decoded[-1], digit)
    assert not np.array_equal(decoded[0], decoded[1]) and not np.array_equal(decoded[1], decoded[2])


@needs_shared
def test_float_tiff_scaled_by_its_range(tmp_path, mnist_digits):
    for index, digit in enumerate(mnist_digits):
        path = tmp_path / f"{index}.tif"
        Image.fromarray(digit.astype(np.float32) / 255 * 3.5 - 1.0).save(path)  # -1.0..2.5
        assert Image.open(path).mode == "F"
        assert np.array_equal(read_image(path, 28, 1)[0].numpy(), digit)


@needs_shared
def test_alpha_composited_over_white_or_taken_as_intensity(tmp_path, cifar_images, mnist_digits):
    image = cifar_images[0]
    opaque = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    assert np.array_equal(read_image(tmp_path / "opaque.png", 32, 3).permute(1, 2, 0).numpy(), image)

    alpha = np.random.default_rng(0).integers(0, 256, image.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([image, alpha]), "RGBA").save(tmp_path / "half.png")
    expected = (image * (alpha[..., None] / 255.0) + 255 * (1 - alpha[..., None] / 255.0)).round()
    got = read_image(tmp_path / "half.png", 32, 3).permute(1, 2, 0).numpy().astype(float)
    assert np.abs(got - expected).max() <= 1

    digit = mnist_digits[0]  # black ink whose shape lives only in alpha (white-on-transparent is the same)
    for colour in (0, 255):
        Image.fromarray(np.dstack([np.full_like(digit, colour), digit]), "LA").save(tmp_path / f"la{colour}.png")
        assert np.array_equal(read_image(tmp_path / f"la{colour}.png", 28, 1)[0].numpy(), digit)
        rgba = np.dstack([np.full((28, 28, 3), colour, np.uint8), digit])
        Image.fromarray(rgba, "RGBA").save(tmp_path / f"rgba{colour}.png")
        assert np.array_equal(read_image(tmp_path / f"rgba{colour}.png", 28, 1)[0].numpy(), digit)

    palette = Image.fromarray(digit, "P")  # a grey ramp palette whose index 0 (the background) is transparent
    palette.putpalette([value for value in range(256) for _ in range(3)])
    palette.save(tmp_path / "p.png", transparency=0)
    expected = np.where(digit == 0, 255, digit)  # transparent pixels show the white background
    assert np.array_equal(read_image(tmp_path / "p.png", 28, 1)[0].numpy(), expected)


@needs_shared
def test_exif_orientation_applied(tmp_path, cifar_images):
    image = cifar_images[1]
    stored = Image.fromarray(image).transpose(Image.Transpose.ROTATE_90)  # a camera held sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    (tmp_path / "c").mkdir()
    stored.save(tmp_path / "c" / "photo.jpg", quality=95, exif=exif)
    decoded = read_image(tmp_path / "c" / "photo.jpg", 32, 3).permute(1, 2, 0).numpy().astype(float)
    assert np.abs(decoded - image).mean() < 4  # JPEG tolerance
    folder = load_dataset("folder", "train", tmp_path).images[0].permute(1, 2, 0).numpy().astype(float)
    assert np.abs(folder - image).mean() < 4


# ---- case 3: bounded reads ------------------------------------------------------------------------------------


def _peak_bytes(call) -> int:
    tracemalloc.start()
    try:
        call()
    except DataError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_idx_header_overflow_or_larger_than_the_data(tmp_path):
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (2**22, 2**21, 2**21))  # 2**64 bytes
    for name, data in (("wrap", header), ("wrap.gz", gzip.compress(header))):
        (tmp_path / name).write_bytes(data)
        _raises_naming(tmp_path / name, lambda: read_idx(tmp_path / name, 2051), "dimensions")
    big = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (60_000, 28, 28)) + bytes(100)
    (tmp_path / "big.gz").write_bytes(gzip.compress(big))
    assert _peak_bytes(lambda: read_idx(tmp_path / "big.gz", 2051)) < 8 << 20  # not 47 MB for the declared shape
    _raises_naming(tmp_path / "big.gz", lambda: read_idx(tmp_path / "big.gz", 2051))


def test_idx_gzip_decompression_capped_by_the_header(tmp_path):
    path = tmp_path / "bomb-images-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=1) as stream:
        stream.write(idx_bytes(random_images(10, 0, (28, 28))))
        for _ in range(48):  # 48 MiB of zeros behind ten images, about 50 KB on disk
            stream.write(bytes(1 << 20))
    assert path.stat().st_size < 1 << 20
    assert _peak_bytes(lambda: read_idx(path, 2051)) < 4 << 20
    _raises_naming(path, lambda: read_idx(path, 2051), "more data")


def test_cifar_pickle_with_huge_declared_array_not_allocated(tmp_path):
    path = tmp_path / "test_batch"
    # {b"data": numpy.core.multiarray._reconstruct(numpy.ndarray, (811000000,), b"b"), b"labels": []}
    path.write_bytes(b"\x80\x02}q\x00(C\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03"
                     b"J\xc0\xfaV0\x85q\x04C\x01bq\x05\x87q\x06Rq\x07C\x06labelsq\x08]q\x09u.")
    assert path.stat().st_size < 150
    assert _peak_bytes(lambda: read_cifar_python(path, 10, b"labels")) < 16 << 20
    _raises_naming(path, lambda: read_cifar_python(path, 10, b"labels"))


def test_cifar_pickle_array_state_checked_before_numpy(tmp_path):
    path = tmp_path / "data_batch_1"
    build = pickle.dumps({b"data": np.zeros(0, dtype=object), b"labels": []}, protocol=2)
    assert b"(K\x01K\x00\x85" in build  # state (1, (0,), dtype('O'), ...): claim 10**8 objects with an empty list
    path.write_bytes(build.replace(b"(K\x01K\x00\x85", b"(K\x01J\x00\xe1\xf5\x05\x85", 1))
    _raises_naming(path, lambda: read_cifar_python(path, 10, b"labels"))  # numpy's own __setstate__ segfaults here


@pytest.mark.parametrize("labels", [[2**70, 0], ["cat", "dog"], [{}, {}], [None, None], None, {1: 2}, [[0], [1]],
                                    [0.5, 1], [True, False]])
def test_cifar_pickle_labels_of_the_wrong_kind(tmp_path, labels):
    path = tmp_path / "data_batch_1"
    content = {b"data": random_images(2).reshape(2, -1), b"labels": labels}
    path.write_bytes(pickle.dumps(content, protocol=2))
    _raises_naming(path, lambda: read_cifar_python(path, 10, b"labels"), "label")


@pytest.mark.parametrize("names", [5, None, [1, 2], b"abc", {b"a": 1}])
def test_cifar_pickle_label_names_of_the_wrong_kind(tmp_path, names):
    path = tmp_path / "batches.meta"
    path.write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    _raises_naming(path, lambda: read_cifar_python_names(path, b"label_names"), "label_names")


def test_cifar_pickle_odd_keys_one_line(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({1: 2, b"x": 3, (4,): 5}, protocol=2))
    _raises_naming(path, lambda: read_cifar_python(path, 10, b"labels"), "expected keys")


@pytest.mark.parametrize("content", [
    {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([["a"], ["b"]])},
    {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1.5], [2.0]])},
    {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[{"a": 1}], [{"b": 2}]], dtype=object)},
    {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [2]], np.complex64)},
    {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": "text"},
    {"X": np.zeros((3, 32, 32, 2), np.uint8), "y": np.array([[1], [2]])},
])
def test_svhn_mat_wrong_shapes_and_types(tmp_path, content):
    import scipy.io

    path = tmp_path / "train_32x32.mat"
    scipy.io.savemat(str(path), content)
    _raises_naming(path, lambda: read_svhn_mat(path))


def test_a_folder_where_a_file_is_expected(tmp_path):
    (tmp_path / "x.bin").mkdir()
    for read in (lambda: read_cifar_binary(tmp_path / "x.bin", 10), lambda: read_idx(tmp_path / "x.bin", 2051),
                 lambda: read_image(tmp_path / "x.bin", 8, 3), lambda: read_svhn_mat(tmp_path / "x.bin")):
        message = _raises_naming(tmp_path / "x.bin", read, "folder")
        assert "not found" not in message and "No such file" not in message
    write_svhn_mat(tmp_path / "ok.mat", random_images(1, 0), np.array([3]))
    assert len(read_svhn_mat(tmp_path / "ok.mat")[1]) == 1


def test_unreadable_file_is_not_reported_missing(tmp_path, monkeypatch):
    write_cifar_python(tmp_path / "batch", random_images(1), np.array([0]))
    write_idx(tmp_path / "images.gz", random_images(1, 0, (28, 28)))
    write_image_folder(tmp_path / "images", {"a": 1}, size=(8, 8))
    unreadable = [tmp_path / "batch", tmp_path / "images.gz", tmp_path / "images" / "a" / "0.png"]
    if os.geteuid() == 0:  # root reads a chmod 000 file anyway: refuse opening it as the kernel would
        real_open = io.open

        def denying_open(file, *args, **kwargs):
            if Path(file) in unreadable:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(io, "open", denying_open)
        monkeypatch.setattr(builtins, "open", denying_open)
    for path in unreadable:
        path.chmod(0)
    reads = [lambda: read_pickle_dict(unreadable[0]), lambda: read_idx(unreadable[1], 2051),
             lambda: read_image(unreadable[2], 8, 3), lambda: load_dataset("folder", "train", tmp_path / "images")]
    try:
        for path, read in zip(unreadable + unreadable[2:], reads):
            message = _raises_naming(path, read, "cannot read it")
            assert "not found" not in message and "No such file" not in message and "damaged" not in message
    finally:
        for path in unreadable:
            path.chmod(0o644)
