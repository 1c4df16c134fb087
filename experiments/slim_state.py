"""A run's resume state without its fitted preprocessing, small enough to keep in git, and the run folder from it.

    python experiments/slim_state.py save runs/cifar10-paper results/in-progress/cifar10-paper
    python experiments/slim_state.py restore results/in-progress/cifar10-paper runs/cifar10-paper \\
        --data-dir ../shared/data
    nin train --resume runs/cifar10-paper --data-dir ../shared/data    # goes on as if never lost

A CIFAR-10 checkpoint of the paper's recipe is 45 MB, 38 MB of it the ZCA matrix fitted on the training images.
Fitting it again is deterministic, so ``save`` keeps everything else of ``RUN_DIR/checkpoint.safetensors`` (the
weights, the momentum buffers, every RNG state, the counters and the plateau rule: about 8 MB) with a sha256 of
what it keeps and of each tensor it drops, plus the run's config.json, metrics.jsonl and metrics.csv. It reads
the checkpoint once, so a run training meanwhile (which replaces its checkpoint every few minutes) is saved
whole, as of one moment. OUT must be new, or a folder an earlier ``save`` wrote, which it replaces.

``restore`` checks what was kept, reads the training images as `nin train --resume` does (--data-dir, else the
run's data folder, else $NIN_DATA or the cache; the images' sha256 must be the run's), fits the preprocessing again with
nin's own code and compares it with the digests: a refit that differs (another kind of host) is refused unless
``--accept-refit``, because the run would go on with other inputs than it trained on so far. It then writes a
new run folder whose checkpoint is the saved one bit for bit, so that `nin train --resume` continues exactly.

Both commands build their output in a temporary folder beside it and move it into place at the end: an
interrupted or failed command (Ctrl-C, SIGTERM, a full disk) leaves what was there before, and nothing else.
Exit status: 0 done, 2 bad input (one line naming the file or folder and what was expected).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import torch

from nin.checkpoint import load_checkpoint, load_state, read_meta, save_state
from nin.data.datasets import recorded_root
from nin.engine.config import TrainConfig
from nin.engine.optim import load_optimizer_state, make_optimizer
from nin.engine.start import _checkpoint_config, _held_out_split, _prepare_data  # the code path `nin train` fits with
from nin.errors import NinError
from nin.models import get_model

STATE = "state.safetensors"
CHECKPOINT = "checkpoint.safetensors"
LOGS = ("config.json", "metrics.jsonl", "metrics.csv")  # what a run folder holds beside its checkpoint, copied
NEEDED = LOGS[:2]  # ... of which resuming needs these
KIND = "slim-checkpoint"  # never mistaken by nin for a checkpoint it could resume from


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors: each one's name, dtype, shape and bytes, in name order."""
    total = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        total.update(f"{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
        total.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return total.hexdigest()


def save(run_dir: Path, out: Path) -> dict:
    """Write the folder ``out``: the checkpoint of ``run_dir`` less its ``preprocess.`` tensors, and its logs."""
    checkpoint = run_dir / CHECKPOINT
    if not checkpoint.is_file():
        raise NinError(f"{checkpoint}: no training checkpoint there (expected a run folder of `nin train`)")
    missing = [name for name in NEEDED if not (run_dir / name).is_file()]
    if missing:
        raise NinError(f"{run_dir / missing[0]}: missing (expected a run folder of `nin train`)")
    out = _absolute(out)
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise NinError(f"{out}: inside the run folder {run_dir}; write the state somewhere else")
    if os.path.lexists(out) and not _own_state(out):
        raise NinError(f"{out}: exists and is not a folder written by `slim_state.py save`; choose a new folder")

    def fill(tmp: Path) -> dict:
        copy = tmp / CHECKPOINT  # one read of the file as it is now; the run may replace it any moment
        shutil.copyfile(checkpoint, copy)
        with _named(copy, checkpoint):
            tensors, meta = load_state(copy)
        copy.unlink()
        if meta.get("kind") != "checkpoint":
            raise NinError(f"{checkpoint}: not a training checkpoint (its kind is {meta.get('kind')!r})")
        dropped = {k: {"shape": list(v.shape), "sha256": digest({k: v})}
                   for k, v in tensors.items() if k.startswith("preprocess.")}
        kept = {k: v for k, v in tensors.items() if k not in dropped}
        meta = {k: v for k, v in meta.items() if k != "format"}
        save_state(tmp / STATE, kept, {**meta, "kind": KIND, "dropped": dropped, "kept_sha256": digest(kept)})
        for name in LOGS:  # after the checkpoint: its log then covers at least its epochs (nin drops the rest)
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, tmp / name)
        return {"epoch": meta.get("epoch"), "step": meta.get("step"), "dropped": sorted(dropped),
                "bytes": sum(f.stat().st_size for f in tmp.iterdir())}

    return _publish(out, fill, replaceable=_own_state)


