"""Recording runs: ``<name>.json`` for a finished run (its weights copied and evaluated again), or for one still
training (its progress), with the run's segments and learning-rate drops.

    record_run("runs/fast-mnist", "fast-mnist", "runs/results", "runs/weights")
    reevaluate("results")                              # every recorded weights file again, after a change of path

Recording (`record_run`) writes the command, git revision, machine, wall time, per-epoch curve and final
error, copies the weights and evaluates them again, from the weights file alone, on the same test images:
``evaluated_error`` must equal the run's own final error. It replaces an existing record only when it is the
record of the same name (and its weights file only when that record names it), or when told to (``force``).
RESULTS.md is written from the records by `nin.tools.report`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import time
from pathlib import Path

from nin.data.datasets import (
    DATASET_NAMES,
    LOSSLESS_CIFAR10_NAME,
    dataset_info,
    resolve_root,
)
from nin.data.readers import file_digest
from nin.engine.metrics import read_metrics
from nin.errors import NinError
from nin.evaluate import evaluate_weights
from nin.files import atomic_write, atomic_write_bytes, claim_output, read_json_object
from nin.runtime import machine_name

__all__ = ["record_run", "claim_record", "progress_record", "segments", "lr_drops", "exact_1000", "reevaluate",
           "JPEG_COPY_LABEL", "dataset_label", "machine_name", "runnable", "write_json"]


# ---------------------------------------------------------------------------------------------
# Recording one finished run
# ---------------------------------------------------------------------------------------------

JPEG_COPY_LABEL = "CIFAR-10 (JPEG q75 copy)"  # shared/data/README.md: the pixels went through JPEG quality 75


def dataset_label(dataset: str, data_dir: str | os.PathLike | None = None) -> str:
    """The data set's name, marking the JPEG-compressed CIFAR-10 copy (its readme.txt says so)."""
    label = dataset_info(dataset).label if dataset in DATASET_NAMES else dataset
    if dataset == "cifar10":
        readme = resolve_root(data_dir) / "cifar-10-batches-bin" / "readme.txt"
        if readme.is_file() and "JPEG" in readme.read_text(errors="replace"):
            return JPEG_COPY_LABEL
    return label



def _previous_record(path: Path, name: str) -> dict | None:
    """The record of ``name`` that ``path`` already holds (one `record_run` wrote), else None."""
    record = read_json_object(path)
    return record if record is not None and record.get("name") == name and "final_error" in record else None


def claim_record(name: str, results_dir: str | os.PathLike, weights_dir: str | os.PathLike, *,
                 force: bool = False) -> tuple[Path, Path]:
    """``results_dir/<name>.json`` and ``weights_dir/<name>.safetensors``, checked before any work
    (`nin.files.claim_output`): an existing record is replaced only when it is the record of ``name``, an existing
    weights file only when that record names it, anything else only with ``force``."""
    path, weights = Path(results_dir) / f"{name}.json", Path(weights_dir) / f"{name}.safetensors"
    previous = _previous_record(path, name)
    claim_output(path, flag="--results-dir", force=force, ours=lambda _: previous is not None)
    claim_output(weights, flag="--weights-dir", force=force,
                 ours=lambda existing: previous is not None and previous.get("weights") == existing.as_posix())
    return path, weights


def record_run(run_dir: str | os.PathLike, name: str, results_dir: str | os.PathLike,
               weights_dir: str | os.PathLike, *, data_dir: str | None = None, data_label: str | None = None,
               device: str | None = None, force: bool = False, log=print) -> dict:
    """Write ``results_dir/<name>.json`` for a finished run and copy its weights to ``weights_dir/<name>.safetensors``;
    for a run still training, its progress (`progress_record`) without weights.

    The weights are evaluated again on the run's own evaluation images (its split and ``eval_subset``,
    from ``config.json``), and the result is stored as ``evaluated_error`` beside ``final_error``.

    Args:
        run_dir: A run folder holding config.json, metrics.jsonl and model.safetensors.
        name: The result's name (file stem of the json and the weights).
        results_dir: Where the json goes (the repository's ``results`` only when asked for).
        weights_dir: Where the weights copy goes (the repository's ``weights`` only when asked for).
        data_dir: Data root for the re-evaluation; default: the run's own, else $NIN_DATA.
        data_label: The data set's label in RESULTS.md; default: detected (the CIFAR-10 JPEG copy is marked).
        device: Where to evaluate; default: cuda when available.
        force: Replace existing files that are not an earlier record of ``name`` (see `claim_record`).

    Returns:
        The record written to the json file.
    """
    run_dir = Path(run_dir)
    for needed in ("config.json", "metrics.jsonl"):
        if not (run_dir / needed).is_file():
            raise NinError(f"{run_dir}: no {needed}; is it a run folder?")
    path, weights = claim_record(name, results_dir, weights_dir, force=force)
    config = json.loads((run_dir / "config.json").read_text())
    cfg = config["train_config"]
    epochs = read_metrics(run_dir)
    if not epochs:
        raise NinError(f"{run_dir}/metrics.jsonl: no finished epoch")
    split = cfg["eval_split"]
    data_dir = data_dir or cfg.get("data_dir")
    if not (run_dir / "model.safetensors").is_file():  # still training: its progress, from its own log
        record = progress_record(name, config, epochs, data_label or dataset_label(cfg["dataset"], data_dir))
        write_json(path, record)
        log(f"nin reproduce: {name} is still training (epoch {record['epochs']}); wrote its progress to {path}")
        return record

    tick = time.perf_counter()
    result, _, _ = evaluate_weights(run_dir / "model.safetensors", dataset=cfg["dataset"], split=split,
                                    subset=cfg.get("eval_subset", 0), data_dir=data_dir,
                                    batch_size=cfg.get("eval_batch_size", 500),
                                    precision=cfg.get("precision", "auto"), device=device)
    log(f"nin reproduce: {name}: recorded {split} error {epochs[-1][f'{split}_error']:.4%}, evaluated again "
        f"{result.error:.4%} on {result.n} images ({time.perf_counter() - tick:.0f} s)")
    atomic_write(weights, lambda temporary: shutil.copyfile(run_dir / "model.safetensors", temporary),
                 flag="--weights-dir")
    record = _record(name, config, epochs, result, weights, data_label or dataset_label(cfg["dataset"], data_dir))
    record.update(exact_1000(weights, cfg["dataset"], data_dir, device))
    write_json(path, record)
    log(f"nin reproduce: wrote {path} and {weights}")
    return record


