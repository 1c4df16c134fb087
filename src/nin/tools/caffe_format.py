"""Caffe's two file formats, read without Caffe or protobuf: ``.caffemodel`` (binary) and ``.prototxt`` (text).

    net = read_caffemodel("cifar10_nin.caffemodel")       # CaffeNet: layers with their blobs as numpy arrays
    layout = read_prototxt("cifar10_nin_train_val.prototxt")

A ``.caffemodel`` is one protobuf ``NetParameter`` message (caffe/src/caffe/proto/caffe.proto). We read it with
a small decoder of the protobuf wire format of our own, so neither Caffe nor protobuf is needed, and nothing is
unpickled. The file holds its layers either as the old V1 messages (``layers``, field 2; the authors' CIFAR-10
model) or as the new ones (``layer``, field 100); each layer carries its trained blobs (``BlobProto``), a
convolution's weights (out, in, k, k) and biases (out), shaped by the legacy num/channels/height/width fields or
by a ``shape``. Sections, in reading order: the wire format; Caffe's messages; the prototxt (text format).
Every problem is a `NinError` of one line naming the file.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nin.errors import NinError

__all__ = ["CaffeLayer", "CaffeNet", "WireError", "read_caffemodel", "read_prototxt", "POOL_METHODS"]


# ---------------------------------------------------------------------------------------------
# The protobuf wire format (https://protobuf.dev/programming-guides/encoding/)
# ---------------------------------------------------------------------------------------------

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5  # wire types; 3 and 4 (groups) Caffe never uses


class WireError(NinError):
    """The bytes are not a well-formed protobuf message."""


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode one base-128 varint at ``pos``: (value, position after it)."""
    value, shift = 0, 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:  # a varint has at most 10 bytes
            raise WireError("varint longer than 10 bytes")


def _fields(data: memoryview, start: int, end: int):
    """Yield (field number, wire type, value) of the message in ``data[start:end]``.

    The value is an int for VARINT, bytes' (start, end) positions for LENGTH_DELIMITED, and the raw
    (start, end) positions of the 4 or 8 bytes for FIXED32 / FIXED64: nothing is copied or allocated here.
    """
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == VARINT:
            value, pos = _varint(data, pos, end)
            yield number, wire_type, value
        elif wire_type in (LENGTH_DELIMITED, FIXED32, FIXED64):
            if wire_type == LENGTH_DELIMITED:
                size, pos = _varint(data, pos, end)
            else:
                size = 4 if wire_type == FIXED32 else 8
            if size > end - pos:  # bounds every later allocation by the bytes actually present
                raise WireError(f"field {number} needs {size} bytes, {end - pos} remain (truncated)")
            yield number, wire_type, (pos, pos + size)
            pos += size
        else:
            raise WireError(f"field {number} has wire type {wire_type}, which Caffe never writes")


def _signed(value: int) -> int:
    """An int32 / int64 varint as two's complement (negative numbers take 10 bytes)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _string(data: memoryview, span: tuple[int, int]) -> str:
    try:
        return bytes(data[span[0] : span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("a string field is not UTF-8") from None


def _varints(data: memoryview, wire_type: int, value) -> list[int]:
    """A repeated integer field's values: one unpacked varint, or a packed run of them."""
    if wire_type == VARINT:
        return [_signed(value)]
    if wire_type != LENGTH_DELIMITED:
        raise WireError(f"an integer field has wire type {wire_type}")
    values, pos = [], value[0]
    while pos < value[1]:
        number, pos = _varint(data, pos, value[1])
        values.append(_signed(number))
    return values


