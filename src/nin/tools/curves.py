"""Training curves: loss, error and the learning rate of one or more runs, per epoch (lr per step), on one figure.

    plot_curves([("cifar10-paper", records, train_config)], "curves.png", reference=0.1041)
    steps, rates = lr_per_step(records, train_config)

`nin visualize` draws a run's curves with it, and `nin reproduce report` every recorded run's (the Table 5 heads
together), with the paper's error as a dotted line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from nin.data.datasets import DATASETS
from nin.engine.config import TrainConfig
from nin.engine.metrics import read_metrics
from nin.errors import require_package
from nin.engine.schedule import lr_at, total_steps
from nin.tools import figures
from nin.tools.figures import FONT_PT, LINE_IN, TEXT_WIDTH_IN, figure_format, new_figure

__all__ = ["lr_per_step", "plot_curves", "run_records"]


def run_records(run) -> tuple[str, list[dict], dict | None]:
    """(name, per-epoch records, train_config or None) of a run folder or a (name, records[, train_config]).

    Raises:
        NinError: A run folder without metrics.jsonl.
    """
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
    require_package("matplotlib", "drawing curves", "viz")
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    assert runs, "plot_curves needs at least one run"
    figure_format(path)
    runs = [run_records(run) for run in runs]
    references = ([reference] + [None] * (len(runs) - 1) if isinstance(reference, (int, float))
                  else list(reference or [None] * len(runs)))
    assert len(references) == len(runs), f"{len(references)} references for {len(runs)} runs"
    rows = math.ceil((len(runs) + 3) / 3)  # the legend: the runs, then the line styles, three to a row
    figure = new_figure(TEXT_WIDTH_IN, 2.3 + rows * LINE_IN * 1.3, layout="constrained")
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
    return figures.save_figure(figure, path)


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
