"""nin reproduce: every experiment's dry run parses back as nin train; record_run on a tiny real run; RESULTS.md."""

import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nin.cli import build_parser, main
from nin.inference import agrees_with_record
from nin.models import get_model, multiply_adds
from nin.tools.reproduce import EXPERIMENTS, PAPER_ROWS, TABLE5_SMALL_ROWS, plan, record_run, write_report
from nin.engine import recipe, train

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_dry_run_prints_valid_train_commands(experiment, capsys, tmp_path):
    out_root = tmp_path / "runs"
    assert main(["reproduce", experiment, "--dry-run", "--out-root", str(out_root), "--epochs", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(EXPERIMENTS[experiment][1]) >= 1
    parser = build_parser()
    for line, planned in zip(lines, plan(experiment, out_root=out_root, epochs=3)):
        words = shlex.split(line)
        assert words[:2] == ["nin", "train"]
        args = parser.parse_args(words[1:])
        assert args.command == "train" and args.out == str(out_root / planned.name) and args.epochs == 3
        # the command resolves to a valid config, as `nin train --dry-run` would; it exits 1 only where the data
        # set is not here (CIFAR-100, SVHN), after printing the config
        code = main([*words[1:], "--dry-run"])
        captured = capsys.readouterr()
        printed = json.loads(captured.out)
        assert printed["train_config"]["epochs"] == 3
        assert (code, printed["data_files"] is None) in ((0, False), (1, True)), captured.err
        assert code == 0 or "no " + printed["train_config"]["dataset"] + " files found" in captured.err
    assert not out_root.exists()


def test_table5_trains_six_heads_on_one_schedule():
    runs = plan("table5", gpu=True)
    models = [r.argv[r.argv.index("--model") + 1] for r in runs]
    assert models == ["nin_cifar10_fc", "nin_cifar10_fc_dropout", "nin_cifar10",
                      "cnn_cifar10_fc", "cnn_cifar10_fc_dropout", "cnn_cifar10_gap"]
    tails = {r.argv[r.argv.index("--epochs"):] for r in runs}
    assert tails == {("--epochs", "260", "--set", "schedule=multistep", "--set", "milestones=200,230",
                      "--device", "cuda")}
    aug = plan("table1-aug")[0].argv
    assert "--augment" in aug and "--recipe" in aug and aug[aug.index("--recipe") + 1] == "paper"


def test_only_runs_the_named_runs_of_an_experiment(capsys, tmp_path):
    """`--only table5-nin_cifar10`: Table 1's model under the authors' fixed schedule, alone; a name the experiment
    lacks is refused in one line naming its runs, before anything is trained or written."""
    assert main(["reproduce", "table5", "--only", "table5-cnn_cifar10_gap", "table5-nin_cifar10", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [shlex.split(line)[shlex.split(line).index("--out") + 1] for line in lines] == [
        "runs/table5-nin_cifar10", "runs/table5-cnn_cifar10_gap"]  # the experiment's order
    assert "milestones=200,230" in lines[0] and "--model nin_cifar10 " in lines[0]
    assert main(["reproduce", "table5", "--only", "nin_cifar10", "--out-root", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "--only nin_cifar10: table5 has no such run" in err and "table5-nin_cifar10," in err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()


def test_cifar10_runs_also_score_the_exact_1000_and_checkpoint_as_asked(data_root):
    argv = plan("table1", data_dir=str(data_root), checkpoint_every=200)[0].argv
    exact = data_root / "cifar-10-test-lossless-first1000" / "test_batch_first1000.bin"
    assert f"extra_eval={exact}" in argv and argv[argv.index("--checkpoint-every") + 1] == "200"
    mnist = plan("table4", data_dir=str(data_root))[0].argv
    assert not any(a.startswith("extra_eval=") for a in mnist) and "--checkpoint-every" not in mnist


# what a run's config holds beside its training: where the data lies, how often it is evaluated and checkpointed
NOT_TRAINING = {"data_dir", "extra_eval", "eval_every", "eval_batch_size", "checkpoint_every", "stall_check_steps",
                "compile"}


def _training_fields(config: dict) -> dict:
    from nin.engine import TrainConfig

    cfg = TrainConfig.from_dict(config).to_dict()  # a record's older config read as a resume reads it
    cfg["val_split"] = cfg["val_split"] or 0.0
    cfg["milestones"] = list(cfg["milestones"])
    if not cfg["small_size"]:  # no progressive resizing: its length is moot
        cfg["small_epochs"] = cfg["small_fraction"] = 0
    return {k: v for k, v in cfg.items() if k not in NOT_TRAINING}


@pytest.mark.parametrize("record", sorted((REPO / "results").glob("*.json")), ids=lambda p: p.stem)
def test_reproduce_repeats_each_recorded_run(record, data_root, capsys):
    """`nin reproduce EXPERIMENT` trains what results/NAME.json recorded: the same config but for where the data
    lies and how often it is evaluated (runs recorded before a recipe's default changed have that setting pinned)."""
    recorded = json.loads(record.read_text())
    runs = {spec.name: name for name, (_, specs) in EXPERIMENTS.items() for spec in specs}
    if recorded["name"] not in runs:
        assert recorded.get("kind") == "imported", f"{record.name}: no experiment repeats it"
        return
    planned = next(p for p in plan(runs[recorded["name"]], data_dir=str(data_root))
                   if p.run_dir.name == recorded["name"])
    main([*planned.argv, "--dry-run"])
    config = json.loads(capsys.readouterr().out)["train_config"]
    assert _training_fields(config) == _training_fields(recorded["train_config"])


def test_table5_small_runs_three_heads_identically_but_for_the_head(capsys):
    runs = plan("table5-small")
    models = [r.argv[r.argv.index("--model") + 1] for r in runs]
    assert models == ["nin_cifar10_fc", "nin_cifar10_fc_dropout", "nin_cifar10"]
    for r in runs:
        assert "--no-augment" in r.argv and r.argv[r.argv.index("--train-subset") + 1] == "10000"
        assert r.argv[r.argv.index("--epochs") + 1] == "6"
    strip = [[a for a in r.argv if a not in models and "table5-small" not in a] for r in runs]
    assert strip[0] == strip[1] == strip[2]  # nothing else differs
    assert main([*runs[2].argv, "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)["train_config"]
    assert cfg["eval_subset"] == 5000 and cfg["tta_flip"] is False and cfg["augment"] is False


def test_multiply_adds_match_the_paper():
    assert round(multiply_adds(get_model("nin_cifar10")) / 1e6, 1) == 222.5  # the CIFAR-10 model's ≈ 222.5 M per image


def test_record_run_and_report(data_root, tmp_path):
    run = tmp_path / "runs" / "tiny-mnist"
    cfg = dataclasses.replace(recipe("fast", "mnist"), train_subset=512, eval_subset=300, epochs=1, batch_size=64)
    last = train(cfg, run, command="nin train --dataset mnist --recipe fast (tiny)", log=lambda *_: None)
    results, weights = tmp_path / "results", tmp_path / "weights"

    record = record_run(run, "tiny-mnist", results, weights, log=lambda *_: None)
    saved = json.loads((results / "tiny-mnist.json").read_text())
    assert saved == record
    for key in ("command", "git_revision", "machine", "cores", "wall_time_s", "epochs", "final_error",
                "evaluated_error", "curve", "dataset_label", "weights"):
        assert key in saved, key
    assert saved["command"] == "nin train --dataset mnist --recipe fast (tiny)"
    assert saved["dataset_label"] == "MNIST" and saved["epochs"] == 1 and saved["eval_subset"] == 300
    assert saved["curve"][0].keys() == {"epoch", "step", "train_error", "test_error", "train_loss", "test_loss", "lr"}
    assert saved["final_error"] == last["test_error"]
    assert saved["evaluated_n"] == 300
    assert saved["evaluated_error"] == saved["final_error"]  # the weights file alone reproduces the error exactly
    assert (weights / "tiny-mnist.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()

    report = write_report(results, tmp_path / "RESULTS.md", data_dir=str(data_root))
    text = report.read_text()
    for row in PAPER_ROWS:
        assert f"| {row.table} | {row.label} | {row.paper} |" in text
    assert "not run here: needs data (CIFAR-100/SVHN not on this machine)" in text
    assert "not run here: needs a GPU" in text
    assert "tiny-mnist" in text and "## Other recorded runs" in text
    pytest.importorskip("matplotlib")
    assert (results / "curves" / "tiny-mnist.png").stat().st_size > 1000


def test_python_dash_m_reproduce_report(tmp_path):
    (tmp_path / "none").mkdir()  # no results yet: every row says how to fill it
    done = subprocess.run([sys.executable, "-m", "nin", "reproduce", "report", "--results-dir", str(tmp_path / "none"),
                           "--output", str(tmp_path / "R.md"), "--no-curves"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "R.md").read_text()
    assert report.count("| Table ") == len(PAPER_ROWS) + len(TABLE5_SMALL_ROWS)
    assert report.count("| Table 5, reduced |") == len(TABLE5_SMALL_ROWS) == 3


def test_report_without_matplotlib_or_results(tmp_path, capsys, monkeypatch):
    """No matplotlib: the report is written without curves (they are optional); no results folder: one line."""
    import shutil

    (tmp_path / "results").mkdir()
    shutil.copy(REPO / "results" / "fast-mnist.json", tmp_path / "results")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["reproduce", "report", "--results-dir", str(tmp_path / "results"), "--output",
                 str(tmp_path / "R.md")]) == 0
    assert "| ours | MNIST, fast recipe |" in (tmp_path / "R.md").read_text()
    assert "lost/" not in (tmp_path / "R.md").read_text()
    assert not (tmp_path / "results" / "curves").exists()
    # a lost run's record (results/lost/) is named below the introduction, not shown in a table
    (tmp_path / "results" / "lost").mkdir()
    shutil.copy(REPO / "results" / "lost" / "cifar10-paper-run2.json", tmp_path / "results" / "lost")
    (tmp_path / "results" / "lost" / "damaged.json").write_text("{")
    assert main(["reproduce", "report", "--results-dir", str(tmp_path / "results"), "--output",
                 str(tmp_path / "R.md")]) == 0
    text = (tmp_path / "R.md").read_text()
    assert "`cifar10-paper-run2` (recorded at epoch 76: 18.73%)" in text and "`damaged`" in text
    assert "| Table 1 |" in text and "cifar10-paper-run2.png" not in text and "18.73%**" not in text
    assert main(["reproduce", "report", "--results-dir", str(tmp_path / "none"), "--output",
                 str(tmp_path / "S.md")]) == 1
    assert "none: no such folder" in capsys.readouterr().err and not (tmp_path / "S.md").exists()


def test_pack_and_unpack_data_round_trip(tmp_path):
    source = tmp_path / "data"
    (source / "mnist").mkdir(parents=True)
    (source / "mnist" / "a.bin").write_bytes(bytes(range(256)) * 9000)  # 2.3 MB
    (source / "b.txt").write_text("hello")
    parts = tmp_path / "parts"
    tool = REPO / "experiments" / "pack_data.py"
    packed = subprocess.run([sys.executable, str(tool), "pack", str(source), str(parts), "--part-mib", "1"],
                            capture_output=True, text=True, timeout=60)
    assert packed.returncode == 0, packed.stderr
    manifest = json.loads((parts / "manifest.json").read_text())
    assert len(manifest["parts"]) == 3 and all((parts / p["name"]).stat().st_size <= 2**20 for p in manifest["parts"])
    unpacked = subprocess.run([sys.executable, str(tool), "unpack", str(parts), str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=60)
    assert unpacked.returncode == 0, unpacked.stderr
    assert (tmp_path / "out" / "mnist" / "a.bin").read_bytes() == (source / "mnist" / "a.bin").read_bytes()
    assert (tmp_path / "out" / "b.txt").read_text() == "hello"


def test_jpeg_pairs_are_the_exact_images_jpeg_copies(data_root, tmp_path, capsys):
    """experiments/jpeg_pairs.py writes, in the exact 1,000's order, each image's JPEG copy from the CIFAR-10 copy's
    test batch; the authors' weights (trained on exact pixels) then score the same images lower in JPEG."""
    if not (data_root / "cifar-10-test-lossless-first1000").is_dir():
        pytest.skip("no exact CIFAR-10 images here")
    tool, out = REPO / "experiments" / "jpeg_pairs.py", tmp_path / "pairs.bin"
    done = subprocess.run([sys.executable, str(tool), "--data-dir", str(data_root), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    record = 3073
    exact = (data_root / "cifar-10-test-lossless-first1000" / "test_batch_first1000.bin").read_bytes()
    jpeg = (data_root / "cifar-10-batches-bin" / "test_batch.bin").read_bytes()
    pairs = out.read_bytes()
    assert len(pairs) == len(exact)
    pairs_records = [pairs[i:i + record] for i in range(0, len(pairs), record)]
    assert len(set(pairs_records)) == 1000 and set(pairs_records) <= {jpeg[i:i + record] for i in range(0, len(jpeg), record)}
    assert pairs[::record] == exact[::record]  # the labels, in the exact file's order
    assert pairs != exact

    scores = {}
    for name, extra in (("jpeg", ["--data-file", str(out)]),
                        ("exact", ["--dataset", "cifar10-lossless-first1000", "--data-dir", str(data_root)])):
        assert main(["evaluate", "caffe-authors-cifar10", *extra, "--json"]) == 0
        scores[name] = json.loads(capsys.readouterr().out)["accuracy"]
    assert scores["exact"] - scores["jpeg"] > 0.05

    broken = tmp_path / "data"
    (broken / "cifar-10-test-lossless-first1000").mkdir(parents=True)
    (broken / "cifar-10-batches-bin").symlink_to(data_root / "cifar-10-batches-bin")
    (broken / "cifar-10-test-lossless-first1000" / "test_batch_first1000.bin").write_bytes(
        bytes([(exact[0] + 1) % 10]) + exact[1:])  # image 0 labelled as another class
    refused = subprocess.run([sys.executable, str(tool), "--data-dir", str(broken), "--out", str(tmp_path / "x.bin")],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "labels differ" in refused.stderr and not (tmp_path / "x.bin").exists()
    # never over an input, nor over a file of the user's
    jpeg_file = data_root / "cifar-10-batches-bin" / "test_batch.bin"
    for target, message in ((jpeg_file, "is one of the input files"), (out, "exists and was not written")):
        refused = subprocess.run([sys.executable, str(tool), "--data-dir", str(data_root), "--out", str(target)],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and message in refused.stderr and refused.stderr.count("\n") == 1
    assert jpeg_file.read_bytes() == jpeg and out.read_bytes() == pairs


REPO = Path(__file__).resolve().parent.parent
CHEAP_RESULTS = ("fast-mnist", "fast-fashion-mnist")  # 10,000 small test images each: seconds to evaluate


@pytest.mark.parametrize("name", CHEAP_RESULTS)
def test_published_weights_reproduce_their_recorded_error(name, data_root, capsys):
    """`nin evaluate weights/<name>.safetensors` on the real test set gives the recorded test error (on the CPU that
    recorded it, exactly; on another, within `nin.inference.accuracy_tolerance`)."""
    import hashlib

    path = REPO / "results" / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"{name} not recorded")
    record = json.loads(path.read_text())
    weights = REPO / record["weights"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == record["weights_sha256"]
    assert main(["evaluate", str(weights), "--json", "--data-dir", str(data_root), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == record["evaluated_n"] == 10_000
    # the count `nin reproduce reevaluate` stored, to within what another CPU's bf16 kernels may move it
    assert agrees_with_record(result["correct"], result["n"], 1 - record["evaluated_error"]), (result, record["name"])
    assert abs(record["final_error"] - record["evaluated_error"]) * 10_000 <= 5  # the run's own log, a few images
    assert record["curve"][-1]["test_error"] == record["final_error"]


def test_a_run_in_progress_is_recorded_with_its_segments_and_shown_as_such(data_root, tmp_path):
    """A paper-recipe run stopped mid-way and resumed: its progress record, one segment per (re)start, each with
    the host it ran on; the report's row says "in progress" and is not scored again."""
    run = tmp_path / "runs" / "mnist-paper"  # the name of Table 4's run, so the report puts it in Table 4's row
    cfg = dataclasses.replace(recipe("paper", "mnist"), train_subset=256, eval_subset=200, epochs=3, batch_size=64)
    with pytest.raises(KeyboardInterrupt):  # 4-step epochs: killed in epoch 2, after its checkpoint at step 4
        train(cfg, run, command="nin train --dataset mnist --recipe paper (tiny)", log=lambda *_: None,
              interrupt_after=6)
    with pytest.raises(KeyboardInterrupt):  # resumed at step 4, killed again in epoch 3
        train(None, run, resume=True, command="nin train --resume runs/mnist-paper", log=lambda *_: None,
              interrupt_after=10)
    results = tmp_path / "results"
    record = record_run(run, "mnist-paper", results, tmp_path / "weights", log=lambda *_: None)
    assert record["in_progress"] and record["epochs"] == 2 and record["evaluated_n"] == 0
    assert not (tmp_path / "weights").exists()  # nothing to copy yet
    first, second = record["segments"]
    assert (first["step"], second["step"]) == (0, 4)
    assert (first["first_epoch"], first["last_epoch"], second["first_epoch"], second["last_epoch"]) == (1, 1, 2, 2)
    assert first["host"]["machine"] and first["host"]["bf16"] in ("AMX", "AVX-512 BF16", "none")
    assert second["command"] == "nin train --resume runs/mnist-paper"
    text = write_report(results, tmp_path / "RESULTS.md", data_dir=str(data_root), curves=False).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| Table 4 |"))
    assert "in progress: epoch 2 of at most 3" in row and "not yet: still training" in row and "2 segments" in row
    units = {"none": "no bf16 units (fp32)"}.get(first["host"]["bf16"], first["host"]["bf16"])
    assert f"epoch 1: {first['host']['machine']}, {units}" in row  # what each segment computed in
    # finished: an ordinary record, the weights copied and scored again
    train(None, run, resume=True, log=lambda *_: None)
    done = record_run(run, "mnist-paper", results, tmp_path / "weights", log=lambda *_: None)
    assert not done["in_progress"] and done["evaluated_error"] == done["final_error"] and len(done["segments"]) == 3


def test_a_run_in_progress_between_evaluations_is_recorded_with_its_last_scored_epoch(tmp_path, capsys):
    """The fast recipe scores MNIST every other epoch: a run recorded after epoch 3 shows epoch 2's error; one
    recorded after epoch 1, before any evaluation, is refused in one line."""
    run = tmp_path / "runs" / "fast-mnist"
    run.mkdir(parents=True)
    cfg = dataclasses.replace(recipe("fast", "mnist"), data_dir=str(tmp_path))
    (run / "config.json").write_text(json.dumps({"train_config": cfg.to_dict(), "command": "nin train ...",
                                                 "device": "cpu"}))
    epoch = {"lr": 0.1, "train_loss": 0.5, "train_error": 0.02, "images_per_s": 700.0, "train_time_s": 80.0,
             "eval_time_s": 1.0}
    lines = [{**epoch, "epoch": 1, "step": 469}, {**epoch, "epoch": 2, "step": 938, "test_loss": 0.1, "test_error": 0.0144},
             {**epoch, "epoch": 3, "step": 1407}]
    (run / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    args = ["reproduce", "record", str(run), "--name", "fast-mnist", "--results-dir", str(tmp_path / "results")]
    assert main(args) == 1
    assert "no epoch scored on test yet" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(args) == 0
    record = json.loads((tmp_path / "results" / "fast-mnist.json").read_text())
    assert record["in_progress"] and record["epochs"] == 3
    assert (record["final_error"], record["final_error_epoch"]) == (0.0144, 2)
    text = write_report(tmp_path / "results", tmp_path / "RESULTS.md", curves=False).read_text()
    row = next(line for line in text.splitlines() if "MNIST, fast recipe" in line)
    assert "in progress: epoch 3 of 6, 1.44% at epoch 2, its last evaluation" in row


def test_cpu_estimates_scale_a_run_of_this_cpu_kind_only(monkeypatch):
    """One CPU name covers hosts with and without bf16 units, which train about 3-5x apart: the estimates' reference
    is a run recorded with this host's units, else one recorded before units were, never one with other units."""
    from nin.tools import report

    def run(name, epochs, units=None, machine="AMD EPYC", **extra):
        segments = [{"host": {"machine": machine, "bf16": units}}] if units else []
        return {"name": name, "device": "cpu", "machine": machine, "epochs": epochs, "segments": segments,
                "images_per_s": 50.0, **extra}

    bf16 = run("bf16-run", 55, "AVX-512 BF16")
    fp32 = run("fp32-run", 3, "none")
    old = run("before-units", 32)
    records = [bf16, fp32, old, run("subset", 99, "none", train_subset=1000), run("xeon", 99, "none", machine="Xeon")]
    monkeypatch.setattr(report, "machine_name", lambda device: "AMD EPYC")
    for units, expected in (("none", fp32), ("AVX-512 BF16", bf16), ("AMX", old)):
        monkeypatch.setattr(report, "bf16_units", lambda units=units: units)
        assert report._cpu_reference(records) is expected, units
    monkeypatch.setattr(report, "bf16_units", lambda: "AMX")
    assert report._cpu_reference([bf16, fp32]) is None
    resumed = {"images_per_s": 34.0, "segments": [{"images_per_s": 33.0}, {"images_per_s": 63.0}, {}]}
    assert report._reference_rate(resumed) == 63.0 and report._reference_rate({"images_per_s": 50.0}) == 50.0
    # resumed across kinds: a reference for each kind it has segments of, at those segments' rate alone
    mixed = run("mixed", 149, "none", images_per_s=120.0)
    mixed["segments"] = [{"host": {"bf16": "none"}, "images_per_s": 95.0},
                         {"host": {"bf16": "AVX-512 BF16"}, "images_per_s": 456.0}]
    for units, rate in (("none", 95.0), ("AVX-512 BF16", 456.0)):
        monkeypatch.setattr(report, "bf16_units", lambda units=units: units)
        assert report._cpu_reference([bf16, fp32, mixed]) is mixed
        assert report._reference_rate(mixed, units) == rate
    monkeypatch.setattr(report, "bf16_units", lambda: "AMX")
    assert report._cpu_reference([mixed]) is None
    # a kind whose only segment never finished an epoch measured nothing there: not a reference for that kind
    unfinished = run("unfinished", 152, "none", images_per_s=90.0)
    unfinished["segments"] = [{"host": {"bf16": "none"}, "images_per_s": 90.0},
                              {"host": {"bf16": "AMX"}, "images_per_s": None}]
    assert report._reference_rate(unfinished, "AMX") is None
    assert report._cpu_reference([unfinished, old]) is old


def test_a_paper_run_this_cpu_trains_in_a_day_is_not_run_yet_not_a_gpus_job(data_root, monkeypatch):
    from nin.tools import report

    row = next(r for r in report.PAPER_ROWS if r.experiment == "table1-aug")
    if not (data_root / "cifar-10-batches-bin").is_dir():
        pytest.skip("no CIFAR-10 in the data folder")
    reference = {"name": "r", "model": "nin_cifar10", "images_per_s": 456.0, "segments": []}
    text = report._not_run(row, data_root, reference)
    hours = 260 * 50_000 / 456.0 / 3600
    assert text == f"not run yet: `nin reproduce table1-aug` (the paper recipe's 260 epochs ≈ {hours:.0f} h on this CPU)"
    slow = dict(reference, images_per_s=95.0)
    assert report._not_run(row, data_root, slow) == \
        f"not run here: needs a GPU (the paper recipe's 260 epochs ≈ {260 * 50_000 / 95.0 / 3600:.0f} h on this CPU)"
    assert report._not_run(row, data_root, None) == "not run here: needs a GPU (the paper recipe's 260 epochs)"
    heads = next(r for r in report.PAPER_ROWS if r.results == ("table5-cnn_cifar10_gap",))
    assert report._not_run(heads, data_root, reference).startswith(
        "not run yet: `nin reproduce table5 --only table5-cnn_cifar10_gap` (the paper recipe's 260 epochs ≈ ")


def test_a_row_shows_its_finished_run_and_the_run_still_training_beside_it(tmp_path):
    """Table 5's mlpconv + GAP row names table5-nin_cifar10 (the authors' schedule) before cifar10-paper (Table 1's
    run): while the first still trains, the row keeps the finished run's numbers and shows the other's progress."""
    from nin.tools import report

    finished = json.loads((REPO / "results" / "cifar10-paper.json").read_text())
    training = {**finished, "name": "table5-nin_cifar10", "in_progress": True, "epochs": 12, "final_error": 0.4012,
                "final_error_epoch": 12, "lr_drops_after_epochs": [], "curve": finished["curve"][:12]}
    row = next(r for r in report.PAPER_ROWS if r.results == ("table5-nin_cifar10", "cifar10-paper"))
    for records in ({"cifar10-paper": finished, "table5-nin_cifar10": training},
                    {"table5-nin_cifar10": training, "cifar10-paper": finished}):
        line = report._table((row,), records, tmp_path, None, {})[-1]
        assert f"| **{finished['final_error']:.2%}** ({finished['epochs']} epochs" in line
        assert "still training beside it, `table5-nin_cifar10`: **40.12%** (in progress: epoch 12 of 260," in line
        assert f"| {finished['exact_1000_error']:.1%} |" in line  # the finished run's exact 1,000
    alone = report._table((row,), {"table5-nin_cifar10": training}, tmp_path, None, {})[-1]
    assert "**40.12%** (in progress" in alone and "beside it" not in alone


def test_a_run_resumed_across_host_kinds_records_each_kinds_autocast():
    """precision auto picks bf16 per host on the CPU: the record says which epochs trained in which."""
    from nin.tools.results import _autocast

    def stretch(first, last, units):
        return {"first_epoch": first, "last_epoch": last, "host": {"bf16": units}}

    config = {"train_config": {"precision": "auto"}, "device": "cpu", "autocast": "bfloat16"}
    stretches = [stretch(1, 9, "none"), stretch(10, 128, "none"), stretch(None, None, "AMX"),
                 stretch(129, 149, "AVX-512 BF16")]
    assert _autocast(config, stretches) == "fp32 (epochs 1–128), bfloat16 (epochs 129–149)"
    assert _autocast(config, stretches[:2]) == "bfloat16"  # one kind: config.json's own value
    assert _autocast({**config, "train_config": {"precision": "fp32"}, "autocast": "fp32"}, stretches) == "fp32"


def test_plateau_trend_replays_the_recorded_lr_drops_and_measures_the_trend(tmp_path, capsys):
    """experiments/plateau_trend.py: replaying PlateauRule at the runs' patience on a recorded curve finds the epoch
    where the run divided its lr; on a made-up run it reports the slope it was built with and the plateau it has.
    Its main() in this process (each script run would import torch again); the script itself for the error."""
    import importlib.util

    tool = REPO / "experiments" / "plateau_trend.py"
    spec = importlib.util.spec_from_file_location("plateau_trend", tool)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run(*args):
        code = script.main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    for path in (REPO / "results" / "mnist-paper.json", REPO / "results" / "lost" / "cifar10-paper-run1.json"):
        record = json.loads(path.read_text())
        code, out, err = run(path, "--patience", record["train_config"]["plateau_patience"])
        assert code == 0, err
        assert f"divides the lr after epoch {record['lr_drops_after_epochs'][0]}" in out

    # 12 epochs improving by 0.5 points, then flat: patience 5 fires 5 epochs into the flat part, 10 does not
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    errors = [0.30 - 0.005 * e for e in range(1, 13)] + [0.30 - 0.005 * 12] * 6 + [0.20 - 0.002 * e for e in range(5)]
    lrs = [0.1] * 18 + [0.01] * 5
    with open(run_dir / "metrics.jsonl", "w") as f:
        for epoch, (error, lr) in enumerate(zip(errors, lrs), 1):
            f.write(json.dumps({"epoch": epoch, "lr": lr, "train_error": error, "test_error": error + 0.1}) + "\n")
    code, out, err = run(run_dir, "--window", 5, "--patience", 5, 10)
    assert code == 0, err
    assert "patience   5: divides the lr after epoch 17" in out and "patience  10: no drop by epoch 18" in out
    assert "lr 0.01: epochs 19-23" in out and "slope -0.200 points/epoch, scatter 0.000" in out

    done = subprocess.run([sys.executable, str(tool), str(tmp_path / "missing.json")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "missing.json" in done.stderr and done.stderr.count("\n") == 1


def test_same_curve_finds_the_first_epoch_two_runs_differ(tmp_path, capsys):
    """experiments/same_curve.py: two curves the same in every logged value (timings aside) exit 0; a difference
    names its first epoch and the largest differences from there; NaN equals NaN, a null or a missing epoch is a
    difference; the lost Table 1 runs (bf16 and fp32) differ from their first epoch."""
    import importlib.util

    tool = REPO / "experiments" / "same_curve.py"
    spec = importlib.util.spec_from_file_location("same_curve", tool)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run_folder(name, losses, seconds, epochs=None):
        folder = tmp_path / name
        folder.mkdir()
        with open(folder / "metrics.jsonl", "w") as f:
            for epoch, loss, time_s in zip(epochs or range(1, len(losses) + 1), losses, seconds):
                f.write(json.dumps({"epoch": epoch, "step": 10 * epoch, "lr": 0.1, "train_error": 0.1 * epoch,
                                    "train_loss": loss, "train_time_s": time_s, "images_per_s": 1 / time_s}) + "\n")
        return str(folder)

    def compared(first, second):
        code = script.main([first, second])
        return code, capsys.readouterr().out

    losses = [0.9, 0.8, 0.7, 0.6]
    a = run_folder("a", losses, [10, 11, 12, 13])
    b = run_folder("b", losses[:3], [20, 21, 22])  # another host's speed, one epoch fewer
    c = run_folder("c", losses[:2] + [0.7 + 1e-9, 0.55], [10, 11, 12, 13])
    nan = run_folder("nan", losses[:2] + [float("nan"), 0.6], [10, 11, 12, 13])
    null = run_folder("null", losses[:2] + [None, 0.6], [10, 11, 12, 13])
    gap = run_folder("gap", [0.9, 0.6], [10, 13], epochs=[1, 4])
    code, out = compared(a, b)
    assert code == 0 and out.splitlines() == ["epochs 1-3: 3 in both; compared: lr, step, train_error, train_loss",
                                              f"  the first goes on to epoch 4 ({a})",
                                              "the same in every value compared"]
    code, out = compared(a, c)
    assert code == 1 and "the same through epoch 2; first difference at epoch 3\n" in out
    assert "train_loss   largest difference from epoch 3 on: 0.05\n" in out and "time" not in out
    assert compared(nan, nan)[0] == 0
    code, out = compared(a, nan)
    assert code == 1 and "train_loss   from epoch 3 on: at epoch 3 the first has 0.7, the second nan" in out
    code, out = compared(a, null)
    assert code == 1 and "at epoch 3 the first has 0.7, the second None" in out
    code, out = compared(a, gap)
    assert code == 1 and "epochs in one curve only: 2, 3\n" in out and "first difference at epoch 2" in out

    lost = REPO / "results" / "lost"
    code, out = compared(str(lost / "cifar10-paper-run1.json"), str(lost / "cifar10-paper-run2.json"))
    assert code == 1 and "different from the first epoch; first difference at epoch 1" in out
    assert out.startswith("epochs 1-76: 76 in both;") and "the first goes on to epoch 151" in out
    (tmp_path / "null.json").write_text(json.dumps({"curve": None}))
    for bad in (tmp_path / "missing.json", tmp_path / "null.json"):
        assert script.main([str(bad), a]) == 2
        assert bad.name in capsys.readouterr().err


def test_reproduce_refuses_to_run_under_torchrun(tmp_path, monkeypatch, capsys):
    """Under torchrun each process ran nin reproduce: each started its own `nin train` (the children paired up as a
    DDP group by chance, from the inherited environment) and each recorded the same json and weights."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["reproduce", "fast-mnist", "--out-root", str(tmp_path), "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nin reproduce: error: under torchrun: it starts `nin train` itself") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    assert main(["reproduce", "fast-mnist", "--out-root", str(tmp_path), "--dry-run"]) == 0  # the commands to launch
    assert capsys.readouterr().out.startswith("nin train --dataset mnist")


def test_slim_state_saves_a_run_without_its_zca_and_restores_it_bit_for_bit(data_root, tmp_path, capsys):
    """experiments/slim_state.py: a run's resume state less its fitted ZCA (kept in git for Table 1's long run)
    restores a run folder that `nin train --resume` finishes exactly as the uninterrupted run; a refit that differs
    from the run's is refused unless accepted; nothing a user has is replaced, and damaged states are refused."""
    import importlib.util
    import shutil

    import torch

    from nin.checkpoint import load_state, save_state
    from small_models import TINY_NIN_BLOCKS

    spec = importlib.util.spec_from_file_location("slim_state", REPO / "experiments" / "slim_state.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = dataclasses.replace(recipe("fast", "mnist"), data_dir=str(data_root), preprocessing="gcn_zca",
                              train_subset=1024, eval_subset=200, batch_size=64, epochs=2, eval_every=1,
                              checkpoint_every=5, model_args={**recipe("fast", "mnist").model_args, "dropout": 0.5,
                                                              "blocks": TINY_NIN_BLOCKS})
    full, cut, state = tmp_path / "full", tmp_path / "cut", tmp_path / "state"
    train(cfg, full, log=lambda *_: None)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, cut, log=lambda *_: None, interrupt_after=23)  # a checkpoint at step 20, mid-epoch 2
    for out in (cut, full, tmp_path / "notes.txt", cut / "state"):  # the run itself, another run, a user's file
        (tmp_path / "notes.txt").write_text("mine")
        assert script.main(["save", str(cut), str(out)]) == 2
        assert str(out) in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine" and (full / "model.safetensors").is_file()
    (tmp_path / ".state.old").mkdir()  # a user's folder named like a leftover
    for _ in range(2):  # a new folder, then the one it wrote: replaced
        assert script.main(["save", str(cut), str(state)]) == 0
        assert "epoch 1, step 20" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state.old", "cut", "full", "notes.txt", "state"]
    kept, meta = load_state(state / "state.safetensors")
    assert not [k for k in kept if k.startswith("preprocess.")] and "preprocess.zca.matrix" in meta["dropped"]
    assert (state / "metrics.jsonl").read_bytes() == (cut / "metrics.jsonl").read_bytes()
    original = load_state(cut / "checkpoint.safetensors")

    (cut / "model.safetensors").write_bytes(b"")  # a user's file: restore never writes into an existing folder
    assert script.main(["restore", str(state), str(cut)]) == 2
    assert f"{cut}: already exists" in capsys.readouterr().err and (cut / "model.safetensors").exists()
    shutil.rmtree(cut)
    assert script.main(["restore", str(state), str(cut), "--data-dir", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "fitted again: the same to the last bit" in out and f"--resume {cut} --data-dir {data_root}" in out
    restored = load_state(cut / "checkpoint.safetensors")
    assert restored[1] == original[1] and sorted(restored[0]) == sorted(original[0])
    assert all(torch.equal(restored[0][k], original[0][k]) for k in original[0])
    train(None, cut, resume=True, log=lambda *_: None)
    a, _ = load_state(full / "checkpoint.safetensors")
    b, _ = load_state(cut / "checkpoint.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("model.", "optim.")))
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if "time" not in k and "per_s" not in k}
                          for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert strip(cut) == strip(full) and len(strip(full)) == 2

    def refused(changed_state, says, *flags):
        other = tmp_path / "other"
        assert script.main(["restore", str(changed_state), str(other), *flags]) == 2
        assert says in capsys.readouterr().err and not other.exists()

    clean = json.loads(json.dumps({k: v for k, v in meta.items() if k != "format"}))
    other_host = json.loads(json.dumps(clean))
    other_host["dropped"]["preprocess.zca.mean"]["sha256"] = "0" * 64  # as if fitted on another kind of host
    save_state(state / "state.safetensors", kept, other_host)
    refused(state, "differs from the run's in preprocess.zca.mean (the same images: another kind of host); "
                   "--accept-refit goes on with it")
    assert script.main(["restore", str(state), str(tmp_path / "accepted"), "--accept-refit"]) == 0
    assert "differs, accepted" in capsys.readouterr().out and (tmp_path / "accepted" / "checkpoint.safetensors").is_file()
    save_state(state / "state.safetensors", kept, clean)
    fake = tmp_path / "fake" / "mnist"  # other images under MNIST's names: refused, accepted refit or not
    fake.mkdir(parents=True)
    for part in data_root.joinpath("fashion-mnist").iterdir():
        (fake / part.name).symlink_to(part)
    refused(state, f"{fake.parent}: not the images the run trained on", "--data-dir", str(fake.parent),
            "--accept-refit")
    damaged = dict(kept)
    first = sorted(k for k in kept if k.startswith("model."))[0]
    damaged[first] = kept[first] + 1  # a flipped value in a kept tensor
    save_state(state / "state.safetensors", damaged, clean)
    refused(state, "damaged (its tensors do not match")
    no_buffer = {k: v for k, v in kept.items() if k != "optim.0.1"}  # as saved from a damaged checkpoint
    save_state(state / "state.safetensors", no_buffer, {**clean, "kept_sha256": script.digest(no_buffer)})
    refused(state, f"{state / 'state.safetensors'}: damaged (momentum buffer 0.1 is missing)")
    save_state(state / "state.safetensors", kept, {k: v for k, v in clean.items() if k != "epoch"})
    refused(state, f"{state / 'state.safetensors'}: damaged training state (no epoch)")
    save_state(state / "state.safetensors", kept, clean)
    (state / "metrics.jsonl").unlink()
    refused(state, "metrics.jsonl: missing")
    assert script.main(["save", str(tmp_path), str(tmp_path / "nothing")]) == 2
    assert "checkpoint.safetensors: no training checkpoint there" in capsys.readouterr().err
    torn = tmp_path / "torn"
    shutil.copytree(full, torn)
    (torn / "checkpoint.safetensors").write_bytes((full / "checkpoint.safetensors").read_bytes()[:100_000])
    assert script.main(["save", str(torn), str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith(f"slim_state.py save: {torn / 'checkpoint.safetensors'}: ")
    assert not (tmp_path / "nothing").exists()

    def appears(tmp):  # a user makes the folder while restore fits, or save reads: neither replaces it
        (tmp.parents[1] / "late").mkdir()
        (tmp.parents[1] / "late" / "notes.txt").write_text("mine")
        return {}

    for replaceable in (None, script._own_state):
        with pytest.raises(script.NinError, match="late: appeared meanwhile"):
            script._publish(tmp_path / "late", appears, replaceable=replaceable)
        assert (tmp_path / "late" / "notes.txt").read_text() == "mine"
        shutil.rmtree(tmp_path / "late")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".state.old"]
