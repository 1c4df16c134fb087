"""A restricted unpickler for CIFAR's python files: numpy arrays, lists, dicts and latin-1 bytes, nothing else.

    content = unpickle_dict(Path("data_batch_1").read_bytes(), Path("data_batch_1"))   # {b"data": ..., b"labels": ...}

A pickle is a program: ``pickle.load`` runs whatever callables the file names. This unpickler admits only what
CIFAR's pickles (Python 2, protocol 2) and numpy's own array pickles need, each wrapped so that it checks its
arguments (a plain numeric dtype, a shape the file's bytes can hold) before numpy sees them.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
from pathlib import Path

import numpy as np

from nin.errors import DataError

__all__ = ["unpickle_dict"]


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


def unpickle_dict(data: bytes, path: Path) -> dict[bytes, object]:
    """Unpickle a CIFAR python-version file's bytes through the restricted unpickler (``path`` names it in errors).

    Returns:
        The file's dict, with bytes keys (b"data", b"labels", b"fine_labels", b"label_names", ...).
    """
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
