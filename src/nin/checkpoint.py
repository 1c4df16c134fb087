"""Checkpoints and weights files: safetensors tensors plus a JSON header, written atomically.

    save_weights("weights/mnist.safetensors", model, preprocessing, meta)
    model, preprocessing, meta = load_weights("weights/mnist.safetensors")
    save_checkpoint("runs/x/checkpoint.safetensors", state.state_dict(), preprocessing, meta)
    state, preprocess_state, meta = load_checkpoint("runs/x/checkpoint.safetensors")

This module owns both formats: every tensor prefix and every key of the header is written and read here.

Every file is one safetensors file: tensors under prefixes (``model.``, ``preprocess.``, ``ema.``,
``optim.``, ``rng.``) and a JSON document in the header's metadata under the key ``nin``. Loading
never unpickles anything. A training checkpoint (``RUN_DIR/checkpoint.safetensors``) also holds the
optimizer's momentum buffers, the lr rule, every RNG state and the position in the epoch;
a weights file (``RUN_DIR/model.safetensors``, ``weights/<name>.safetensors``) holds what evaluate
and predict need: the model config, the weights and the fitted preprocessing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nin.errors import CheckpointError
from nin.files import atomic_write
from nin.models import NiN, NiNConfig, model_config
from nin.transforms import Preprocessing

__all__ = ["save_state", "load_state", "read_meta", "save_weights", "load_weights", "save_checkpoint",
           "load_checkpoint", "weights_architecture", "git_revision"]

FORMAT = "nin-1"


def save_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write tensors and a JSON-able ``meta`` dict into one safetensors file."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {"nin": json.dumps({"format": FORMAT, **meta})}
    try:
        atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=header))
    except (SafetensorError, OSError) as e:  # disk full, quota, a vanished folder: the old file stays
        raise CheckpointError(f"{path}: cannot write it ({e}); the previous file, if any, is unchanged") from None


# What safetensors raises for a file it cannot read (damaged, truncated, another format, unreadable)
_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON header of a file written by `save_state`, without reading its tensors."""
    path = Path(path)
    return _parse_meta(path, _read_header(path))


def _read_header(path: Path) -> dict:
    """The safetensors metadata of ``path``; a missing or unreadable file raises CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint or weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except _READ_ERRORS as e:
        raise CheckpointError(_unreadable(path, e)) from None


# Files users pass where weights go: what they are, and what to pass instead (not just "header too large").
_NOT_WEIGHTS = {
    ".onnx": "an exported model (ONNX), not nin weights",
    ".pt": "an exported model (TorchScript), not nin weights",
    ".xml": "an exported model (OpenVINO), not nin weights",
    ".caffemodel": "Caffe weights, not nin weights; convert them first with `nin import-caffe`",
}


def _unreadable(path: Path, error: Exception) -> str:
    """The one-line message for a file safetensors cannot read."""
    what = _NOT_WEIGHTS.get(path.suffix.lower())
    if what is None:
        return f"{path}: not a readable safetensors file ({error})"
    if what.startswith("an exported"):
        backend = {".onnx": "onnxruntime", ".pt": "torchscript", ".xml": "openvino"}[path.suffix.lower()]
        what += (f"; pass the weights file or run folder it was exported from, or score this graph with "
                 f"`nin predict {path.name} IMAGE --backend {backend}`")
    return f"{path}: {what}"


def _parse_meta(path: Path, header: dict) -> dict:
    if "nin" not in header:
        raise CheckpointError(f"{path}: a safetensors file without nin metadata (expected a nin checkpoint)")
    try:
        meta = json.loads(header["nin"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: damaged nin metadata ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: nin metadata is {type(meta).__name__}, expected a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by `save_state`; a missing, damaged or foreign file raises CheckpointError."""
    path = Path(path)
    meta = _parse_meta(path, _read_header(path))
    try:
        tensors = load_file(str(path))
    except _READ_ERRORS as e:
        raise CheckpointError(_unreadable(path, e)) from None
    return tensors, meta


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def save_weights(path: str | os.PathLike, model: NiN, preprocessing, meta: dict) -> None:
    """Weights for evaluate / predict: the model config, state_dict and fitted preprocessing.

    ``meta`` should carry ``dataset``, ``classes`` and anything evaluate needs (``tta_flip``).
    """
    tensors = _prefixed("model", model.state_dict())
    tensors.update(_prefixed("preprocess", preprocessing.state_dict()))
    meta = {**meta, "kind": "weights", "model_config": model.config.to_dict(), "preprocessing": preprocessing.kind}
    save_state(path, tensors, meta)


