"""Look inside a trained NiN: its category-confidence maps (the paper's Figure 4), class-activation overlays,
training curves, the confusion matrix, and a number for the paper's claim about the maps.

    nin visualize runs/mnist-fast --out figures/mnist --per-class 2 --images my_digit.png
    maps = confidence_maps(model, preprocessing(images))        # (N, K, h, w); maps.mean((2, 3)) are the logits

The paper (Figure 4, section 4.7): the last mlpconv block emits one map per class, global average pooling
turns each map into its class's score, and "the largest activations lie in the map of the true class, roughly
where the object is". `map_statistics` measures the first half of that sentence on the whole test set: how
often the map holding the single largest activation belongs to the true class, and how often it names the
class the averaged (GAP) scores predict. The overlays show the second half: the predicted class's map,
upsampled bilinearly onto the image.

Plots are written as PNGs through matplotlib's Agg canvas (no pyplot, no global backend state), at fixed
pixel sizes given with each function; matplotlib is the optional extra ``network-in-network[viz]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from nin.errors import NinError
from nin.metrics import read_metrics

__all__ = [
    "confidence_maps",
    "map_scores",
    "map_statistics",
    "upsample_maps",
    "plot_confidence_maps",
    "plot_overlays",
    "plot_curves",
    "plot_confusion",
    "add_arguments",
    "run",
]

DPI = 100  # every figure: inches × 100 = pixels, so the sizes below are exact
CELL_PX = 120  # one image or map panel of the confidence-map figure, title included
COLORBAR_PX = 40  # the column of per-image colour bars
HEADER_PX = 60  # the figure title and legend line
OVERLAY_PX = 160  # one overlay panel, title included
OVERLAY_COLUMNS = 8
CURVES_PX = (1500, 450)  # loss, error, lr side by side
MAX_CLASS_PANELS = 10  # more classes than this (CIFAR-100, ImageNet): show the true class and the top scorers
TRUE_COLOUR, PREDICTED_COLOUR = "#1a9850", "#d73027"  # green frame: true class; red frame: a wrong prediction


# ---------------------------------------------------------------------------------------------------------------
# Maps and the statistic
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def confidence_maps(model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The last mlpconv block's maps, before pooling: ``model.forward_features`` in eval mode, without gradients.

    Args:
        model: A NiN (anything with ``forward_features``).
        images: Preprocessed float (N, C, H, W), on the model's device.
        amp_dtype: Autocast dtype (bf16 where `nin.train.select_precision` picks it); None runs fp32.

    Returns:
        fp32 (N, K, h, w), one confidence map per class; the model's training mode is left as it was.
    """
    from nin.runtime import autocast

    was_training = model.training
    model.eval()
    try:
        with autocast(images.device, amp_dtype):
            maps = model.forward_features(images)
    finally:
        model.train(was_training)
    return maps.float().contiguous()


