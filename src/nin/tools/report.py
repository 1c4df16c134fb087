"""RESULTS.md from the records: every row of the paper's Tables 1-5, then ours, and every other recorded run.

    write_report("results", "RESULTS.md")       # and results/curves/<name>.png, the Table 5 heads together

Each row gives the paper's number, the best public port's, and ours: the recorded error, the exact 1,000's, the
error evaluated again from the weights file, wall time, where it ran (each segment of a resumed run) and the
command; or why there is none (needs data, not run yet or needs a GPU with the CPU estimate, in progress).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from nin.data.datasets import DATASETS, dataset_info, resolve_root
from nin.engine.config import recipe
from nin.errors import MissingPackage, NinError
from nin.files import atomic_write_bytes, claim_output
from nin.models import get_model, multiply_adds
from nin.runtime import bf16_units, machine_name
from nin.tools.curves import plot_curves
from nin.tools.experiments import EXPERIMENTS, PAPER_EPOCHS, TABLE5_SMALL_MODELS, RunSpec
from nin.tools.results import exact_1000, runnable, write_json

__all__ = ["write_report", "PAPER_ROWS", "TABLE5_SMALL_ROWS", "OUR_ROWS", "NEEDS_DATA"]


# ---------------------------------------------------------------------------------------------
# RESULTS.md
# ---------------------------------------------------------------------------------------------

NEEDS_DATA = "not run here: needs data (CIFAR-100/SVHN not on this machine)"


@dataclass(frozen=True)
class Row:
    table: str
    label: str
    paper: str  # the paper's test error
    port: str  # the best public port's number, as that port reports it
    results: tuple[str, ...]  # result names, the first recorded one fills the row
    experiment: str  # what to run: `nin reproduce <experiment>`


# Accuracy a -> error 100 - a, as the ports report it.
PAPER_ROWS = (
    Row("Table 1", "CIFAR-10, NIN + dropout", "10.41%",
        "10.36% (PyTorch port, after tuning: 89.64%); 10.4% (Caffe zoo weights: 89.6%)",
        ("cifar10-paper",), "table1"),
    Row("Table 1", "CIFAR-10, the authors' Caffe weights through nin", "10.41%",
        "10.4% (the Caffe zoo's own number: 89.6%)", ("caffe-authors-cifar10",), "import-caffe"),
    Row("Table 1", "CIFAR-10, NIN + dropout + augmentation", "8.81%",
        "7.43% (a ported model zoo: 92.57%, no BN, long training); 8.37% (Keras, BN + augmentation: 91.63%)",
        ("cifar10-paper-aug",), "table1-aug"),
    Row("Table 2", "CIFAR-100, NIN + dropout", "35.68%", "28.39% (a ported model zoo: 71.61%)",
        ("cifar100-paper",), "table2"),
    Row("Table 3", "SVHN, NIN + dropout", "2.35%", "3.76% (a ported model zoo: 96.24%)", ("svhn-paper",), "table3"),
    Row("Table 4", "MNIST, NIN + dropout", "0.47%", "–", ("mnist-paper",), "table4"),
    Row("Table 5", "CIFAR-10, mlpconv + FC", "11.59%", "–", ("table5-nin_cifar10_fc",), "table5"),
    Row("Table 5", "CIFAR-10, mlpconv + FC + dropout", "10.88%", "–", ("table5-nin_cifar10_fc_dropout",), "table5"),
    Row("Table 5", "CIFAR-10, mlpconv + GAP", "10.41%", "–", ("table5-nin_cifar10", "cifar10-paper"), "table5"),
    Row("Table 5", "CIFAR-10, conventional CNN + FC", "17.56%", "–", ("table5-cnn_cifar10_fc",), "table5"),
    Row("Table 5", "CIFAR-10, conventional CNN + FC + dropout", "15.99%", "–",
        ("table5-cnn_cifar10_fc_dropout",), "table5"),
    Row("Table 5", "CIFAR-10, conventional CNN + GAP", "16.46%", "–", ("table5-cnn_cifar10_gap",), "table5"),
)

TABLE5_SMALL_ROWS = tuple(
    Row("Table 5, reduced", label, paper, "–", (f"table5-small-{m}",), "table5-small")
    for m, label, paper in zip(TABLE5_SMALL_MODELS, ("mlpconv + FC", "mlpconv + FC + dropout", "mlpconv + GAP"),
                               ("11.59%", "10.88%", "10.41%")))

OUR_ROWS = tuple(Row("ours", f"{d.label}, fast recipe", "–", "–", (f"fast-{d.name}",), f"fast-{d.name}")
                 for d in DATASETS.values())


def _cpu_reference(records: list[dict]) -> dict | None:
    """A full CPU run recorded on this machine: its throughput scales to other models by multiply-adds.

    "This machine" is the CPU's model name and its bf16 units: one name ("AMD EPYC") covers hosts with AVX-512 BF16
    and hosts with AVX2 alone, which train nin's models about 3-5x apart. A run with no segment on these units is
    never the reference (one resumed across kinds is, by its segments on these units); one that recorded units comes
    before one recorded before units were."""
    here, units = machine_name("cpu"), bf16_units()
    cpu = [r for r in records if str(r.get("device", "")).startswith("cpu") and r.get("machine") == here
           and not r.get("train_subset") and _reference_rate(r, units) is not None]
    return max(cpu, key=lambda r: (_record_units(r) is not None, r["epochs"])) if cpu else None


def _record_units(record: dict) -> set[str] | None:
    """The bf16 units of the hosts a run's segments ran on; None where no segment recorded them."""
    units = {(s.get("host") or {}).get("bf16") for s in record.get("segments", [])} - {None}
    return units or None