def load_weights(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Rebuild (model, preprocessing, meta) from one file: a weights file, or a training checkpoint (read as
    weights: its averaged weights when the run keeps an EMA). Tags and run folders: `nin.pretrained.load`."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, expected a weights file (nin.pretrained.load reads run folders)")
    tensors, meta = load_state(path)
    broken = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:
        raise CheckpointError(f"{path}: tensor {broken} holds NaN or infinite values; these weights cannot predict")
    missing = next((key for key in ("model_config", "preprocessing") if key not in meta), None)
    if missing is not None:
        raise CheckpointError(f"{path}: its metadata has no {missing}; expected a weights file written by nin (nin "
                              "train, nin reproduce record, nin import-caffe)")
    try:
        config = NiNConfig.from_dict(meta["model_config"])
        weights = _unprefixed("ema", tensors) or _unprefixed("model", tensors)
        _check_shapes(config, weights)  # before the model's own tensors are allocated
        model = NiN(config)
        model.load_state_dict(weights)
        preprocessing = Preprocessing(meta["preprocessing"], _unprefixed("preprocess", tensors))
        _check_preprocessing(preprocessing, config)
        _check_classes(meta.get("classes"), config.num_classes)
    except (KeyError, TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise CheckpointError(f"{path}: does not match its own model config ({_first_line(e)})") from None
    model.classes = meta.get("classes")
    model.to(device).eval()
    return model, preprocessing, meta


def _check_shapes(config: NiNConfig, weights: dict[str, torch.Tensor]) -> None:
    """The model ``config`` declares must have the file's tensors, name for name and shape for shape: checked on
    the meta device, so a config declaring huge widths costs nothing (the file's tensors bound the memory)."""
    with torch.device("meta"):
        declared = {name: tuple(tensor.shape) for name, tensor in NiN(config).state_dict().items()}
    missing = sorted(set(declared) - set(weights))
    if missing:
        raise KeyError(f"no tensor {missing[0]} in the file")
    extra = sorted(set(weights) - set(declared))
    if extra:
        raise KeyError(f"tensor {extra[0]} is not in the model")
    wrong = next((name for name, shape in declared.items() if tuple(weights[name].shape) != shape), None)
    if wrong is not None:
        raise ValueError(f"tensor {wrong} has the shape {tuple(weights[wrong].shape)}, the config declares "
                         f"{declared[wrong]}")


def weights_architecture(meta: dict) -> tuple[str, dict]:
    """The registered model name and the NiNConfig overrides that rebuild a weights file's model.

    The name comes from the training config (or an import's ``source.arch``); the overrides are the fields
    where the file's model config differs from that model's registered one (the blocks follow num_classes).
    """
    name = (meta.get("train_config") or {}).get("model") or (meta.get("source") or {}).get("arch")
    try:
        saved = NiNConfig.from_dict(meta["model_config"])
        base = model_config(name)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"its model is not a registered one ({e})") from None
    overrides = {f.name: getattr(saved, f.name) for f in dataclasses.fields(NiNConfig)
                 if f.name != "blocks" and getattr(saved, f.name) != getattr(base, f.name)}
    if model_config(name, **overrides) != saved:
        raise CheckpointError(f"its model differs from {name} in its blocks, which --set cannot express")
    return name, overrides