def restore(state_dir: Path, run_dir: Path, data_dir: str | None, accept_refit: bool) -> dict:
    """Write the new run folder ``run_dir`` from ``state_dir``, its preprocessing fitted again as `nin train` fits."""
    path = state_dir / STATE
    if not path.is_file():
        raise NinError(f"{path}: {'not a file' if path.exists() else 'not found'} "
                       "(expected a folder written by `slim_state.py save`)")
    missing = [name for name in NEEDED if not (state_dir / name).is_file()]
    if missing:
        raise NinError(f"{state_dir / missing[0]}: missing (a folder written by `slim_state.py save` has it)")
    run_dir = _absolute(run_dir)
    if os.path.lexists(run_dir):
        raise NinError(f"{run_dir}: already exists; restore writes a new run folder (move it away first)")
    _check_parent(run_dir)
    kept, meta = load_state(path)
    dropped = meta.get("dropped")
    if meta.get("kind") != KIND or not isinstance(dropped, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in dropped.values()):
        raise NinError(f"{path}: not a state written by `slim_state.py save` (its kind is {meta.get('kind')!r})")
    if digest(kept) != meta.get("kept_sha256"):
        raise NinError(f"{path}: damaged (its tensors do not match the sha256 recorded when it was saved)")
    cfg = _checkpoint_config(path, {"model": {k[6:]: v for k, v in kept.items() if k.startswith("model.")}}, meta)
    cfg = _held_out_split(cfg, new_run=False)
    root = data_dir or recorded_root(cfg.data_dir, cfg.dataset)
    cfg = dataclasses.replace(cfg, data_dir=str(root) if root else None)
    preprocessing, _, _, _, identity = _prepare_data(cfg, torch.device("cpu"), None)
    if meta.get("data_sha256") not in (None, identity):
        raise NinError(f"{root}: not the images the run trained on (their sha256 differs from the one it recorded)")
    refit = {f"preprocess.{k}": v for k, v in preprocessing.state_dict().items()}
    if sorted(refit) != sorted(dropped):
        raise NinError(f"{path}: it dropped {sorted(dropped) or 'nothing'}, the refit gives {sorted(refit) or 'nothing'}")
    differ = [k for k, v in refit.items() if digest({k: v}) != dropped[k]["sha256"]]
    if differ and not accept_refit:
        raise NinError(f"{path}: the {cfg.preprocessing} preprocessing fitted again differs from the run's in "
                       f"{', '.join(differ)} (the same images: another kind of host); --accept-refit goes on with it")
    meta = {k: v for k, v in meta.items() if k not in ("format", "kind", "dropped", "kept_sha256")}

    def fill(tmp: Path) -> dict:
        save_state(tmp / CHECKPOINT, {**kept, **refit}, {**meta, "kind": "checkpoint"})
        with _named(tmp / CHECKPOINT, path):
            state, _, written = load_checkpoint(tmp / CHECKPOINT)  # what `nin train --resume` checks first
            _check_resumable(cfg, state, path)
        for name in LOGS:
            if (state_dir / name).is_file():
                shutil.copyfile(state_dir / name, tmp / name)
        return {"epoch": written["epoch"], "step": written["step"], "refit_differs": differ}

    return _publish(run_dir, fill)


@contextlib.contextmanager
def _named(temporary: Path, given: Path):
    """An error about the temporary copy ``temporary`` names the file it stands for, ``given``."""
    try:
        yield
    except NinError as e:
        raise NinError(str(e).replace(str(temporary), str(given))) from None


def _check_resumable(cfg: TrainConfig, state: dict, path: Path) -> None:
    """What `nin train --resume` loads first takes the state: the model's tensors, a momentum buffer for each
    of its parameters (or none), a CPU RNG state of the size torch keeps."""
    model = get_model(cfg.model, **cfg.model_args)
    try:
        model.load_state_dict(state["model"])
        load_optimizer_state(make_optimizer(model, cfg), state["optimizer"])
    except (RuntimeError, ValueError) as e:
        raise NinError(f"{path}: damaged ({' '.join(str(e).split())[:200]})") from None
    if state["rng"]["cpu"].shape != torch.get_rng_state().shape:
        raise NinError(f"{path}: damaged (its RNG state has {state['rng']['cpu'].numel()} bytes, torch keeps "
                       f"{torch.get_rng_state().numel()})")


