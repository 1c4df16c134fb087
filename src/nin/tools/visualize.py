"""Look inside a trained NiN: its category-confidence maps (the paper's Figure 4), class-activation overlays,
training curves, the confusion matrix, and a number for the paper's claim about the maps.

    nin visualize runs/mnist-fast --out figures/mnist --per-class 2 --images my_digit.png --format pdf
    maps = confidence_maps(model, preprocessing(images))        # (N, K, h, w); maps.mean((2, 3)) are the logits

The paper (Figure 4, section 4.7): the last mlpconv block emits one map per class, global average pooling
turns each map into its class's score, and "the largest activations lie in the map of the true class, roughly
where the object is". `map_statistics` measures the first half of that sentence on the whole test set: how
often the map holding the single largest activation belongs to the true class, and how often it names the
class the averaged (GAP) scores predict. The overlays show the second half: the predicted class's map,
upsampled bilinearly onto the image (a user's photo at its own resolution).

The figures themselves are drawn by `nin.tools.figures`, at the size they print at in a paper.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from nin.data import TensorLoader
from nin.data.datasets import DATA_DIR_OF_MODEL_HELP, first_per_class
from nin.data.images import read_image, read_photo
from nin.errors import NinError, path_arg
from nin.evaluate import evaluate, load_matching_dataset
from nin.files import atomic_write_bytes, claim_output, folder_lock, read_json_object, removed_if_unused
from nin.inference import inference_model, predict_logits
from nin.pretrained import load
from nin.runtime import autocast, resolve_device, select_precision
from nin.tools.curves import plot_curves, run_records
from nin.tools.figures import (
    FORMATS,
    new_figure,
    plot_confidence_maps,
    plot_confusion,
    plot_overlays,
    plot_photo_overlays,
)
from nin.tools.predict import PredictReport, polarity_hint
from nin.transforms import invert_ink, odd_polarity

__all__ = ["confidence_maps", "map_scores", "map_statistics", "add_arguments", "run"]



# ---------------------------------------------------------------------------------------------------------------
# Maps and the statistic
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _maps_and_logits(model: nn.Module, images: torch.Tensor,
                     amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The class maps (N, K, h, w) and the logits (N, K) of one forward pass in eval mode: the logits are the
    head of the maps in the maps' own dtype, as ``model(images)`` computes them (a bf16 mean of bf16 maps can tie
    two classes that an fp32 mean would part; this keeps `nin evaluate`'s count)."""
    was_training = model.training
    model.eval()
    try:
        with autocast(images.device, amp_dtype):
            maps = model.forward_features(images)
            logits = model.forward_head(maps)
    finally:
        model.train(was_training)
    return maps.float().contiguous(), logits.float()