def _reference_segments(reference: dict, units: str | None) -> list[dict]:
    """The reference run's segments on hosts with ``units`` (all of them where none recorded its units)."""
    segments = reference.get("segments", [])
    if units is None or _record_units(reference) is None:
        return segments
    return [s for s in segments if (s.get("host") or {}).get("bf16") == units]


def _reference_rate(reference: dict, units: str | None = None) -> float | None:
    """The reference run's images/s on hosts with ``units``: its fastest segment's there, where it was resumed (a
    segment that shared the host, or was paused, is slower than this CPU is), else the run's own (which is not this
    kind's where the run was resumed across kinds); None where no finished epoch measured it on this kind."""
    rates = [s["images_per_s"] for s in _reference_segments(reference, units) if s.get("images_per_s")]
    if units is None or _record_units(reference) in (None, {units}):  # the whole run ran on this kind
        rates.append(reference.get("images_per_s"))
    rates = [rate for rate in rates if rate]
    return max(rates) if rates else None


def _estimates_note(reference: dict) -> str:
    """The sentence under the tables that says what the CPU estimates scale from."""
    units = bf16_units()
    segments, kinds = len(_reference_segments(reference, units)), _record_units(reference) or set()
    on = " on this kind of host" if len(kinds) > 1 else ""
    over = f"the fastest of its {segments} segments{on}" if segments > 1 else f"its segment{on}" if on else \
        "over the whole run"
    return (f"CPU estimates scale `{reference['name']}`'s measured training throughput "
            f"({_reference_rate(reference, units):.0f} images/s, {reference['model']}, {over}) by multiply-adds per "
            f"image; the paper recipe's plateau rule can end a run before its {PAPER_EPOCHS}-epoch cap.")


def _estimate_hours(spec: RunSpec, reference: dict | None) -> float | None:
    """Hours for ``spec`` on this CPU, from a recorded CPU run's images/s scaled by multiply-adds per image."""
    if reference is None:
        return None
    cfg = recipe(spec.recipe, spec.dataset)
    model = spec.model or cfg.model
    rate = (_reference_rate(reference, bf16_units()) * multiply_adds(get_model(reference["model"]))
            / multiply_adds(get_model(model)))
    epochs = spec.epochs or (PAPER_EPOCHS if spec.recipe == "paper" else cfg.epochs)
    return epochs * (spec.train_subset or dataset_info(spec.dataset).train_images) / rate / 3600


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"


def _found(name: str) -> tuple[str, RunSpec] | tuple[None, None]:
    """The experiment and RunSpec whose run folder / result is ``name``; (None, None) for a run recorded by hand
    under another name."""
    return next(((experiment, spec) for experiment, (_, specs) in EXPERIMENTS.items() for spec in specs
                 if spec.name == name), (None, None))