def _absolute(folder: Path) -> Path:
    """``folder`` made absolute without following links; refuses a path with no name of its own ("/", "..")."""
    absolute = Path(os.path.abspath(folder))
    if not absolute.name or absolute.name in (".", ".."):
        raise NinError(f"{folder}: not a folder name to write")
    return absolute


def _own_state(folder: Path) -> bool:
    """Whether ``folder`` is a real folder holding a state written by `save` and nothing else."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    names = {entry.name for entry in folder.iterdir()}
    if STATE not in names or not names <= {STATE, *LOGS}:
        return False
    try:
        return read_meta(folder / STATE).get("kind") == KIND
    except NinError:
        return False


def _check_parent(folder: Path) -> None:
    """The folder ``folder`` can be made: its nearest existing ancestor is a folder this user can write."""
    ancestor = folder.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NinError(f"{folder}: cannot be made there: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise NinError(f"{folder}: cannot be made there: {ancestor} is not writable")


def _publish(folder: Path, fill, *, replaceable=None) -> dict:
    """Fill a new temporary folder beside ``folder`` with ``fill(tmp)``, then move it into ``folder``'s place.

    A ``folder`` there by then is replaced only where ``replaceable(folder)`` says so (set aside first, put back if
    the move fails); else the folder must still not exist, which a rename onto it would not ensure (a rename
    replaces an empty folder), so it is made first and the files moved into it.
    """
    _check_parent(folder)
    work = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        tmp, aside = work / "new", work / "old"
        tmp.mkdir()
        done = fill(tmp)
        if replaceable is not None and os.path.lexists(folder):
            if not replaceable(folder):
                raise NinError(f"{folder}: appeared meanwhile, and is not a folder this script wrote; left as it is")
            try:
                folder.rename(aside)
                tmp.rename(folder)
            except BaseException:
                if aside.is_dir() and not os.path.lexists(folder):
                    aside.rename(folder)
                raise
            return done
        try:
            folder.mkdir()
        except FileExistsError:
            raise NinError(f"{folder}: appeared meanwhile; left as it is") from None
        try:
            for name in sorted(os.listdir(tmp), key=lambda n: n == CHECKPOINT):  # a run's checkpoint last
                (tmp / name).rename(folder / name)
        except BaseException:
            for name in os.listdir(folder):
                (folder / name).rename(tmp / name)
            folder.rmdir()
            raise
        return done
    except OSError as e:
        raise NinError(f"{folder}: cannot write it ({e.strerror or e})") from None
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    save_parser = commands.add_parser("save", help="keep a run's resume state, less its fitted preprocessing",
                                      allow_abbrev=False)
    save_parser.add_argument("run_dir", type=Path)
    save_parser.add_argument("out", type=Path, help="a new folder, or one an earlier save wrote (replaced)")
    restore_parser = commands.add_parser("restore", help="write a new run folder from a saved state",
                                         allow_abbrev=False)
    restore_parser.add_argument("state_dir", type=Path)
    restore_parser.add_argument("run_dir", type=Path, help="the run folder to write (must not exist)")
    restore_parser.add_argument("--data-dir", help="where the training images are now (default: the run's own, "
                                "else $NIN_DATA, else the cache, as `nin train --resume` finds them)")
    restore_parser.add_argument("--accept-refit", action="store_true",
                                help="go on with a refitted preprocessing that differs from the run's")
    args = parser.parse_args(argv)
    try:
        if args.command == "save":
            done = save(args.run_dir, args.out)
            print(f"{args.out}: epoch {done['epoch']}, step {done['step']}, {done['bytes'] / 1e6:.1f} MB "
                  f"(left out, to fit again: {', '.join(done['dropped']) or 'nothing'})")
        else:
            done = restore(args.state_dir, args.run_dir, args.data_dir, args.accept_refit)
            same = "differs, accepted" if done["refit_differs"] else "the same to the last bit"
            data = f" --data-dir {args.data_dir}" if args.data_dir else ""
            print(f"{args.run_dir}: epoch {done['epoch']}, step {done['step']}; preprocessing fitted again: {same}. "
                  f"Continue with: nin train --resume {args.run_dir}{data}")
    except (NinError, OSError) as e:
        print(f"slim_state.py {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # cleans up as Ctrl-C does
    sys.exit(main())
