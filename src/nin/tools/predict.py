"""`nin predict`'s library: image files in, the top classes of each out, as a listing, JSON lines or CSV.

    report = predict_files("fast-cifar10", ["cat.jpg", "photos/", "more/*.png"], top_k=3)
    write_predictions(Path("preds.csv"), report.rows)

Every image goes through the one decoder (`nin.data.images.read_image`) and, with the default backend, the one
inference path (`nin.classifier.Classifier`), a batch at a time, so a folder of any size fits in memory. The
other backends (`nin.deploy.backends`) compute the same probabilities through another engine.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nin.classifier import Classifier
from nin.data.datasets import LIGHT_ON_DARK
from nin.data.folders import list_images
from nin.data.images import read_image
from nin.deploy.backends import EXPORTED_SUFFIX, load_runner
from nin.deploy.export import read_sidecar
from nin.errors import NinError
from nin.files import atomic_write_bytes, claim_output
from nin.models import NiNConfig
from nin.pretrained import load
from nin.transforms import invert_ink, odd_polarity

__all__ = ["PredictReport", "predict_files", "check_output", "write_predictions", "polarity_hint",
           "OUTPUT_SUFFIXES"]

OUTPUT_SUFFIXES = (".csv", ".jsonl")


@dataclass
class PredictReport:
    """What `predict_files` found: one row per image, and what the user should hear about."""

    rows: list[dict]  # {"image": path, "top": [{"class", "index", "probability"}, ...]}
    dataset: str | None  # the data set the weights were trained on
    odd: list[Path] = field(default_factory=list)  # images the other way round from what the weights expect
    problems: list[str] = field(default_factory=list)  # unreadable folders met while listing (and, with
    # skip_bad, images that could not be read), each a line naming the path and what was wrong


def predict_files(weights: str | os.PathLike, items: list[str], *, top_k: int = 5, batch_size: int = 256,
                  backend: str = "torch", device: str | None = None, invert: bool = False,
                  skip_bad: bool = False) -> PredictReport:
    """The ``top_k`` classes of every image that ``items`` name (files, folders searched recursively, globs).

    Args:
        weights: A pretrained tag, a weights file or a run folder.
        backend: "torch" (nin's inference path, as `nin evaluate`) or another of `nin.deploy.backends.BACKENDS`.
        invert: Score dark-ink-on-paper images as MNIST draws them (`nin.transforms.invert_ink`).
        skip_bad: Go on past an image that cannot be read (a damaged or non-image file) and a folder or glob
            that names none, listing each in ``problems``; without it the first one raises `NinError` naming it.
    """
    exported = Path(weights).suffix == EXPORTED_SUFFIX.get(backend)  # a graph `nin export` wrote
    if exported:  # its sidecar describes it
        runner = load_runner(backend, weights)
        meta = read_sidecar(weights)  # checked by load_runner too: a cheap second read of a small file
        config = NiNConfig.from_dict(meta["model"])
    else:
        model, preprocessing, meta = load(weights)
        config = model.config
    paths, problems = list_images(items, skip_empty=skip_bad)
    report = PredictReport([], meta.get("dataset"), problems=problems)
    with tempfile.TemporaryDirectory(prefix="nin-export-") as folder:  # an exported backend's files, removed after
        if backend == "torch":  # nin's own inference path, the one `nin evaluate` scores with
            classifier = Classifier(model, preprocessing, meta, device=device)
            classes, score = classifier.classes, classifier.predict
        else:
            classes = meta.get("classes") or [str(i) for i in range(config.num_classes)]
            if not exported:
                runner = load_runner(backend, weights, export_dir=folder)

            def score(batch: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(runner(batch))
        k = min(top_k, config.num_classes)
        for start in range(0, len(paths), batch_size):  # one batch in memory at a time: folders of any size
            chunk, pixels = _read_chunk(paths[start:start + batch_size], config, report if skip_bad else None)
            if not chunk:
                continue
            batch = torch.stack(pixels)
            report.odd += [path for path, flag in zip(chunk, odd_polarity(batch, report.dataset, invert)) if flag]
            top = score(invert_ink(batch) if invert else batch).topk(k, dim=1)
            report.rows += [{"image": str(path),
                             "top": [{"class": classes[i], "index": int(i), "probability": float(p)}
                                     for p, i in zip(values.tolist(), indices.tolist())]}
                            for path, values, indices in zip(chunk, top.values, top.indices)]
    return report


def _read_chunk(paths: list[Path], config, report: PredictReport | None) -> tuple[list[Path], list[torch.Tensor]]:
    """The images of ``paths`` that read; with a ``report`` (skip_bad) one that does not is noted there and left
    out, else its `NinError` propagates."""
    kept, pixels = [], []
    for path in paths:
        try:
            pixels.append(read_image(path, config.input_size, config.in_channels))
        except NinError as error:
            if report is None:
                raise
            report.problems.append(str(error))
            continue
        kept.append(path)
    return kept, pixels


def check_output(path: Path) -> None:
    """``--output`` must name a new .csv or .jsonl file (`nin.files.claim_output`: not a link, not an existing
    file; `nin predict` has no --force)."""
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise NinError(f"--output {path}: expected a .csv or .jsonl file name")
    if path.exists() and not path.is_symlink():
        raise NinError(f"--output {path}: exists; not overwriting it (choose a new file name)")
    claim_output(path, flag="--output")


def write_predictions(path: Path, rows: list[dict]) -> None:
    """One row per image, atomically: CSV (image, then class and probability of each of the top k) or JSON lines
    (.jsonl, one `predict_files` row each)."""
    check_output(path)
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(row) + "\n" for row in rows)
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        k = len(rows[0]["top"]) if rows else 0
        writer.writerow(["image", *[f"{name}{j + 1}" for j in range(k) for name in ("class", "probability")]])
        for row in rows:
            writer.writerow([row["image"], *[v for item in row["top"]
                                             for v in (item["class"], f"{item['probability']:.6f}")]])
        text = buffer.getvalue()
    atomic_write_bytes(path, text.encode(), flag="--output")


def polarity_hint(report: PredictReport, total: int, inverted: bool, command: str = "nin predict") -> list[str]:
    """The lines to print after the listing: images the other way round from what the weights (and ``--invert``)
    expect, and ``--invert`` given with weights that do not take it (``command``: whose flag, `nin predict`'s or
    `nin visualize`'s)."""
    lines, dataset, odd = [], report.dataset, report.odd
    if odd:
        which = f"{odd[0]} looks" if len(odd) == 1 else f"{len(odd)} of {total} images (first: {odd[0]}) look"
        them = "it" if len(odd) == 1 else "them"
        if inverted:
            lines.append(f"{command}: {which} light on a dark background already, as {dataset} weights expect; "
                         f"--invert made {them} dark on light: score {them} without --invert")
        else:
            lines.append(f"{command}: {which} dark on a light background; {dataset} weights expect light on a "
                         f"dark background: score {them} with --invert")
    if inverted and dataset not in LIGHT_ON_DARK:
        lines.append(f"{command}: --invert is for weights trained on light-on-black images "
                     f"({', '.join(LIGHT_ON_DARK)}); these are {dataset} weights, so the images were scored as "
                     "negatives")
    return lines
