"""The `nin` command line: parses arguments, then calls the library.

    nin train --dataset mnist --recipe fast --out runs/mnist-fast          # ~10 min on a 2-core CPU
    nin train --dataset cifar10 --recipe paper --out runs/c10-paper        # the paper's recipe (GCN + ZCA, plateau rule)
    nin train --dataset cifar10 --recipe caffe --out runs/c10-caffe        # the Caffe zoo solver
    nin train --dataset cifar10 --recipe fast --epochs 30 --out runs/c10-fast --set weight_decay=5e-4
    nin train --resume runs/c10-fast                                        # continue exactly where it stopped
    nin evaluate runs/c10-fast --json
    nin predict runs/c10-fast cat.jpg dog.png --top-k 3
    torchrun --standalone --nproc_per_node=2 -m nin train --dataset mnist --epochs 1

Errors are one line on stderr and a non-zero exit; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import NoReturn

from nin.__about__ import __version__
from nin.data.datasets import DATA_DIR_OF_MODEL_HELP, DATASET_NAMES
from nin.data.download import RESOURCES
from nin.errors import path_arg, positive_int

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse without prefix matching: `--data-d` is an unknown flag, not `--data-dir` (a prefix that names one
    flag today can name two tomorrow). Subcommands' parsers are of this class too (add_subparsers' default)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nin", description="Network In Network: train, evaluate, predict.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"nin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_arguments(sub.add_parser("train", help="train a model (or --resume a run)",
                                        description="Train a NiN model. Defaults per data set: the matching paper "
                                                    "model."))
    _add_evaluate_arguments(sub.add_parser("evaluate", help="test error, per-class accuracy, confusion matrix"))
    _add_predict_arguments(sub.add_parser("predict", help="class probabilities for image files"))
    sub.add_parser("models", help="list the registered models with their parameter counts")
    p = sub.add_parser("download", help="download a data set's official files (needs internet)")
    p.add_argument("dataset", choices=list(RESOURCES),
                   help="svhn-extra: SVHN's 531,131 extra images (1.3 GB), which the paper's SVHN model trained on")
    p.add_argument("--data-dir", help="data root (default: $NIN_DATA, else ~/.cache/nin)")

    # Subcommands whose module owns its arguments: add_arguments(parser) and run(args) -> int
    for name, module, help_text in EXTENSIONS:
        extension = _extension(module)
        if extension is not None:
            extension.add_arguments(sub.add_parser(name, help=help_text))
    return parser


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASET_NAMES, help="data set (required unless --resume)")
    p.add_argument("--model", help="model name (see `nin models`); default: the data set's paper model")
    p.add_argument("--recipe", choices=["paper", "caffe", "fast"],  # None until given: --resume refuses it
                   help="training recipe (default: fast; `paper` is the paper's own recipe, GCN + ZCA and the plateau rule)")
    p.add_argument("--epochs", type=int, help="epochs (default: the recipe's)")
    p.add_argument("--batch-size", type=int, help="images per step per process (default 128)")
    p.add_argument("--data-dir", help="data root (default: $NIN_DATA, else ~/.cache/nin)")
    p.add_argument("--out", type=path_arg, help="run folder (default: runs/<dataset>-<recipe>)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--train-subset", type=positive_int, metavar="N",
                   help="train on the first N training images (an image folder: N drawn at random, seeded, so "
                        "every class is in them; leave it out for all of them)")
    p.add_argument("--val-split", type=float, metavar="FRACTION",
                   help="image folders: hold out FRACTION of each class of the training images as the test split "
                        "(stratified, seeded by --seed; default 0.1 when the folder has no test/ sub-folder)")
    p.add_argument("--image-size", type=positive_int, metavar="PIXELS",
                   help="image folders: the model's input size; every image's centre square is resized to it "
                        "(default: the model's, 32 for nin_cifar10; = --set model.input_size=PIXELS)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random translation + flip (default: on for fast, off for paper/caffe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, or model.<field> of the model config; repeatable")
    p.add_argument("--init-from", type=path_arg, metavar="WEIGHTS",
                   help="start from these weights (a weights file or run folder): fine-tuning; its architecture and "
                        "preprocessing unless --model / --set say otherwise; the class-map layer is re-initialised "
                        "when the class count differs")
    p.add_argument("--resume", type=path_arg, metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="also checkpoint every STEPS steps")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the data files it would read (a missing one: one line, exit 1) and exit")


def _add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", type=path_arg, metavar="RUN_DIR_OR_WEIGHTS")
    p.add_argument("--data-dir", help=DATA_DIR_OF_MODEL_HELP)
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--dataset", help="evaluate on another data set with the same classes (default: the model's)")
    p.add_argument("--data-file", type=path_arg, metavar="FILE",
                   help="evaluate on one file: a CIFAR binary batch file (CIFAR-10 layout; CIFAR-100's for 100-class "
                        "models) or an MNIST-format t10k-images-idx3-ubyte[.gz] with its labels file beside it")
    p.add_argument("--batch-size", type=positive_int, default=500)
    p.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", type=path_arg, metavar="RUN_DIR_OR_WEIGHTS")
    p.add_argument("images", nargs="+", type=path_arg, metavar="IMAGE", help="image files, folders (searched recursively) or globs")
    p.add_argument("--top-k", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=256, help="images decoded and scored at a time")
    p.add_argument("--output", type=path_arg, metavar="FILE", help="write one row per image to FILE.csv or FILE.jsonl")
    p.add_argument("--backend", default="torch", metavar="NAME",
                   help="torch (default: nin's inference path, as `nin evaluate`), torch-fp32, torch-folded, torchscript, "
                        "onnxruntime or openvino: the same probabilities through another engine (docs/deploy.md)")
    p.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--invert", action="store_true",
                   help="dark ink on light paper for weights trained on light-on-black images (MNIST, Fashion-MNIST): "
                        "255 - each pixel, levels stretched so the paper is black and the strongest ink white")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: the predictions, or with --output the file and the image count; "
                        "'skipped' lists what --skip-bad went past")
    p.add_argument("--skip-bad", action="store_true",
                   help="go on past images that cannot be read, naming each on stderr (default: the first one stops "
                        "the command and nothing is written)")


EXTENSIONS = [
    ("visualize", "nin.tools.visualize", "confidence maps (Figure 4), overlays, curves, confusion matrix"),
    ("bench", "nin.tools.bench", "training and inference throughput against a plain PyTorch port"),
    ("reproduce", "nin.tools.reproduce", "run one of the paper's experiments"),
    ("import-caffe", "nin.tools.caffe", "import the authors' trained Caffe weights (.caffemodel) into a weights file"),
    ("export", "nin.deploy.export", "export a model to ONNX, TorchScript or OpenVINO, preprocessing inside"),
    ("serve", "nin.deploy.serve", "serve a model over HTTP: /predict, /health, /docs and a web page"),
]


def _extension(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None
        raise



def _given_data_root(data_dir: str | None) -> str | None:
    """The data folder a command was given, as an absolute path: ``--data-dir``, else ``$NIN_DATA``, else None
    (the per-user cache, which a run need not record)."""
    given = data_dir or os.environ.get("NIN_DATA")
    return str(Path(given).expanduser().resolve()) if given else None


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from nin import distributed
    from nin.engine import apply_overrides, fitted_to_model, planned_config, recipe, starting_from, train, validate
    from nin.errors import NinError
    from nin.runtime import resolve_device

    command = shlex.join(["nin", *sys.argv[1:]]) if sys.argv else None
    if args.resume is not None:
        return _resume(args, command)
    if not args.dataset:
        raise NinError("train: --dataset is required (or --resume RUN_DIR)")
    recipe_name = args.recipe or "fast"
    cfg = recipe(recipe_name, args.dataset)
    changes = {
        "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size,
        # the data folder as an absolute path (--data-dir, else $NIN_DATA): a resume or evaluate from elsewhere finds it
        "data_dir": _given_data_root(args.data_dir),
        "seed": args.seed, "train_subset": args.train_subset, "augment": args.augment,
        "checkpoint_every": args.checkpoint_every, "val_split": args.val_split,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    if args.init_from:
        cfg = starting_from(cfg, args.init_from, keep_model=args.model is not None)
    if args.image_size:
        if args.dataset != "folder":  # a named data set's images have one size, which its model is built for
            raise NinError(f"--image-size {args.image_size}: for image folders only (--dataset folder); "
                           f"{args.dataset}'s images have a fixed size")
        cfg = dataclasses.replace(cfg, model_args={**cfg.model_args, "input_size": args.image_size})
    cfg = apply_overrides(cfg, args.set)
    if not any(item.split("=", 1)[0].strip() == "small_size" for item in args.set):  # the user's is validated
        cfg, note = fitted_to_model(cfg)
        if note and distributed.launch_rank() == 0:  # under torchrun, once
            print(f"nin train: {note}", file=sys.stderr)
    validate(cfg)
    out = Path(args.out or f"runs/{args.dataset}-{recipe_name}")
    if args.dry_run:
        return _dry_run({"out": str(out)}, planned_config(cfg, out)[0])
    with distributed.process_group(resolve_device(args.device)) as device, _stop_on_signals() as stop:
        train(cfg, out, command=command, device=device, stop=stop)
    return 0


def _resume(args: argparse.Namespace, command: str | None) -> int:
    """`nin train --resume RUN`: the run as it was configured; only its length, checkpoints, device and data's
    place may change."""
    from nin import distributed
    from nin.engine import planned_config, train
    from nin.errors import NinError
    from nin.runtime import resolve_device

    run = Path(args.resume)
    if not run.is_dir():
        raise NinError(f"--resume {run}: {'a file' if run.exists() else 'no such folder'}, expected a run folder "
                       "(the --out of `nin train`)")
    if not (run / "checkpoint.safetensors").is_file():
        raise NinError(f"--resume {run}: no checkpoint.safetensors there (a run stopped before its first "
                       "checkpoint has nothing to continue: start it again with the command that started it)")
    fixed = {"--dataset": args.dataset, "--recipe": args.recipe, "--model": args.model,
             "--batch-size": args.batch_size, "--out": args.out, "--seed": args.seed, "--val-split": args.val_split,
             "--image-size": args.image_size,
             "--train-subset": args.train_subset, "--augment/--no-augment": args.augment,
             "--init-from": args.init_from,
             "--set": args.set or None}
    given = [flag for flag, value in fixed.items() if value is not None]
    if given:
        raise NinError(f"--resume continues the run as it was configured; {', '.join(given)} cannot change it "
                       "(only --epochs, --checkpoint-every, --device and --data-dir, for the same data moved, can)")
    data_dir = args.data_dir and str(Path(args.data_dir).expanduser().resolve())
    if args.dry_run:  # what the run would continue with, decided as the run decides it; nothing is written
        cfg, meta = planned_config(None, run, resume=True, epochs=args.epochs, checkpoint_every=args.checkpoint_every,
                                   data_dir=data_dir)
        return _dry_run({"out": str(run), "resume_at_step": meta["step"], "epochs": cfg.epochs}, cfg, resuming=True)
    with distributed.process_group(resolve_device(args.device)) as device, _stop_on_signals() as stop:
        train(None, run, resume=True, epochs=args.epochs, checkpoint_every=args.checkpoint_every, command=command,
              device=device, stop=stop, data_dir=data_dir)
    return 0


def _dry_run(report: dict, cfg, *, resuming: bool = False) -> int:
    """`nin train --dry-run`: the config as the run would take it and the data files it would read, found but not
    read (`nin.engine.data_files`); where one is missing the config is still printed, then the problem in one
    line and exit 1. An image folder's images are counted, not listed."""
    from nin.data import resolve_root
    from nin.engine import data_files
    from nin.errors import NinError

    try:
        files, problem = [str(f) for f in data_files(cfg, resuming=resuming)], None
    except NinError as error:
        files, problem = None, error
    if files is not None and cfg.dataset == "folder":  # the folder and its image count, not every image's name
        extra = files[-1:] if cfg.extra_eval else []
        report["data_images"] = len(files) - len(extra)
        files = [str(resolve_root(cfg.data_dir)), *extra]
    print(json.dumps({**report, "train_config": cfg.to_dict(), "data_files": files}, indent=2))
    if problem is not None:
        raise problem
    return 0


