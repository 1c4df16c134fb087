"""A run folder belongs to one run: checked before anything is read, locked while a process writes it.

    with run_folder_lock(Path("runs/x"), resume=False):     # a second writer is refused with the holder's PID
        ...

A new run takes an absent or empty folder, or one a run started and left before its first epoch ended; a folder
holding anything else is a user's, and is refused. The files a run writes are `RUN_FILES` (and TensorBoard's
folder, `RUN_FOLDERS`); none may be a symbolic link, and the probe that tests the folder is writable is a fresh
file of its own, never an existing one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from nin.errors import NinError
from nin.files import folder_lock, read_json_object, removed_if_unused

__all__ = ["RUN_FILES", "RUN_FOLDERS", "RUN_MARKER", "run_folder_lock", "check_output_dir"]

RUN_FILES = ("checkpoint.safetensors", "model.safetensors", "metrics.jsonl", "metrics.csv", "config.json")
RUN_FOLDERS = ("tensorboard",)  # written by TensorBoard's SummaryWriter when it is installed
PROBE_PREFIX = ".write-test"  # the writability probe: a new file (mkstemp, .write-testXXXX), removed at once
RUN_MARKER = "nin_run"  # a key of config.json: this folder was made by `nin train`
WRITING = "is writing this run folder"  # what the lock holder is doing, in the refusal


@contextlib.contextmanager
def run_folder_lock(out: Path, *, resume: bool):
    """Hold an exclusive OS lock on the run folder itself (`nin.files.folder_lock`: released by the kernel when
    the process dies, kill -9 too; no lock file is left behind).

    Checks first that the folder may be written (`check_output_dir`); a second writer gets one line naming
    the holder's PID. A folder this call made is removed again when the run fails before writing into it.
    """
    flag = "--resume" if resume else "--out"
    created = not out.exists()
    try:
        check_output_dir(out, resume=resume)
    except NinError:
        _refuse_if_held(out, flag)  # a run another process is writing: name that process, not what it wrote so far
        raise
    with removed_if_unused(out, created), folder_lock(out, flag=flag, doing=WRITING):
        check_output_dir(out, resume=resume)  # what the holder before us may have left
        yield


def _refuse_if_held(out: Path, flag: str) -> None:
    """`folder_lock`'s one line, naming the holder's PID, when another process is writing ``out`` now."""
    if out.is_dir():
        with contextlib.suppress(OSError), folder_lock(out, flag=flag, doing=WRITING):
            pass


def check_output_dir(out: Path, *, resume: bool) -> None:
    """Fail now, not after an hour: the folder is ours (or new), writable, with room for checkpoints."""
    if out.exists() and not out.is_dir():
        raise NinError(f"--out {out}: exists and is not a folder")
    links = [name for name in (*RUN_FILES, *RUN_FOLDERS) if (out / name).is_symlink()]
    if links:
        raise NinError(f"--out {out}: {links[0]} is a symbolic link; a run folder holds its own files")
    if not resume and out.is_dir():
        _check_new_run_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=out)  # O_EXCL: a new file, never through a link
        try:
            os.write(fd, b"0" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise NinError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    free = shutil.disk_usage(out).free
    if free < 64 * 2**20:
        raise NinError(f"--out {out}: only {free // 2**20} MiB free; checkpoints need at least 64 MiB")


def _check_new_run_folder(out: Path) -> None:
    """A new run may only take an empty folder, or one a run started and left before finishing an epoch."""
    if (out / "checkpoint.safetensors").exists():
        raise NinError(f"--out {out}: already holds a run; continue it with --resume {out} or choose another --out")
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(PROBE_PREFIX))  # a killed probe
    if not entries:
        return
    ours = (read_json_object(out / "config.json") or {}).get(RUN_MARKER) is True
    results = [name for name in ("model.safetensors", "metrics.jsonl") if (out / name).is_file()
               and (out / name).stat().st_size > 0]
    if not ours or results:
        kept = results[0] if results and ours else entries[0]
        raise NinError(f"--out {out}: not empty and not a run this program left unfinished (it holds {kept}); "
                       "choose another --out")