def _reals(data: memoryview, wire_type: int, value, dtype: str) -> np.ndarray:
    """A repeated float ('<f4') or double ('<f8') field's values: one unpacked value, or a packed run."""
    width = np.dtype(dtype).itemsize
    packed = wire_type == LENGTH_DELIMITED
    if not packed and wire_type != (FIXED32 if width == 4 else FIXED64):
        raise WireError(f"a {'float' if width == 4 else 'double'} field has wire type {wire_type}")
    start, end = value
    if (end - start) % width:
        raise WireError(f"packed {'floats' if width == 4 else 'doubles'} of {end - start} bytes")
    return np.frombuffer(data[start:end], dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Caffe's messages (caffe.proto): NetParameter, LayerParameter / V1LayerParameter, BlobProto
# ---------------------------------------------------------------------------------------------

# V1LayerParameter.LayerType: the enum numbers of the types a NiN uses (caffe.proto, message V1LayerParameter)
V1_TYPES = {1: "Accuracy", 3: "Concat", 4: "Convolution", 5: "Data", 6: "Dropout", 14: "InnerProduct", 15: "LRN",
            17: "Pooling", 18: "ReLU", 20: "Softmax", 21: "SoftmaxWithLoss"}
# the V1 text names of those types (prototxt `type: CONVOLUTION`) and the new ones, onto one spelling
_TYPE_NAMES = {name.upper(): name for name in V1_TYPES.values()} | {"SOFTMAX_LOSS": "SoftmaxWithLoss",
                                                                   "INNER_PRODUCT": "InnerProduct", "RELU": "ReLU"}
POOL_METHODS = {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}  # PoolingParameter.PoolMethod
MAX_BLOB_AXES = 32  # caffe/include/caffe/blob.hpp: kMaxBlobAxes

# (name, type, blobs, convolution_param, pooling_param) field numbers in the two layer messages
_LAYER_FIELDS = {
    "V1": {"name": 4, "type": 5, "blobs": 6, "convolution": 10, "pooling": 19},
    "new": {"name": 1, "type": 2, "blobs": 7, "convolution": 106, "pooling": 121},
}
_CONV_FIELDS = {3: "pad", 4: "kernel_size", 5: "group", 6: "stride", 9: "pad_h", 10: "pad_w", 11: "kernel_h",
                12: "kernel_w", 13: "stride_h", 14: "stride_w", 1: "num_output"}
_POOL_FIELDS = {1: "pool", 2: "kernel_size", 3: "stride", 4: "pad", 5: "pad_h", 6: "pad_w", 7: "kernel_h",
                8: "kernel_w", 9: "stride_h", 10: "stride_w", 12: "global_pooling"}


@dataclass
class CaffeLayer:
    """One layer of a Caffe net: its name, type, trained blobs and the parameters a NiN must match."""

    name: str
    type: str  # new-style spelling: "Convolution", "Pooling", ... (V1 enums and names are translated)
    blobs: list[np.ndarray] = field(default_factory=list)  # float32, each in its declared shape
    convolution: dict[str, list[int]] = field(default_factory=dict)  # e.g. {"kernel_size": [5], "pad": [2]}
    pooling: dict[str, list[int]] = field(default_factory=dict)  # e.g. {"pool": [0], "kernel_size": [3]}


@dataclass
class CaffeNet:
    """A decoded NetParameter: the net's name and its layers in file order."""

    name: str
    layers: list[CaffeLayer]
    format: str  # "V1" (layers, field 2) or "new" (layer, field 100)

    def layer(self, name: str) -> CaffeLayer | None:
        return next((layer for layer in self.layers if layer.name == name), None)


def _blob(data: memoryview, start: int, end: int, where: str) -> np.ndarray:
    """Decode a BlobProto: its values (data, else double_data) shaped by ``shape`` or num/channels/height/width."""
    legacy = {1: 0, 2: 0, 3: 0, 4: 0}  # num, channels, height, width (int32, default 0)
    shape: list[int] | None = None
    parts: list[np.ndarray] = []
    double_parts: list[np.ndarray] = []
    for number, wire_type, value in _fields(data, start, end):
        if number in legacy:
            legacy[number] = _varints(data, wire_type, value)[-1]
        elif number == 5:  # data: repeated float, packed
            parts.append(_reals(data, wire_type, value, "<f4"))
        elif number == 8:  # double_data: repeated double, packed
            double_parts.append(_reals(data, wire_type, value, "<f8"))
        elif number == 7 and wire_type == LENGTH_DELIMITED:  # BlobShape { repeated int64 dim = 1 [packed] }
            shape = []
            for dim_number, dim_type, dim_value in _fields(data, *value):
                if dim_number == 1:
                    shape.extend(_varints(data, dim_type, dim_value))
    if shape is None:
        shape = [legacy[1], legacy[2], legacy[3], legacy[4]]
    if len(shape) > MAX_BLOB_AXES:
        raise NinError(f"{where} declares {len(shape)} dimensions; Caffe allows at most {MAX_BLOB_AXES}")
    if any(d < 0 for d in shape):
        raise NinError(f"{where} declares the shape {_shape(shape)}, with a negative size")
    present = sum(part.size for part in parts or double_parts)  # values in the file: bounds every dimension
    if any(d > max(present, 1) for d in shape):  # checked before numpy sees the shape (a 0 elsewhere hides it)
        raise NinError(f"{where} declares the shape {_shape(shape)} but holds {present} values")
    values = np.concatenate(parts or double_parts or [np.zeros(0, "<f4")]).astype(np.float32)
    if math.prod(shape) != values.size:
        raise NinError(f"{where} declares the shape {_shape(shape)} ({math.prod(shape)} values) "
                       f"but holds {values.size} values")
    return values.reshape(shape)


def _shape(shape: list[int]) -> str:
    """A declared shape for a message, shortened when a damaged file declares many dimensions."""
    return str(tuple(shape)) if len(shape) <= 8 else f"({', '.join(map(str, shape[:8]))}, ...)"


def _params(data: memoryview, span: tuple[int, int], names: dict[int, str]) -> dict[str, list[int]]:
    params: dict[str, list[int]] = {}
    for number, wire_type, value in _fields(data, *span):
        if number in names and wire_type in (VARINT, LENGTH_DELIMITED):
            params.setdefault(names[number], []).extend(_varints(data, wire_type, value))
    return params


def _layer(data: memoryview, span: tuple[int, int], form: str, index: int) -> CaffeLayer:
    numbers = _LAYER_FIELDS[form]
    layer = CaffeLayer(name=f"#{index}", type="")
    blob_spans = []
    for number, wire_type, value in _fields(data, *span):
        if number == numbers["name"] and wire_type == LENGTH_DELIMITED:
            layer.name = _string(data, value)
        elif number == numbers["type"]:
            if form == "V1" and wire_type == VARINT:
                layer.type = V1_TYPES.get(value, f"V1 type {value}")
            elif form == "new" and wire_type == LENGTH_DELIMITED:
                text = _string(data, value)
                layer.type = _TYPE_NAMES.get(text.upper(), text)
        elif number == numbers["blobs"] and wire_type == LENGTH_DELIMITED:
            blob_spans.append(value)
        elif number == numbers["convolution"] and wire_type == LENGTH_DELIMITED:
            layer.convolution = _params(data, value, _CONV_FIELDS)
        elif number == numbers["pooling"] and wire_type == LENGTH_DELIMITED:
            layer.pooling = _params(data, value, _POOL_FIELDS)
    layer.blobs = [_blob(data, *blob, f"layer {layer.name} blob {i}") for i, blob in enumerate(blob_spans)]
    return layer


def read_caffemodel(path: str | os.PathLike) -> CaffeNet:
    """Decode a binary ``.caffemodel`` (a NetParameter) into its layers and blobs.

    Raises:
        NinError: The file is missing, truncated, not a protobuf NetParameter, or a blob's values do not
            fill its declared shape. Memory use is bounded by the file's size.
    """
    path = Path(path)
    if not path.is_file():
        raise NinError(f"{path}: no such file")
    data = memoryview(path.read_bytes())
    layers: list[CaffeLayer] = []
    name, forms = "", set()
    try:
        for number, wire_type, value in _fields(data, 0, len(data)):
            if number == 1 and wire_type == LENGTH_DELIMITED:
                name = _string(data, value)
            elif number in (2, 100) and wire_type == LENGTH_DELIMITED:
                form = "V1" if number == 2 else "new"
                forms.add(form)
                layers.append(_layer(data, value, form, len(layers)))
    except WireError as e:
        raise NinError(f"{path}: not a readable Caffe model ({e})") from None
    except NinError as e:
        raise NinError(f"{path}: {e}") from None
    if not layers:
        raise NinError(f"{path}: not a Caffe model (no layers in a NetParameter)")
    if len(forms) > 1:  # Caffe's own upgrade refuses such a file too
        raise NinError(f"{path}: mixes V1 `layers` and new `layer` messages")
    return CaffeNet(name=name, layers=layers, format=forms.pop())


# ---------------------------------------------------------------------------------------------
# The prototxt: protobuf text format, just enough to read a net's layers
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[{}:;,\[\]<>]|[^\s{}:;,\[\]<>"\'#]+')


def _parse_text(text: str, where: str) -> list[tuple[str, object]]:
    """Parse protobuf text format into nested lists of (key, value); values are strings or such lists."""
    tokens = [t for t in _TOKEN.findall(text) if t.strip() and not t.startswith("#")]
    if "".join(_TOKEN.findall(text)) != text:
        raise NinError(f"{where}: not a protobuf text file")
    stack: list[list[tuple[str, object]]] = [[]]
    pos = 0
    while pos < len(tokens):
        token = tokens[pos]
        if token == "}":
            if len(stack) == 1:
                raise NinError(f"{where}: unbalanced '}}'")
            stack.pop()
            pos += 1
            continue
        if token in ",;":
            pos += 1
            continue
        key = token
        pos += 1
        if pos < len(tokens) and tokens[pos] == ":":
            pos += 1
        if pos >= len(tokens):
            raise NinError(f"{where}: ends inside the field {key!r}")
        if tokens[pos] in ("{", "<"):
            message: list[tuple[str, object]] = []
            stack[-1].append((key, message))
            stack.append(message)
        else:
            stack[-1].append((key, tokens[pos].strip("\"'")))
        pos += 1
    if len(stack) != 1:
        raise NinError(f"{where}: unbalanced '{{'")
    return stack[0]


_TEXT_ENUMS = {"MAX": 0, "AVE": 1, "STOCHASTIC": 2, "true": 1, "false": 0}  # PoolMethod, bool


def _text_params(entries: list, names: dict[int, str], where: str) -> dict[str, list[int]]:
    """The integer (or enum, bool) fields of a text-format convolution_param / pooling_param."""
    params: dict[str, list[int]] = {}
    for param, text in entries:
        if param not in names.values() or not isinstance(text, str):
            continue
        try:
            params.setdefault(param, []).append(_TEXT_ENUMS[text] if text in _TEXT_ENUMS else int(text))
        except ValueError:
            raise NinError(f"{where}: {param}: {text!r} is not an integer") from None
    return params


def read_prototxt(path: str | os.PathLike) -> CaffeNet:
    """Read a net definition (``.prototxt``, V1 ``layers {}`` or new ``layer {}``): layer names, types, parameters."""
    path = Path(path)
    if not path.is_file():
        raise NinError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise NinError(f"{path}: not a text file") from None
    layers, forms, net_name = [], set(), ""
    for key, value in _parse_text(text, str(path)):
        if key == "name" and isinstance(value, str):
            net_name = value
        if key not in ("layers", "layer") or not isinstance(value, list):
            continue
        forms.add("V1" if key == "layers" else "new")
        layer = CaffeLayer(name=f"#{len(layers)}", type="")
        for sub_key, sub_value in value:
            if sub_key == "name" and isinstance(sub_value, str):
                layer.name = sub_value
            elif sub_key == "type" and isinstance(sub_value, str):
                layer.type = _TYPE_NAMES.get(sub_value.upper(), sub_value)
            elif sub_key == "convolution_param" and isinstance(sub_value, list):
                layer.convolution = _text_params(sub_value, _CONV_FIELDS, f"{path}: layer {layer.name}")
            elif sub_key == "pooling_param" and isinstance(sub_value, list):
                layer.pooling = _text_params(sub_value, _POOL_FIELDS, f"{path}: layer {layer.name}")
        layers.append(layer)
    if not layers:
        raise NinError(f"{path}: no `layers {{}}` or `layer {{}}` in it; not a Caffe net definition")
    return CaffeNet(name=net_name, layers=layers, format="V1" if forms == {"V1"} else "new")
