"""Checkpoints and weights files: safetensors tensors plus a JSON header, written atomically.

    save_weights("weights/mnist.safetensors", model, preprocessing, meta)
    model, preprocessing, meta = load_weights("weights/mnist.safetensors")

Every file is one safetensors file: tensors under prefixes (``model.``, ``preprocess.``, ``ema.``,
``optim.``, ``rng.``) and a JSON document in the header's metadata under the key ``nin``. Loading
never unpickles anything. A training checkpoint (``RUN_DIR/checkpoint.safetensors``) also holds the
optimizer's momentum buffers, the lr rule, every RNG state and the position in the epoch;
a weights file (``RUN_DIR/model.safetensors``, ``weights/<name>.safetensors``) holds what evaluate
and predict need: the model config, the weights and the fitted preprocessing.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from nin.errors import CheckpointError
from nin.models import NiN, NiNConfig

__all__ = ["atomic_write_bytes", "save_state", "load_state", "save_weights", "load_weights", "git_revision",
           "remove_stale_temp_files"]

FORMAT = "nin-1"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: str | os.PathLike, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files that killed writes of ``folder/<name>`` left behind; returns what went.

    Only call it when no other process is writing into ``folder`` (the training run owning it, at its start).
    """
    removed = []
    for name in names:
        for temp in Path(folder).glob(f".{name}.*.tmp"):
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


def _atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file, never a torn one."""

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)

    _atomic(Path(path), write)


def save_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write tensors and a JSON-able ``meta`` dict into one safetensors file."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {"nin": json.dumps({"format": FORMAT, **meta})}
    _atomic(Path(path), lambda tmp: save_file(flat, tmp, metadata=header))


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by `save_state`; a missing, damaged or foreign file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint or weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if "nin" not in header:
        raise CheckpointError(f"{path}: a safetensors file without nin metadata (expected a nin checkpoint)")
    try:
        meta = json.loads(header["nin"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: damaged nin metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
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
    meta = {"kind": "weights", "model_config": model.config.to_dict(),
            "preprocessing": preprocessing.kind, **meta}
    save_state(path, tensors, meta)


def load_weights(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Rebuild (model, preprocessing, meta) from a weights file or a run folder.

    A run folder is read through its ``model.safetensors`` (the final weights) or, while the run is
    still going, through its ``checkpoint.safetensors``.
    """
    from nin.transforms import build_preprocessing

    path = Path(path)
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "checkpoint.safetensors"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise CheckpointError(f"{path}: a folder without model.safetensors or checkpoint.safetensors")
        path = found[0]
    tensors, meta = load_state(path)
    try:
        config = NiNConfig.from_dict(meta["model_config"])
        model = NiN(config)
        state = _unprefixed("ema", tensors) if meta.get("kind") == "checkpoint" and meta.get("use_ema") else {}
        state = state or _unprefixed("model", tensors)
        model.load_state_dict(state)
        preprocessing = build_preprocessing(meta["preprocessing"], _unprefixed("preprocess", tensors))
    except (KeyError, TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise CheckpointError(f"{path}: does not match its own model config ({str(e).splitlines()[0]})") from None
    model.to(device).eval()
    return model, preprocessing, meta


def git_revision() -> str | None:
    """The source tree's git commit (with '-dirty' for local changes), or None outside a checkout."""
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
