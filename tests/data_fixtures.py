"""Writers of small files in the genuine on-disk formats (CIFAR binary and python, IDX, SVHN .mat, image folders)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def random_images(count: int, seed: int = 0, shape: tuple[int, ...] = (3, 32, 32)) -> np.ndarray:
    """uint8 (count, *shape) noise."""
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def balanced_labels(count: int, num_classes: int) -> np.ndarray:
    return (np.arange(count) % num_classes).astype(np.uint8)


def write_cifar_binary(path: Path, images: np.ndarray, labels: np.ndarray, coarse_labels: np.ndarray | None = None) -> None:
    """CIFAR-10 records (label, 3072 pixels); with coarse_labels, CIFAR-100 records (coarse, fine, 3072 pixels)."""
    columns = [] if coarse_labels is None else [coarse_labels.reshape(-1, 1)]
    columns += [labels.reshape(-1, 1), images.reshape(len(images), -1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.concatenate(columns, axis=1).astype(np.uint8).tobytes())


def write_cifar_python(path: Path, images: np.ndarray, labels: np.ndarray, label_key: bytes = b"labels") -> None:
    """A protocol-2 pickle of the dict CIFAR's python version holds (bytes keys, uint8 (N, 3072) data)."""
    content = {b"batch_label": b"fixture", label_key: [int(label) for label in labels],
               b"data": images.reshape(len(images), -1), b"filenames": [b"x.png"] * len(images)}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(content, protocol=2))


def write_cifar10_tree(root: Path, layout: str, per_batch: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A complete cifar-10-batches-bin/ or cifar-10-batches-py/ tree; returns (train images, train labels)."""
    all_images, all_labels = [], []
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        images, labels = random_images(per_batch, seed + index), balanced_labels(per_batch, 10)
        if layout == "bin":
            write_cifar_binary(root / "cifar-10-batches-bin" / f"{name}.bin", images, labels)
        else:
            write_cifar_python(root / "cifar-10-batches-py" / name, images, labels)
        if name != "test_batch":
            all_images.append(images)
            all_labels.append(labels)
    names = [f"class{i}" for i in range(10)]
    if layout == "bin":
        (root / "cifar-10-batches-bin" / "batches.meta.txt").write_text("\n".join(names) + "\n")
    else:
        meta = {b"label_names": [name.encode() for name in names], b"num_cases_per_batch": per_batch}
        (root / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return np.concatenate(all_images), np.concatenate(all_labels)


def write_cifar100_tree(root: Path, layout: str, count: int = 200, seed: int = 0) -> dict[str, tuple]:
    """cifar-100-binary/ or cifar-100-python/ with train and test; returns {part: (images, fine labels)}."""
    written = {}
    for index, part in enumerate(("train", "test")):
        images = random_images(count, seed + index)
        fine = (np.arange(count) % 100).astype(np.uint8)
        coarse = (fine // 5).astype(np.uint8)
        if layout == "bin":
            write_cifar_binary(root / "cifar-100-binary" / f"{part}.bin", images, fine, coarse_labels=coarse)
        else:
            content = {b"data": images.reshape(count, -1), b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist()}
            (root / "cifar-100-python").mkdir(parents=True, exist_ok=True)
            (root / "cifar-100-python" / part).write_bytes(pickle.dumps(content, protocol=2))
        written[part] = (images, fine)
    names = [f"fine{i}" for i in range(100)]
    if layout == "bin":
        (root / "cifar-100-binary" / "fine_label_names.txt").write_text("\n".join(names) + "\n")
    else:
        meta = {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"c"] * 20}
        (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: 0, 0, 0x08, ndim, then big-endian int32 dimensions, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)


def write_mnist_tree(folder: Path, count: int = 30, compress: bool = True, seed: int = 0) -> dict[str, tuple]:
    """train-/t10k- images and labels in `folder`; returns {prefix: (images (N, 28, 28), labels)}."""
    written = {}
    suffix = ".gz" if compress else ""
    for index, prefix in enumerate(("train", "t10k")):
        images, labels = random_images(count, seed + index, (28, 28)), balanced_labels(count, 10)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        written[prefix] = (images, labels)
    return written


def write_svhn_mat(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """SVHN format 2: X (32, 32, 3, N) uint8 and y (N, 1) with the digit 0 stored as 10."""
    import scipy.io

    stored = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"X": np.ascontiguousarray(images.transpose(2, 3, 1, 0)), "y": stored})


def write_image_folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (40, 30), mode: str = "RGB") -> None:
    """root/<class>/<i>.png images of the given size (width, height) and Pillow mode."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            channels = {"RGB": 3, "RGBA": 4}.get(mode, 1)
            pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
            image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, "L" if channels == 1 else mode)
            image.convert(mode).save(root / name / f"{index}.png")
