"""A run's per-epoch log: ``metrics.jsonl`` (the record), ``metrics.csv`` (for spreadsheets), TensorBoard.

    log = MetricsLog(run_dir, keep_epochs=0)     # a resumed run passes the epochs its checkpoint covers
    log.append({"epoch": 1, "train_loss": 1.2, ...})
    records = read_metrics(run_dir)              # what evaluate, visualize and reproduce read back

One JSON object per line, appended after every epoch; a line torn by a kill mid-append is the only line a
reader may skip.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path

from nin.errors import NinError, NinNote
from nin.files import atomic_write_bytes

__all__ = ["MetricsLog", "read_metrics", "json_number"]


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7] as "1-3, 7"."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def json_number(value: float) -> float | None:
    """``value`` as strict JSON allows it: NaN and infinities become null."""
    return value if math.isfinite(value) else None


def read_metrics(run_dir: str | os.PathLike, *, strict: bool = False) -> list[dict]:
    """The per-epoch records of a run's ``metrics.jsonl``.

    Args:
        run_dir: The run folder.
        strict: Refuse a log with an unreadable line anywhere but at the end (where a kill mid-append
            leaves a torn line), instead of skipping it. Resuming a run reads strictly, so that it never
            rewrites a log it could not read whole.

    Raises:
        NinError: No metrics.jsonl, or (strict) a line that is not one epoch's JSON record.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise NinError(f"{run_dir}: no metrics.jsonl (not a run folder, or no epoch finished yet)")
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
        elif strict and number < len(lines):
            raise NinError(f"{path}: line {number} is not one epoch's JSON record; fix or move the file "
                           "(nothing was written)")
    return records


def _columns(records: list[dict]) -> list[str]:
    """Every key of ``records``, each new one placed after the key it follows in its record: epochs that were not
    evaluated lack test_loss / test_error, and the first epoch is often one of them (the fast recipe)."""
    columns: list[str] = []
    for record in records:
        previous = None
        for key in record:
            if key not in columns:
                columns.insert(columns.index(previous) + 1 if previous is not None else 0, key)
            previous = key
    return columns


class MetricsLog:
    """Appends one record per epoch to metrics.jsonl and metrics.csv, and to TensorBoard when installed."""

    def __init__(self, out: str | os.PathLike, keep_epochs: int) -> None:
        """Open the log of the run in ``out``, keeping its first ``keep_epochs`` epochs (a resumed run's)."""
        self.out = Path(out)
        self.records: list[dict] = []
        if (self.out / "metrics.jsonl").exists():
            self.records = [r for r in read_metrics(self.out, strict=True) if r["epoch"] <= keep_epochs]
        missing = sorted(set(range(1, keep_epochs + 1)) - {r["epoch"] for r in self.records})
        if missing:  # not a kill's doing (the log is appended before the checkpoint is written): a damaged last line
            warnings.warn(NinNote(f"{self.out / 'metrics.jsonl'} has no record of epoch"
                                  f"{'s' if len(missing) > 1 else ''} {_ranges(missing)} that the checkpoint covers (a "
                                  "damaged or removed line): the run goes on, and its curve lacks "
                                  f"{'them' if len(missing) > 1 else 'it'}"))
        # rewritten atomically: a kill mid-rewrite must not lose the earlier epochs
        atomic_write_bytes(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records).encode())
        self._write_csv()
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.out / "tensorboard"))
        except ImportError:
            pass

    def _write_csv(self) -> None:
        if not self.records:
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=_columns(self.records), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.records)
        atomic_write_bytes(self.out / "metrics.csv", text.getvalue().encode())

    def append(self, record: dict) -> None:
        """Add one epoch's record (numbers that are not finite are written as null)."""
        record = {k: json_number(v) if isinstance(v, float) else v for k, v in record.items()}
        self.records.append(record)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        self._write_csv()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["epoch"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