@torch.no_grad()
def map_scores(model: nn.Module, preprocessing, images: torch.Tensor, *, batch_size: int = 500,
               amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class map's largest activation and the model's logits, batch by batch over a whole split.

    Args:
        model: A NiN, on its device.
        preprocessing: The fitted `nin.transforms.Preprocessing` stored with the model.
        images: Raw uint8 (N, C, H, W), on any device; each batch is moved to the model's device.
        batch_size: Images per batch.
        amp_dtype: As in `confidence_maps`.

    Returns:
        On the CPU: peaks (N, K), the max over spatial positions of each class map, and logits (N, K),
        ``model.forward_head`` of the same maps (their spatial mean for a GAP model).
    """
    device = next(model.parameters()).device
    peaks, logits = [], []
    for chunk in images.split(batch_size):
        maps = confidence_maps(model, preprocessing(chunk.to(device)), amp_dtype)  # (B, K, h, w)
        peaks.append(maps.amax(dim=(2, 3)).cpu())
        logits.append(model.forward_head(maps).float().cpu())
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


def upsample_maps(maps: torch.Tensor, class_indices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One chosen map per image, resized to the image: (N, K, h, w) -> (N, H, W), bilinear (class-activation style).

    Args:
        maps: Confidence maps (N, K, h, w).
        class_indices: (N,) the class whose map to take for each image (usually the prediction).
        size: The image's (H, W).
    """
    chosen = maps[torch.arange(len(maps), device=maps.device), class_indices.to(maps.device)]  # (N, h, w)
    return F.interpolate(chosen.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


def _figure(width_px: int, height_px: int, **kwargs):
    """A matplotlib Figure on an Agg canvas, exactly width_px × height_px when saved."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise NinError("visualization needs matplotlib: pip install 'network-in-network[viz]'") from None
    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, **kwargs)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")  # no bbox_inches="tight": it would change the pixel size
    return path


def _show_image(ax, image: torch.Tensor) -> None:
    """A raw uint8 (C, H, W) image, grey for one channel."""
    array = image.detach().cpu().permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        ax.imshow(array[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(array, interpolation="nearest")


def _frame(ax, colour: str | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)


def plot_confidence_maps(images: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor,
                         classes: Sequence[str], path: str | os.PathLike) -> Path:
    """The paper's Figure 4: each input beside its class maps, one colour scale per image.

    One row per image: the raw input, then one panel per class titled with its name (at most
    `MAX_CLASS_PANELS`: with more classes, the true class and the highest-scoring others), then a colour bar.
    The true class's panel has a green frame and "true" in its title; the predicted class's says "pred",
    framed red when the prediction is wrong. Size: ((1 + panels) × CELL_PX + COLORBAR_PX) × (rows × CELL_PX
    + HEADER_PX) pixels.

    Args:
        images: Raw uint8 (N, C, H, W), as stored in the data set (not preprocessed).
        maps: (N, K, h, w) their confidence maps.
        labels: (N,) true classes.
        predictions: (N,) predicted classes.
        classes: K class names.
        path: The PNG to write.
    """
    num_images, num_classes = maps.shape[:2]
    assert len(images) == len(labels) == len(predictions) == num_images, "one label and prediction per image"
    assert len(classes) == num_classes, f"{len(classes)} class names for {num_classes} maps"
    panels = min(num_classes, MAX_CLASS_PANELS)
    width, height = (1 + panels) * CELL_PX + COLORBAR_PX, max(num_images, 1) * CELL_PX + HEADER_PX
    figure = _figure(width, height)
    signed = bool((maps < 0).any())  # the fast recipe's class maps have no ReLU: their values take both signs
    scale = ("signed maps (no ReLU on the class maps): red > 0 > blue, centred at 0" if signed else
             "rectified maps (ReLU): dark = 0, yellow = high")
    figure.suptitle(f"Confidence maps of the last mlpconv block (before global average pooling), {scale}; one colour "
                    "scale per row.\nGreen frame: true class. Red frame: predicted class when wrong.", fontsize=9,
                    y=1 - 4 / height, va="top")
    grid = figure.add_gridspec(max(num_images, 1), panels + 2, left=6 / width, right=1 - 34 / width,
                               top=1 - HEADER_PX / height, bottom=18 / height, wspace=0.12, hspace=0.38,
                               width_ratios=[1.0] * (panels + 1) + [0.12])
    maps = maps.detach().float().cpu()
    scores = maps.mean(dim=(2, 3))
    for row in range(num_images):
        label, predicted = int(labels[row]), int(predictions[row])
        ax = figure.add_subplot(grid[row, 0])
        _show_image(ax, images[row])
        _frame(ax, None)
        ax.set_title(f"true: {classes[label]}", fontsize=8, pad=2)
        ax.set_xlabel(f"pred: {classes[predicted]}", fontsize=8, labelpad=2,
                      color="black" if predicted == label else PREDICTED_COLOUR)
        if num_classes <= MAX_CLASS_PANELS:
            shown = list(range(num_classes))
        else:
            others = [k for k in scores[row].argsort(descending=True).tolist() if k != label]
            shown = [label, *others[: panels - 1]]
        low, high = float(maps[row, shown].min()), float(maps[row, shown].max())
        high = high if high > low else low + 1e-6
        cmap = "viridis"
        if signed:  # maps without the ReLU: a diverging scale centred at 0, red above, blue below
            bound = max(abs(low), abs(high))
            cmap, low, high = "RdBu_r", -bound, bound
        for column, k in enumerate(shown, start=1):
            ax = figure.add_subplot(grid[row, column])
            picture = ax.imshow(maps[row, k].numpy(), cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
            marks = [word for word, hit in (("true", k == label), ("pred", k == predicted)) if hit]
            ax.set_title(classes[k] + (f" ({', '.join(marks)})" if marks else ""), fontsize=7, pad=2,
                         fontweight="bold" if marks else "normal")
            _frame(ax, TRUE_COLOUR if k == label else PREDICTED_COLOUR if k == predicted else None)
        bar = figure.colorbar(picture, cax=figure.add_subplot(grid[row, panels + 1]))
        bar.ax.tick_params(labelsize=6, length=2, pad=1)
    return _save(figure, path)


def plot_overlays(images: torch.Tensor, maps: torch.Tensor, predictions: torch.Tensor, classes: Sequence[str],
                  path: str | os.PathLike, *, labels: torch.Tensor | None = None,
                  names: Sequence[str] | None = None) -> Path:
    """Each image under its predicted class's map, upsampled bilinearly and scaled to [0, 1] per image.

    Panels run in rows of `OVERLAY_COLUMNS`; size: (columns × OVERLAY_PX) × (rows × OVERLAY_PX + HEADER_PX)
    pixels, columns = min(N, OVERLAY_COLUMNS) but at least 3.

    Args:
        images: Raw uint8 (N, C, H, W).
        maps: (N, K, h, w) their confidence maps.
        predictions: (N,) the class whose map is shown.
        classes: K class names.
        path: The PNG to write.
        labels: (N,) true classes, when known; a wrong prediction's title turns red.
        names: (N,) captions, e.g. the image files' names.
    """
    num_images = len(images)
    assert len(maps) == len(predictions) == num_images, "one map and prediction per image"
    columns = max(3, min(num_images, OVERLAY_COLUMNS))  # at least 3 wide, so that the title fits
    rows = max(1, math.ceil(num_images / columns))
    width, height = columns * OVERLAY_PX, rows * OVERLAY_PX + HEADER_PX
    figure = _figure(width, height)
    figure.suptitle("Predicted class's map, upsampled onto the image\n"
                    "(bilinear; per image: dark = low, yellow = high)", fontsize=8, y=1 - 3 / height, va="top")
    grid = figure.add_gridspec(rows, columns, left=8 / width, right=1 - 8 / width, top=1 - HEADER_PX / height,
                               bottom=6 / height, wspace=0.1, hspace=0.42)
    heat = upsample_maps(maps.detach().float().cpu(), predictions.cpu(), tuple(images.shape[2:]))  # (N, H, W)
    low = heat.flatten(1).min(dim=1).values.view(-1, 1, 1)
    high = heat.flatten(1).max(dim=1).values.view(-1, 1, 1)
    heat = (heat - low) / (high - low).clamp_min(1e-12)
    for i in range(num_images):
        ax = figure.add_subplot(grid[i // columns, i % columns])
        _show_image(ax, images[i])
        ax.imshow(heat[i].numpy(), cmap="inferno", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="nearest")
        _frame(ax, None)
        predicted = int(predictions[i])
        title = [names[i][:22]] if names is not None else []
        title.append(f"pred: {classes[predicted]}")
        wrong = labels is not None and int(labels[i]) != predicted
        if wrong:
            title.append(f"true: {classes[int(labels[i])]}")
        ax.set_title("\n".join(title), fontsize=8, pad=2, color=PREDICTED_COLOUR if wrong else "black")
    return _save(figure, path)


def plot_curves(runs: Sequence, path: str | os.PathLike, *, reference: float | None = None) -> Path:
    """Training curves: loss, error (train solid, test dashed) and lr per epoch, one colour per run.

    Args:
        runs: Run folders (their metrics.jsonl is read), or (name, per-epoch records) pairs.
        path: The PNG to write. Size: `CURVES_PX` (1500 × 450 pixels).
        reference: An error (fraction) drawn as a horizontal line on the error panel, e.g. the paper's.
    """
    assert runs, "plot_curves needs at least one run"
    figure = _figure(*CURVES_PX, layout="constrained")
    from matplotlib.ticker import MaxNLocator
    loss_ax, error_ax, lr_ax = figure.subplots(1, 3)
    lrs: list[float] = []
    for index, run in enumerate(runs):
        name, records = run if isinstance(run, tuple) else (Path(run).resolve().name, read_metrics(run))
        colour = f"C{index % 10}"
        epochs = [r["epoch"] for r in records]
        eval_split = next((key[: -len("_error")] for key in (records[0] if records else {})
                           if key.endswith("_error") and key != "train_error"), "test")

        def series(key: str) -> list[float]:
            return [math.nan if r.get(key) is None else float(r[key]) for r in records]

        loss_ax.plot(epochs, series("train_loss"), "-", color=colour, marker=".", label=f"{name} train")
        loss_ax.plot(epochs, series(f"{eval_split}_loss"), "--", color=colour, marker=".", label=f"{name} {eval_split}")
        error_ax.plot(epochs, [100 * v for v in series("train_error")], "-", color=colour, marker=".",
                      label=f"{name} train")
        error_ax.plot(epochs, [100 * v for v in series(f"{eval_split}_error")], "--", color=colour, marker=".",
                      label=f"{name} {eval_split}")
        lr_ax.plot(epochs, series("lr"), "-", color=colour, marker=".", label=name)
        lrs += [v for v in series("lr") if v > 0]
    if reference is not None:
        error_ax.axhline(100 * reference, color="grey", linestyle=":", label=f"paper {100 * reference:.2f}%")
    for ax, title, unit in ((loss_ax, "loss", "cross-entropy (nats)"), (error_ax, "error", "error (%)"),
                            (lr_ax, "learning rate", "lr (last step of the epoch)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    if lrs and max(lrs) / min(lrs) > 20:  # the paper's lr / 10 drops read best on a log axis
        lr_ax.set_yscale("log")
    return _save(figure, path)


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], path: str | os.PathLike) -> Path:
    """The test set's confusion matrix, each row (true class) coloured by its share; counts written in the cells.

    Size: side × side pixels, side = 200 + K × cell with cell = clamp(2000 // K, 2, 50) (700 for K = 10).
    """
    confusion = confusion.detach().cpu().to(torch.int64)
    num_classes = len(classes)
    assert confusion.shape == (num_classes, num_classes), f"confusion {tuple(confusion.shape)} for {num_classes} classes"
    side = 200 + num_classes * max(2, min(50, 2000 // num_classes))
    figure = _figure(side, side, layout="constrained")
    ax = figure.subplots()
    shares = confusion.double() / confusion.sum(dim=1, keepdim=True).clamp_min(1)
    picture = ax.imshow(shares.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(picture, ax=ax, shrink=0.8, label="share of the true class's images")
    correct, total = int(confusion.diagonal().sum()), int(confusion.sum())
    ax.set_title(f"Confusion matrix: {correct}/{total} correct ({correct / max(total, 1):.2%})", fontsize=10)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if num_classes <= 50:
        ax.set_xticks(range(num_classes), list(classes), rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(num_classes), list(classes), fontsize=8)
    if num_classes <= 20:
        for true in range(num_classes):
            for predicted in range(num_classes):
                count = int(confusion[true, predicted])
                ax.text(predicted, true, str(count), ha="center", va="center", fontsize=7,
                        color="white" if shares[true, predicted] > 0.5 else "black")
    return _save(figure, path)


# ---------------------------------------------------------------------------------------------------------------
# Command line: nin visualize
# ---------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Figure 4 (confidence maps), class-activation overlays, training curves, the confusion "
                          "matrix, and maps.json: how often the map with the largest activation is the true class.")
    parser.add_argument("weights", metavar="RUN_DIR_OR_WEIGHTS")
    parser.add_argument("--data-dir", help="data root (default: $NIN_DATA, else ~/.cache/nin)")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/figures, or WEIGHTS_STEM-figures)")
    parser.add_argument("--images", nargs="+", default=[], metavar="FILE", help="also overlay these image files")
    parser.add_argument("--per-class", type=int, default=2, metavar="K",
                        help="test images per class in the figures (default 2)")
    parser.add_argument("--runs", nargs="+", default=[], metavar="RUN_DIR",
                        help="training curves of these runs on one plot (default: RUN_DIR itself)")
    parser.add_argument("--limit", type=int, metavar="N", help="use only the first N test images")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", help="cpu, cuda (default: cuda when available)")


def _output_folder(weights: Path, out: str | None) -> Path:
    if out:
        return Path(out)
    return weights / "figures" if weights.is_dir() else weights.with_name(weights.stem + "-figures")


def _user_overlays(model: nn.Module, preprocessing, images: Sequence[str], classes: Sequence[str], out: Path,
                   amp_dtype: torch.dtype | None) -> Path:
    """Overlays of the user's own images, converted exactly as `nin predict` converts them."""
    from nin.data.readers import read_image

    config = model.config
    device = next(model.parameters()).device
    user = torch.stack([read_image(Path(p), config.input_size, config.in_channels) for p in images])
    user_maps = confidence_maps(model, preprocessing(user.to(device)), amp_dtype)
    user_predictions = model.forward_head(user_maps).argmax(dim=1).cpu()
    for path, k in zip(images, user_predictions.tolist()):
        print(f"{path}: {classes[k]}")
    return plot_overlays(user, user_maps.cpu(), user_predictions, classes, out / "overlays_images.png",
                         names=[Path(p).name for p in images])


def _scored_as_evaluate(model: nn.Module, preprocessing, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                        amp_dtype: torch.dtype | None, meta: dict):
    """The test images scored exactly as `nin evaluate` scores them (its test-time flips included)."""
    from nin.data import TensorLoader
    from nin.evaluate import evaluate

    device = next(model.parameters()).device
    prepared = preprocessing(images).to(device).contiguous(memory_format=torch.channels_last)
    return evaluate(model.to(memory_format=torch.channels_last),
                    TensorLoader(prepared, labels.to(device), batch_size, shuffle=False),
                    num_classes=model.config.num_classes, amp_dtype=amp_dtype, tta_flip=bool(meta.get("tta_flip")))


def run(args: argparse.Namespace) -> int:
    """``nin visualize``: every figure of the module docstring, and maps.json, into ``--out``."""
    from nin.checkpoint import load_weights
    from nin.data.datasets import first_per_class
    from nin.evaluate import load_matching_dataset
    from nin.runtime import resolve_device, select_precision

    if args.per_class < 1:
        raise NinError(f"--per-class {args.per_class}: expected at least 1")
    if args.batch_size < 1:
        raise NinError(f"--batch-size {args.batch_size}: expected at least 1")
    if args.limit is not None and args.limit < 1:
        raise NinError(f"--limit {args.limit}: expected at least 1")
    _figure(1, 1)  # fail now, with the install hint, when matplotlib is missing
    weights = Path(args.weights)
    out = _output_folder(weights, args.out)
    device = resolve_device(args.device)
    model, preprocessing, meta = load_weights(weights, device)
    config = model.config
    dataset, data = load_matching_dataset(weights, config, meta, None, "test", args.data_dir)
    images, labels = data.images[: args.limit], data.labels[: args.limit]
    classes = list(meta.get("classes") or data.classes or [str(k) for k in range(config.num_classes)])
    amp_dtype = select_precision("auto", device)
    written: list[Path] = []

    # the map statistic (plain GAP, no flips), over the whole (or --limit) test set
    peaks, logits = map_scores(model, preprocessing, images, batch_size=args.batch_size, amp_dtype=amp_dtype)
    statistics = map_statistics(peaks, logits, labels)
    predictions = logits.argmax(dim=1)
    num_classes = config.num_classes
    scored = _scored_as_evaluate(model, preprocessing, images, labels, args.batch_size, amp_dtype, meta)
    confusion = scored.confusion
    report = {"weights": str(weights), "dataset": dataset, "split": "test", "limit": args.limit,
              "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32", "tta_flip": False,
              "head": config.head, **statistics, "accuracy": scored.accuracy,
              "accuracy_tta_flip": bool(meta.get("tta_flip"))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "maps.json").write_text(json.dumps(report, indent=2) + "\n")
    written.append(out / "maps.json")
    written.append(plot_confusion(confusion, classes, out / "confusion.png"))

    # Figure 4 and the test-image overlays: the first --per-class images of every class
    chosen = first_per_class(labels, args.per_class, num_classes)
    chosen_maps = confidence_maps(model, preprocessing(images[chosen].to(device)), amp_dtype).cpu()
    chosen_predictions = predictions[chosen]
    written.append(plot_confidence_maps(images[chosen], chosen_maps, labels[chosen], chosen_predictions, classes,
                                        out / "confidence_maps.png"))
    written.append(plot_overlays(images[chosen], chosen_maps, chosen_predictions, classes, out / "overlays.png",
                                 labels=labels[chosen]))

    if args.images:
        written.append(_user_overlays(model, preprocessing, args.images, classes, out, amp_dtype))

    runs = [Path(r) for r in args.runs] or ([weights] if (weights / "metrics.jsonl").is_file() else [])
    if runs:
        written.append(plot_curves(runs, out / "curves.png"))

    print(f"{dataset} test, {statistics['n']} images ({report['precision']}), {weights}:")
    print(f"  map with the largest activation is the true class:  {statistics['max_map_true_class']:.2%}  "
          f"(chance {statistics['chance']:.0%})")
    print(f"  ... and agrees with the GAP prediction:              {statistics['max_map_agrees_with_gap']:.2%}")
    print(f"  GAP prediction accuracy (no test-time flips):        {statistics['gap_accuracy']:.2%}")
    print(f"  accuracy as `nin evaluate` counts it (confusion.png): {report['accuracy']:.2%}")
    for path in written:
        print(f"wrote {path}")
    return 0