def _spec(name: str) -> RunSpec | None:
    return _found(name)[1]


CPU_HOURS = 24  # a paper-recipe run estimated longer than this on this CPU is a GPU's job


def _not_run(row: Row, data_root: Path, reference: dict | None) -> str:
    spec = _spec(row.results[0])
    if spec is None:  # weights made elsewhere (imported), not a run of ours
        return f"not recorded here: see `nin {row.experiment} --help`"
    folder = dataset_info(spec.dataset).folder
    if not folder or not (data_root / folder).is_dir():
        return NEEDS_DATA
    hours = _estimate_hours(spec, reference)
    experiment, _ = _found(spec.name)
    command = f"nin reproduce {experiment}" + (f" --only {spec.name}" if len(EXPERIMENTS[experiment][1]) > 1 else "")
    if spec.recipe == "paper":
        if hours is not None and hours <= CPU_HOURS:  # a few sessions of background training on this CPU
            return (f"not run yet: `{command}` (the paper recipe's {PAPER_EPOCHS} epochs ≈ {hours:.0f} h on this "
                    f"CPU)")
        estimate = f" ≈ {hours:.0f} h on this CPU" if hours is not None else ""
        return f"not run here: needs a GPU (the paper recipe's {PAPER_EPOCHS} epochs{estimate})"
    estimate = f" (≈ {hours:.1f} h on this CPU)" if hours is not None else ""
    return f"not run yet: `{command}`{estimate}"


def plot_curve(record: dict, path: Path, reference: float | None = None) -> Path | None:
    """A recorded run's curves (`nin.visualize.plot_curves`); None when matplotlib is missing."""
    try:
        return plot_curves([(record["name"], record["curve"], record.get("train_config"))], path, reference=reference)
    except MissingPackage:  # matplotlib is not installed
        return None


def plot_table5(records: dict[str, dict], rows: tuple, path: Path) -> Path | None:
    """The Table 5 heads' curves on one plot, each with the paper's error as a dotted line in its colour; None
    when fewer than two heads have run or matplotlib is missing."""
    found = [(row, records[row.results[0]]) for row in rows
             if row.results[0] in records and records[row.results[0]]["curve"]]
    if len(found) < 2:
        return None
    runs = [(row.label.split(", ", 1)[-1], record["curve"], record.get("train_config")) for row, record in found]
    papers = [float(row.paper.rstrip("%")) / 100 if row.paper.endswith("%") else None for row, _ in found]
    try:
        return plot_curves(runs, path, reference=papers)
    except MissingPackage:
        return None


def _ours(record: dict) -> str:
    if record.get("kind") == "imported":
        return f"**{record['final_error']:.2%}** (trained by the paper's authors, imported; {record['dataset_label']})"
    notes = [f"{record['epochs']} epochs"]
    spec = _spec(record["name"])
    drops = record.get("lr_drops_after_epochs", [])
    if drops:
        notes.append(f"lr / 10 after epoch{'s' * (len(drops) > 1)} {' and '.join(map(str, drops))}")
    if record.get("in_progress"):
        plateau = spec is not None and spec.recipe == "paper" and not spec.fixed_schedule  # may end before its cap
        cap = f"at most {record['epochs_planned']}" if plateau else str(record["epochs_planned"])
        scored = record.get("final_error_epoch", record["epochs"])
        at = "so far" if scored == record["epochs"] else f"at epoch {scored}, its last evaluation"
        notes = [f"in progress: epoch {record['epochs']} of {cap}, {record['final_error']:.2%} {at}", *notes[1:]]
    elif spec is not None and spec.recipe == "paper" and record["epochs"] < PAPER_EPOCHS and not drops:
        notes = [f"only {record['epochs']} of the paper recipe's up to {PAPER_EPOCHS} epochs: a curve, not a result"]
    if record.get("train_subset"):
        notes.append(f"first {record['train_subset']} training images")
    if record.get("eval_subset"):
        notes.append(f"first {record['eval_subset']} test images")
    return f"**{record['final_error']:.2%}** ({', '.join(notes)}; {record['dataset_label']})"


