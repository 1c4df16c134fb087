"""One reader per on-disk format: IDX (MNIST), CIFAR binary and python, SVHN .mat, image folders.

Every reader returns uint8 images (N, C, H, W) and int64 labels (N,) as torch tensors, and checks the file's
structure on every read (present, magic, size an exact record multiple, label range); anything wrong raises
`DataError` with a one-line message naming the file. Sizes a header or a pickle declares are checked against the
file's size before anything of that size is allocated.

    images, labels = read_cifar_binary(Path("cifar-10-batches-bin/test_batch.bin"), num_classes=10)
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import math
import pickle
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

CIFAR_IMAGE_BYTES = 3 * 32 * 32  # one CIFAR record's pixels: 1024 R, then 1024 G, then 1024 B, row-major
IDX_LABEL_MAGIC = 2049  # http://yann.lecun.com/exdb/mnist/: uint8 data, 1 dimension
IDX_IMAGE_MAGIC = 2051  # uint8 data, 3 dimensions
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (about 0.25 GiB of RGB)
MAX_DEFLATE_RATIO = 1032  # deflate expands at most about 1032:1 (zlib.net, "Technical details"): bounds a .gz's content


class DataError(ValueError):
    """A data file is missing, damaged, or not in the format its name promises."""


def _require_file(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a file")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")


def _cannot_read(path: Path, error: OSError) -> DataError:
    """The one-line error for a file that is there but cannot be opened (permissions, I/O error)."""
    return DataError(f"{path}: cannot read it ({error.strerror or type(error).__name__})")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, transparently gunzipped when the name ends in .gz."""
    _require_file(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                return stream.read()
        return path.read_bytes()
    except PermissionError as error:
        raise _cannot_read(path, error) from None
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

    The header is read first; a plain file must then hold exactly the bytes its dimensions declare, and a gzipped
    one is decompressed only up to that size plus one byte (refused if it holds more or less), so neither an
    overflowing header nor a gzip bomb allocates more than the file can hold.
    """
    _require_file(path)
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
        raise _cannot_read(path, error) from None
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: unreadable or truncated gzip stream ({error})") from None
    if len(data) > size:
        raise DataError(f"{path}: more data than dimensions {dims} declare ({size} bytes after the header)")
    if len(data) < size:
        found = header_bytes + len(data)
        raise DataError(f"{path}: {found} bytes, expected {header_bytes + size} for dimensions {dims}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


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


class _PickledArray(np.ndarray):
    """An array being unpickled: its `__setstate__` (the BUILD opcode) checks the state before numpy sees it.

    numpy's own `ndarray.__setstate__` trusts the declared shape; an object array whose list is shorter than the
    shape crashes the interpreter (numpy 2.4). Only plain numeric arrays whose bytes match their shape get through.
    """

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ValueError("array state is not a 4- or 5-tuple")
        shape, dtype, raw = state[-4], state[-3], state[-1]
        if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"array shape {shape!r} is not a tuple of sizes")
        if not isinstance(dtype, np.dtype) or not _is_plain(dtype):
            raise ValueError(f"array dtype {dtype!r} is not a plain numeric type")
        if not isinstance(raw, bytes) or len(raw) != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"array data does not hold the {math.prod(shape) * dtype.itemsize} bytes of shape {shape}")
        super().__setstate__(state)


def _is_plain(dtype: np.dtype) -> bool:
    """Booleans, integers, floats, complex numbers, bytes: no objects, no records, no void."""
    return dtype.kind in "biufcS" and not dtype.hasobject and dtype.fields is None


class _NumpyArrayType:
    """Stands for `numpy.ndarray` inside a pickle: the first argument of `_reconstruct`, never itself called."""


def _checked_dtype(unpickler: _RestrictedUnpickler):
    def dtype(name, align=False, copy=False) -> np.dtype:
        try:
            checked = np.dtype(name)
        except TypeError:
            checked = None
        if checked is None or not _is_plain(checked):
            raise DataError(f"{unpickler.path}: refused array type {name!r}, expected a plain numeric type")
        return np.dtype(name, align, copy)

    return dtype


def _checked_reconstruct(unpickler: _RestrictedUnpickler):
    def reconstruct(subtype, shape, dtype) -> np.ndarray:
        """numpy's `_reconstruct` (an empty array that BUILD then fills), for arrays the file can hold."""
        dtype = _checked_dtype(unpickler)(dtype)
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
        if subtype is not _NumpyArrayType or not all(type(d) is int and d >= 0 for d in shape):
            raise DataError(f"{unpickler.path}: refused to reconstruct {subtype!r} of shape {shape!r}")
        if math.prod(shape) * dtype.itemsize > unpickler.file_bytes:
            raise DataError(f"{unpickler.path}: pickle declares a {shape} {dtype} array, larger than the file's "
                            f"{unpickler.file_bytes} bytes")
        return np.ndarray.__new__(_PickledArray, shape, dtype)

    return reconstruct


def _latin1_encode(unpickler: _RestrictedUnpickler):
    def encode(text: str, encoding: str = "utf-8") -> bytes:
        if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
            raise DataError(f"{unpickler.path}: refused _codecs.encode(..., {encoding!r}), expected latin1")
        return codecs.encode(text, "latin1")

    return encode


# What CIFAR's pickles (Python 2, protocol 2) and numpy's own array pickles need, and nothing else, each as a
# factory given the unpickler. Names arrive unmapped (Python 2 "__builtin__"), so both spellings are listed.
# Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"), a pure function.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy.core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): lambda unpickler: _numpy_frombuffer(),
    ("numpy._core.numeric", "_frombuffer"): lambda unpickler: _numpy_frombuffer(),
    ("numpy", "ndarray"): lambda unpickler: _NumpyArrayType,
    ("numpy", "dtype"): _checked_dtype,
    ("__builtin__", "list"): lambda unpickler: list,
    ("builtins", "list"): lambda unpickler: list,
    ("__builtin__", "dict"): lambda unpickler: dict,
    ("builtins", "dict"): lambda unpickler: dict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose `find_class` refuses every global outside `_ALLOWED_GLOBALS`."""

    def __init__(self, stream: io.BytesIO, path: Path) -> None:
        super().__init__(stream, encoding="bytes")  # Python 2 str -> bytes, as CIFAR's own loader does
        self.path = path
        self.file_bytes = len(stream.getbuffer())  # the bound on any array the pickle declares

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DataError(f"refused to unpickle {module}.{name} in {self.path}")
        return _ALLOWED_GLOBALS[(module, name)](self)


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
    plain = {key: value.view(np.ndarray) if isinstance(value, np.ndarray) else value for key, value in content.items()}
    return {key.encode() if isinstance(key, str) else key: value for key, value in plain.items()}


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


def read_svhn_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `train_32x32.mat`, `test_32x32.mat` or `extra_32x32.mat`.

    Returns:
        uint8 images (N, 3, 32, 32) and int64 labels (N,), with label 10 mapped to 0.
    """
    import scipy.io  # optional dependency: network-in-network[svhn]

    _require_file(path)
    try:
        content = scipy.io.loadmat(str(path))
    except PermissionError as error:
        raise _cannot_read(path, error) from None
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


# ---------------------------------------------------------------------------------------------------------------
# Image folders: <root>/<class>/<image>, any size and mode
# ---------------------------------------------------------------------------------------------------------------


def list_image_classes(root: Path) -> list[str]:
    """The class names of a class-per-sub-folder tree: its sub-folders, sorted, hidden ones left out."""
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders, expected <root>/<class>/<image>")
    return classes


# What a folder's images are named; other files there (a README, Thumbs.db) are not images of the class.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})


def list_image_folder(root: Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """List (file, label) pairs of a class-per-sub-folder tree.

    Hidden files and folders (".DS_Store", ".ipynb_checkpoints") are ignored; files at the top level too, and files
    whose suffix is not an image's (`IMAGE_SUFFIXES`: a README, notes.txt, Thumbs.db).

    Args:
        root: The tree, <root>/<class>/<image>.
        classes: The class list in label order (e.g. the training split's, or a model's); a sub-folder outside
            it is refused, and a class without a sub-folder is fine. Default: the sub-folders, sorted by name.

    Returns:
        The samples in (sub-folder name, file name) order, and the class names.
    """
    found = list_image_classes(root)
    classes = found if classes is None else list(classes)
    samples = []
    for name in found:
        if name not in classes:
            raise DataError(f"{root / name}: class {name!r} is not in the class list ({', '.join(classes)})")
        files = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{root / name}: empty class folder, expected at least one image")
        samples.extend((path, classes.index(name)) for path in files)
    return samples, classes


def _to_8_bits(array: np.ndarray) -> np.ndarray:
    """16-bit integers by their type's range (value / 257); floats, and integers outside 0..65535, by min–max."""
    if array.dtype.kind in "iu" and array.size and array.min() >= 0 and array.max() <= 65535:
        return np.round(array / 257).astype(np.uint8)
    finite = array[np.isfinite(array)].astype(np.float64)
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    scaled = (array.astype(np.float64) - low) * (255 / (high - low) if high > low else 0.0)
    return np.round(np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0).clip(0, 255)).astype(np.uint8)


def _composite(image: Image.Image) -> Image.Image:
    """RGB as seen over a white background; an image whose visible colour is one value shows its alpha instead."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    colour, alpha = rgba[..., :3], rgba[..., 3:]
    visible = colour[alpha[..., 0] > 0]
    if alpha.min() < alpha.max() and (visible == visible[0]).all():  # content only in alpha: a stencil, ink = alpha
        seen = np.repeat(alpha, 3, axis=2)
    else:
        seen = colour * (alpha / 255) + 255 * (1 - alpha / 255)
    return Image.fromarray(np.round(seen).astype(np.uint8), "RGB")


def as_seen(image: Image.Image) -> Image.Image:
    """The picture a viewer shows: EXIF orientation applied, high bit depths scaled to 8 bits, alpha composited."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block: a viewer shows the pixels unrotated, and so do we
        pass
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = Image.fromarray(_to_8_bits(np.asarray(image)), "L")
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        image = _composite(image)
    return image


def read_image(path: Path, image_size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode one image as a viewer shows it, convert it to `channels` (1 or 3), resize, and center-crop a square.

    As shown means: the EXIF orientation is applied; 16-bit images ("I;16", and "I" with values in 0..65535, as
    Pillow opens 16-bit PNGs) are scaled by the type's full range (value / 257), other "I" images and float
    images ("F", e.g. float TIFFs) by their own min–max range; images with alpha (RGBA, LA, P or L/RGB with a
    transparent colour) are composited over white, except that an image whose visible pixels all have one colour
    (a stencil such as a digit drawn only in alpha) becomes its alpha channel, ink bright on black.

    Args:
        path: Any format Pillow decodes.
        image_size: Output height and width.
        channels: 1 (grayscale) or 3 (RGB).
        max_pixels: Refuse images with more pixels than this (decompression-bomb guard), checked before decoding.

    Returns:
        uint8 tensor (channels, image_size, image_size).
    """
    assert channels in (1, 3), f"channels must be 1 or 3, got {channels}"
    return _decode(path, max_pixels, lambda image: image_to_tensor(image, image_size, channels))


def read_photo(path: Path, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one image as `read_image` does (as seen, ``channels``), but keep its own size: a PIL image.

    `nin visualize --images` draws the class map on it; the square `read_image` crops is its centre square.
    """
    assert channels in (1, 3), f"channels must be 1 or 3, got {channels}"
    return _decode(path, max_pixels, lambda image: as_seen(image).convert("L" if channels == 1 else "RGB"))


def _decode(path: Path, max_pixels: int, convert):
    """Open ``path`` with Pillow, refuse it in one line when it is missing, too large or damaged, else convert it."""
    _require_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise DataError(f"{path}: {width}x{height} image exceeds the {max_pixels}-pixel limit")
                return convert(image)
    except DataError:
        raise
    except PermissionError as error:
        raise _cannot_read(path, error) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"{path}: oversized image refused ({error})") from None
    except Exception as error:  # UnidentifiedImageError, truncated data, unsupported modes
        raise DataError(f"{path}: unsupported or damaged image ({type(error).__name__})") from None


def image_to_tensor(image: Image.Image, image_size: int, channels: int) -> torch.Tensor:
    """A decoded PIL image as `read_image` converts it: as seen, to ``channels``, resized and center-cropped.

    Returns:
        uint8 tensor (channels, image_size, image_size).
    """
    assert channels in (1, 3), f"channels must be 1 or 3, got {channels}"
    image = as_seen(image).convert("L" if channels == 1 else "RGB")
    width, height = image.size  # after the EXIF rotation
    scale = image_size / min(width, height)
    resized_width, resized_height = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    if (resized_width, resized_height) != (width, height):
        image = image.resize((resized_width, resized_height), Image.BILINEAR)
    left, top = (resized_width - image_size) // 2, (resized_height - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def read_image_folder(
    root: Path,
    image_size: int = 32,
    channels: int = 3,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    classes: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode a whole class-per-sub-folder tree into memory (each image as `read_image` does).

    Args:
        root: The tree, <root>/<class>/<image>.
        image_size: Output height and width.
        channels: 1 or 3.
        max_pixels: Per-image pixel limit (see `read_image`).
        classes: The class list in label order, e.g. the training split's or the classes stored in a model's
            weights; label i is `classes[i]`. A sub-folder outside it is refused; a class without a sub-folder
            is fine. Default: the sub-folders of `root`, sorted by name.

    Returns:
        uint8 images (N, channels, image_size, image_size), int64 labels (N,), and the class names.
    """
    samples, classes = list_image_folder(root, classes)
    images = torch.stack([read_image(path, image_size, channels, max_pixels) for path, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return images, labels, classes
