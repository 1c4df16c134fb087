"""The command line: every --help, a dry run, and train -> evaluate -> predict on a tiny real run."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nin import distributed
from nin.cli import build_parser, main
from nin.engine import recipe, train
from nin.pretrained import load


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_every_subcommand_has_help(capsys):
    names = _subcommands()
    assert {"train", "evaluate", "predict", "models", "download"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: nin" in capsys.readouterr().out


def test_a_flag_prefix_is_not_taken_for_the_flag(capsys):
    """`--data-d` is not `--data-dir`, in any subcommand's parser: a prefix that names one flag today could name
    another after a new flag lands, and silently change what a user's script does."""
    for argv in (["evaluate", "fast-mnist", "--data-d", "x"], ["train", "--datas", "mnist", "--dry-run"],
                 ["reproduce", "record", "runs/x", "--name", "x", "--results-d", "r"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err, argv
    assert build_parser().parse_args(["evaluate", "fast-mnist", "--data-dir", "x"]).data_dir == "x"


def test_the_repository_scripts_take_no_flag_prefixes_either():
    """experiments/ and benchmarks/ parse their flags as `nin` does: every parser they build says allow_abbrev=False
    (checked in the source, as importing each would start torch), and one script refuses a prefix when run."""
    import ast

    repo = Path(__file__).resolve().parents[1]
    scripts = sorted([*(repo / "experiments").glob("*.py"), *(repo / "benchmarks").glob("*.py")])
    parsers = 0
    for script in scripts:
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("ArgumentParser", "add_parser"):
                parsers += 1
                assert any(k.arg == "allow_abbrev" and k.value.value is False for k in node.keywords), \
                    f"{script.name}:{node.lineno}"
    assert parsers >= len(scripts) // 2
    out = subprocess.run([sys.executable, str(repo / "experiments" / "plateau_trend.py"),
                          str(repo / "results" / "mnist-paper.json"), "--wind", "5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unrecognized arguments: --wind" in out.stderr


def test_python_dash_m_runs():
    out = subprocess.run([sys.executable, "-m", "nin", "models"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "nin_cifar10 " in out.stdout and "966,986" in out.stdout


def test_dry_run_resolves_recipe_and_overrides(capsys, tmp_path):
    # no CIFAR-100 here: the config is still printed, then the missing data in one line and exit 1
    assert main(["train", "--dataset", "cifar100", "--recipe", "paper", "--dry-run", "--out", str(tmp_path / "r"),
                 "--set", "model.dropout=0.3", "--epochs", "7", "--data-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    cfg = printed["train_config"]
    assert (cfg["model"], cfg["lr"], cfg["weight_decay"], cfg["epochs"]) == ("nin_cifar100", 0.02, 5e-4, 7)
    assert cfg["model_args"] == {"dropout": 0.3} and printed["data_files"] is None
    assert captured.err.count("\n") == 1 and "no cifar100 files found" in captured.err
    assert not (tmp_path / "r").exists()


def test_fast_recipe_trains_an_fc_head_at_full_size(capsys, tmp_path):
    """CIFAR-10's fast recipe trains its first epochs on 24 px images, which a GAP head takes and a fully connected
    head does not: for an FC model the recipe's resizing is off (said in one line); a small_size the user sets
    is refused, with the way out."""
    for model, small in (("nin_cifar10_fc", 0), ("cnn_cifar10_fc_dropout", 0), ("nin_cifar10", 24)):
        main(["train", "--dataset", "cifar10", "--model", model, "--dry-run", "--data-dir", str(tmp_path)])
        captured = capsys.readouterr()
        assert json.loads(captured.out)["train_config"]["small_size"] == small
        assert ("fully connected head takes 32×32 inputs only" in captured.err) == (small == 0)
    assert main(["train", "--dataset", "cifar10", "--model", "nin_cifar10_fc", "--dry-run", "--set",
                 "small_size=24"]) == 1
    err = capsys.readouterr().err
    assert "a 24×24 input does not fit" in err and "--set small_size=0" in err and err.count("\n") == 1


def test_the_fc_head_note_is_printed_by_rank_0_only(capsys, monkeypatch, tmp_path):
    """Under torchrun every rank plans the same config; the note about the FC head comes once, from rank 0."""
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert distributed.launch_rank() == int(rank)
        main(["train", "--dataset", "cifar10", "--model", "nin_cifar10_fc", "--dry-run", "--data-dir", str(tmp_path)])
        assert ("fully connected head takes 32×32 inputs only" in capsys.readouterr().err) == printed


def test_dry_run_finds_the_data_files_without_reading_them(capsys, tmp_path, data_root):
    assert main(["train", "--dataset", "mnist", "--dry-run", "--data-dir", str(data_root)]) == 0
    files = [Path(f) for f in json.loads(capsys.readouterr().out)["data_files"]]
    assert sorted(f.name for f in files) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                                             "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    # a copy that lacks one file: named, before any training; the run itself would have stopped on it later
    copy = tmp_path / "data"
    shutil.copytree(data_root / "cifar-10-batches-bin", copy / "cifar-10-batches-bin")
    (copy / "cifar-10-batches-bin" / "test_batch.bin").unlink()  # a run evaluated on val never reads it
    assert main(["train", "--dataset", "cifar10", "--dry-run", "--data-dir", str(copy), "--set", "eval_split=val"]) == 0
    assert len(json.loads(capsys.readouterr().out)["data_files"]) == 5
    (copy / "cifar-10-batches-bin" / "data_batch_3.bin").unlink()
    assert main(["train", "--dataset", "cifar10", "--dry-run", "--data-dir", str(copy), "--set", "eval_split=val"]) == 1
    err = capsys.readouterr().err
    assert "data_batch_3.bin: missing" in err and err.count("\n") == 1
    # the second test set of Table 1's recipe is a file the run reads too, recorded as an absolute path (a resume
    # from another folder finds it)
    assert main(["train", "--dataset", "mnist", "--dry-run", "--set", f"extra_eval={tmp_path / 'absent.bin'}"]) == 1
    assert "absent.bin: no such file" in capsys.readouterr().err
    (tmp_path / "x.bin").write_bytes(b"")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["train", "--dataset", "mnist", "--dry-run", "--set", "extra_eval=x.bin"]) == 0
    finally:
        monkeypatch.undo()
    printed = json.loads(capsys.readouterr().out)
    assert printed["train_config"]["extra_eval"] == str(tmp_path / "x.bin") == printed["data_files"][-1]


def test_a_run_recorded_with_a_relative_extra_eval_says_where_to_resume_from(tmp_path):
    from nin.engine.start import _checkpoint_config
    from nin.errors import NinError

    with pytest.raises(NinError, match="relative to the folder the run was started in"):
        _checkpoint_config(tmp_path / "checkpoint.safetensors", {}, {"train_config": {"extra_eval": "xe.bin"}})


def test_the_data_folder_from_nin_data_is_recorded_as_an_absolute_path(capsys, tmp_path, monkeypatch, data_root):
    """A run trained with $NIN_DATA (relative, as the README writes it) records where its data is, so that a
    resume or evaluate from another directory or shell finds it; without either the cache is not recorded."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(data_root / "mnist", tmp_path / "data" / "mnist")  # the dry run finds the data it names
    monkeypatch.setenv("NIN_DATA", "data")
    assert main(["train", "--dataset", "mnist", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["train_config"]["data_dir"] == str(tmp_path / "data")
    monkeypatch.delenv("NIN_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # an empty per-user cache: exit 1, config printed
    assert main(["train", "--dataset", "mnist", "--dry-run"]) == 1
    assert json.loads(capsys.readouterr().out)["train_config"]["data_dir"] is None


def test_bad_flags_give_one_line_and_exit_nonzero(capsys):
    assert main(["train", "--dataset", "mnist", "--set", "lr=abc", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--set lr" in err and "Traceback" not in err
    assert main(["train", "--dataset", "mnist", "--image-size", "64", "--dry-run"]) == 1
    assert "for image folders only" in capsys.readouterr().err
    assert main(["train", "--dataset", "mnist", "--model", "nin_foo", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "error: unknown model 'nin_foo'; choose one of: " in err and "{" not in err  # not the recipe's fields
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset", "imagenet21k"])
    assert exit_info.value.code == 2


def test_train_evaluate_predict(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = dataclasses.replace(recipe("fast", "mnist"), train_subset=1024, eval_subset=300, epochs=1, batch_size=64)
    train(cfg, run, log=lambda *_: None)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json", "--data-dir", str(data_root)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 10_000 and 0 <= result["error"] <= 1
    assert abs(result["accuracy"] + result["error"] - 1) < 1e-12
    assert len(result["confusion"]) == 10 and sum(map(sum, result["confusion"])) == 10_000
    assert main(["evaluate", str(run / "model.safetensors")]) == 0
    assert "confusion matrix" in capsys.readouterr().out

    odd = tmp_path / "odd.png"  # any size and mode: a 45×17 RGBA image
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (17, 45, 4), dtype=np.uint8), "RGBA").save(odd)
    assert main(["predict", str(run), str(odd), "--top-k", "3", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
    classes = load(run)[2]["classes"]
    assert len(classes) == 10 and {t["class"] for t in top} <= set(classes)

    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    assert main(["predict", str(run), str(not_image)]) == 1
    err = capsys.readouterr().err
    assert "notes.txt" in err and err.count("\n") == 1


def test_predict_dark_ink_on_light_paper(data_root, tmp_path, capsys):
    """Real MNIST test digits as a user would photograph them (dark ink on white or grey paper, larger, RGB, one
    with a dark scanner edge): the shipped MNIST weights say so after the listing and, with --invert, read them
    right; digits already light on black get the opposite advice."""
    from nin.data import load_dataset

    test = load_dataset("mnist", "test", data_root)
    digits = test.images[:4, 0].numpy().astype(np.float64) / 255  # ink amount, 0..1
    paper = []
    for i, (level, ink) in enumerate([(255, 0), (200, 20), (230, 40), (255, 0)]):
        pixels = np.round(level + (ink - level) * digits[i])
        if i == 3:
            pixels[:, :2] = 0  # a dark edge down one side
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(pixels.astype(np.uint8)).resize((112, 112)).convert("RGB").save(path)
        paper.append(str(path))
    weights = str(Path(__file__).parents[1] / "weights" / "fast-mnist.safetensors")
    assert main(["predict", weights, *paper]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "4 of 4 images (first: " in captured.err
    assert "look dark on a light background; mnist weights" in captured.err
    assert "score them with --invert" in captured.err
    assert main(["predict", weights, *paper, "--json", "--invert"]) == 0
    captured = capsys.readouterr()
    predicted = [int(p["top"][0]["class"]) for p in json.loads(captured.out)["predictions"]]
    assert predicted == test.labels[:4].tolist() and captured.err == ""
    assert main(["predict", weights, paper[1], "--invert", "--backend", "torch-fp32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["top"][0]["class"] == str(int(test.labels[1]))

    mnist_like = tmp_path / "mnist_like.png"
    Image.fromarray(test.images[0, 0].numpy()).save(mnist_like)
    assert main(["predict", weights, str(mnist_like), "--invert"]) == 0
    err = capsys.readouterr().err
    assert err == (f"nin predict: {mnist_like} looks light on a dark background already, as mnist weights expect; "
                   f"--invert made it dark on light: score it without --invert\n")
    assert main(["predict", "fast-cifar10", *paper]) == 0 and capsys.readouterr().err == ""  # CIFAR-10: no advice
    assert main(["predict", "fast-cifar10", paper[0], "--invert"]) == 0
    assert "these are cifar10 weights, so the images were scored as negatives" in capsys.readouterr().err


def test_predict_output_is_checked_before_scoring(tmp_path, capsys, monkeypatch):
    import nin.tools.predict

    def refuse(*_):
        raise AssertionError("an image was read before --output was checked")

    monkeypatch.setattr(nin.tools.predict, "read_image", refuse)
    (tmp_path / "taken.csv").write_text("mine")
    for output in ("preds.txt", "taken.csv"):
        assert main(["predict", "fast-mnist", str(tmp_path / "x.png"), "--output", str(tmp_path / output)]) == 1
        assert output in capsys.readouterr().err
    assert (tmp_path / "taken.csv").read_text() == "mine"


def test_resume_refuses_flags_that_would_change_the_run(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = dataclasses.replace(recipe("fast", "mnist"), train_subset=256, eval_subset=100, epochs=1, batch_size=64)
    train(cfg, run, log=lambda *_: None)
    before = (run / "metrics.jsonl").read_text()
    for flags in (["--set", "lr=1"], ["--seed", "3"], ["--dataset", "cifar10"], ["--batch-size", "32"],
                  ["--recipe", "paper"], ["--recipe", "fast"]):  # even the default, typed: it was ignored
        assert main(["train", "--resume", str(run), *flags]) == 1, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flags[0].split("=")[0] in err, err
    assert (run / "metrics.jsonl").read_text() == before  # nothing ran, nothing lost

    # what may change: more epochs, how often to checkpoint
    assert main(["train", "--resume", str(run), "--epochs", "2", "--checkpoint-every", "2", "--device", "cpu"]) == 0
    saved = json.loads((run / "config.json").read_text())["train_config"]
    assert saved["checkpoint_every"] == 2 and saved["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert main(["train", "--resume", str(run), "--checkpoint-every", "-1"]) == 1
    assert "checkpoint_every" in capsys.readouterr().err


@pytest.mark.parametrize("dataset, noted", [("mnist", True), ("folder", False)])
def test_the_val_split_note_is_for_named_data_sets_only(capsys, monkeypatch, dataset, noted):
    """A named data set's val split is part of its training images; an image folder's val/ (or held-out part) is not."""
    import nin.evaluate
    from nin.evaluate import EvalResult

    result = EvalResult(confusion=torch.eye(2, dtype=torch.int64), loss=0.1)
    monkeypatch.setattr(nin.evaluate, "evaluate_weights", lambda *args, **kwargs: (result, dataset, ["a", "b"]))
    assert main(["evaluate", "paper-mnist", "--split", "val", "--json"]) == 0
    assert ("is made of training images" in capsys.readouterr().err) == noted
