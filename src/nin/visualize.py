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

Figures are drawn at the size they print at in a paper, at most `TEXT_WIDTH_IN` (7 in) wide, with no text
under `FONT_PT` (9 pt), through matplotlib's Agg canvas (no pyplot, no global backend state), and written as
PNG (300 dpi), PDF or SVG by the path's suffix; matplotlib is the optional extra ``network-in-network[viz]``.
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
    "plot_photo_overlays",
    "lr_per_step",
    "figure_format",
    "plot_curves",
    "plot_confusion",
    "add_arguments",
    "run",
]

TEXT_WIDTH_IN = 7.0  # a two-column paper's text width: no figure is wider, so each prints at 100 %
FONT_PT = 9  # no text smaller than this at that size
PNG_DPI = 300  # PNGs: inches × 300 = pixels
FORMATS = ("png", "pdf", "svg")
MAX_CLASS_PANELS = 10  # more classes than this (CIFAR-100, ImageNet): the true class and the top scorers
MANY_CLASS_PANELS = 6  # ... as this many panels, wide enough for a name each
OVERLAY_COLUMNS = 5
PHOTO_COLUMNS = 3
MAX_PHOTO_SIDE = 2048  # a user's photo is drawn at its own resolution up to this many pixels a side
TRUE_COLOUR, PREDICTED_COLOUR = "#1a9850", "#d73027"  # green frame: true class; red frame: a wrong prediction
LINE_IN = FONT_PT * 1.25 / 72  # one line of text



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


def _figure(width_in: float, height_in: float, **kwargs):
    """A matplotlib Figure on an Agg canvas, width_in × height_in inches (the size it is meant to print at)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise NinError("visualization needs matplotlib: pip install 'network-in-network[viz]'") from None
    figure = Figure(figsize=(width_in, height_in), dpi=PNG_DPI, **kwargs)
    FigureCanvasAgg(figure)
    return figure


def figure_format(path: str | os.PathLike) -> str:
    """The format a figure path asks for (its suffix): png, pdf or svg; anything else is refused in one line."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise NinError(f"{path}: figures are written as {', '.join('.' + f for f in FORMATS)}")
    return suffix


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    fmt = figure_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format=fmt, dpi=PNG_DPI)  # no bbox_inches="tight": the size stays the print size
    return path


def _wrap(text: str, width_in: float) -> str:
    """``text`` broken into lines that fit ``width_in`` inches at FONT_PT (a conservative character width)."""
    import textwrap

    columns = max(10, int(width_in / (0.56 * FONT_PT / 72)))
    return "\n".join(textwrap.fill(part, columns) for part in text.split("\n"))


def _fit(name: str, width_in: float) -> str:
    """A class name cut to fit ``width_in`` inches at FONT_PT."""
    room = max(3, int(width_in / (0.55 * FONT_PT / 72)))
    return name if len(name) <= room else name[: room - 1] + "…"


