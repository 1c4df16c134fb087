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
import json
import shlex
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

DATASETS = ["cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", "folder"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nin", description="Network In Network: train, evaluate, predict.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (or --resume a run)",
                       description="Train a NiN model. Defaults per data set: the matching paper model.")
    p.add_argument("--dataset", choices=DATASETS, help="data set (required unless --resume)")
    p.add_argument("--model", help="model name (see `nin models`); default: the data set's paper model")
    p.add_argument("--recipe", choices=["paper", "caffe", "fast"], default="paper", help="training recipe (default: paper)")
    p.add_argument("--epochs", type=int, help="epochs (default: the recipe's)")
    p.add_argument("--batch-size", type=int, help="images per step per process (default 128)")
    p.add_argument("--data-dir", help="data root (default: $NIN_DATA, else ~/.cache/nin)")
    p.add_argument("--out", help="run folder (default: runs/<dataset>-<recipe>)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--train-subset", type=int, metavar="N", help="train on the first N training images")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random translation + flip (default: on for fast, off for paper/caffe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, or model.<field> of the model config; repeatable")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="also checkpoint every STEPS steps")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    p = sub.add_parser("evaluate", help="test error, per-class accuracy, confusion matrix")
    p.add_argument("weights", metavar="RUN_DIR_OR_WEIGHTS")
    p.add_argument("--data-dir", help="data root (default: $NIN_DATA, else ~/.cache/nin)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--dataset", help="evaluate on another data set with the same classes (default: the model's)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("predict", help="class probabilities for image files")
    p.add_argument("weights", metavar="RUN_DIR_OR_WEIGHTS")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    sub.add_parser("models", help="list the registered models with their parameter counts")

    p = sub.add_parser("download", help="download a data set's official files (needs internet)")
    p.add_argument("dataset", choices=[d for d in DATASETS if d != "folder"])
    p.add_argument("--data-dir", help="data root (default: $NIN_DATA, else ~/.cache/nin)")

    # Subcommands whose module owns its arguments: add_arguments(parser) and run(args) -> int
    for name, module, help_text in EXTENSIONS:
        extension = _extension(module)
        if extension is not None:
            extension.add_arguments(sub.add_parser(name, help=help_text))
    return parser


EXTENSIONS = [
    ("visualize", "nin.visualize", "confidence maps (Figure 4), overlays, curves, confusion matrix"),
    ("export", "nin.export", "export a model to ONNX"),
    ("bench", "nin.bench", "training and inference throughput against a plain PyTorch port"),
    ("reproduce", "nin.reproduce", "run one of the paper's experiments"),
    ("serve", "nin.serve", "serve a model over HTTP: /predict, /health, /docs and a web page"),
]


def _extension(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None
        raise


def _device(text: str | None):
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        from nin.errors import NinError

        raise NinError(f"--device {text!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        from nin.errors import NinError

        raise NinError(f"--device {text}: no CUDA device is available here")
    return device


def _leave_process_group() -> None:
    """Under torchrun, train() joined the process group: leave it before the process exits."""
    from nin import distributed

    distributed.cleanup()


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from nin.errors import NinError
    from nin.train import apply_overrides, recipe, train, validate

    command = shlex.join(["nin", *sys.argv[1:]]) if sys.argv else None
    if args.resume:
        run = Path(args.resume)
        if not (run / "checkpoint.safetensors").is_file():
            raise NinError(f"--resume {run}: no checkpoint.safetensors there")
        fixed = {"--dataset": args.dataset, "--model": args.model, "--batch-size": args.batch_size,
                 "--data-dir": args.data_dir, "--out": args.out, "--seed": args.seed,
                 "--train-subset": args.train_subset, "--augment/--no-augment": args.augment,
                 "--set": args.set or None}
        given = [flag for flag, value in fixed.items() if value is not None]
        if given:
            raise NinError(f"--resume continues the run as it was configured; {', '.join(given)} cannot change it "
                           "(only --epochs, --checkpoint-every and --device can)")
        try:
            train(None, run, resume=True, epochs=args.epochs, checkpoint_every=args.checkpoint_every, command=command,
                  device=_device(args.device))
        finally:
            _leave_process_group()
        return 0
    if not args.dataset:
        raise NinError("train: --dataset is required (or --resume RUN_DIR)")
    cfg = recipe(args.recipe, args.dataset)
    changes = {
        "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size, "data_dir": args.data_dir,
        "seed": args.seed, "train_subset": args.train_subset, "augment": args.augment,
        "checkpoint_every": args.checkpoint_every,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    cfg = apply_overrides(cfg, args.set)
    validate(cfg)
    out = Path(args.out or f"runs/{args.dataset}-{args.recipe}")
    if args.dry_run:
        print(json.dumps({"out": str(out), "train_config": cfg.to_dict()}, indent=2))
        return 0
    try:
        train(cfg, out, command=command, device=_device(args.device))
    finally:
        _leave_process_group()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from nin.checkpoint import load_weights
    from nin.data import TensorLoader
    from nin.evaluate import evaluate, load_matching_dataset
    from nin.train import select_precision

    device = _device(args.device)
    model, preprocessing, meta = load_weights(args.weights, device)
    config = model.config
    dataset, data = load_matching_dataset(args.weights, config, meta, args.dataset, args.split, args.data_dir)
    images = preprocessing(data.images).to(device).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    result = evaluate(model, TensorLoader(images, data.labels.to(device), args.batch_size, shuffle=False),
                      num_classes=config.num_classes, amp_dtype=select_precision("auto", device),
                      tta_flip=bool(meta.get("tta_flip")))
    classes = meta.get("classes") or data.classes
    if args.json:
        print(json.dumps({"weights": str(args.weights), "dataset": dataset, "split": args.split,
                          **result.to_dict(classes)}))
        return 0
    print(f"{dataset} {args.split}: error {result.error:.2%}  accuracy {result.accuracy:.2%}  "
          f"({result.correct}/{result.n})  loss {result.loss:.4f}")
    width = max(len(c) for c in classes)
    for name, accuracy in zip(classes, result.per_class_accuracy):
        print(f"  {name:<{width}}  {accuracy:.2%}")
    print("confusion matrix (rows: true class, columns: predicted):")
    for name, row in zip(classes, result.confusion.tolist()):
        print(f"  {name:<{width}}  " + " ".join(f"{v:>5}" for v in row))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from nin.checkpoint import load_weights
    from nin.data.readers import read_image
    from nin.evaluate import predict_logits

    device = _device(args.device)
    model, preprocessing, meta = load_weights(args.weights, device)
    config = model.config
    classes = meta.get("classes") or [str(i) for i in range(config.num_classes)]
    batch = torch.stack([read_image(Path(p), config.input_size, config.in_channels) for p in args.images])
    with torch.no_grad():
        logits = predict_logits(model, preprocessing(batch).to(device), tta_flip=bool(meta.get("tta_flip")))
    probabilities = logits.softmax(dim=1).cpu()
    k = max(1, min(args.top_k, config.num_classes))
    top = probabilities.topk(k, dim=1)
    results = [{"image": str(path),
                "top": [{"class": classes[i], "index": int(i), "probability": float(p)}
                        for p, i in zip(values.tolist(), indices.tolist())]}
               for path, values, indices in zip(args.images, top.values, top.indices)]
    if args.json:
        print(json.dumps({"weights": str(args.weights), "predictions": results}))
        return 0
    for result in results:
        print(result["image"])
        for item in result["top"]:
            print(f"  {item['probability']:7.2%}  {item['class']}")
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
    if args.debug:
        return COMMANDS[args.command](args)
    from nin.data import DataError
    from nin.errors import NinError

    try:
        return COMMANDS[args.command](args)
    except (NinError, DataError) as e:
        message = " ".join(str(e).split())  # one line, even when a library's message had several
        print(f"nin {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nin {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"nin {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
