"""Whether two runs of one command trained alike: their curves compared epoch by epoch, to the last digit.

    python experiments/same_curve.py results/lost/cifar10-paper-run2.json runs/cifar10-paper
    python experiments/same_curve.py runs/a runs/b        # two run folders (their metrics.jsonl)

On a CPU, nin's training is deterministic for a given host kind, thread count and precision, and a resumed run
ends bit-identical to an uninterrupted one: the same command then logs the same losses and errors, whatever
the segments it ran in. This compares, over the epochs both curves have, every value both log (losses, errors,
lr, step; not the timings), NaN and null (a non-finite number in nin's logs) included, and prints which values
were compared, the epochs that agree in all of them, then the first epoch that does not and the largest
differences from there on. An epoch that one curve lacks between the first and the last epoch both have (a
damaged log line, say) is a difference; the epochs past the shorter curve's end are only counted. Exit status:
0 when the curves agree, 1 when they do not, 2 when a file is not a curve or the two share no epoch.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plateau_trend import read_records  # noqa: E402  (this folder's script, on the path set above)

from nin.errors import NinError  # noqa: E402


def _epoch(record: dict) -> int | None:
    epoch = record.get("epoch")
    if isinstance(epoch, float) and epoch.is_integer():
        return int(epoch)
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def _logged(record: dict) -> dict:
    """An epoch's values that training decides: everything but its epoch and the host's speed."""
    return {k: v for k, v in record.items() if k != "epoch" and "time" not in k and "per_s" not in k}


def _same(x, y) -> bool:
    """Equal values: numbers by value (NaN equals NaN, 1 equals 1.0), anything else (a string, null) by type too."""
    if _number(x) and _number(y):
        return x == y or (math.isnan(x) and math.isnan(y))
    return type(x) is type(y) and x == y


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def by_epoch(records: list[dict]) -> tuple[dict[int, dict], list[int]]:
    """(each epoch's values, the last record of an epoch logged more than once; the epochs logged more than once)."""
    epochs = [_epoch(r) for r in records]
    repeated = sorted(e for e, n in Counter(epochs).items() if e is not None and n > 1)
    return {e: _logged(r) for e, r in zip(epochs, records) if e is not None}, repeated


def compare(a: dict[int, dict], b: dict[int, dict]) -> dict:
    """The comparison of two curves given as {epoch: values}: the epochs both have, the ones between the first and
    the last of those that one lacks, the values compared and those one curve alone logs, the first epoch that
    differs (or None) and, per value, the largest difference from there on (inf where one side is not a number or
    not finite and the other is) with the first epoch of such a mismatch."""
    epochs = sorted(set(a) & set(b))
    span = range(epochs[0], epochs[-1] + 1) if epochs else range(0)
    gaps = sorted(e for e in span if (e in a) != (e in b))
    shared = sorted({k for e in epochs for k in a[e].keys() & b[e].keys()})
    one_sided = sorted({k for e in epochs for k in a[e].keys() ^ b[e].keys()})
    differing = [e for e in epochs if any(not _same(a[e][k], b[e][k]) for k in a[e].keys() & b[e].keys())]
    start = min(differing + gaps, default=None)
    largest: dict[str, float] = {}
    mismatch: dict[str, tuple[int, object, object]] = {}
    for e in epochs:
        if start is None or e < start:
            continue
        for k in sorted(a[e].keys() & b[e].keys()):
            x, y = a[e][k], b[e][k]
            if _same(x, y):
                continue
            if _number(x) and _number(y) and math.isfinite(x) and math.isfinite(y):
                largest[k] = max(largest.get(k, 0.0), abs(x - y))
            else:
                largest[k] = math.inf
                mismatch.setdefault(k, (e, x, y))
    return {"epochs": epochs, "gaps": gaps, "shared": shared, "one_sided": one_sided, "start": start,
            "largest": largest, "mismatch": mismatch}


def _span(epochs: list[int]) -> str:
    return f"epochs {epochs[0]}-{epochs[-1]}" if len(epochs) > 1 else f"epoch {epochs[0]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("first", help="a run folder (its metrics.jsonl) or a results/<name>.json record")
    parser.add_argument("second", help="another")
    args = parser.parse_args(argv)
    curves = []
    try:
        for path in (args.first, args.second):
            values, repeated = by_epoch(read_records(path, strict=True))
            curves.append(values)
            if repeated:
                print(f"{path}: {'epoch' if len(repeated) == 1 else 'epochs'} {', '.join(map(str, repeated))} "
                      "logged more than once; the last record is compared")
    except NinError as e:
        print(f"same_curve: {e}", file=sys.stderr)
        return 2
    a, b = curves
    result = compare(a, b)
    epochs = result["epochs"]
    if not epochs:
        print(f"same_curve: no epoch in both ({len(a)} and {len(b)} epochs logged)", file=sys.stderr)
        return 2
    print(f"{_span(epochs)}: {len(epochs)} in both; compared: {', '.join(result['shared'])}")
    if result["one_sided"]:
        print(f"  not compared (logged by one curve only): {', '.join(result['one_sided'])}")
    for name, path, curve in (("first", args.first, a), ("second", args.second, b)):
        if max(curve) > epochs[-1]:
            print(f"  the {name} goes on to epoch {max(curve)} ({path})")
    if result["gaps"]:
        print(f"  epochs in one curve only: {', '.join(map(str, result['gaps']))}")
    start = result["start"]
    if start is None:
        print("the same in every value compared")
        return 0
    before = [e for e in epochs if e < start]
    print((f"the same through epoch {before[-1]}" if before else "different from the first epoch") +
          f"; first difference at epoch {start}")
    for key, difference in result["largest"].items():
        if key in result["mismatch"]:
            epoch, x, y = result["mismatch"][key]
            print(f"  {key:<12} from epoch {start} on: at epoch {epoch} the first has {x!r}, the second {y!r}")
        else:
            print(f"  {key:<12} largest difference from epoch {start} on: {difference:.6g}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