def write_json(path: Path, record: dict) -> None:
    """Write a record atomically (`nin.files.atomic_write_bytes`)."""
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode(), flag="--results-dir")


def _record(name: str, config: dict, epochs: list[dict], result, weights: Path, label: str) -> dict:
    """The results json of a finished run: provenance, the curve, the error recorded and evaluated again."""
    return {**_run_fields(name, config, epochs, label), "in_progress": False, "evaluated_error": result.error,
            "evaluated_n": result.n, "weights": weights.as_posix(), "weights_sha256": file_digest(weights, "sha256")}


def progress_record(name: str, config: dict, epochs: list[dict], label: str) -> dict:
    """The results json of a run still training: what its log says so far (no weights, nothing evaluated again).
    Its error is its last scored epoch's (``eval_every`` > 1 leaves epochs in between unscored).

    Raises:
        NinError: No epoch scored yet.
    """
    cfg = config["train_config"]
    if not _scored(epochs, cfg["eval_split"]):
        raise NinError(f"{name}: no epoch scored on {cfg['eval_split']} yet (the run evaluates every "
                       f"{cfg.get('eval_every', 1)} epochs; {epochs[-1]['epoch']} finished): record it after the "
                       "next evaluation")
    fields = _run_fields(name, config, epochs, label)
    last = _scored(epochs, cfg["eval_split"])[-1]
    extra = {"exact_1000_error": last["extra_error"]} if "extra_error" in last else {}
    return {**fields, "in_progress": True, "evaluated_error": fields["final_error"], "evaluated_n": 0, **extra}


def segments(config: dict, epochs: list[dict]) -> list[dict]:
    """A run's stretches between (re)starts: where each ran (host, when it started), the epochs it finished,
    its training time and median images/s. A stretch that ended before finishing an epoch has no epochs."""
    steps_per_epoch = epochs[0]["step"] // epochs[0]["epoch"] if epochs else 1
    starts = [{"step": 0, "host": config.get("host"), "started": config.get("started"),
               "command": runnable(config.get("command") or "")}]
    starts += [{"step": r.get("step") or 0, "host": r.get("host"), "started": r.get("started"),
                "command": runnable(r.get("command") or "")} for r in config.get("resumes", [])]
    found = []
    for i, start in enumerate(starts):
        end = starts[i + 1]["step"] if i + 1 < len(starts) else float("inf")
        # an epoch belongs to the stretch in which it ended
        mine = [e for e in epochs if start["step"] < e["step"] <= end]
        found.append({**start, "first_epoch": mine[0]["epoch"] if mine else None,
                      "last_epoch": mine[-1]["epoch"] if mine else None,
                      "train_time_s": sum(e["train_time_s"] for e in mine),
                      "images_per_s": statistics.median(e["images_per_s"] for e in mine) if mine else None,
                      "to_step": min(end, epochs[-1]["step"]) if epochs else 0,
                      "steps_per_epoch": steps_per_epoch})
    return found


def lr_drops(curve: list[dict]) -> list[int]:
    """The epochs after which the learning rate went down (the plateau rule's drops, or a schedule's)."""
    return [a["epoch"] for a, b in zip(curve, curve[1:]) if b.get("lr", 0) < a.get("lr", 0) * 0.5]


def _scored(epochs: list[dict], split: str) -> list[dict]:
    """The epochs that were evaluated on ``split``."""
    return [e for e in epochs if f"{split}_error" in e]


