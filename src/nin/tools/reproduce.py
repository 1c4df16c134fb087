"""Reproduce the paper's tables: run each experiment, record each finished run, write RESULTS.md.

    nin reproduce table4 --dry-run                            # the exact `nin train` commands, nothing run
    nin reproduce fast-mnist --out-root runs                  # train, then record runs/results/fast-mnist.json
    nin reproduce record runs/fast-mnist --name fast-mnist    # record a finished run by hand (runs/results/...)
    nin reproduce record runs/fast-mnist --name fast-mnist --results-dir results --weights-dir weights
    nin reproduce report                                      # RESULTS.md + results/curves/<name>.png

An experiment is a list of `nin train` invocations, one run folder each under ``--out-root``. Each run
goes through a subprocess (`python -m nin train ...`), so its ``config.json`` holds the plain `nin train`
command that anyone can paste. A run folder that already holds ``model.safetensors`` is only recorded;
one that holds ``checkpoint.safetensors`` is resumed. Recording (`record_run`) writes
``<name>.json`` (command, git revision, machine, wall time, per-epoch curve, final error), copies the weights
to ``<name>.safetensors`` and evaluates them again, from the weights file alone, on the same test images:
``evaluated_error`` must equal the run's own final error. Records go beside the runs (``OUT_ROOT/results``,
``OUT_ROOT/weights``; for ``record``, the run folder's parent) unless ``--results-dir`` / ``--weights-dir``
say otherwise: the repository's ``results/`` and ``weights/`` are written only when named.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from nin.distributed import launched_by_torchrun
from nin.errors import NinError, path_arg, positive_int
from nin.tools.experiments import EXPERIMENTS, PlannedRun, RunSpec, plan
from nin.tools.report import PAPER_ROWS, TABLE5_SMALL_ROWS, write_report
from nin.tools.results import claim_record, record_run, reevaluate

__all__ = ["RunSpec", "PlannedRun", "EXPERIMENTS", "plan", "record_run", "write_report", "PAPER_ROWS",
           "TABLE5_SMALL_ROWS", "add_arguments", "run"]


# ---------------------------------------------------------------------------------------------
# Command line: nin reproduce EXPERIMENT | record RUN_DIR --name NAME | report
# ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `nin reproduce` (called by nin.cli)."""
    parser.description = "Run one of the paper's experiments, record a finished run, or write RESULTS.md."
    parser.set_defaults(reproduce_parser=parser)
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    for name, (help_text, _) in EXPERIMENTS.items():
        p = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        p.add_argument("--data-dir", help="data root (default: $NIN_DATA, else ~/.cache/nin)")
        p.add_argument("--out-root", default="runs", help="run folders go to OUT_ROOT/<name> (default: runs)")
        p.add_argument("--epochs", type=positive_int, help="epochs for every run (default: the recipe's)")
        p.add_argument("--train-subset", type=positive_int, metavar="N",
                       help="train on the first N training images (leave it out for all of them)")
        p.add_argument("--dry-run", action="store_true", help="print the nin train commands and exit")
        p.add_argument("--gpu", action="store_true", help="train on cuda (--device cuda)")
        p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                       help="also checkpoint every STEPS optimizer steps (default: at the end of each epoch)")
        p.add_argument("--only", nargs="+", default=[], metavar="RUN",
                       help="train and record only these of its runs: "
                            + ", ".join(spec.name for spec in EXPERIMENTS[name][1]))
        _add_record_arguments(p, "OUT_ROOT")

    p = sub.add_parser("record", help="record a finished run: <name>.json and <name>.safetensors beside it")
    p.add_argument("run_dir", type=path_arg, metavar="RUN_DIR")
    p.add_argument("--name", required=True, help="result name, e.g. fast-mnist")
    p.add_argument("--data-dir", help="data root for the re-evaluation (default: the run's, else $NIN_DATA)")
    p.add_argument("--data-label",
                   help='data set label in RESULTS.md (default: detected, e.g. "CIFAR-10 (JPEG q75 copy)")')
    p.add_argument("--device", help="where to evaluate again (default: cuda when available)")
    _add_record_arguments(p, "the run folder's parent")

    p = sub.add_parser("reevaluate", help="evaluate every recorded weights file again (after a change to the "
                                          "inference path) and store the numbers in results/*.json")
    p.add_argument("--results-dir", default="results", help="folder of result json files (default: results)")
    p.add_argument("--data-dir", help="data root (default: $NIN_DATA)")

    p = sub.add_parser("report", help="write RESULTS.md and results/curves/*.png from results/*.json")
    p.add_argument("--results-dir", default="results", help="folder of result json files (default: results)")
    p.add_argument("--output", default="RESULTS.md", help="report path (default: RESULTS.md)")
    p.add_argument("--data-dir", help="data root, to tell missing data from missing runs (default: $NIN_DATA)")
    p.add_argument("--no-curves", action="store_true", help="skip the PNG curves")
    p.add_argument("--force", action="store_true", help="replace an --output that is not a report this command wrote")


