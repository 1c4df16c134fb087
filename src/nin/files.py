"""Writing files without losing anything: atomic replacement, and never through a symbolic link.

    atomic_write_bytes("runs/x/config.json", text.encode())       # the old file or the new one, never a torn one
    atomic_write("model.onnx", lambda tmp: save(tmp))              # any writer that takes a path

A write goes to a temporary file in the target's folder, is flushed to disk, and is renamed over the target,
so a crash, a full disk or a kill leaves the previous file whole. A target that is a symbolic link is refused:
renaming over it would silently replace the user's link, and writing through it would change a file elsewhere.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from nin.errors import NinError

__all__ = ["atomic_write", "atomic_write_bytes", "remove_stale_temp_files", "refuse_symlink"]


def refuse_symlink(path: str | os.PathLike, flag: str = "--out") -> None:
    """Raise NinError when ``path`` is a symbolic link (dangling or not)."""
    if Path(path).is_symlink():
        raise NinError(f"{flag} {path}: is a symbolic link; nin writes its own files, never through a link")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], flag: str = "--out") -> None:
    """Call ``write(temporary_path)``, fsync the result, then rename it over ``path``.

    The temporary file lives in ``path``'s folder (``.<name>.<random>.tmp``) and is removed when ``write``
    fails. Refuses a ``path`` that is a symbolic link.
    """
    path = Path(path)
    refuse_symlink(path, flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the user's umask decides, as for any other file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, flag: str = "--out") -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file, never a torn one."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), flag)


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
