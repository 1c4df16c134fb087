"""One reader per on-disk format: IDX (MNIST), CIFAR binary and python, SVHN .mat, image folders.

Every reader returns uint8 images (N, C, H, W) and int64 labels (N,) as torch tensors, and checks the file's
structure on every read (present, magic, size an exact record multiple, label range); anything wrong raises
`DataError` with a one-line message naming the file.

    images, labels = read_cifar_binary(Path("cifar-10-batches-bin/test_batch.bin"), num_classes=10)
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import pickle
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CIFAR_IMAGE_BYTES = 3 * 32 * 32  # one CIFAR record's pixels: 1024 R, then 1024 G, then 1024 B, row-major
IDX_LABEL_MAGIC = 2049  # http://yann.lecun.com/exdb/mnist/: uint8 data, 1 dimension
IDX_IMAGE_MAGIC = 2051  # uint8 data, 3 dimensions
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (about 0.25 GiB of RGB)


class DataError(ValueError):
    """A data file is missing, damaged, or not in the format its name promises."""


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, transparently gunzipped when the name ends in .gz."""
    _require_file(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                return stream.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: unreadable or truncated gzip stream ({error})") from None


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in 1 MiB chunks.

    Args:
        path: The file.
        algorithm: Any `hashlib` name ("md5", "sha256").

    Returns:
        The lowercase hex digest.
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: Path, expected: str, algorithm: str = "md5") -> None:
    """Raise `DataError` unless the file's digest equals `expected`."""
    _require_file(path)
    actual = file_digest(path, algorithm)
    if actual != expected.lower():
        raise DataError(f"{path}: {algorithm} is {actual}, expected {expected}")


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> torch.Tensor:
    if labels.size and int(labels.max()) >= num_classes:
        raise DataError(f"{path}: label {int(labels.max())} out of range, expected 0..{num_classes - 1}")
    return torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# ---------------------------------------------------------------------------------------------------------------


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzipped or not).

    Args:
        path: The file, e.g. `train-images-idx3-ubyte.gz`.
        expected_magic: 2051 for images (3 dimensions) or 2049 for labels (1 dimension).

    Returns:
        A uint8 array of the dimensions the header gives.
    """
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: IDX magic {magic}, expected {expected_magic}")
    num_dims = data[3]
    header_bytes = 4 + 4 * num_dims
    if len(data) < header_bytes:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims)]
    expected_bytes = header_bytes + int(np.prod(dims))
    if len(data) != expected_bytes:
        raise DataError(f"{path}: {len(data)} bytes, expected {expected_bytes} for dimensions {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(dims)


def read_idx_dataset(images_path: Path, labels_path: Path, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a matching pair of IDX image and label files.

    Returns:
        uint8 images (N, 1, H, W) and int64 labels (N,).
    """
    images = read_idx(images_path, IDX_IMAGE_MAGIC)
    labels = read_idx(labels_path, IDX_LABEL_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels, expected {len(images)} to match {images_path.name}")
    return torch.from_numpy(images.copy()).unsqueeze(1), _check_labels(labels, num_classes, labels_path)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR binary: records of label byte(s) + 3072 pixel bytes
# ---------------------------------------------------------------------------------------------------------------


def read_cifar_binary(
    path: Path, num_classes: int, *, label_bytes: int = 1, expected_records: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR binary batch file.

    Args:
        path: e.g. `cifar-10-batches-bin/data_batch_1.bin` or `cifar-100-binary/train.bin`.
        num_classes: Labels must lie in 0..num_classes-1.
        label_bytes: 1 for CIFAR-10; 2 for CIFAR-100 (coarse then fine label; the fine one is returned).
        expected_records: When given, the exact number of records the file must hold.

    Returns:
        uint8 images (N, 3, 32, 32) and int64 labels (N,).
    """
    data = _read_bytes(path)
    record_bytes = label_bytes + CIFAR_IMAGE_BYTES
    if len(data) == 0 or len(data) % record_bytes:
        raise DataError(f"{path}: {len(data)} bytes, expected a non-zero multiple of {record_bytes}-byte records")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, record_bytes)
    if expected_records is not None and len(records) != expected_records:
        raise DataError(f"{path}: {len(records)} records, expected {expected_records}")
    labels = records[:, label_bytes - 1]
    images = records[:, label_bytes:].reshape(-1, 3, 32, 32)
    return torch.from_numpy(images.copy()), _check_labels(labels, num_classes, path)


def read_class_names_text(path: Path) -> list[str]:
    """Class names from a text file, one a line (`batches.meta.txt`, `fine_label_names.txt`)."""
    names = [line.strip() for line in _read_bytes(path).decode("utf-8", "replace").splitlines()]
    return [name for name in names if name]


# ---------------------------------------------------------------------------------------------------------------
# CIFAR python: pickled dicts, read through an unpickler that only admits numpy array reconstruction
# ---------------------------------------------------------------------------------------------------------------


def _numpy_multiarray():
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed numpy.core to numpy._core
    return core.multiarray


def _numpy_frombuffer():
    core = getattr(np, "_core", None) or np.core
    return core.numeric._frombuffer


# What CIFAR's pickles (Python 2, protocol 2) and numpy's own array pickles need, and nothing else. Names
# arrive unmapped (Python 2 "__builtin__"), so both spellings are listed. Python 3 writes bytes into protocol-2
# pickles as _codecs.encode(text, "latin1"), a pure function.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): lambda: codecs.encode,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_multiarray()._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_multiarray()._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("__builtin__", "list"): lambda: list,
    ("builtins", "list"): lambda: list,
    ("__builtin__", "dict"): lambda: dict,
    ("builtins", "dict"): lambda: dict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose `find_class` refuses every global outside `_ALLOWED_GLOBALS`."""

    def __init__(self, stream: io.BytesIO, path: Path) -> None:
        super().__init__(stream, encoding="bytes")  # Python 2 str -> bytes, as CIFAR's own loader does
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DataError(f"refused to unpickle {module}.{name} in {self.path}")
        return _ALLOWED_GLOBALS[(module, name)]()


def read_pickle_dict(path: Path) -> dict[bytes, object]:
    """Unpickle a CIFAR python-version file through the restricted unpickler.

    Returns:
        The file's dict, with bytes keys (b"data", b"labels", b"fine_labels", b"label_names", ...).
    """
    data = _read_bytes(path)
    try:
        content = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except Exception as error:  # a damaged pickle can raise almost anything: EOFError, UnpicklingError, ...
        message = " ".join(str(error).split())  # one line, whatever the unpickler said
        raise DataError(f"{path}: not a readable pickle ({type(error).__name__}: {message})") from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: pickle holds {type(content).__name__}, expected a dict")
    return {key.encode() if isinstance(key, str) else key: value for key, value in content.items()}


def read_cifar_python(path: Path, num_classes: int, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR python-version batch (`data_batch_1`, `test_batch`, CIFAR-100 `train`/`test`).

    Args:
        path: The pickle file.
        num_classes: Labels must lie in 0..num_classes-1.
        label_key: b"labels" for CIFAR-10, b"fine_labels" for CIFAR-100.

    Returns:
        uint8 images (N, 3, 32, 32) and int64 labels (N,).
    """
    content = read_pickle_dict(path)
    if b"data" not in content or label_key not in content:
        raise DataError(f"{path}: expected keys b'data' and {label_key!r}, found {sorted(content)}")
    data = content[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_IMAGE_BYTES:
        raise DataError(f"{path}: b'data' must be a uint8 array (N, {CIFAR_IMAGE_BYTES})")
    labels = np.asarray(content[label_key], dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {labels.size} labels, expected {len(data)}")
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: label {int(labels.min())} out of range, expected 0..{num_classes - 1}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), _check_labels(labels, num_classes, path)


def read_cifar_python_names(path: Path, key: bytes) -> list[str]:
    """Class names from `batches.meta` (key b"label_names") or CIFAR-100 `meta` (b"fine_label_names")."""
    content = read_pickle_dict(path)
    if key not in content:
        raise DataError(f"{path}: expected key {key!r}")
    return [name.decode() if isinstance(name, bytes) else str(name) for name in content[key]]


# ---------------------------------------------------------------------------------------------------------------
# SVHN format 2 (cropped digits): MATLAB files with X (32, 32, 3, N) and y (N, 1), digit 0 stored as 10
# ---------------------------------------------------------------------------------------------------------------


def read_svhn_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `train_32x32.mat`, `test_32x32.mat` or `extra_32x32.mat`.

    Returns:
        uint8 images (N, 3, 32, 32) and int64 labels (N,), with label 10 mapped to 0.
    """
    import scipy.io  # optional dependency: nin[svhn]

    _require_file(path)
    try:
        content = scipy.io.loadmat(str(path))
    except Exception as error:  # scipy raises ValueError, TypeError, OSError... on damaged files
        message = " ".join(str(error).split())
        raise DataError(f"{path}: not a readable MATLAB file ({type(error).__name__}: {message})") from None
    images, labels = content.get("X"), content.get("y")
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: X must have shape (32, 32, 3, N)")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: X has dtype {images.dtype}, expected uint8")
    if not isinstance(labels, np.ndarray) or labels.size != images.shape[3]:
        raise DataError(f"{path}: y must hold {images.shape[3]} labels")
    labels = labels.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{path}: label out of range {labels.min()}..{labels.max()}, expected 1..10")
    labels[labels == 10] = 0
    return torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1))), torch.from_numpy(labels)


