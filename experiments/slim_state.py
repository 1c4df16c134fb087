"""A run's resume state without its fitted preprocessing, small enough to keep in git, and the run folder from it.

    python experiments/slim_state.py save runs/cifar10-paper results/in-progress/cifar10-paper
    python experiments/slim_state.py restore results/in-progress/cifar10-paper runs/cifar10-paper \\
        --data-dir ../shared/data
    nin train --resume runs/cifar10-paper          # goes on as if the folder had never been lost

A CIFAR-10 checkpoint of the paper's recipe is 45 MB, 38 MB of it the ZCA matrix fitted on the training images.
Fitting it again is deterministic, so ``save`` keeps everything else of ``RUN_DIR/checkpoint.safetensors`` (the
weights, the momentum buffers, every RNG state, the counters and the plateau rule: about 8 MB), with each
dropped tensor's shape and sha256, plus the run's config.json, metrics.jsonl and metrics.csv. ``restore`` reads
the training images again, fits the preprocessing again, checks it against those digests (a refit that differs,
on another kind of host say, is refused unless ``--accept-refit``: the run would then go on with other inputs
than it trained on so far) and writes the run folder whole, so that `nin train --resume` continues it bit for bit.
Both write into a temporary folder renamed into place: an interrupted command leaves the old state or none.
Exit status: 0 done, 2 bad input (a message naming the file and what was expected).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from nin.checkpoint import load_state, save_state
from nin.data.datasets import load_dataset
from nin.errors import NinError
from nin.transforms import fit_preprocessing

STATE = "state.safetensors"
CHECKPOINT = "checkpoint.safetensors"
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv")  # what a run folder holds beside its checkpoint
KIND = "slim-checkpoint"  # never mistaken by nin for a checkpoint it could resume from


def digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def save(run_dir: Path, out: Path) -> dict:
    """Write ``out`` (a folder): the checkpoint of ``run_dir`` without its ``preprocess.`` tensors, and its logs."""
    checkpoint = run_dir / CHECKPOINT
    if not checkpoint.is_file():
        raise NinError(f"{checkpoint}: no training checkpoint there (expected a run folder of `nin train`)")
    tensors, meta = load_state(checkpoint)
    if meta.get("kind") != "checkpoint":
        raise NinError(f"{checkpoint}: not a training checkpoint (its kind is {meta.get('kind')!r})")
    dropped = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "sha256": digest(v)}
               for k, v in tensors.items() if k.startswith("preprocess.")}
    kept = {k: v for k, v in tensors.items() if k not in dropped}
    missing = [name for name in RUN_FILES[:2] if not (run_dir / name).is_file()]
    if missing:
        raise NinError(f"{run_dir / missing[0]}: missing (expected a run folder of `nin train`)")
    meta = {k: v for k, v in meta.items() if k != "format"}
    _replace_folder(out, lambda tmp: (
        save_state(tmp / STATE, kept, {**meta, "kind": KIND, "dropped": dropped}),
        *(shutil.copy2(run_dir / name, tmp / name) for name in RUN_FILES if (run_dir / name).is_file())))
    return {"epoch": meta["epoch"], "step": meta["step"], "dropped": sorted(dropped),
            "bytes": sum(f.stat().st_size for f in out.iterdir())}


def restore(state_dir: Path, run_dir: Path, data_dir: str | None, accept_refit: bool) -> dict:
    """Write the run folder ``run_dir`` from ``state_dir``, fitting its preprocessing again on the training images."""
    path = state_dir / STATE
    if not path.is_file():
        raise NinError(f"{path}: not found (expected a folder written by `slim_state.py save`)")
    if run_dir.exists():
        raise NinError(f"{run_dir}: already exists; restore writes a new run folder (move it away first)")
    tensors, meta = load_state(path)
    if meta.get("kind") != KIND or not isinstance(meta.get("dropped"), dict):
        raise NinError(f"{path}: not a state written by `slim_state.py save` (its kind is {meta.get('kind')!r})")
    config = meta.get("train_config")
    if not isinstance(config, dict) or not all(isinstance(config.get(k), str) for k in ("dataset", "train_split")):
        raise NinError(f"{path}: damaged state (no train_config naming the data set and split it trained on)")
    if config.get("dataset") == "folder" and config.get("train_subset"):
        raise NinError(f"{path}: a folder data set trained on a drawn subset; this script refits whole splits only")
    images = load_dataset(config["dataset"], config["train_split"], data_dir or config.get("data_dir")).images
    if config.get("train_subset"):
        images = images[:config["train_subset"]]
    refit = {f"preprocess.{k}": v for k, v in fit_preprocessing(meta["preprocessing"], images).state_dict().items()}
    if sorted(refit) != sorted(meta["dropped"]):
        raise NinError(f"{path}: it dropped {sorted(meta['dropped'])}, the refit gives {sorted(refit)}")
    differ = [k for k, v in refit.items() if digest(v) != meta["dropped"][k]["sha256"]]
    if differ and not accept_refit:
        raise NinError(f"{path}: the {meta['preprocessing']} preprocessing fitted again differs from the run's in "
                       f"{', '.join(differ)} (another kind of host, or other data); --accept-refit goes on with it")
    meta = {k: v for k, v in meta.items() if k not in ("format", "kind", "dropped")}
    _replace_folder(run_dir, lambda tmp: (
        save_state(tmp / CHECKPOINT, {**tensors, **refit}, {"kind": "checkpoint", **meta}),
        *(shutil.copy2(state_dir / name, tmp / name) for name in RUN_FILES if (state_dir / name).is_file())))
    return {"epoch": meta["epoch"], "step": meta["step"], "refit_differs": differ}


def _replace_folder(folder: Path, fill) -> None:
    """Fill a new temporary folder beside ``folder``, then put it in ``folder``'s place (replacing an old one)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the folder it becomes is an ordinary one
    old = folder.with_name(f".{folder.name}.old")
    try:
        fill(tmp)
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    save_parser = commands.add_parser("save", help="keep a run's resume state, less its fitted preprocessing",
                                      allow_abbrev=False)
    save_parser.add_argument("run_dir", type=Path)
    save_parser.add_argument("out", type=Path, help="the folder to write (replaced if it exists)")
    restore_parser = commands.add_parser("restore", help="write the run folder again from a saved state",
                                         allow_abbrev=False)
    restore_parser.add_argument("state_dir", type=Path)
    restore_parser.add_argument("run_dir", type=Path, help="the run folder to write (must not exist)")
    restore_parser.add_argument("--data-dir", help="where the training images are now (default: the run's own)")
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
            print(f"{args.run_dir}: epoch {done['epoch']}, step {done['step']}; preprocessing fitted again: {same}. "
                  f"Continue with: nin train --resume {args.run_dir}")
    except (NinError, OSError) as e:
        print(f"slim_state.py {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