def _command(record: dict) -> str:
    """How to repeat the run, then the command as it ran (a run folder given by absolute path becomes runs/<name>):
    `nin reproduce EXPERIMENT` for an experiment's run, which pins what the recipes have changed since
    (tests/test_reproduce.py::test_reproduce_repeats_each_recorded_run)."""
    ran = runnable(record.get("command") or "")
    experiment = _found(record["name"])[0]
    return f"`nin reproduce {experiment}`; ran as `{ran}`" if experiment else f"`{ran}`"


def _row_command(row: Row) -> str:
    """The command that fills a row not recorded yet: `nin reproduce EXP`, or for imported weights their command."""
    return f"nin reproduce {row.experiment}" if row.experiment in EXPERIMENTS else f"nin {row.experiment} --help"


def _units(host: dict) -> str:
    """", AMX", ", AVX-512 BF16" or ", no bf16 units (fp32)": what a host computed in; "" when not recorded."""
    units = host.get("bf16")
    return "" if units is None else ", no bf16 units (fp32)" if units == "none" else f", {units}"


def _machines(record: dict) -> str:
    """Where a run ran: its machine, or each segment's (host and epochs) when it was resumed."""
    parts = []
    for segment in record.get("segments", []):
        host = segment.get("host") or {}
        machine = host.get("machine") or "a host before hosts were recorded"
        units = _units(host)
        first, last = segment.get("first_epoch"), segment.get("last_epoch")
        span = (f"epochs {first}–{last}" if first is not None and last != first else
                f"epoch {first}" if first is not None else "part of an epoch")
        rate = f", {segment['images_per_s']:.0f} img/s" if segment.get("images_per_s") else ""
        parts.append(f"{span}: {machine}{units}{rate}")
    if len(parts) > 1:
        return f"{len(parts)} segments: " + "; ".join(parts)
    host = (record.get("segments") or [{}])[0].get("host") or {}
    return f"{record['machine']}, {record['cores']} cores{_units(host)}"


def _wall(record: dict) -> str:
    return "–" if record.get("kind") == "imported" else _duration(record["wall_time_s"])