def _show_image(ax, image) -> None:
    """A raw uint8 (C, H, W) tensor or an (H, W[, C]) array, grey for one channel."""
    array = image.detach().cpu().permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else image
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        ax.imshow(array, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(array, interpolation="nearest")


def _frame(ax, colour: str | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_edgecolor(colour)
            spine.set_linewidth(2)


def _map_scale(maps: torch.Tensor) -> tuple[str, str]:
    """(colour map, the sentence saying how to read it) for a set of class maps."""
    if bool((maps < 0).any()):  # the fast recipe's class maps have no ReLU: their values take both signs
        return "RdBu_r", ("Signed maps (the class maps have no ReLU): red > 0 > blue, white = 0, "
                          "one scale per row, symmetric about 0.")
    return "viridis", "Rectified maps (ReLU after the class maps): dark = 0, yellow = high; one scale per row."


def plot_confidence_maps(images: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor,
                         classes: Sequence[str], path: str | os.PathLike) -> Path:
    """The paper's Figure 4: each input beside its class maps, one colour scale per image, at print size.

    One row per image: the true and predicted class at the left, the raw input, one panel per class, a colour
    bar. With at most `MAX_CLASS_PANELS` classes every row shows every class and the class names head the
    columns; with more, a row shows the true class and the highest-scoring others (`MANY_CLASS_PANELS` panels),
    each titled. Green frame: the true class; red frame: the predicted class when wrong. Signed maps (no ReLU)
    use a diverging colour map centred at 0, and the figure says so. `TEXT_WIDTH_IN` wide, text ≥ `FONT_PT`.

    Args:
        images: Raw uint8 (N, C, H, W), as stored in the data set (not preprocessed).
        maps: (N, K, h, w) their confidence maps.
        labels: (N,) true classes.
        predictions: (N,) predicted classes.
        classes: K class names.
        path: The file to write: .png, .pdf or .svg.
    """
    num_images, num_classes = maps.shape[:2]
    assert len(images) == len(labels) == len(predictions) == num_images, "one label and prediction per image"
    assert len(classes) == num_classes, f"{len(classes)} class names for {num_classes} maps"
    figure_format(path)
    shared = num_classes <= MAX_CLASS_PANELS
    panels = num_classes if shared else MANY_CLASS_PANELS
    label_in, bar_in = 1.05, 0.5
    cell = (TEXT_WIDTH_IN - label_in - bar_in) / (1 + panels)
    cmap, how = _map_scale(maps)
    title = _wrap("Confidence maps of the last mlpconv block, before global average pooling. " + how +
                  " Green frame: true class; red frame: predicted class when wrong.", TEXT_WIDTH_IN - 0.2)
    title_in = (title.count("\n") + 1) * LINE_IN + 0.1
    header_in = title_in + (0.75 if shared else 0.05)
    row_in = cell + (0.05 if shared else LINE_IN + 0.05)
    rows = max(num_images, 1)
    height = header_in + rows * row_in + 0.1
    figure = _figure(TEXT_WIDTH_IN, height)
    figure.text(0.5, 1 - 0.05 / height, title, ha="center", va="top", fontsize=FONT_PT)
    maps = maps.detach().float().cpu()
    scores = maps.mean(dim=(2, 3))
    for row in range(num_images):
        label, predicted = int(labels[row]), int(predictions[row])
        top = 1 - (header_in + row * row_in + (row_in - cell)) / height
        def axes(left_in: float, width_in: float):
            return figure.add_axes((left_in / TEXT_WIDTH_IN, top - cell / height, width_in / TEXT_WIDTH_IN,
                                    cell * 0.92 / height))

        figure.text(0.05 / TEXT_WIDTH_IN, top - cell * 0.46 / height,
                    f"{_fit(classes[label], label_in - 0.15)}\n→ {_fit(classes[predicted], label_in - 0.3)}",
                    ha="left", va="center", fontsize=FONT_PT,
                    color="black" if predicted == label else PREDICTED_COLOUR)
        ax = axes(label_in, 0.92 * cell)
        _show_image(ax, images[row])
        _frame(ax, None)
        picture = _class_panels(axes, maps[row], scores[row], label, predicted, classes, panels=panels,
                                shared=shared, first_row=row == 0, left_in=label_in, cell=cell, cmap=cmap)
        bar = figure.colorbar(picture, cax=axes(label_in + (1 + panels) * cell + 0.02, 0.06))
        bar.ax.tick_params(labelsize=FONT_PT, length=2, pad=1)
        bar.ax.locator_params(nbins=2)
    return _save(figure, path)


def _class_panels(axes, maps: torch.Tensor, scores: torch.Tensor, label: int, predicted: int, classes: Sequence[str],
                  *, panels: int, shared: bool, first_row: bool, left_in: float, cell: float, cmap: str):
    """One image's class-map panels of `plot_confidence_maps`, on one colour scale: the true class framed green,
    a wrong prediction red; names over the first row's columns (``shared``) or over every panel. Returns the last
    panel's image, for the colour bar."""
    shown = _shown_classes(scores, label, panels)
    low, high = _colour_limits(maps[shown], cmap)
    for column, k in enumerate(shown, start=1):
        ax = axes(left_in + column * cell, 0.92 * cell)
        picture = ax.imshow(maps[k].numpy(), cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
        _frame(ax, TRUE_COLOUR if k == label else PREDICTED_COLOUR if k == predicted else None)
        if shared and first_row:
            ax.text(0.3, 1.08, classes[k], transform=ax.transAxes, rotation=45, ha="left", va="bottom",
                    fontsize=FONT_PT)
        elif not shared:
            ax.set_title(_fit(classes[k], 0.75 * cell), fontsize=FONT_PT, pad=2)
    return picture


def _shown_classes(scores: torch.Tensor, label: int, panels: int) -> list[int]:
    """The classes of one map row: all of them when they fit, else the true class and the top scorers."""
    if len(scores) <= MAX_CLASS_PANELS:
        return list(range(len(scores)))
    others = [k for k in scores.argsort(descending=True).tolist() if k != label]
    return [label, *others[: panels - 1]]


def _colour_limits(values: torch.Tensor, cmap: str) -> tuple[float, float]:
    """One row's colour scale: its range, or symmetric about 0 for signed maps (the diverging map)."""
    low, high = float(values.min()), float(values.max())
    high = high if high > low else low + 1e-6
    if cmap == "RdBu_r":
        bound = max(abs(low), abs(high))
        return -bound, bound
    return low, high


def _overlay_figure(count: int, columns: int, panel_in: tuple[float, float], title: str):
    """A figure of ``count`` panels in rows of ``columns``, each panel_in = (width, height) in inches plus three
    title lines, under a wrapped ``title``; returns (figure, a function giving panel i's axes)."""
    rows = max(1, math.ceil(count / columns))
    title = _wrap(title, TEXT_WIDTH_IN - 0.2)
    header = (title.count("\n") + 1) * LINE_IN + 0.15
    cell_w, cell_h = TEXT_WIDTH_IN / columns, panel_in[1] + 3 * LINE_IN + 0.1
    height = header + rows * cell_h
    figure = _figure(TEXT_WIDTH_IN, height)
    figure.text(0.5, 1 - 0.05 / height, title, ha="center", va="top", fontsize=FONT_PT)

    def panel(i: int):
        row, column = divmod(i, columns)
        left = column * cell_w + (cell_w - panel_in[0]) / 2
        bottom = height - header - row * cell_h - 3 * LINE_IN - 0.05 - panel_in[1]
        return figure.add_axes((left / TEXT_WIDTH_IN, bottom / height, panel_in[0] / TEXT_WIDTH_IN,
                                panel_in[1] / height))

    return figure, panel


def _overlay_title(ax, lines: list[str], wrong: bool) -> None:
    ax.set_title("\n".join(lines), fontsize=FONT_PT, pad=3, color=PREDICTED_COLOUR if wrong else "black")


def _normalised(heat: torch.Tensor) -> torch.Tensor:
    """Each map (N, H, W) scaled to [0, 1]."""
    low = heat.flatten(1).min(dim=1).values.view(-1, 1, 1)
    high = heat.flatten(1).max(dim=1).values.view(-1, 1, 1)
    return (heat - low) / (high - low).clamp_min(1e-12)


OVERLAY_NOTE = ("The predicted class's confidence map, upsampled bilinearly onto the image and scaled per image "
                "(dark = its lowest value, yellow = its highest).")


def plot_overlays(images: torch.Tensor, maps: torch.Tensor, predictions: torch.Tensor, classes: Sequence[str],
                  path: str | os.PathLike, *, labels: torch.Tensor | None = None,
                  names: Sequence[str] | None = None) -> Path:
    """Each image under its predicted class's map, upsampled bilinearly and scaled to [0, 1] per image.

    Panels run in rows of `OVERLAY_COLUMNS` (at least 3 wide), `TEXT_WIDTH_IN` wide, text ≥ `FONT_PT`.

    Args:
        images: Raw uint8 (N, C, H, W).
        maps: (N, K, h, w) their confidence maps.
        predictions: (N,) the class whose map is shown.
        classes: K class names.
        path: The file to write: .png, .pdf or .svg.
        labels: (N,) true classes, when known; a wrong prediction's title turns red.
        names: (N,) captions, e.g. the image files' names.
    """
    num_images = len(images)
    assert len(maps) == len(predictions) == num_images, "one map and prediction per image"
    figure_format(path)
    columns = max(3, min(num_images, OVERLAY_COLUMNS))
    side = TEXT_WIDTH_IN / columns - 0.25
    figure, panel = _overlay_figure(num_images, columns, (side, side), OVERLAY_NOTE)
    heat = _normalised(upsample_maps(maps.detach().float().cpu(), predictions.cpu(), tuple(images.shape[2:])))
    for i in range(num_images):
        ax = panel(i)
        _show_image(ax, images[i])
        ax.imshow(heat[i].numpy(), cmap="inferno", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="nearest")
        _frame(ax, None)
        predicted = int(predictions[i])
        wrong = labels is not None and int(labels[i]) != predicted
        lines = [_fit(names[i], side + 0.2)] if names is not None else []
        lines.append(_fit(f"pred: {classes[predicted]}", side + 0.2))
        if wrong:
            lines.append(_fit(f"true: {classes[int(labels[i])]}", side + 0.2))
        _overlay_title(ax, lines, wrong)
    return _save(figure, path)


def plot_photo_overlays(photos: Sequence, maps: torch.Tensor, predictions: torch.Tensor, classes: Sequence[str],
                        path: str | os.PathLike, *, probabilities: torch.Tensor | None = None,
                        names: Sequence[str] | None = None) -> Path:
    """Each photo at its own resolution under its predicted class's map, upsampled onto the part the model saw.

    The model sees the centre square of a photo (`nin predict`'s resize and crop); the map is upsampled to that
    square's pixels and drawn over it, and a non-square photo gets the square's outline. Photos larger than
    `MAX_PHOTO_SIDE` pixels a side are drawn at that size. Rows of `PHOTO_COLUMNS`.

    Args:
        photos: PIL images as `nin.data.readers.read_photo` returns them.
        maps: (N, K, h, w) the class maps of the photos' model inputs.
        predictions: (N,) the class whose map is shown.
        classes: K class names.
        path: The file to write: .png, .pdf or .svg.
        probabilities: (N,) the predicted class's probability, printed in the title.
        names: (N,) captions, e.g. the files' names.
    """
    import numpy as np
    from matplotlib.patches import Rectangle

    assert len(maps) == len(predictions) == len(photos), "one map and prediction per photo"
    figure_format(path)
    photos = [_bounded(photo) for photo in photos]
    columns = max(1, min(len(photos), PHOTO_COLUMNS))
    width = TEXT_WIDTH_IN / columns - 0.25
    aspect = max(photo.height / photo.width for photo in photos)
    figure, panel = _overlay_figure(len(photos), columns, (width, width * aspect), OVERLAY_NOTE)
    for i, photo in enumerate(photos):
        ax = panel(i)
        side = min(photo.size)
        left, top = (photo.width - side) // 2, (photo.height - side) // 2
        heat = _normalised(upsample_maps(maps[i : i + 1].detach().float().cpu(), predictions[i : i + 1].cpu(),
                                         (side, side)))[0]
        _show_image(ax, np.asarray(photo))
        ax.imshow(heat.numpy(), cmap="inferno", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="bilinear",
                  extent=(left - 0.5, left + side - 0.5, top + side - 0.5, top - 0.5))
        if photo.width != photo.height:
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), side, side, fill=False, edgecolor="white",
                                   linestyle="--", linewidth=1))
        ax.set_xlim(-0.5, photo.width - 0.5)
        ax.set_ylim(photo.height - 0.5, -0.5)
        _frame(ax, None)
        predicted = int(predictions[i])
        lines = [_fit(names[i], width + 0.2)] if names is not None else []
        lines.append(f"{photo.width}×{photo.height} px")
        share = f" ({float(probabilities[i]):.0%})" if probabilities is not None else ""
        lines.append(_fit(f"pred: {classes[predicted]}{share}", width + 0.2))
        _overlay_title(ax, lines, False)
    return _save(figure, path)


