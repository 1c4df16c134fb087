"""How a run's learning-rate phases ended: the trend under the plateau rule's noise, and other patiences replayed.

    python experiments/plateau_trend.py results/lost/cifar10-paper-run1.json   # a recorded run's curve
    python experiments/plateau_trend.py runs/cifar10-paper --window 20 --patience 5 10 20 40   # a run folder

The paper's rule ("train until the accuracy on the training set stops improving, then divide the lr by 10")
reads training accuracy, which dropout makes noisy from epoch to epoch. For each lr phase of a run this prints
the least-squares slope of training and test error over the phase's last ``--window`` epochs (points per
epoch; negative: still improving) and the training error's scatter around that line: a slope that is small next
to the scatter is a trend the rule's "no new best for ``patience`` epochs" cannot see. Then it replays
`nin.engine.schedule.PlateauRule` on the first phase's training accuracy for each ``--patience``: the epoch each
would have divided the lr at, or that it would not have by the phase's end (what came after a drop that did not
happen is not in the log, so later phases are not replayed).
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import groupby
from pathlib import Path

import numpy as np

from nin.engine.metrics import read_metrics
from nin.engine.schedule import PlateauRule
from nin.errors import NinError

ERRORS = (("train_error", "training"), ("test_error", "test"), ("extra_error", "extra test"))


def read_records(path: str, *, strict: bool = False) -> list[dict]:
    """Every per-epoch record of a run folder (its metrics.jsonl, or that file named) or of a record written by
    `nin reproduce record` (its curve). ``strict``: a run folder's log with a damaged line before its last is
    refused (`read_metrics`), not read around."""
    if path.endswith(".json"):
        try:
            curve = json.loads(open(path).read())["curve"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise NinError(f"{path}: not a record of `nin reproduce record` with a curve ({e})") from None
        if not isinstance(curve, list):
            raise NinError(f"{path}: not a record of `nin reproduce record` with a curve (its curve is "
                           f"{type(curve).__name__}, expected a list of epochs)")
        return [r for r in curve if isinstance(r, dict) and "epoch" in r]
    folder = Path(path)
    if folder.name == "metrics.jsonl" and folder.is_file():
        folder = folder.parent
    return read_metrics(folder, strict=strict)


def read_curve(path: str) -> list[dict]:
    """The epochs of `read_records` with a training error and an lr: the ones the plateau rule reads."""
    return [r for r in read_records(path) if r.get("train_error") is not None and r.get("lr")]


def phases(records: list[dict]) -> list[list[dict]]:
    """The epochs of a run, split where the lr changed (an epoch's lr is the one it ended at)."""
    return [list(group) for _, group in groupby(records, key=lambda r: round(r["lr"], 12))]


def trend(records: list[dict], key: str) -> tuple[float, float] | None:
    """(slope in points per epoch, scatter around the line in points) of ``key`` over ``records``, or None."""
    points = [(r["epoch"], 100 * r[key]) for r in records if r.get(key) is not None]
    if len(points) < 3:
        return None
    epochs, values = np.array(points).T
    fit = np.polyfit(epochs, values, 1)
    return float(fit[0]), float(np.std(values - np.polyval(fit, epochs)))


def replay(records: list[dict], patience: int, min_delta: float = 0.0) -> int | None:
    """The epoch at which `PlateauRule(patience)` would first divide the lr on these epochs, or None."""
    rule = PlateauRule(patience, min_delta)
    for record in records:
        if rule.update(1 - record["train_error"]) is not None:
            return record["epoch"]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("run", help="a run folder (its metrics.jsonl) or a results/<name>.json record")
    parser.add_argument("--window", type=int, default=20, help="epochs at the end of each phase to fit (default 20)")
    parser.add_argument("--patience", type=int, nargs="+", default=[5, 10, 20, 40],
                        help="patiences to replay on the first phase (default 5 10 20 40)")
    args = parser.parse_args(argv)
    if args.window < 3 or min(args.patience) < 1:
        parser.error("--window must be at least 3 and every --patience at least 1")
    try:
        records = read_curve(args.run)
    except NinError as e:
        print(f"plateau_trend: {e}", file=sys.stderr)
        return 1
    if not records:
        print(f"plateau_trend: {args.run}: no epoch with a training error and an lr", file=sys.stderr)
        return 1
    print(f"{args.run}: {len(records)} epochs")
    for phase in phases(records):
        tail = phase[-args.window:]
        first, last = phase[0]["epoch"], phase[-1]["epoch"]
        print(f"lr {phase[0]['lr']:.4g}: epochs {first}-{last}; over epochs {tail[0]['epoch']}-{last}:")
        for key, label in ERRORS:
            fitted = trend(tail, key)
            if fitted is not None:
                print(f"  {label:10s} error {100 * tail[-1][key]:6.2f}% at the end, slope {fitted[0]:+.3f} points/epoch, "
                      f"scatter {fitted[1]:.3f} points")
    first = phases(records)[0]
    print(f"PlateauRule replayed on the first phase (lr {first[0]['lr']:.4g}, epochs {first[0]['epoch']}-"
          f"{first[-1]['epoch']}):")
    for patience in args.patience:
        epoch = replay(first, patience)
        print(f"  patience {patience:3d}: " + (f"divides the lr after epoch {epoch}" if epoch is not None
                                               else f"no drop by epoch {first[-1]['epoch']}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
