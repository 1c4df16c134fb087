"""Whether two runs of one command trained alike: their curves compared epoch by epoch, to the last digit.

    python experiments/same_curve.py results/lost/cifar10-paper-run2.json runs/cifar10-paper
    python experiments/same_curve.py runs/a runs/b        # two run folders (their metrics.jsonl)

On a CPU, nin's training is deterministic for a given host kind, thread count and precision, and a resumed run
ends bit-identical to an uninterrupted one: the same command then logs the same losses and errors, whatever
the segments it ran in. This compares every logged number the two curves share (losses, errors, lr, step; not
the timings) over the epochs both have, and prints the epochs that agree in every one, then the first epoch that
does not and the largest differences from there on. Exit status: 0 when they agree everywhere, 1 when they do
not, 2 for a file that is not a curve.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plateau_trend import read_curve  # noqa: E402  (this folder's script, on the path set above)

from nin.errors import NinError  # noqa: E402


def _logged(record: dict) -> dict:
    """An epoch's numbers that training decides, not the host's speed."""
    return {k: v for k, v in record.items() if "time" not in k and "per_s" not in k and isinstance(v, (int, float))}


def compare(first: list[dict], second: list[dict]) -> tuple[list[int], int | None, dict[str, float]]:
    """(epochs both curves have, the first of them where a shared number differs or None, the largest absolute
    difference of each number from that epoch on)."""
    a, b = ({r["epoch"]: _logged(r) for r in curve if "epoch" in r} for curve in (first, second))
    epochs = sorted(set(a) & set(b))
    differing = [e for e in epochs if any(a[e][k] != b[e][k] for k in a[e].keys() & b[e].keys())]
    if not differing:
        return epochs, None, {}
    start = differing[0]
    largest: dict[str, float] = {}
    for e in epochs:
        if e >= start:
            for k in sorted(a[e].keys() & b[e].keys()):
                largest[k] = max(largest.get(k, 0.0), abs(a[e][k] - b[e][k]))
    return epochs, start, {k: v for k, v in largest.items() if v}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("first", help="a run folder (its metrics.jsonl) or a results/<name>.json record")
    parser.add_argument("second", help="another")
    args = parser.parse_args(argv)
    try:
        curves = [read_curve(path) for path in (args.first, args.second)]
    except NinError as e:
        print(f"same_curve: {e}", file=sys.stderr)
        return 2
    epochs, start, largest = compare(*curves)
    if not epochs:
        print(f"same_curve: no epoch in both ({len(curves[0])} and {len(curves[1])} epochs logged)", file=sys.stderr)
        return 2
    span = f"epochs {epochs[0]}-{epochs[-1]}" if len(epochs) > 1 else f"epoch {epochs[0]}"
    if start is None:
        print(f"{span}, in both: the same in every logged number")
        return 0
    agreed = f"the same through epoch {epochs[epochs.index(start) - 1]}" if start != epochs[0] else "different from the first"
    print(f"{span}, in both: {agreed}; first difference at epoch {start}")
    for key, difference in largest.items():
        print(f"  {key:<12} largest difference from epoch {start} on: {difference:.6g}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