def _bounded(photo):
    """``photo``, or a copy scaled down so that neither side exceeds `MAX_PHOTO_SIDE`."""
    if max(photo.size) <= MAX_PHOTO_SIDE:
        return photo
    photo = photo.copy()
    photo.thumbnail((MAX_PHOTO_SIDE, MAX_PHOTO_SIDE))
    return photo


def _run_records(run) -> tuple[str, list[dict], dict | None]:
    """(name, per-epoch records, train_config or None) of a run folder or a (name, records[, train_config])."""
    if isinstance(run, tuple):
        return run[0], list(run[1]), (run[2] if len(run) > 2 else None)
    folder = Path(run)
    config_path = folder / "config.json"
    config = None
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text()).get("train_config")
        except (ValueError, AttributeError):
            config = None
    return folder.resolve().name, read_metrics(folder), config


def lr_per_step(records: Sequence[dict], train_config: dict | None) -> tuple[list[float], list[float]]:
    """(x in epochs, lr) at every optimizer step of a run, from its schedule (`nin.schedule.lr_at` is pure).

    The plateau rule's drops are known only per epoch: its lr is drawn constant through each epoch at the
    value recorded for it. Without a config (or its step count), the recorded per-epoch points.
    """
    from nin.config import TrainConfig
    from nin.data.datasets import DATASETS
    from nin.schedule import lr_at, total_steps

    points = ([r["epoch"] for r in records if r.get("lr") is not None],
              [float(r["lr"]) for r in records if r.get("lr") is not None])
    if not train_config or not records:
        return points
    try:
        cfg = TrainConfig.from_dict(train_config)
    except Exception:  # a config from another version: the points still say what happened
        return points
    first = records[0]
    if first.get("step"):
        steps_per_epoch = max(1, round(first["step"] / first["epoch"]))
    else:
        info = DATASETS.get(cfg.dataset)
        images = cfg.train_subset or (info.train_images if info else 0)
        if not images:
            return points
        steps_per_epoch = math.ceil(images / cfg.batch_size)
    if cfg.schedule == "plateau":  # constant through each epoch
        xs, ys = [], []
        for epoch, lr in zip(*points):
            xs += [epoch - 1, epoch]
            ys += [lr, lr]
        return xs, ys
    total = min(total_steps(cfg, steps_per_epoch), int(max(points[0], default=0) * steps_per_epoch))
    stride = max(1, total // 2000)
    steps = list(range(0, total, stride))
    return [s / steps_per_epoch for s in steps], [lr_at(s, cfg, steps_per_epoch) for s in steps]


def plot_curves(runs: Sequence, path: str | os.PathLike, *,
                reference: float | Sequence[float | None] | None = None) -> Path:
    """Training curves at print size: loss and error per epoch (train solid, test dashed), lr per step.

    One colour per run; one legend under the panels; integer epochs; `TEXT_WIDTH_IN` wide, text ≥ `FONT_PT`.

    Args:
        runs: Run folders (their metrics.jsonl and config.json are read), or (name, per-epoch records) pairs,
            or (name, records, train_config) triples (the config gives the lr per step).
        path: The file to write: .png, .pdf or .svg.
        reference: An error (fraction) drawn as a horizontal dotted line on the error panel, e.g. the paper's;
            or one per run (None: none), each in its run's colour.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    assert runs, "plot_curves needs at least one run"
    figure_format(path)
    runs = [_run_records(run) for run in runs]
    references = ([reference] + [None] * (len(runs) - 1) if isinstance(reference, (int, float))
                  else list(reference or [None] * len(runs)))
    assert len(references) == len(runs), f"{len(references)} references for {len(runs)} runs"
    rows = math.ceil((len(runs) + 3) / 3)  # the legend: the runs, then the line styles, three to a row
    figure = _figure(TEXT_WIDTH_IN, 2.3 + rows * LINE_IN * 1.3, layout="constrained")
    loss_ax, error_ax, lr_ax = figure.subplots(1, 3)
    handles, lrs, eval_names = [], [], set()
    for index, (name, records, config) in enumerate(runs):
        colour = f"C{index % 10}"
        eval_names.add(_plot_run(loss_ax, error_ax, lr_ax, records, config, colour, lrs))
        if references[index] is not None:
            error_ax.axhline(100 * references[index], color=colour if len(runs) > 1 else "grey", linestyle=":")
        handles.append(Line2D([], [], color=colour, label=name))
    handles += [Line2D([], [], color="black", linestyle="-", label="train"),
                Line2D([], [], color="black", linestyle="--", marker=".", label=" / ".join(sorted(eval_names)))]
    if any(r is not None for r in references):
        label = (f"paper {100 * references[0]:.2f}%" if len(runs) == 1 else "paper (each run's colour)")
        handles.append(Line2D([], [], color="grey", linestyle=":", label=label))
    for ax, title, unit in ((loss_ax, "loss", "cross-entropy (nats)"), (error_ax, "error", "error (%)"),
                            (lr_ax, "learning rate (per step)", "lr")):
        ax.set_title(title, fontsize=FONT_PT)
        ax.set_xlabel("epoch", fontsize=FONT_PT)
        ax.set_ylabel(unit, fontsize=FONT_PT)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=FONT_PT)
        ax.grid(alpha=0.3)
    if lrs and max(lrs) / min(lrs) > 20 and len(set(lrs)) <= 10:  # the paper's lr / 10 drops: a log axis
        from matplotlib.ticker import LogFormatter, NullFormatter

        lr_ax.set_yscale("log")
        lr_ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(0, 0)))
        lr_ax.yaxis.set_minor_formatter(NullFormatter())
    figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=FONT_PT, frameon=False)
    return _save(figure, path)


def _plot_run(loss_ax, error_ax, lr_ax, records: list[dict], config: dict | None, colour: str,
              lrs: list[float]) -> str:
    """One run's lines on the three panels (its lr values appended to ``lrs``); returns its test split's name."""
    epochs = [r["epoch"] for r in records]
    eval_split = next((key[: -len("_error")] for key in (records[0] if records else {})
                       if key.endswith("_error") and key not in ("train_error", "extra_error")), "test")

    def series(key: str, scale: float = 1.0) -> list[float]:
        return [math.nan if r.get(key) is None else scale * float(r[key]) for r in records]

    def measured(key: str, scale: float = 1.0) -> tuple[list, list]:  # skip epochs not evaluated
        pairs = [(e, v) for e, v in zip(epochs, series(key, scale)) if not math.isnan(v)]
        return [e for e, _ in pairs], [v for _, v in pairs]

    loss_ax.plot(epochs, series("train_loss"), "-", color=colour)
    loss_ax.plot(*measured(f"{eval_split}_loss"), "--", color=colour, marker=".")
    error_ax.plot(epochs, series("train_error", 100), "-", color=colour)
    error_ax.plot(*measured(f"{eval_split}_error", 100), "--", color=colour, marker=".")
    xs, ys = lr_per_step(records, config)
    lr_ax.plot(xs, ys, "-", color=colour)
    lrs += [v for v in ys if v > 0]
    return eval_split


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], path: str | os.PathLike) -> Path:
    """The test set's confusion matrix, each row (true class) coloured by its share; counts in the cells.

    At print size: min(`TEXT_WIDTH_IN`, 2.3 + 0.42 × K) inches square; class names label the axes up to 30
    classes (class indices beyond); counts are written up to 12 classes. Text ≥ `FONT_PT`.
    """
    confusion = confusion.detach().cpu().to(torch.int64)
    num_classes = len(classes)
    assert confusion.shape == (num_classes, num_classes), f"confusion {tuple(confusion.shape)} for {num_classes} classes"
    figure_format(path)
    side = min(TEXT_WIDTH_IN, 2.3 + 0.42 * num_classes)
    figure = _figure(side, side, layout="constrained")
    ax = figure.subplots()
    shares = confusion.double() / confusion.sum(dim=1, keepdim=True).clamp_min(1)
    picture = ax.imshow(shares.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    bar = figure.colorbar(picture, ax=ax, shrink=0.8)
    bar.set_label("share of the true class's images", fontsize=FONT_PT)
    bar.ax.tick_params(labelsize=FONT_PT)
    correct, total = int(confusion.diagonal().sum()), int(confusion.sum())
    ax.set_title(f"Confusion matrix: {correct}/{total} correct ({correct / max(total, 1):.2%})", fontsize=FONT_PT)
    ax.set_xlabel("predicted class", fontsize=FONT_PT)
    ax.set_ylabel("true class", fontsize=FONT_PT)
    ax.tick_params(labelsize=FONT_PT)
    if num_classes <= 30:
        ax.set_xticks(range(num_classes), list(classes), rotation=45, ha="right", fontsize=FONT_PT)
        ax.set_yticks(range(num_classes), list(classes), fontsize=FONT_PT)
    if num_classes <= 12:
        for true in range(num_classes):
            for predicted in range(num_classes):
                count = int(confusion[true, predicted])
                ax.text(predicted, true, str(count), ha="center", va="center", fontsize=FONT_PT,
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
    parser.add_argument("--invert", action="store_true",
                        help="read --images as `nin predict --invert` does (dark ink on paper, MNIST-style weights)")
    parser.add_argument("--per-class", type=int, default=1, metavar="K",
                        help="test images per class in the figures (default 1)")
    parser.add_argument("--runs", nargs="+", default=[], metavar="RUN_DIR",
                        help="training curves of these runs on one plot (default: RUN_DIR itself)")
    parser.add_argument("--limit", type=int, metavar="N", help="use only the first N test images")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--format", choices=FORMATS, default="png",
                        help="figure files: png (300 dpi), pdf or svg (vector); default png")
    parser.add_argument("--device", help="cpu, cuda (default: cuda when available)")


def _output_folder(weights: Path, out: str | None) -> Path:
    if out:
        return Path(out)
    return weights / "figures" if weights.is_dir() else weights.with_name(weights.stem + "-figures")


def _user_overlays(served, preprocessing, images: Sequence[str], classes: Sequence[str], path: Path,
                   amp_dtype: torch.dtype | None, meta: dict, invert: bool = False) -> Path:
    """The user's own photos, each at its own resolution under its predicted class's map. The prediction is
    `nin predict`'s: the same conversion (`read_image`, and `invert_ink` with ``invert``), model (``served``, an
    `InferenceModel`) and test-time flips; the photos are drawn as given."""
    from nin.data.readers import read_image, read_photo
    from nin.evaluate import predict_logits
    from nin.transforms import invert_ink

    model = served.model
    config = model.config
    device = next(model.parameters()).device
    photos = [read_photo(Path(p), config.in_channels) for p in images]
    pixels = torch.stack([read_image(Path(p), config.input_size, config.in_channels) for p in images])
    batch = preprocessing((invert_ink(pixels) if invert else pixels).to(device))
    maps = confidence_maps(model, batch, amp_dtype)
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
    from nin.data import TensorLoader
    from nin.evaluate import evaluate

    device = next(served.parameters()).device
    prepared = preprocessing(images).to(device).contiguous(memory_format=torch.channels_last)
    return evaluate(served, TensorLoader(prepared, labels.to(device), batch_size, shuffle=False),
                    num_classes=served.model.config.num_classes, amp_dtype=amp_dtype,
                    tta_flip=bool(meta.get("tta_flip")))


def run(args: argparse.Namespace) -> int:
    """``nin visualize``: every figure of the module docstring, and maps.json, into ``--out``."""
    from nin.checkpoint import load_weights
    from nin.data.datasets import first_per_class
    from nin.evaluate import load_matching_dataset
    from nin.inference import inference_model
    from nin.runtime import resolve_device, select_precision

    _check_args(args)
    _figure(1, 1)  # fail now, with the install hint, when matplotlib is missing
    fmt = getattr(args, "format", "png")
    weights = Path(args.weights)
    out = _output_folder(weights, args.out)
    device = resolve_device(args.device)
    model, preprocessing, meta = load_weights(weights, device)
    config = model.config
    dataset, data = load_matching_dataset(weights, config, meta, None, "test", args.data_dir)
    images, labels = data.images[: args.limit], data.labels[: args.limit]
    classes = list(meta.get("classes") or data.classes or [str(k) for k in range(config.num_classes)])
    amp_dtype = select_precision("auto", device)
    served = inference_model(model, amp_dtype)  # the one inference path: batch norm folded once, in amp_dtype
    model = served.model  # its folded copy, whose class maps the figures show
    written: list[Path] = []

    # the map statistic (plain GAP, no flips), over the whole (or --limit) test set
    peaks, logits = map_scores(model, preprocessing, images, batch_size=args.batch_size, amp_dtype=amp_dtype)
    statistics = map_statistics(peaks, logits, labels)
    predictions = logits.argmax(dim=1)
    num_classes = config.num_classes
    scored = _scored_as_evaluate(served, preprocessing, images, labels, args.batch_size, amp_dtype, meta)
    confusion = scored.confusion
    report = {"weights": str(weights), "dataset": dataset, "split": "test", "limit": args.limit,
              "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32", "tta_flip": False,
              "head": config.head, **statistics, "accuracy": scored.accuracy,
              "accuracy_tta_flip": bool(meta.get("tta_flip"))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "maps.json").write_text(json.dumps(report, indent=2) + "\n")
    written.append(out / "maps.json")
    written.append(plot_confusion(confusion, classes, out / f"confusion.{fmt}"))

    # Figure 4 and the test-image overlays: the first --per-class images of every class
    chosen = first_per_class(labels, args.per_class, num_classes)
    chosen_maps = confidence_maps(model, preprocessing(images[chosen].to(device)), amp_dtype).cpu()
    chosen_predictions = predictions[chosen]
    written.append(plot_confidence_maps(images[chosen], chosen_maps, labels[chosen], chosen_predictions, classes,
                                        out / f"confidence_maps.{fmt}"))
    written.append(plot_overlays(images[chosen], chosen_maps, chosen_predictions, classes, out / f"overlays.{fmt}",
                                 labels=labels[chosen]))

    if args.images:
        written.append(_user_overlays(served, preprocessing, args.images, classes, out / f"overlays_images.{fmt}",
                                      amp_dtype, meta, invert=args.invert))

    runs = [Path(r) for r in args.runs] or ([weights] if (weights / "metrics.jsonl").is_file() else [])
    if runs:
        written.append(plot_curves(runs, out / f"curves.{fmt}"))

    _print_summary(report, fmt, written)
    return 0


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


def _print_summary(report: dict, fmt: str, written: list[Path]) -> None:
    print(f"{report['dataset']} test, {report['n']} images ({report['precision']}), {report['weights']}:")
    print(f"  map with the largest activation is the true class:  {report['max_map_true_class']:.2%}  "
          f"(chance {report['chance']:.0%})")
    print(f"  ... and agrees with the GAP prediction:              {report['max_map_agrees_with_gap']:.2%}")
    print(f"  GAP prediction accuracy (no test-time flips):        {report['gap_accuracy']:.2%}")
    print(f"  accuracy as `nin evaluate` counts it (confusion.{fmt}): {report['accuracy']:.2%}")
    for path in written:
        print(f"wrote {path}")