def confidence_maps(model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The last mlpconv block's maps, before pooling: ``model.forward_features`` in eval mode, without gradients.

    Args:
        model: A NiN (anything with ``forward_features``), or the `nin.inference.InferenceModel` of one.
        images: Preprocessed float (N, C, H, W), on the model's device.
        amp_dtype: Autocast dtype (bf16 where `nin.runtime.select_precision` picks it); None runs fp32.

    Returns:
        fp32 (N, K, h, w), one confidence map per class; the model's training mode is left as it was.
    """
    return _maps_and_logits(model, images, amp_dtype)[0]


def map_scores(model: nn.Module, preprocessing, images: torch.Tensor, *, batch_size: int = 500,
               amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class map's largest activation and the model's logits, batch by batch over a whole split.

    Args:
        model: A NiN, or the `nin.inference.InferenceModel` of one (``nin visualize`` passes the one `nin
            evaluate` runs: then the logits are exactly evaluate's), on its device.
        preprocessing: The fitted `nin.transforms.Preprocessing` stored with the model.
        images: Raw uint8 (N, C, H, W), on any device; each batch is moved to the model's device.
        batch_size: Images per batch.
        amp_dtype: As in `confidence_maps`.

    Returns:
        On the CPU: peaks (N, K), the max over spatial positions of each class map, and logits (N, K),
        ``model.forward_head`` of the same maps (their spatial mean for a GAP model), without test-time flips.
    """
    device = next(model.parameters()).device
    peaks, logits = [], []
    for chunk in images.split(batch_size):
        maps, scores = _maps_and_logits(model, preprocessing(chunk.to(device)), amp_dtype)  # (B, K, h, w), (B, K)
        peaks.append(maps.amax(dim=(2, 3)).cpu())
        logits.append(scores.cpu())
    return torch.cat(peaks), torch.cat(logits)


def map_statistics(peaks: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Test the paper's claim that the largest activations lie in the map of the true class.

    Args:
        peaks: (N, K) max over spatial positions of each class map (from `map_scores`).
        logits: (N, K) the model's scores (GAP: each map's mean).
        labels: (N,) true classes.

    Returns:
        ``n``; ``max_map_true_class``: share of images whose argmax over classes of the peaks is the true class;
        ``max_map_agrees_with_gap``: share where it equals the GAP prediction (argmax of the logits);
        ``gap_accuracy``: share where the GAP prediction is the true class; ``chance``: 1 / K.
    """
    assert peaks.shape == logits.shape and peaks.ndim == 2, f"peaks {tuple(peaks.shape)} vs logits {tuple(logits.shape)}"
    assert len(labels) == len(peaks), f"{len(labels)} labels for {len(peaks)} images"
    labels = labels.cpu()
    max_map, gap = peaks.argmax(dim=1), logits.argmax(dim=1)
    n = len(labels)

    def share(hits: torch.Tensor) -> float:
        return float(hits.sum()) / max(n, 1)

    return {"n": n,
            "max_map_true_class": share(max_map == labels),
            "max_map_agrees_with_gap": share(max_map == gap),
            "gap_accuracy": share(gap == labels),
            "chance": 1.0 / peaks.shape[1]}


# ---------------------------------------------------------------------------------------------------------------
# Command line: nin visualize
# ---------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Figure 4 (confidence maps), class-activation overlays, training curves, the confusion "
                          "matrix, and maps.json: how often the map with the largest activation is the true class.")
    parser.add_argument("weights", type=path_arg, metavar="RUN_DIR_OR_WEIGHTS")
    parser.add_argument("--data-dir", help=DATA_DIR_OF_MODEL_HELP)
    parser.add_argument("--out", type=path_arg, help="output folder (default: RUN_DIR/figures, or WEIGHTS_STEM-figures)")
    parser.add_argument("--images", nargs="+", type=path_arg, default=[], metavar="FILE", help="also overlay these image files")
    parser.add_argument("--invert", action="store_true",
                        help="read --images as `nin predict --invert` does (dark ink on paper, MNIST-style weights)")
    parser.add_argument("--per-class", type=int, default=1, metavar="K",
                        help="test images per class in the figures (default 1)")
    parser.add_argument("--runs", nargs="+", type=path_arg, default=[], metavar="RUN_DIR",
                        help="training curves of these runs on one plot (default: RUN_DIR itself)")
    parser.add_argument("--limit", type=int, metavar="N", help="use only the first N test images")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--format", choices=FORMATS, default="png",
                        help="figure files: png (300 dpi), pdf or svg (vector); default png")
    parser.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    parser.add_argument("--force", action="store_true",
                        help="replace files in --out that an earlier `nin visualize` did not write (never through a "
                             "symbolic link)")


def _output_folder(weights: Path, out: str | None) -> Path:
    if out:
        return Path(out)
    return weights / "figures" if weights.is_dir() else weights.with_name(weights.stem + "-figures")


REPORT = "maps.json"


def _earlier_report(out: Path) -> dict | None:
    """The maps.json an earlier `nin visualize` wrote into ``out`` (not a link: `read_json_object`), or None."""
    report = read_json_object(out / REPORT)
    return report if report is not None and {"weights", "max_map_true_class", "gap_accuracy"} <= set(report) else None


def _claim_outputs(out: Path, names: list[str], force: bool) -> None:
    """Every file this run writes into ``out`` may be written (`nin.files.claim_output`), before any work: an
    existing one only when an earlier `nin visualize` wrote the folder (its maps.json is ours), or with --force."""
    earlier = _earlier_report(out) is not None
    for name in names:
        claim_output(out / name, flag="--out", force=force, ours=lambda _: earlier)


FIGURES = ("confusion", "confidence_maps", "overlays", "overlays_images", "curves")  # every figure it may write


def _output_names(args: argparse.Namespace, fmt: str, runs: list[Path]) -> list[str]:
    """The files a run of `nin visualize` with ``args`` writes into its folder."""
    drawn = {"overlays_images": bool(args.images), "curves": bool(runs)}  # the others every time
    return [REPORT, *(f"{figure}.{fmt}" for figure in FIGURES if drawn.get(figure, True))]


def _write_report(out: Path, report: dict, files: list[str]) -> None:
    atomic_write_bytes(out / REPORT, (json.dumps({**report, "files": files}, indent=2) + "\n").encode())


def _read_user_images(images: Sequence[str], config) -> tuple[list, torch.Tensor | None]:
    """The user's photos as drawn (`read_photo`) and as the model reads them (`read_image`: (N, C, H, W) uint8)."""
    if not images:
        return [], None
    photos = [read_photo(Path(p), config.in_channels) for p in images]
    return photos, torch.stack([read_image(Path(p), config.input_size, config.in_channels) for p in images])


def _user_overlays(served, preprocessing, images: Sequence[str], read: tuple[list, torch.Tensor],
                   classes: Sequence[str], path: Path, amp_dtype: torch.dtype | None, meta: dict,
                   invert: bool = False) -> Path:
    """The user's own photos (``images``, ``read`` by `_read_user_images`), each at its own resolution under its
    predicted class's map. The prediction is `nin predict`'s: the same conversion (`read_image`, and `invert_ink`
    with ``invert``), model (``served``, an `InferenceModel`) and test-time flips; the photos are drawn as given."""
    device = next(served.model.parameters()).device
    photos, pixels = read
    dataset = meta.get("dataset")  # photos the other way round from what the weights expect: said as predict says it
    odd = [Path(p) for p, flag in zip(images, odd_polarity(pixels, dataset, invert)) if flag]
    for line in polarity_hint(PredictReport([], dataset, odd=odd), len(images), invert, command="nin visualize"):
        print(line, file=sys.stderr)
    batch = preprocessing((invert_ink(pixels) if invert else pixels).to(device))
    maps = confidence_maps(served, batch, amp_dtype)
    logits = predict_logits(served, batch, tta_flip=bool(meta.get("tta_flip")))
    probabilities, predictions = logits.softmax(dim=1).max(dim=1)
    for name, k, share in zip(images, predictions.tolist(), probabilities.tolist()):
        print(f"{name}: {classes[k]} ({share:.1%})")
    return plot_photo_overlays(photos, maps.cpu(), predictions.cpu(), classes, path,
                               probabilities=probabilities.cpu(), names=[Path(p).name for p in images])


def _scored_as_evaluate(served, preprocessing, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                        amp_dtype: torch.dtype | None, meta: dict):
    """The test images scored exactly as `nin evaluate` scores them (its test-time flips included); ``served`` is
    the `InferenceModel` the figures use, so batch norm is folded once."""
    device = next(served.parameters()).device
    prepared = preprocessing(images).to(device).contiguous(memory_format=torch.channels_last)
    return evaluate(served, TensorLoader(prepared, labels.to(device), batch_size, shuffle=False),
                    num_classes=served.model.config.num_classes, amp_dtype=amp_dtype,
                    tta_flip=bool(meta.get("tta_flip")))


def run(args: argparse.Namespace) -> int:
    """``nin visualize``: every figure of the module docstring, and maps.json, into ``--out``."""
    _check_args(args)
    new_figure(1, 1)  # fail now, with the install hint, when matplotlib is missing
    fmt = getattr(args, "format", "png")
    weights = Path(args.weights)
    out = _output_folder(weights, args.out)
    runs = [Path(r) for r in args.runs] or ([weights] if (weights / "metrics.jsonl").is_file() else [])
    runs = [run_records(r) for r in runs]  # read now: a folder that is no run is said before any work
    names = _output_names(args, fmt, runs)
    _claim_outputs(out, names, getattr(args, "force", False))  # before any work
    with _figures_folder(out):  # one writer at a time: two calls would mix their figures
        _claim_outputs(out, names, getattr(args, "force", False))  # what a call before us may have written
        return _draw(args, weights, out, runs, names, fmt)


@contextlib.contextmanager
def _figures_folder(out: Path):
    """``out``, made if needed and held (`nin.files.folder_lock`) while the figures are drawn; a folder this call
    made is removed again when it fails before writing anything into it."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NinError(f"--out {out}: cannot make the folder ({error.strerror or error})") from None
    with removed_if_unused(out, created), folder_lock(out, doing="is writing figures into this folder"):
        yield


def _draw(args: argparse.Namespace, weights: Path, out: Path, runs: list[tuple], names: list[str], fmt: str) -> int:
    """The figures and maps.json of `run`, into the held folder ``out``; ``runs`` as `run_records` reads them."""
    earlier = _earlier_files(out)
    device = resolve_device(args.device)
    model, preprocessing, meta = load(weights, device)
    config = model.config
    user_images = _read_user_images(args.images, config)  # before any figure: a damaged photo writes nothing
    dataset, data = load_matching_dataset(weights, config, meta, None, "test", args.data_dir)
    images, labels = data.images[: args.limit], data.labels[: args.limit]
    classes = list(meta.get("classes") or data.classes or [str(k) for k in range(config.num_classes)])
    amp_dtype = select_precision("auto", device)
    # the one inference path: batch norm folded once, in amp_dtype; its class maps are the figures' maps, and
    # their spatial mean is exactly the logits `nin evaluate` counts (one pass, one set of kernels)
    served = inference_model(model, amp_dtype)
    written: list[Path] = []

    # the map statistic (plain GAP, no flips), over the whole (or --limit) test set
    peaks, logits = map_scores(served, preprocessing, images, batch_size=args.batch_size, amp_dtype=amp_dtype)
    statistics = map_statistics(peaks, logits, labels)
    predictions = logits.argmax(dim=1)
    num_classes = config.num_classes
    scored = _scored_as_evaluate(served, preprocessing, images, labels, args.batch_size, amp_dtype, meta)
    confusion = scored.confusion
    report = {"weights": str(weights), "dataset": dataset, "split": "test", "limit": args.limit,
              "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32", "tta_flip": False,
              "head": config.head, **statistics, "accuracy": scored.accuracy,
              "accuracy_tta_flip": bool(meta.get("tta_flip"))}
    # until every figure is written the report lists the earlier call's figures too: a call that fails midway
    # leaves a folder whose next call still knows every figure in it
    _write_report(out, report, names + sorted(earlier - set(names)))
    written.append(out / REPORT)
    written.append(plot_confusion(confusion, classes, out / f"confusion.{fmt}"))

    # Figure 4 and the test-image overlays: the first --per-class images of every class
    chosen = first_per_class(labels, args.per_class, num_classes)
    chosen_maps = confidence_maps(served, preprocessing(images[chosen].to(device)), amp_dtype).cpu()
    chosen_predictions = predictions[chosen]
    written.append(plot_confidence_maps(images[chosen], chosen_maps, labels[chosen], chosen_predictions, classes,
                                        out / f"confidence_maps.{fmt}"))
    written.append(plot_overlays(images[chosen], chosen_maps, chosen_predictions, classes, out / f"overlays.{fmt}",
                                 labels=labels[chosen]))

    if args.images:
        written.append(_user_overlays(served, preprocessing, args.images, user_images, classes,
                                      out / f"overlays_images.{fmt}", amp_dtype, meta, invert=args.invert))

    if runs:
        written.append(plot_curves(runs, out / f"curves.{fmt}"))

    _remove_stale(out, earlier - set(names))
    _write_report(out, report, names)
    _print_summary(report, fmt, written)
    return 0


def _earlier_files(out: Path) -> set[str]:
    """The figures an earlier `nin visualize` into ``out`` wrote, as its maps.json lists them: only names this
    command writes (a figure's name in one of FORMATS), so no other file of the folder is ever taken for one;
    none when the folder is not ours, or its maps.json is from a version that listed none."""
    files = (_earlier_report(out) or {}).get("files")
    ours = {f"{figure}.{fmt}" for figure in FIGURES for fmt in FORMATS}
    return {name for name in files if isinstance(name, str) and name in ours} if isinstance(files, list) else set()


def _remove_stale(out: Path, names: set[str]) -> None:
    """Remove figures an earlier call wrote that this one did not (say its --images overlays), so the folder shows
    one call's results; never through a link."""
    for name in names:
        path = out / name
        if path.is_file() and not path.is_symlink():
            path.unlink()


def _check_args(args: argparse.Namespace) -> None:
    """One line naming the flag for each out-of-range count."""
    if args.per_class < 1:
        raise NinError(f"--per-class {args.per_class}: expected at least 1")
    if args.batch_size < 1:
        raise NinError(f"--batch-size {args.batch_size}: expected at least 1")
    if args.limit is not None and args.limit < 1:
        raise NinError(f"--limit {args.limit}: expected at least 1")
    if args.invert and not args.images:
        raise NinError("--invert applies to --images: give the image files to read inverted")
    missing = next((image for image in args.images if not Path(image).is_file()), None)
    if missing is not None:  # before any work: not after the figures of the test images are drawn
        raise NinError(f"--images {missing}: no such file")


def _print_summary(report: dict, fmt: str, written: list[Path]) -> None:
    print(f"{report['dataset']} test, {report['n']} images ({report['precision']}), {report['weights']}:")
    print(f"  map with the largest activation is the true class:  {report['max_map_true_class']:.2%}  "
          f"(chance {report['chance']:.0%})")
    print(f"  ... and agrees with the GAP prediction:              {report['max_map_agrees_with_gap']:.2%}")
    print(f"  GAP prediction accuracy (no test-time flips):        {report['gap_accuracy']:.2%}")
    print(f"  accuracy as `nin evaluate` counts it (confusion.{fmt}): {report['accuracy']:.2%}")
    for path in written:
        print(f"wrote {path}")
