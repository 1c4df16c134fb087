"""Writing files without losing anything: only what a command owns, atomically, never through a symbolic link.

    claim_output("model.onnx", flag="--out", force=args.force)    # before any work: may the command write it?
    atomic_write_bytes("runs/x/config.json", text.encode())       # the old file or the new one, never a torn one
    atomic_write("model.onnx", lambda tmp: save(tmp))              # any writer that takes a path

Every command that writes a file a user names (`nin train`, `export`, `visualize`, `reproduce`, `import-caffe`,
`predict --output`) first claims it with `claim_output`: a symbolic link is refused, and so is an existing file,
unless the command wrote it for the same purpose (the caller says how to tell) or the user said ``--force``.
A write then goes to a temporary file in the target's folder, is flushed to disk, and is renamed over the
target, so a crash, a full disk or a kill leaves the previous file whole, and a failed write leaves neither
the temporary file nor the folders it made. A target that is a symbolic link is refused at write time too:
renaming over it would silently replace the user's link, and writing through it would change a file elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from nin.errors import NinError

__all__ = ["claim_output", "read_json_object", "output_path", "atomic_write", "atomic_write_bytes",
           "remove_stale_temp_files", "refuse_symlink", "folder_lock", "removed_if_unused"]


def output_path(path: str | os.PathLike) -> Path:
    """``path`` with its folder resolved (symbolic links followed, ``..`` taken) and its last part kept as given:
    the file a write will land on. ``sub/../w.safetensors`` is ``w.safetensors`` even while ``sub`` does not
    exist (the write makes it, and the system would then resolve the same path to ``w.safetensors``)."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        return path
    return Path(os.path.realpath(path.parent)) / path.name


def refuse_symlink(path: str | os.PathLike, flag: str = "--out") -> None:
    """Raise NinError when ``path`` is a symbolic link (dangling or not)."""
    if Path(path).is_symlink():
        raise NinError(f"{flag} {path}: is a symbolic link; nin writes its own files, never through a link")


def claim_output(path: str | os.PathLike, *, flag: str = "--out", force: bool = False,
                 ours: Callable[[Path], bool] | None = None) -> bool:
    """Check, before any work is done, that a command may write ``path``; nothing is created or changed.

    Args:
        path: The file the command will write.
        flag: The option that named it, for the message.
        force: The user asked to replace an existing file (``--force``); a symbolic link is refused even then.
        ours: Tells whether an existing ``path`` is a file this command wrote for the same purpose (a re-run
            may replace it); None: no existing file is.

    Returns:
        True when ``path`` exists and will be replaced.

    Raises:
        NinError: ``path`` is a symbolic link, a folder, lies under a file, or is an existing file that is
            neither ours nor ``force``d.
    """
    given = Path(path)
    path = output_path(given)  # checked where the write will land; named as the user wrote it
    if path.is_symlink():
        raise NinError(f"{flag} {given}: is a symbolic link; nin writes its own files, never through a link")
    if path.exists():
        if not path.is_file():
            raise NinError(f"{flag} {given}: exists and is not a file")
        if not (force or (ours is not None and ours(given))):
            raise NinError(f"{flag} {given}: exists and was not written by this command; not replacing it "
                           "(choose another name, or add --force to replace it)")
        return True
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise NinError(f"{flag} {given}: {ancestor} is a file, not a folder")
    return False


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing ancestors; returns the ones made, deepest first."""
    made = []
    missing = folder
    while not missing.exists() and missing != missing.parent:
        made.append(missing)
        missing = missing.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


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

    The temporary file lives in ``path``'s folder (``.<name>.<random>.tmp``); when ``write`` fails it is removed,
    and so are the folders made for it. Refuses a ``path`` that is a symbolic link. An OSError (a folder that
    cannot be made or written, a full disk) is raised again naming ``path`` as given, not the temporary (the
    same errno, so the same OSError subclass: a caller's `except OSError` still sees a full disk as one).
    """
    given, path = path, output_path(path)
    if path.is_symlink():
        refuse_symlink(given, flag)
    made, tmp = [], None
    try:
        made = _make_parents(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the user's umask decides, as for any other file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if path.is_symlink():  # a link put there while the file was being written
            refuse_symlink(given, flag)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        for folder in made:  # deepest first; a folder something else wrote into meanwhile stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(error, OSError) and error.errno is not None:
            raise OSError(error.errno, error.strerror, str(given)) from None
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


def read_json_object(path: str | os.PathLike) -> dict | None:
    """The JSON object a regular file holds, or None: a symbolic link, a missing or unreadable file, other JSON.
    How a command recognises its own earlier output (a sidecar, a record, a report, a run's config)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


@contextlib.contextmanager
def removed_if_unused(folder: str | os.PathLike, created: bool):
    """Remove ``folder`` again when the block fails and it was ``created`` for it and is still empty: a failed
    command leaves no empty folder of its own behind."""
    try:
        yield
    except BaseException:
        if created and Path(folder).is_dir() and not any(Path(folder).iterdir()):
            Path(folder).rmdir()
        raise


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, flag: str = "--out", doing: str = "is writing this folder"):
    """Hold an exclusive OS lock on ``folder`` itself while a command writes into it: released by the kernel
    when the process dies (kill -9 too), no lock file left behind. A second nin process gets one line naming the
    holder's PID (`nin train` on its run folder, `nin visualize` on its figures folder)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NinError(f"{flag} {folder}: another nin process (PID {_lock_holder(fd)}) {doing}; wait for it "
                           "or stop it first") from None
        yield
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """The PID holding a flock on ``fd``'s file, from /proc/locks (Linux); "unknown" elsewhere."""
    info = os.fstat(fd)
    where = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and where in fields:
                return fields[fields.index(where) - 1]
    except OSError:
        pass
    return "unknown"