def _check_preprocessing(preprocessing, config: NiNConfig) -> None:
    """The fitted statistics must fit the model's input: (C,) mean/std, a (D, D) ZCA for D = C·H·W."""
    channels, pixels = config.in_channels, config.in_channels * config.input_size ** 2
    if preprocessing.kind == "standardize":
        if tuple(preprocessing.mean.shape) != (channels,) or tuple(preprocessing.std.shape) != (channels,):
            raise ValueError(f"standardize mean/std of shape {tuple(preprocessing.mean.shape)}, expected ({channels},)")
    if preprocessing.kind == "gcn_zca":
        if tuple(preprocessing.zca.matrix.shape) != (pixels, pixels) or preprocessing.zca.mean.numel() != pixels:
            raise ValueError(f"ZCA matrix of shape {tuple(preprocessing.zca.matrix.shape)}, expected ({pixels}, {pixels})")


def _check_classes(classes, num_classes: int) -> None:
    if classes is None:
        return
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(classes) != num_classes:
        raise ValueError(f"classes must be a list of {num_classes} names, got {str(classes)[:80]}")


def _first_line(error: BaseException) -> str:
    """A load_state_dict error's first line names the problem; the tensor it names is on the next line."""
    lines = [line.strip() for line in str(error).strip("'\"").splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__


# The training state's plain values (the rest are tensors), and the tensors resuming cannot do without.
_COUNTERS = ("epoch", "batches_done", "step", "partial_time", "plateau_rule")
_REQUIRED = ("rng.cpu", "partial.loss_sum", "partial.correct", "partial.seen")


def save_checkpoint(path: str | os.PathLike, state: dict, preprocessing, meta: dict) -> None:
    """Atomically write a training checkpoint: a run's state (`RunState.state_dict()`), its preprocessing, ``meta``.

    ``state`` holds ``model``, ``optimizer``, ``rng`` and ``partial`` (dicts of tensors), ``ema`` (a dict of
    tensors or None) and the counters epoch, batches_done, step, partial_time, plateau_rule.
    """
    tensors = {**_prefixed("model", state["model"]), **_prefixed("preprocess", preprocessing.state_dict()),
               **_prefixed("optim", state["optimizer"]), **_prefixed("rng", state["rng"]),
               **_prefixed("partial", state["partial"]), **_prefixed("ema", state.get("ema") or {})}
    save_state(path, tensors, {"kind": "checkpoint", "preprocessing": preprocessing.kind, **meta,
                               **{key: state[key] for key in _COUNTERS}})


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by `save_checkpoint`: (state, preprocessing state, meta).

    Raises:
        CheckpointError: Missing, damaged, not a training checkpoint, or without what resuming reads.
    """
    tensors, meta = load_state(path)
    if meta.get("kind") != "checkpoint":
        raise CheckpointError(f"{path}: not a training checkpoint")
    missing = [key for key in (*_COUNTERS, "train_config") if key not in meta]
    missing += [key for key in _REQUIRED if key not in tensors]
    if missing:
        raise CheckpointError(f"{path}: damaged training state (no {missing[0]})")
    for key in ("epoch", "batches_done", "step"):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 0:
            raise CheckpointError(f"{path}: damaged training state ({key} is {meta[key]!r})")
    if not isinstance(meta["partial_time"], (int, float)) or not isinstance(meta["plateau_rule"], dict):
        raise CheckpointError(f"{path}: damaged training state (partial_time or plateau_rule)")
    state = {"model": _unprefixed("model", tensors), "ema": _unprefixed("ema", tensors) or None,
             "optimizer": _unprefixed("optim", tensors), "rng": _unprefixed("rng", tensors),
             "partial": _unprefixed("partial", tensors), **{key: meta[key] for key in _COUNTERS}}
    return state, _unprefixed("preprocess", tensors), meta


@functools.cache
def git_revision() -> str | None:
    """The source tree's git commit (with '-dirty' for local changes), or None outside a checkout.

    Read once per process: a run records the revision that started it (and each resume its own).
    """
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
