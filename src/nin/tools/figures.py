"""Figures at the size they print at: Figure 4's confidence maps, overlays on images and photos, the confusion
matrix (training curves: `nin.tools.curves`).

    path = plot_confidence_maps(images, maps, labels, predictions, classes, "maps.pdf")

Figures are drawn at most `TEXT_WIDTH_IN` (7 in) wide, with no text under `FONT_PT` (9 pt), through matplotlib's
Agg canvas (no pyplot, no global backend state), and written as PNG (300 dpi), PDF or SVG by the path's suffix;
matplotlib is the optional extra ``network-in-network[viz]``. `nin visualize` (`nin.tools.visualize`) and
`nin reproduce report` draw with these.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.nn import functional as F

from nin.errors import NinError, require_package
from nin.files import atomic_write

__all__ = ["upsample_maps", "plot_confidence_maps", "plot_overlays", "plot_photo_overlays", "figure_format",
           "plot_confusion", "new_figure", "save_figure", "FORMATS"]

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


def new_figure(width_in: float, height_in: float, **kwargs):
    """A matplotlib Figure on an Agg canvas, width_in × height_in inches (the size it is meant to print at)."""
    require_package("matplotlib", "visualization", "viz")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=PNG_DPI, **kwargs)
    FigureCanvasAgg(figure)
    return figure


def figure_format(path: str | os.PathLike) -> str:
    """The format a figure path asks for (its suffix): png, pdf or svg; anything else is refused in one line."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise NinError(f"{path}: figures are written as {', '.join('.' + f for f in FORMATS)}")
    return suffix


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Write ``figure`` to ``path`` atomically (`nin.files.atomic_write`: never through a symbolic link)."""
    path = Path(path)
    fmt = figure_format(path)
    # no bbox_inches="tight": the size stays the print size
    atomic_write(path, lambda temporary: figure.savefig(temporary, format=fmt, dpi=PNG_DPI))
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
    header_in = title_in + (_slanted_names_in(classes) if shared else 0.05)
    row_in = cell + (0.05 if shared else LINE_IN + 0.05)
    rows = max(num_images, 1)
    height = header_in + rows * row_in + 0.1
    figure = new_figure(TEXT_WIDTH_IN, height)
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
    return save_figure(figure, path)


def _slanted_names_in(classes: Sequence[str]) -> float:
    """The height the class names over the first row take, written at 45° (short names, a short header)."""
    longest = max((len(name) for name in classes), default=1)
    return 0.12 + 0.71 * (longest * 0.55 * FONT_PT / 72 + LINE_IN)


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
    figure = new_figure(TEXT_WIDTH_IN, height)
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
    return save_figure(figure, path)


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
    return save_figure(figure, path)


def _bounded(photo):
    """``photo``, or a copy scaled down so that neither side exceeds `MAX_PHOTO_SIDE`."""
    if max(photo.size) <= MAX_PHOTO_SIDE:
        return photo
    photo = photo.copy()
    photo.thumbnail((MAX_PHOTO_SIDE, MAX_PHOTO_SIDE))
    return photo


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
    figure = new_figure(side, side, layout="constrained")
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
    return save_figure(figure, path)