def _add_record_arguments(parser: argparse.ArgumentParser, beside: str) -> None:
    parser.add_argument("--results-dir", help=f"result json folder (default: {beside}/results; the repository's "
                                              "results/ only when named)")
    parser.add_argument("--weights-dir", help=f"weights copies go here (default: {beside}/weights; the repository's "
                                              "weights/ only when named)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing json or weights file that is not an earlier record of this name")


def _record_dirs(args: argparse.Namespace, beside: Path) -> tuple[Path, Path]:
    """Where records go: --results-dir / --weights-dir, else results/ and weights/ under ``beside``."""
    return (Path(args.results_dir) if args.results_dir else beside / "results",
            Path(args.weights_dir) if args.weights_dir else beside / "weights")


def run(args: argparse.Namespace) -> int:
    """`nin reproduce ...` (called by nin.cli)."""
    if args.experiment is None:
        args.reproduce_parser.print_help()
        return 2
    if launched_by_torchrun() and not getattr(args, "dry_run", False):
        raise NinError("under torchrun: it starts `nin train` itself and records each run once, so every "
                       "process would train and write the same records; run it without torchrun, or put the commands "
                       "that `nin reproduce EXPERIMENT --dry-run` prints under torchrun (`torchrun ... -m nin train "
                       "...`) and record each run after with `nin reproduce record`")
    if args.experiment == "record":
        results_dir, weights_dir = _record_dirs(args, Path(args.run_dir).parent)
        record_run(args.run_dir, args.name, results_dir, weights_dir, data_dir=args.data_dir,
                   data_label=args.data_label, device=args.device, force=args.force)
        return 0
    if args.experiment == "reevaluate":
        moved = reevaluate(args.results_dir, data_dir=args.data_dir)
        print(f"nin reproduce: {len(moved)} records changed" + (f" ({', '.join(moved)})" if moved else ""))
        return 0
    if args.experiment == "report":
        path = write_report(args.results_dir, args.output, data_dir=args.data_dir, curves=not args.no_curves,
                            force=args.force)
        print(f"nin reproduce: wrote {path}")
        return 0

    runs = plan(args.experiment, out_root=args.out_root, data_dir=args.data_dir, epochs=args.epochs,
                train_subset=args.train_subset, gpu=args.gpu, checkpoint_every=args.checkpoint_every,
                only=args.only)
    if args.dry_run:
        for planned in runs:
            print(planned.command)
        return 0
    results_dir, weights_dir = _record_dirs(args, Path(args.out_root))
    for planned in runs:  # every record may be written: checked before hours of training, not after
        claim_record(planned.name, results_dir, weights_dir, force=args.force)
    for planned in runs:
        argv = list(planned.argv)
        if (planned.run_dir / "model.safetensors").is_file():
            print(f"nin reproduce: {planned.run_dir} is finished; recording it", flush=True)
        else:
            if (planned.run_dir / "checkpoint.safetensors").is_file():
                argv = ["train", "--resume", str(planned.run_dir), *(["--device", "cuda"] if args.gpu else [])]
            print(f"nin reproduce: {shlex.join(['nin', *argv])}", flush=True)
            done = subprocess.run([sys.executable, "-m", "nin", *argv])
            if done.returncode != 0:
                raise NinError(f"{planned.name}: nin train exited with status {done.returncode}")
        record_run(planned.run_dir, planned.name, results_dir, weights_dir, data_dir=args.data_dir,
                   device="cuda" if args.gpu else None, force=args.force)
    print(f"nin reproduce: done; records in {results_dir}, weights in {weights_dir}. Into the repository: "
          f"`nin reproduce record RUN --name NAME --results-dir results --weights-dir weights`, then "
          f"`nin reproduce report`")
    return 0