# ---------------------------------------------------------------------------------------------------------------
# Image folders: <root>/<class>/<image>, any size and mode
# ---------------------------------------------------------------------------------------------------------------


def list_image_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """List (file, label) pairs of a class-per-sub-folder tree; classes sorted by name.

    Hidden files and folders (".DS_Store", ".ipynb_checkpoints") are ignored; files at the top level too.

    Returns:
        The samples in (class, file name) order, and the class names.
    """
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders, expected <root>/<class>/<image>")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{root / name}: empty class folder, expected at least one image")
        samples.extend((path, label) for path in files)
    return samples, classes


def read_image(path: Path, image_size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode one image, convert it to `channels` (1 or 3), resize its shorter side and center-crop a square.

    Args:
        path: Any format Pillow decodes.
        image_size: Output height and width.
        channels: 1 (grayscale) or 3 (RGB).
        max_pixels: Refuse images with more pixels than this (decompression-bomb guard), checked before decoding.

    Returns:
        uint8 tensor (channels, image_size, image_size).
    """
    assert channels in (1, 3), f"channels must be 1 or 3, got {channels}"
    _require_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise DataError(f"{path}: {width}x{height} image exceeds the {max_pixels}-pixel limit")
                image = image.convert("L" if channels == 1 else "RGB")
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"{path}: oversized image refused ({error})") from None
    except Exception as error:  # UnidentifiedImageError, truncated data, unsupported modes
        raise DataError(f"{path}: unsupported or damaged image ({type(error).__name__})") from None
    scale = image_size / min(width, height)
    resized_width, resized_height = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    if (resized_width, resized_height) != (width, height):
        image = image.resize((resized_width, resized_height), Image.BILINEAR)
    left, top = (resized_width - image_size) // 2, (resized_height - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def read_image_folder(
    root: Path, image_size: int = 32, channels: int = 3, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode a whole class-per-sub-folder tree into memory.

    Returns:
        uint8 images (N, channels, image_size, image_size), int64 labels (N,), and the class names.
    """
    samples, classes = list_image_folder(root)
    images = torch.stack([read_image(path, image_size, channels, max_pixels) for path, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return images, labels, classes

