"""One writer per run folder, a user's files never overwritten, SIGTERM = Ctrl-C with a checkpoint, the umask kept.

Real `nin train` processes on real MNIST (a 16-step run: 8 steps of 32 images per epoch, 2 epochs).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from nin.cli import main
from nin.engine.loop import dropout_seed

CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nin", "train", "--dataset", "mnist", "--recipe", "fast", "--train-subset", "256",
            "--set", "eval_subset=200", "--batch-size", "32", "--epochs", "2", "--device", "cpu", "--out", str(out),
            *extra]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    done = subprocess.run(_train(out), env=CHILD_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_two_writers_one_folder_one_is_refused(data_root, tmp_path):
    out = tmp_path / "race"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    processes = [subprocess.Popen(_train(out, "--seed", str(seed)), env=CHILD_ENV, stdout=open(log, "w"),
                                  stderr=subprocess.STDOUT) for seed, log in zip((1, 2), logs)]
    codes = [p.wait(timeout=600) for p in processes]
    assert sorted(codes) == [0, 1], (codes, [log.read_text()[-1500:] for log in logs])
    loser = logs[codes.index(1)].read_text()
    # the lock's line while the winner writes; once it has finished (a loser started late), what it left
    assert any(why in loser for why in ("another nin process (PID", "already holds a run", "not a run this program")), loser
    winner_seed = (1, 2)[codes.index(0)]
    config = json.loads((out / "config.json").read_text())
    assert config["train_config"]["seed"] == winner_seed
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # one writer's lines, none interleaved


def test_resume_while_the_run_is_training_is_refused(data_root, tmp_path, capsys):
    out = tmp_path / "busy"
    process = subprocess.Popen(_train(out, "--checkpoint-every", "1", "--epochs", "6"), env=CHILD_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint.safetensors").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before the test could race it"
        assert main(["train", "--resume", str(out), "--device", "cpu"]) == 1
        _one_line(capsys, "another nin process (PID", str(process.pid))
        # a new run into it: the same line, not what the running one has written so far ("already holds a run")
        assert main(_train(out)[3:]) == 1
        _one_line(capsys, "another nin process (PID", str(process.pid))
        assert process.poll() is None, "the run ended before the test could race it"
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("case", ["user-files", "finished-run-without-checkpoint", "symlinked-config", "temp-file"])
def test_out_folder_that_is_not_ours_is_refused_untouched(case, data_root, tmp_path, capsys, uninterrupted):
    out = tmp_path / "mine"
    out.mkdir()
    if case == "user-files":
        (out / "config.json").write_text('{"my": "settings"}')
        (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
        (out / "model.safetensors").write_bytes(b"my weights")
    elif case == "finished-run-without-checkpoint":
        for name in ("config.json", "metrics.jsonl", "model.safetensors"):
            (out / name).write_bytes((uninterrupted / name).read_bytes())
    elif case == "symlinked-config":
        target = tmp_path / "elsewhere.json"
        target.write_text("precious")
        (out / "config.json").symlink_to(target)
    else:
        (out / ".config.json.abc.tmp").write_text("a user's temp file")
    before = _digests(out)
    assert main(["train", "--dataset", "mnist", "--epochs", "1", "--train-subset", "64", "--out", str(out),
                 "--device", "cpu"]) == 1
    _one_line(capsys, str(out))
    assert _digests(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    if case == "symlinked-config":
        assert (tmp_path / "elsewhere.json").read_text() == "precious"


def test_bad_config_leaves_no_run_folder(data_root, tmp_path, capsys):
    for assignment in ("model.num_classes=0", "model.num_classes=-3", "eval_batch_size=0", f"seed={2**64}",
                       "model.init_std=-1", "model.pool_kernel=0"):
        out = tmp_path / assignment.replace("=", "_")
        assert main(["train", "--dataset", "mnist", "--set", assignment, "--out", str(out)]) == 1, assignment
        _one_line(capsys, assignment.split("=")[0].split(".")[-1])
        assert not out.exists(), assignment


def test_resume_dry_run_writes_nothing(uninterrupted, tmp_path, capsys):
    before = _digests(uninterrupted)
    assert main(["train", "--resume", str(uninterrupted), "--epochs", "3", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["resume_at_step"] == 16 and printed["epochs"] == 3
    assert _digests(uninterrupted) == before
    # --data-dir: the folder the resume would read, in the config and in the files alike (absolute, as recorded)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["train", "--resume", str(uninterrupted), "--data-dir", "elsewhere", "--dry-run"]) == 1
    finally:
        monkeypatch.undo()
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed["train_config"]["data_dir"] == str(empty) and printed["data_files"] is None
    assert str(empty) in captured.err and _digests(uninterrupted) == before
    # $NIN_DATA elsewhere: the resume reads the folder it recorded while that is there, and so does its dry run
    monkeypatch.setenv("NIN_DATA", str(empty))
    try:
        assert main(["train", "--resume", str(uninterrupted), "--dry-run"]) == 0
    finally:
        monkeypatch.undo()
    assert json.loads(capsys.readouterr().out)["train_config"]["data_dir"] != str(empty)


def test_resume_refuses_a_metrics_log_it_cannot_read_whole(uninterrupted, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.safetensors", "config.json"):
        (run / name).write_bytes((uninterrupted / name).read_bytes())
    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text(json.dumps(records, indent=2))  # valid JSON, but not one record a line
    before = _digests(run)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--device", "cpu"]) == 1
    _one_line(capsys, "metrics.jsonl", "line")
    assert _digests(run) == before


def test_sigterm_checkpoints_the_current_step_and_resume_is_bit_identical(uninterrupted, tmp_path):
    out = tmp_path / "termed"
    log = tmp_path / "log.txt"
    process = subprocess.Popen(_train(out, "--checkpoint-every", "5"), env=CHILD_ENV, stdout=open(log, "w"),
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.safetensors").is_file() and time.monotonic() < deadline:  # step 5 is written
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130, log.read_text()[-2000:]
    text = log.read_text()
    assert "stopped at step" in text and f"nin train --resume {out}" in text, text[-2000:]
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        step = json.loads(f.metadata()["nin"])["step"]
    assert 5 <= step < 16, step
    done = subprocess.run([sys.executable, "-m", "nin", "train", "--resume", str(out), "--device", "cpu"],
                          env=CHILD_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed, whole = load_file(str(out / "model.safetensors")), load_file(str(uninterrupted / "model.safetensors"))
    assert resumed.keys() == whole.keys()
    assert all((resumed[k] == whole[k]).all() for k in whole), "SIGTERM + resume differs from the uninterrupted run"


def test_files_get_the_users_umask(uninterrupted):
    for name in ("model.safetensors", "checkpoint.safetensors", "metrics.jsonl", "metrics.csv", "config.json"):
        mode = (uninterrupted / name).stat().st_mode & 0o777
        assert mode == 0o666 & ~0o022, (name, oct(mode))  # CI and this machine run with umask 022


def test_dropout_streams_differ_per_rank_and_step():
    seeds = {dropout_seed(0, rank, step) for rank in range(4) for step in range(100)}
    assert len(seeds) == 400
    assert dropout_seed(3, 1, 7) == dropout_seed(3, 1, 7)


def test_top_k_and_batch_size_must_be_positive(capsys):
    for argv in (["predict", "w", "x.png", "--top-k", "0"], ["predict", "w", "x.png", "--top-k", "-1"],
                 ["evaluate", "w", "--batch-size", "0"], ["evaluate", "w", "--batch-size", "-5"],
                 ["train", "--dataset", "mnist", "--train-subset", "0"],  # 0 trained on all of them, silently
                 ["reproduce", "table4", "--train-subset", "0", "--dry-run"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "expected a positive integer" in capsys.readouterr().err


def test_empty_path_flags_are_refused(capsys):
    """An empty path (an unset shell variable) is not the current folder, nor "not given": `--init-from ""` had
    trained from scratch and `--out ""` had used the default folder, silently."""
    for argv in (["train", "--resume", ""], ["train", "--dataset", "mnist", "--init-from", "", "--dry-run"],
                 ["train", "--dataset", "mnist", "--out", " ", "--dry-run"], ["export", "w", "--out", ""],
                 ["visualize", "w", "--out", ""], ["predict", "w", "x.png", "--output", ""],
                 ["evaluate", "w", "--data-file", ""], ["import-caffe", "m.caffemodel", "--out", ""],
                 # the positional ones: `nin predict W ""` had scored every image under the current folder
                 ["predict", "paper-mnist", ""], ["predict", "", "x.png"], ["evaluate", ""], ["visualize", " "],
                 ["export", ""], ["serve", ""], ["reproduce", "record", "", "--name", "x"],
                 ["import-caffe", "", "--arch", "nin_cifar10_caffe", "--out", "w.safetensors"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
        assert "an empty path" in capsys.readouterr().err, argv


@pytest.mark.parametrize("raised", ["safetensors", "os"])
def test_disk_full_while_checkpointing_keeps_the_old_checkpoint(data_root, tmp_path, capsys, monkeypatch, raised):
    """A full disk as safetensors reports it, or as the OS does (from the write, its fsync or its rename)."""
    import errno

    from safetensors import SafetensorError

    import nin.checkpoint

    out = tmp_path / "full-disk"
    real = nin.checkpoint.save_file
    calls = {"n": 0}

    def save_file(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2 and raised == "os":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        if calls["n"] == 2:  # the second checkpoint: as safetensors reports a full disk
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                  "\"No space left on device\" })")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(nin.checkpoint, "save_file", save_file)
    assert main(["train", "--dataset", "mnist", "--train-subset", "128", "--set", "eval_subset=100", "--batch-size",
                 "32", "--epochs", "2", "--checkpoint-every", "2", "--out", str(out), "--device", "cpu"]) == 1
    _one_line(capsys, "checkpoint.safetensors", "No space left", f"--resume {out}")
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["nin"])["step"] == 2  # the first checkpoint survived
    assert not list(out.glob(".checkpoint.safetensors.*.tmp"))


def test_weights_with_nan_are_refused_in_one_line(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    weights = Path(__file__).resolve().parents[1] / "weights" / "fast-mnist.safetensors"
    tensors = load_file(str(weights))
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    key = next(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    assert main(["evaluate", str(bad)]) == 1
    _one_line(capsys, str(bad), key, "NaN")


def test_resume_finds_moved_data_by_data_dir_and_refuses_other_data(data_root, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.delenv("NIN_DATA")  # set by conftest; a set $NIN_DATA would be where the data moved

    moved = tmp_path / "data"
    shutil.copytree(data_root / "mnist", moved / "mnist")
    out = tmp_path / "moving"
    args = ["train", "--dataset", "mnist", "--train-subset", "128", "--set", "eval_subset=100", "--batch-size", "32",
            "--epochs", "1", "--data-dir", str(moved), "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    shutil.move(str(moved), str(tmp_path / "elsewhere"))
    assert main(["train", "--resume", str(out), "--epochs", "2", "--device", "cpu"]) == 1  # the data is gone
    capsys.readouterr()
    before = _digests(out)
    other = tmp_path / "other"
    shutil.copytree(data_root / "fashion-mnist", other / "mnist")  # the same format, other images
    assert main(["train", "--resume", str(out), "--epochs", "2", "--data-dir", str(other), "--device", "cpu"]) == 1
    _one_line(capsys, "not the ones this run trained on")
    assert _digests(out) == before
    assert main(["train", "--resume", str(out), "--epochs", "2", "--data-dir", str(tmp_path / "elsewhere"),
                 "--device", "cpu"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_a_run_trained_through_nin_data_finds_its_data_from_any_shell(data_root, tmp_path, capsys, monkeypatch):
    """$NIN_DATA is recorded like --data-dir; when the recorded folder is gone, a set $NIN_DATA is where the data
    moved (checked by its sha256), and the resumed run records the new place for shells without $NIN_DATA."""
    import shutil

    shutil.copytree(data_root / "mnist", tmp_path / "d1" / "mnist")
    out = tmp_path / "run"
    monkeypatch.setenv("NIN_DATA", str(tmp_path / "d1"))
    assert main(["train", "--dataset", "mnist", "--train-subset", "128", "--set", "eval_subset=100", "--batch-size",
                 "32", "--epochs", "1", "--out", str(out), "--device", "cpu"]) == 0
    shutil.move(str(tmp_path / "d1"), str(tmp_path / "d2"))
    monkeypatch.setenv("NIN_DATA", str(tmp_path / "d2"))
    assert main(["train", "--resume", str(out), "--epochs", "2", "--device", "cpu"]) == 0
    monkeypatch.delenv("NIN_DATA")  # another shell
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 10000  # every MNIST test image, read from d2
    (tmp_path / "cache").mkdir()
    shutil.move(str(tmp_path / "d2"), str(tmp_path / "cache" / "nin"))  # the recorded d2 gone, its data in the cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["train", "--resume", str(out), "--epochs", "3", "--device", "cpu"]) == 0


@pytest.mark.parametrize("case", ["meta-not-object", "classes-short", "classes-not-list", "input-size-huge",
                                  "mean-wrong-shape"])
def test_damaged_weights_metadata_is_one_line(case, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    name = "fast-cifar10" if case == "mean-wrong-shape" else "fast-mnist"  # standardize vs [0, 1] scaling
    weights = Path(__file__).resolve().parents[1] / "weights" / f"{name}.safetensors"
    tensors = load_file(str(weights))
    with safe_open(str(weights), framework="pt") as f:
        meta = json.loads(f.metadata()["nin"])
    if case == "meta-not-object":
        header = json.dumps([1, 2, 3])
    else:
        if case == "classes-short":
            meta["classes"] = ["0", "1"]
        elif case == "classes-not-list":
            meta["classes"] = 5
        elif case == "input-size-huge":
            meta["model_config"]["input_size"] = 10**9
        else:
            tensors["preprocess.mean"] = torch.zeros(7)
        header = json.dumps(meta)
    bad = tmp_path / f"{case}.safetensors"
    save_file(tensors, str(bad), metadata={"nin": header})
    assert main(["evaluate", str(bad)]) == 1
    _one_line(capsys, str(bad))


def test_metrics_csv_keeps_the_test_columns_when_the_first_epoch_is_not_evaluated(tmp_path):
    """The fast recipe scores MNIST every other epoch (CIFAR-10 every 4th): epoch 1 has no test_loss/test_error,
    and the CSV's columns were taken from that first record alone, so metrics.csv never showed the test error."""
    from nin.engine.metrics import MetricsLog

    log = MetricsLog(tmp_path, keep_epochs=0)
    log.append({"epoch": 1, "train_loss": 2.0, "eval_time_s": 0.0})
    log.append({"epoch": 2, "train_loss": 1.0, "test_loss": 0.5, "test_error": 0.125, "eval_time_s": 1.0})
    log.close()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert rows[1]["test_error"] == "0.125" and rows[1]["test_loss"] == "0.5"
    assert rows[0]["test_error"] == "" and rows[0]["train_loss"] == "2.0"
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "epoch,train_loss,test_loss,test_error,eval_time_s"  # as the records order them


def test_a_resumed_log_missing_epochs_its_checkpoint_covers_says_so(tmp_path):
    """The log is appended before the checkpoint is written, so a kill never leaves a checkpoint past the log; a
    damaged last line did, and the resume dropped that epoch from the curve without a word."""
    from nin.engine.metrics import MetricsLog
    from nin.errors import NinNote

    records = [{"epoch": e, "train_loss": 1.0 / e} for e in range(1, 6)]
    lines = [json.dumps(r) for r in records]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:1] + lines[3:4]) + "\n" + lines[4][:9])
    with pytest.warns(NinNote, match=r"has no record of epochs 2-3, 5 that the checkpoint covers"):
        log = MetricsLog(tmp_path, keep_epochs=5)
    assert [r["epoch"] for r in log.records] == [1, 4]
    log.close()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[4][:9])  # a kill's torn line after them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetricsLog(tmp_path, keep_epochs=5).close()