def _table(rows: tuple[Row, ...], records: dict[str, dict], data_root: Path, reference: dict | None,
           curves: dict[str, str]) -> list[str]:
    lines = ["| table | experiment | paper | best public port | ours | exact 1,000 | `nin evaluate` again | wall time "
             "| machine | command |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        found = [records[n] for n in row.results if n in records]  # a finished run before one still training
        record = next((r for r in found if not r.get("in_progress")), found[0] if found else None)
        if record is None:
            lines.append(f"| {row.table} | {row.label} | {row.paper} | {row.port} | "
                         f"{_not_run(row, data_root, reference)} | | | | | `{_row_command(row)}` |")
            continue
        name = record["name"]
        curve = f" [curve]({curves[name]})" if name in curves and record["curve"] else ""
        apart = round(abs(record["evaluated_error"] - record["final_error"]) * record["evaluated_n"])
        same = "equal" if apart == 0 else f"{apart} image{'s' * (apart > 1)} apart from the run's log"
        again = "not yet: still training" if record.get("in_progress") else f"{record['evaluated_error']:.2%} ({same})"
        exact = f"{record['exact_1000_error']:.1%}" if "exact_1000_error" in record else "–"
        for other in (r for r in found if r is not record):  # still training: shown beside the finished run
            link = f" [curve]({curves[other['name']]})" if other["name"] in curves and other["curve"] else ""
            curve += f"; still training beside it, `{other['name']}`: {_ours(other)}{link}"
        lines.append(f"| {row.table} | {row.label} | {row.paper} | {row.port} | {_ours(record)}{curve} | {exact} | "
                     f"{again} | {_wall(record)} | {_machines(record)} | {_command(record)} |")
    return lines


def _table5_small_summary(records: dict[str, dict]) -> list[str]:
    """One sentence on what the reduced Table 5 runs show, from their records (empty until all three ran)."""
    found = [(row.label, records.get(row.results[0])) for row in TABLE5_SMALL_ROWS]
    if any(record is None for _, record in found):
        return []
    parts = [f"{label} {record['curve'][-1]['train_error']:.1%} / {record['final_error']:.2%}" for label, record in found]
    ranked = sorted(found, key=lambda item: item[1]["final_error"])
    gap_first = ranked[0][0] == "mlpconv + GAP"
    verdict = ("GAP has the lowest test error, the paper's direction" if gap_first else
               f"{ranked[0][0]} has the lowest test error: at this scale the paper's direction (GAP lowest) does "
               "not show")
    return ["", f"Train / test error at the last epoch: {'; '.join(parts)}. {verdict}."]


def _intro(results_dir: Path) -> list[str]:
    return [
        "# Results",
        "",
        "Test error (%) of every experiment in the paper's Tables 1–5, the best public port's number "
        "(accuracy a quoted as error 100 − a), and ours. Generated by `nin reproduce report` from "
        f"`{results_dir.as_posix()}/*.json`; each json holds the full per-epoch curve, the git revision and the "
        "resolved training config, and `weights/<name>.safetensors` holds the weights. "
        "\"`nin evaluate` again\" is the error of those weights evaluated afresh from the weights file on the "
        "same test images (`record_run`); it must equal the run's own final error on the CPU that recorded it. "
        "nin's inference path runs in bf16 where the CPU has it, and bf16 kernels round differently on other CPUs "
        "(AMX, AVX-512 BF16): there a count may move by up to 10 images in 10,000, 1 in 1,000 "
        "(`nin.inference.accuracy_tolerance`). A run still training shows its progress (\"in progress\"), "
        "recorded with `nin reproduce record RUN --name NAME --results-dir results --weights-dir weights`; a run "
        "resumed shows where each of its segments ran.",
        "",
        "Wall time is training plus the per-epoch evaluations (metrics.jsonl), without data loading. "
        "\"exact 1,000\": for CIFAR-10 models, the error on the first 1,000 official test images with their "
        "exact pixels (the CIFAR-10 copy here went through JPEG q75, which lowers every model's score on its "
        "10,000; the exact 1,000 are the images the paper's numbers compare with, ±1 point of sampling noise).",
        "",
        *_lost(results_dir),
    ]


def _lost(results_dir: Path) -> list[str]:
    """A paragraph naming the records in RESULTS_DIR/lost/: runs whose folders were lost before they ended."""
    lost = []
    for path in sorted((results_dir / "lost").glob("*.json")):
        try:
            record = json.loads(path.read_text())
            lost.append(f"`{path.stem}` (recorded at epoch {record['epochs']}: {record['final_error']:.2%})")
        except (OSError, ValueError, KeyError, TypeError):
            lost.append(f"`{path.stem}`")
    if not lost:
        return []
    return [f"Runs whose folders (checkpoint and all) were lost with their machines before the runs ended are not "
            f"in the tables; their records and curves stay in `{results_dir.as_posix()}/lost/` (its README.md says "
            f"what happened): {', '.join(lost)}.", ""]


def _other_runs(records: dict[str, dict]) -> list[str]:
    """A table of the recorded runs that no row of the paper's tables or ours names."""
    lines: list[str] = []
    known = {n for row in PAPER_ROWS + TABLE5_SMALL_ROWS + OUR_ROWS for n in row.results}
    others = [records[n] for n in records if n not in known]
    if others:
        lines += ["", "## Other recorded runs", "",
                  "| name | ours | `nin evaluate` again | wall time | machine | command |",
                  "|---|---|---|---|---|---|"]
        for record in others:
            lines.append(f"| {record['name']} | {_ours(record)} | {record['evaluated_error']:.2%} | "
                         f"{_wall(record)} | {record['machine']}, {record['cores']} cores | "
                         f"{_command(record)} |")
    return lines


def _load_records(results_dir: Path, data_dir: str | None) -> dict[str, dict]:
    """Every results json by name; a CIFAR-10 record without its exact-1,000 error gets it (and keeps it)."""
    records = {}
    for path in sorted(results_dir.glob("*.json")):
        record = json.loads(path.read_text())
        weights = Path(record.get("weights", ""))
        if "exact_1000_error" not in record and weights.is_file():
            extra = exact_1000(weights, record["dataset"], data_dir)
            if extra:
                record.update(extra)
                write_json(path, record)
        records[record["name"]] = record
    return records


def _plot_curves(records: dict[str, dict], results_dir: Path, output: Path) -> dict[str, str]:
    """Every record's curve and the two Table 5 overlays under ``results_dir/curves``: {name: path relative to
    ``output``'s folder}, without the ones matplotlib (when missing) could not draw."""
    plotted = {}
    for name, record in records.items():
        paper = next((float(row.paper.rstrip("%")) / 100 for row in PAPER_ROWS + TABLE5_SMALL_ROWS
                      if name in row.results and row.paper.endswith("%")), None)
        png = plot_curve(record, results_dir / "curves" / f"{name}.png", paper) if record["curve"] else None
        if png is not None:
            plotted[name] = Path(os.path.relpath(png, output.parent)).as_posix()
    for key, rows in (("table5", PAPER_ROWS), ("table5-small", TABLE5_SMALL_ROWS)):
        png = plot_table5(records, tuple(r for r in rows if r.experiment == key), results_dir / "curves" / f"{key}.png")
        if png is not None:
            plotted[key] = Path(os.path.relpath(png, output.parent)).as_posix()
    return plotted


def _is_report(path: Path) -> bool:
    """True when ``path`` is a RESULTS.md that `write_report` wrote (its first lines are `_intro`'s)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(400)
    except OSError:
        return False
    return head.startswith("# Results\n") and "Generated by `nin reproduce report`" in head


def write_report(results_dir: str | os.PathLike = "results", output: str | os.PathLike = "RESULTS.md", *,
                 data_dir: str | None = None, curves: bool = True, force: bool = False) -> Path:
    """Write RESULTS.md from ``results_dir/*.json``: every row of the paper's Tables 1-5, then ours.

    Curves go to ``results_dir/curves/<name>.png`` (skipped when matplotlib is missing). An existing ``output``
    is replaced when it is a report this function wrote, other files only with ``force``.
    """
    results_dir, output = Path(results_dir), Path(output)
    if not results_dir.is_dir():
        raise NinError(f"--results-dir {results_dir}: no such folder (the results/*.json that `nin reproduce record` "
                       "writes)")
    claim_output(output, flag="--output", force=force, ours=_is_report)
    records = _load_records(results_dir, data_dir)
    reference = _cpu_reference(list(records.values()))
    plotted = _plot_curves(records, results_dir, output) if curves else {}
    data_root = resolve_root(data_dir)

    lines = [
        *_intro(results_dir),
        "## The paper's tables",
        "",
        *_table(PAPER_ROWS, records, data_root, reference, plotted),
        "",
        "Table 5 runs share one fixed schedule (the authors' CIFAR-10 run: lr / 10 after 200 and 230 of 260 "
        "epochs), so the six heads see the same training. Until `table5-nin_cifar10` has finished, the mlpconv + "
        "GAP row shows Table 1's run (the paper recipe's plateau rule, not that schedule), as the paper's 10.41% "
        "there is its Table 1 model. The paper does not publish its conventional CNN "
        "beyond \"3 conv + 1 locally connected layer\"; ours are three plain convolutions in NiN's layout "
        "(`cnn_cifar10_*`).",
        "",
        "## Table 5 at reduced scale",
        "",
        "The direction of the paper's section 4.6 effect at a size this CPU trains in minutes "
        "(`nin reproduce table5-small`): the three mlpconv heads on the same 10,000 CIFAR-10 training images "
        "for the same 6 epochs and one lr schedule (fast recipe with peak lr 0.05, batch norm, no augmentation), scored "
        "on the first "
        "5,000 test images. The paper's column is its full-scale number, for the direction only.",
        "",
        *_table(TABLE5_SMALL_ROWS, records, data_root, reference, plotted),
        *_table5_small_summary(records),
        *(["", f"The three heads on one plot: [curves]({plotted['table5-small']})."] if "table5-small" in plotted else []),
        "",
        "## Ours: the fast recipe (batch norm, one-cycle lr, label smoothing, flips/translation)",
        "",
        *_table(OUR_ROWS, records, data_root, reference, plotted),
    ]
    if reference is not None:
        lines += ["", _estimates_note(reference)]
    lines += _other_runs(records)
    lines += ["", "Reproduce a row: `nin reproduce <experiment>` (see `docs/reproduce.md`); on a GPU, "
                  "`experiments/gpu_reproduce.sh` runs the paper recipes in pieces of at most 10 minutes.", ""]
    atomic_write_bytes(output, "\n".join(lines).encode(), flag="--output")
    return output