@contextlib.contextmanager
def _stop_on_signals():
    """Ctrl-C (SIGINT) and SIGTERM (schedulers, `docker stop`) ask the run to checkpoint after its current step
    and stop; a second signal stops at once."""
    import signal
    import threading

    stop = threading.Event()

    def request(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt("stopped at once by a second signal; the last checkpoint stays")
        stop.set()

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nin.errors import NinError
    from nin.evaluate import evaluate_weights

    if args.data_file and (args.dataset or args.split != "test"):
        given = "--dataset" if args.dataset else f"--split {args.split}"
        raise NinError(f"--data-file {args.data_file} is the test set scored; {given} does not apply to it")
    result, dataset, classes = evaluate_weights(args.weights, dataset=args.dataset, split=args.split,
                                                data_dir=args.data_dir, data_file=args.data_file,
                                                batch_size=args.batch_size, device=args.device)
    if args.split in ("val", "train_minus_val") and not args.data_file and dataset != "folder":  # a folder's val is its own
        print(f"nin evaluate: note: split {args.split!r} is made of training images (the paper's held-out "
              "validation split); a model trained on split 'train' has seen them", file=sys.stderr)
    if args.json:
        print(json.dumps({"weights": str(args.weights), "dataset": dataset, "split": args.split,
                          **result.to_dict(classes)}))
        return 0
    print(f"{dataset} {args.split}: error {result.error:.2%}  accuracy {result.accuracy:.2%}  "
          f"({result.correct}/{result.n})  loss {result.loss:.4f}")
    width = max(len(c) for c in classes)
    for name, accuracy in zip(classes, result.per_class_accuracy):
        print(f"  {name:<{width}}  " + ("n/a (no test images)" if accuracy is None else f"{accuracy:.2%}"))
    print("confusion matrix (rows: true class, columns: predicted):")
    for name, row in zip(classes, result.confusion.tolist()):
        print(f"  {name:<{width}}  " + " ".join(f"{v:>5}" for v in row))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from nin.errors import NinError
    from nin.tools.predict import (
        check_output,
        polarity_hint,
        predict_files,
        write_predictions,
    )

    if args.output:
        check_output(Path(args.output))  # before any image is scored
    report = predict_files(args.weights, args.images, top_k=args.top_k, batch_size=args.batch_size,
                           backend=args.backend, device=args.device, invert=args.invert, skip_bad=args.skip_bad)
    for problem in report.problems:
        print(f"nin predict: skipped {problem}", file=sys.stderr)
    if not report.rows:  # only with --skip-bad: else the first unreadable image stopped it
        raise NinError("no image could be read (each problem named above); nothing written")
    if args.output:
        write_predictions(Path(args.output), report.rows)
    if args.json:  # one object on stdout; with --output the rows are in the file and the object says where
        rows = {"output": args.output, "images": len(report.rows)} if args.output else {"predictions": report.rows}
        print(json.dumps({"weights": str(args.weights), **rows, "skipped": report.problems}))
    elif args.output:
        skipped = f" ({len(report.problems)} skipped, named above)" if report.problems else ""
        count = len(report.rows)
        print(f"nin predict: {count} image{'' if count == 1 else 's'} -> {args.output}{skipped}")
    else:
        for row in report.rows:
            print(row["image"])
            for item in row["top"]:
                print(f"  {item['probability']:7.2%}  {item['class']}")
    for line in polarity_hint(report, len(report.rows), args.invert):  # after the listing, where it stays in view
        print(line, file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from nin.models import get_model, list_models

    for name in list_models():
        model = get_model(name)
        config = model.config
        print(f"{name:<24} {sum(p.numel() for p in model.parameters()):>10,} parameters  "
              f"{config.in_channels}×{config.input_size}×{config.input_size} -> {config.num_classes} classes")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from nin.data import download

    path = download(args.dataset, args.data_dir)
    print(f"{args.dataset}: ready in {path}")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "models": cmd_models,
            "download": cmd_download}
for _name, _module, _ in EXTENSIONS:
    COMMANDS[_name] = lambda args, _module=_module: _extension(_module).run(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command != "bench":  # bench measures its baseline with malloc's defaults, then sets this itself
        from nin.runtime import keep_freed_memory

        keep_freed_memory()
    with warnings.catch_warnings():  # a library's NinNote: one line of its own, as the errors are
        from nin.errors import NinNote

        warnings.simplefilter("always", NinNote)
        warnings.showwarning = _note_or_warning(args.command, warnings.showwarning)
        leave = None
        if argv is None and "WORLD_SIZE" in os.environ:  # the `nin` program, perhaps a torchrun worker
            from nin.distributed import launched_by_torchrun

            leave = _leave if launched_by_torchrun() else None
        if leave is None:
            return _run_command(args)
        try:
            return _run_command(args, leave=leave)
        except BaseException as e:  # a bug, `--debug`, or an outcome that could not be printed (a closed pipe)
            import traceback

            with contextlib.suppress(Exception):  # the traceback Python would print, where stderr still takes it
                traceback.print_exc()
            leave(130 if any(isinstance(x, KeyboardInterrupt) for x in _chain(e)) else 1)


def _note_or_warning(command: str, show):
    """A `warnings.showwarning` that prints a NinNote as "nin COMMAND: note: ..." and passes on any other."""
    from nin.errors import NinNote

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, NinNote):
            print(f"nin {command}: note: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


def _run_command(args: argparse.Namespace, leave=None) -> int:
    """Run the command; its errors as one line each and an exit code. ``leave(code)``, when given (a torchrun
    worker run as a program), ends the process there, with the exception that stopped the command still alive;
    what escapes, `main` prints and leaves with."""
    done = leave or (lambda code: code)
    if args.debug:
        return done(COMMANDS[args.command](args))
    from nin.errors import NinError

    try:
        return done(COMMANDS[args.command](args))
    except NinError as e:
        message = " ".join(str(e).split())  # one line, even when a library's message had several
        print(f"nin {args.command}: error: {message}", file=sys.stderr)
        return done(1)
    except KeyboardInterrupt as e:
        print(f"nin {args.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return done(130)
    except BrokenPipeError:  # the reader closed the pipe (`| head`): nothing left to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return done(141)
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"nin {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return done(1)
    except RuntimeError as e:  # under torchrun: another process stopped, and this one's collective failed
        from nin.distributed import lost_peer

        line = lost_peer(e)
        if line is None:
            raise
        # The process that stopped first exits now (it left the group before printing its error). Waiting a
        # second lets torchrun see it go first, name it the root cause and stop this one; where torchrun does not
        # (another node's agent learns it later), this one says why it stopped. A Ctrl-C cuts the wait short.
        try:
            time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        print(f"nin {args.command}: error: {line}", file=sys.stderr)
        return done(1)


def _chain(error: BaseException | None):
    """The error and those it was raised while handling (``__context__``)."""
    while error is not None:
        yield error
        error = error.__context__


def _leave(code: int) -> NoReturn:
    """End a torchrun worker now: its output flushed, its files closed, nothing left for the interpreter's teardown.

    That teardown could hang. The exception that stopped a command (a graceful stop's KeyboardInterrupt) holds, in
    its frames, the DDP model, and through it the gloo process group that `destroy_process_group` has let go of.
    Freeing it runs the group's destructor with the GIL held; the destructor joins gloo's worker thread, which may
    still be releasing the last collective's tensors and wait for the GIL to do so. That deadlock held a worker
    until torchrun killed it 30 s later (a 2-process CPU run stopped by SIGTERM, on a busy 2-core host: 2 to 3
    times in 5; the rank that hung was the one that writes nothing, so it reached the teardown right after the last
    collective).
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
