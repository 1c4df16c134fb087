"""One reader per data-set file format: IDX (MNIST), CIFAR binary and python, SVHN .mat (photos: `nin.data.images`).

Every reader returns uint8 images (N, C, H, W) and int64 labels (N,) as torch tensors, and checks the file's
structure on every read (present, magic, size an exact record multiple, label range); anything wrong raises
`DataError` with a one-line message naming the file. Sizes a header or a pickle declares are checked against the
file's size before anything of that size is allocated.

    images, labels = read_cifar_binary(Path("cifar-10-batches-bin/test_batch.bin"), num_classes=10)
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from nin.data.pickles import unpickle_dict
from nin.errors import DataError, require_package

CIFAR_IMAGE_BYTES = 3 * 32 * 32  # one CIFAR record's pixels: 1024 R, then 1024 G, then 1024 B, row-major
IDX_LABEL_MAGIC = 2049  # http://yann.lecun.com/exdb/mnist/: uint8 data, 1 dimension
IDX_IMAGE_MAGIC = 2051  # uint8 data, 3 dimensions
MAX_DEFLATE_RATIO = 1032  # deflate expands at most about 1032:1 (zlib.net, "Technical details"): bounds a .gz's content


def require_file(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a file")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")


def cannot_read(path: Path, error: OSError) -> DataError:
    """The one-line error for a file that is there but cannot be opened (permissions, I/O error)."""
    return DataError(f"{path}: cannot read it ({error.strerror or type(error).__name__})")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, transparently gunzipped when the name ends in .gz."""
    require_file(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                return stream.read()
        return path.read_bytes()
    except PermissionError as error:
        raise cannot_read(path, error) from None
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
    require_file(path)
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

    The header is read first; a plain file must then hold exactly the bytes its dimensions declare, and a gzipped
    one is decompressed only up to that size plus one byte (refused if it holds more or less), so neither an
    overflowing header nor a gzip bomb allocates more than the file can hold.
    """
    require_file(path)
    gzipped = path.suffix == ".gz"
    file_bytes = path.stat().st_size
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as stream:
            magic_bytes = stream.read(4)
            if len(magic_bytes) < 4:
                raise DataError(f"{path}: {len(magic_bytes)} bytes, too short for an IDX header")
            magic = int.from_bytes(magic_bytes, "big")
            if magic != expected_magic:
                raise DataError(f"{path}: IDX magic {magic}, expected {expected_magic}")
            num_dims = magic_bytes[3]
            header_bytes = 4 + 4 * num_dims
            dims_bytes = stream.read(4 * num_dims)
            if len(dims_bytes) < 4 * num_dims:
                raise DataError(f"{path}: truncated IDX header")
            dims = [int.from_bytes(dims_bytes[4 * i : 4 + 4 * i], "big") for i in range(num_dims)]
            size = math.prod(dims)  # a Python int: dimensions up to 2**32 - 1 each cannot overflow it
            if gzipped and size > MAX_DEFLATE_RATIO * file_bytes:
                raise DataError(f"{path}: dimensions {dims} declare {size} bytes, more than {file_bytes} gzipped "
                                f"bytes can hold (at most {MAX_DEFLATE_RATIO}:1)")
            if not gzipped and header_bytes + size != file_bytes:
                raise DataError(f"{path}: {file_bytes} bytes, expected {header_bytes + size} for dimensions {dims}")
            data = stream.read(size + 1)
    except PermissionError as error:
        raise cannot_read(path, error) from None
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: unreadable or truncated gzip stream ({error})") from None
    if len(data) > size:
        raise DataError(f"{path}: more data than dimensions {dims} declare ({size} bytes after the header)")
    if len(data) < size:
        found = header_bytes + len(data)
        raise DataError(f"{path}: {found} bytes, expected {header_bytes + size} for dimensions {dims}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def idx_magic(path: Path) -> int | None:
    """The IDX magic number a file (gzipped or not) starts with when it is an IDX file of unsigned bytes (2051
    images, 2049 labels), else None: how a file is told from a CIFAR batch by content, not name. An images header
    must also give rows and columns of 1 to 4,096, which twelve bytes of a CIFAR batch's first image all but never
    spell; a plain labels file must be as long as its header says. An images file's header alone decides, so a
    damaged one is read as IDX and `read_idx` says what is wrong with it (its length against its header), not the
    CIFAR reader."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as stream:
            header = stream.read(16)
    except (OSError, EOFError, zlib.error):
        return None
    magic = int.from_bytes(header[:4], "big") if len(header) >= 4 else None
    if magic == IDX_LABEL_MAGIC and len(header) >= 8:  # four bytes of header: a plain file's length must agree too
        count = int.from_bytes(header[4:8], "big")
        return magic if path.suffix == ".gz" or path.stat().st_size == 8 + count else None
    if magic != IDX_IMAGE_MAGIC or len(header) < 16:
        return None
    rows, cols = int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big")
    return magic if 1 <= rows <= 4096 and 1 <= cols <= 4096 else None


def read_idx_dataset(images_path: Path, labels_path: Path, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a matching pair of IDX image and label files.

    Returns:
        uint8 images (N, 1, H, W) and int64 labels (N,).
    """
    images = read_idx(images_path, IDX_IMAGE_MAGIC)
    labels = read_idx(labels_path, IDX_LABEL_MAGIC)
    if len(images) == 0:
        raise DataError(f"{images_path}: an IDX images file of 0 images, expected at least one")
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


def read_pickle_dict(path: Path) -> dict[bytes, object]:
    """Unpickle a CIFAR python-version file through the restricted unpickler (`nin.data.pickles`).

    Returns:
        The file's dict, with bytes keys (b"data", b"labels", b"fine_labels", b"label_names", ...).
    """
    return unpickle_dict(_read_bytes(path), path)


def _labels_from_pickle(value: object, count: int, num_classes: int, key: bytes, path: Path) -> torch.Tensor:
    """A pickle's label list (or integer array) as int64, checked element by element before any conversion."""
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        values = value.tolist()
    elif isinstance(value, (list, tuple)):
        values = value
    else:
        raise DataError(f"{path}: {key!r} holds {type(value).__name__}, expected a list of {count} integer labels")
    if len(values) != count:
        raise DataError(f"{path}: {len(values)} labels, expected {count}")
    for label in values:
        if not isinstance(label, (int, np.integer)) or isinstance(label, bool):
            raise DataError(f"{path}: label {label!r:.40} in {key!r} is not an integer")
        if not 0 <= label < num_classes:
            raise DataError(f"{path}: label {label} out of range, expected 0..{num_classes - 1}")
    return torch.tensor([int(label) for label in values], dtype=torch.int64)


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
        found = ", ".join(sorted(repr(key) for key in content))  # keys of any type: repr sorts them all
        raise DataError(f"{path}: expected keys b'data' and {label_key!r}, found {found or 'none'}")
    data = content[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_IMAGE_BYTES:
        raise DataError(f"{path}: b'data' must be a uint8 array (N, {CIFAR_IMAGE_BYTES})")
    labels = _labels_from_pickle(content[label_key], len(data), num_classes, label_key, path)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def read_cifar_python_names(path: Path, key: bytes) -> list[str]:
    """Class names from `batches.meta` (key b"label_names") or CIFAR-100 `meta` (b"fine_label_names")."""
    content = read_pickle_dict(path)
    if key not in content:
        raise DataError(f"{path}: expected key {key!r}")
    names = content[key]
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, (bytes, str)) for name in names):
        raise DataError(f"{path}: {key!r} holds {type(names).__name__}, expected a list of class names")
    return [name.decode("utf-8", "replace") if isinstance(name, bytes) else name for name in names]


# ---------------------------------------------------------------------------------------------------------------
# SVHN format 2 (cropped digits): MATLAB files with X (32, 32, 3, N) and y (N, 1), digit 0 stored as 10
# ---------------------------------------------------------------------------------------------------------------


def require_svhn_reader() -> None:
    """SVHN's .mat files are read with scipy (the `svhn` extra); MissingPackage, naming the extra, without it."""
    require_package("scipy.io", "reading SVHN's .mat files", "svhn")


def read_svhn_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `train_32x32.mat`, `test_32x32.mat` or `extra_32x32.mat`.

    Returns:
        uint8 images (N, 3, 32, 32) and int64 labels (N,), with label 10 mapped to 0.
    """
    require_svhn_reader()
    import scipy.io

    require_file(path)
    try:
        content = scipy.io.loadmat(str(path))
    except PermissionError as error:
        raise cannot_read(path, error) from None
    except Exception as error:  # scipy raises ValueError, TypeError, OSError... on damaged files
        message = " ".join(str(error).split())
        raise DataError(f"{path}: not a readable MATLAB file ({type(error).__name__}: {message})") from None
    images, labels = content.get("X"), content.get("y")
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        found = images.shape if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"{path}: X must have shape (32, 32, 3, N), found {found}")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: X has dtype {images.dtype}, expected uint8")
    count = images.shape[3]
    if not isinstance(labels, np.ndarray) or labels.size != count or labels.dtype.kind not in "iuf":
        found = f"{labels.dtype} {labels.shape}" if isinstance(labels, np.ndarray) else type(labels).__name__
        raise DataError(f"{path}: y must hold {count} numeric labels, found {found}")
    labels = labels.reshape(-1)
    if not np.array_equal(labels, np.round(labels)):  # also refuses NaN; the official files store doubles
        raise DataError(f"{path}: y holds non-integer labels, expected 1..10")
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{path}: label out of range {labels.min()}..{labels.max()}, expected 1..10")
    labels = labels.astype(np.int64)
    labels[labels == 10] = 0
    return torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1))), torch.from_numpy(labels)