def _autocast(config: dict, stretches: list[dict]) -> str | None:
    """The run's autocast ("fp32", "bfloat16"). `precision: auto` picks per host on the CPU (bf16 where there are bf16
    units), so a CPU run resumed across kinds of host gets one entry per kind, in order, with its epochs:
    "fp32 (epochs 1–128), bfloat16 (epochs 129–149)". config.json's own value is the last start's."""
    if config["train_config"].get("precision", "auto") != "auto" or not str(config.get("device", "")).startswith("cpu"):
        return config.get("autocast")
    kinds: list[list] = []  # [autocast, first epoch, last epoch]
    for stretch in stretches:
        units = (stretch.get("host") or {}).get("bf16")
        if units is None or stretch["first_epoch"] is None:
            continue
        kind = "fp32" if units == "none" else "bfloat16"
        if kinds and kinds[-1][0] == kind:
            kinds[-1][2] = stretch["last_epoch"]
        else:
            kinds.append([kind, stretch["first_epoch"], stretch["last_epoch"]])
    if len(kinds) < 2:
        return config.get("autocast")
    return ", ".join(f"{kind} (epochs {first}–{last})" for kind, first, last in kinds)


def _run_fields(name: str, config: dict, epochs: list[dict], label: str) -> dict:
    cfg, split = config["train_config"], config["train_config"]["eval_split"]
    scored = _scored(epochs, split)[-1]  # the last epoch of a finished run; of a run still training, maybe earlier
    keys = ("epoch", "step", "train_error", f"{split}_error", "extra_error", "train_loss", f"{split}_loss", "lr")
    curve = [{k: e[k] for k in keys if k in e} for e in epochs]
    stretches = segments(config, epochs)
    return {
        "segments": stretches, "lr_drops_after_epochs": lr_drops(curve),
        "name": name, "command": runnable(config.get("command") or ""),
        "resumes": [{**r, "command": runnable(r.get("command") or "")} for r in config.get("resumes", [])],
        "git_revision": config.get("git_revision"), "machine": machine_name(config.get("device", "cpu")),
        "device": config.get("device"), "cores": os.cpu_count(), "world_size": config.get("world_size", 1),
        "torch": config.get("torch"), "autocast": _autocast(config, stretches), "dataset": cfg["dataset"],
        "dataset_label": label, "model": cfg["model"],
        "recipe_fields": {k: cfg[k] for k in ("preprocessing", "schedule", "augment", "batch_size", "lr")},
        "train_subset": cfg.get("train_subset", 0), "eval_split": split, "eval_subset": cfg.get("eval_subset", 0),
        "epochs": epochs[-1]["epoch"], "epochs_planned": cfg["epochs"],
        "wall_time_s": sum(e["train_time_s"] + e["eval_time_s"] for e in epochs),
        "train_time_s": sum(e["train_time_s"] for e in epochs),
        # training throughput: the median epoch's, so that epochs slowed by other work on a shared host do not skew it
        "images_per_s": statistics.median(e["images_per_s"] for e in epochs),
        "final_error": scored[f"{split}_error"], "final_error_epoch": scored["epoch"], "curve": curve,
        "train_config": cfg,
    }


def exact_1000(weights: str | os.PathLike, dataset: str, data_dir: str | None = None, device: str | None = None) -> dict:
    """A CIFAR-10 model's error on the pixel-exact first 1,000 official test images: {"exact_1000_error": e}.

    The CIFAR-10 copy here went through JPEG; these 1,000 are the images the paper's number is comparable to.
    Empty for other data sets, or when they are not in the data folder.
    """
    if dataset != "cifar10" or not (resolve_root(data_dir) / "cifar-10-test-lossless-first1000").is_dir():
        return {}
    result, _, _ = evaluate_weights(weights, dataset=LOSSLESS_CIFAR10_NAME, data_dir=data_dir, device=device)
    return {"exact_1000_error": result.error}


def runnable(command: str) -> str:
    """A recorded command as a user runs it: a run folder given by absolute path becomes runs/<name>."""
    return re.sub(r"(--out|--resume) /\S*/([^/\s]+)", r"\1 runs/\2", command)


def reevaluate(results_dir: str | os.PathLike = "results", *, data_dir: str | None = None,
               log=print) -> list[str]:
    """Evaluate every recorded weights file again on nin's current inference path and store the result.

    Each record's ``evaluated_error`` (and ``exact_1000_error`` for CIFAR-10) is replaced by what `nin evaluate`
    gives today; ``final_error``, the error the run logged while training, stays as it was. Returns the names
    whose numbers moved. Run it after a change to the inference path (docs/reproduce.md).
    """
    moved = []
    for path in sorted(Path(results_dir).glob("*.json")):
        record = json.loads(path.read_text())
        weights = Path(record.get("weights", ""))
        if not weights.is_file():
            continue
        result, _, _ = evaluate_weights(weights, dataset=record["dataset"], data_dir=data_dir,
                                        subset=record.get("eval_subset") or 0, split=record.get("eval_split", "test"))
        update = {"evaluated_error": result.error, "evaluated_n": result.n,
                  **exact_1000(weights, record["dataset"], data_dir)}
        changed = {k: (record.get(k), v) for k, v in update.items() if record.get(k) != v}
        if changed:
            moved.append(record["name"])
            record.update(update)
            write_json(path, record)
        log(f"{record['name']}: " + (", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) or "unchanged"))
    return moved
