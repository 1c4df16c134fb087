"""Reliability: no fault or bad input loses work, runs code it should not, or fails without a clear message.

docs/reliability.md lists every fault and bad input tried here (and in the other test files), with its outcome.

* fault injection: SIGKILL a real `nin train` at random moments (startup, mid-step, mid-checkpoint-write),
  resume each time: the final weights equal an uninterrupted run's bit for bit and no checkpoint is ever torn;
  SIGKILL the atomic writer itself mid-write;
* bad input through `nin.cli.main`: one line naming what and where, exit 1, no traceback, files untouched;
* security: no unpickling outside the restricted unpickler, no `torch.load` without weights_only=True;
* property tests: preprocessing on random small batches, readers and checkpoints on random corrupt bytes.

Set NIN_FAULT_SEED to replay the kill moments of a failing run (the seed is in every assertion message).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open

import nin
from nin.checkpoint import load_state, load_weights, save_state, save_weights
from nin.cli import main
from nin.data import DataError
from nin.data.images import read_image
from nin.data.readers import read_cifar_binary, read_idx, read_pickle_dict
from nin.errors import CheckpointError
from nin.models import get_model
from nin.pretrained import load
from nin.transforms import Preprocessing, fit_preprocessing

from guards import no_hang

SRC = Path(nin.__file__).resolve().parent
FAULT_SEED = int(os.environ.get("NIN_FAULT_SEED", random.SystemRandom().randrange(2**31)))
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_args(out: Path) -> list[str]:
    """A 16-step MNIST run (8 steps of 32 images per epoch, 2 epochs) checkpointing every 2 steps."""
    return [sys.executable, "-m", "nin", "train", "--dataset", "mnist", "--recipe", "fast", "--train-subset", "256",
            "--set", "eval_subset=200", "--batch-size", "32", "--epochs", "2", "--checkpoint-every", "2",
            "--device", "cpu", "--out", str(out)]


def _resume_args(out: Path) -> list[str]:
    return [sys.executable, "-m", "nin", "train", "--resume", str(out), "--device", "cpu"]


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as stream:
        return subprocess.Popen(args, stdout=stream, stderr=subprocess.STDOUT, env=CHILD_ENV)


def _checkpoint_step(path: Path) -> int:
    """The step recorded in a checkpoint's header, or -1 while there is none (reads only the header)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["nin"])["step"]
    except Exception:  # absent, or (never expected) unreadable: the caller checks with load_state
        return -1


def _temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".checkpoint.safetensors.*.tmp"))


def _one_line_error(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nin {command}: error: "), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def _strip_times(line: str) -> dict:
    return {k: v for k, v in json.loads(line).items() if "time" not in k and "per_s" not in k}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data_root):
    """An uninterrupted run, started in the background as soon as a test asks for it; call it to wait."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    log = out.parent / "log.txt"
    process = _spawn(_train_args(out), log)

    def finished() -> Path:
        assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
        return out

    yield finished
    if process.poll() is None:
        process.kill()
        process.wait()


# ---- fault injection: SIGKILL a training run at random moments ------------------------------------------------


def test_sigkill_at_random_moments_then_resume_is_bit_identical(baseline, tmp_path, capsys):
    rng = random.Random(FAULT_SEED)
    out, log = tmp_path / "run", tmp_path / "log.txt"
    checkpoint = out / "checkpoint.safetensors"
    note = f"NIN_FAULT_SEED={FAULT_SEED}"

    def wait_for(condition, process, limit=240.0):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and process.poll() is None:
            if condition():
                return True
            time.sleep(0.002)
        return False

    # Each stage starts the run (fresh while there is no checkpoint, else --resume), then SIGKILLs it. (A kill
    # before the first checkpoint leaves nothing to resume: see the --resume cases below.)
    stages = [
        ("mid-step", lambda p: wait_for(lambda: _checkpoint_step(checkpoint) >= 2, p) and (time.sleep(rng.uniform(0, 0.4)) or True)),
        ("mid-checkpoint-write", lambda p: wait_for(lambda: bool(_temp_files(out)) or _checkpoint_step(checkpoint) >= 10, p)),
        ("mid-step, epoch 2", lambda p: wait_for(lambda: _checkpoint_step(checkpoint) >= 12, p) and (time.sleep(rng.uniform(0, 0.3)) or True)),
    ]
    history = []
    for name, trigger in stages:
        resuming = checkpoint.is_file()
        process = _spawn(_resume_args(out) if resuming else _train_args(out), log)
        trigger(process)
        alive = process.poll() is None
        process.send_signal(signal.SIGKILL) if alive else None
        process.wait()
        history.append((name, alive, _checkpoint_step(checkpoint), len(_temp_files(out))))
        if checkpoint.is_file():
            tensors, meta = load_state(checkpoint)  # never torn: the old or the new version, complete
            assert meta["kind"] == "checkpoint" and any(k.startswith("model.") for k in tensors), (note, history)
        else:  # killed before the first checkpoint: --resume says so in one line, the plain command starts over
            assert main(["train", "--resume", str(out)]) == 1
            _one_line_error(capsys, "train", "no checkpoint.safetensors")
        if name == "mid-step, epoch 2" and (out / "metrics.jsonl").is_file():
            with open(out / "metrics.jsonl", "a") as f:  # as if killed while appending a metrics line
                f.write('{"epoch": 2, "step": 16, "train_lo')
    process = _spawn(_resume_args(out) if checkpoint.is_file() else _train_args(out), log)
    assert process.wait(timeout=300) == 0, (note, history, log.read_text()[-3000:])

    full = baseline()
    a, a_meta = load_state(full / "checkpoint.safetensors")
    b, b_meta = load_state(checkpoint)
    weights = [k for k in a if k.startswith("model.")]
    assert weights and sorted(weights) == sorted(k for k in b if k.startswith("model."))
    assert all(torch.equal(a[k], b[k]) for k in weights), (note, history)
    assert (a_meta["step"], b_meta["step"]) == (16, 16)
    final_a, _ = load_state(full / "model.safetensors")
    final_b, _ = load_state(out / "model.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a), (note, history)
    metrics = lambda run: [_strip_times(l) for l in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert metrics(full) == metrics(out), (note, history)
    # leftover temp files of a killed write are never taken for the checkpoint
    load(out)
    assert all(p.name.endswith(".tmp") and p.name.startswith(".") for p in _temp_files(out))


WRITER = textwrap.dedent("""
    import sys, torch
    from nin.checkpoint import save_state
    path, first = sys.argv[1], int(sys.argv[2])
    for i in range(first, first + 10**6):
        print(i, flush=True)
        save_state(path, {"big": torch.full((8_000_000,), float(i)), "small": torch.tensor([i])}, {"version": i})
""")


def test_sigkill_mid_atomic_write_leaves_old_or_new_file(tmp_path, capsys):
    rng = random.Random(FAULT_SEED + 1)
    run = tmp_path / "run"
    target = run / "checkpoint.safetensors"
    torn_temps = 0
    versions = []
    for attempt in range(3):  # versions grow across attempts: attempt k writes k*10**6 + 1, + 2, ...
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(attempt * 10**6 + 1)],
                                   stdout=subprocess.PIPE, env=CHILD_ENV, text=True)
        for _ in range(rng.randint(2, 4)):  # let a few writes complete, then kill inside the next one
            started = process.stdout.readline()
            assert started, "the writer died"
        deadline = time.monotonic() + 5
        while not list(run.glob(".checkpoint.safetensors.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.0005)  # the temp file exists from mkstemp to os.replace: the write is under way
        time.sleep(rng.uniform(0.0, 0.004))
        process.kill()
        process.wait()
        process.stdout.close()
        tensors, meta = load_state(target)  # the previous or the new version, never a mix or a torn file
        version = meta["version"]
        assert int(tensors["small"]) == version and bool((tensors["big"] == version).all()), FAULT_SEED
        versions.append(version)
        temps = list(run.glob(".checkpoint.safetensors.*.tmp"))
        torn_temps += len(temps)
        for temp in temps:  # a temp file is torn (refused) or a complete newer version, never the checkpoint
            try:
                _, temp_meta = load_state(temp)
                assert temp_meta["version"] > version
            except CheckpointError:
                pass
    assert torn_temps >= 1, f"no kill landed inside a write ({FAULT_SEED})"
    # the killed writes' leftovers are not mistaken for a checkpoint: a folder with only them has none
    only_temps = tmp_path / "only-temps"
    only_temps.mkdir()
    (only_temps / ".checkpoint.safetensors.abc123.tmp").write_bytes(target.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="without model.safetensors or checkpoint.safetensors"):
        load(only_temps)
    assert main(["train", "--resume", str(only_temps)]) == 1
    _one_line_error(capsys, "train", "no checkpoint.safetensors")


# ---- bad input: one line, exit 1, no traceback, nothing touched ----------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """An untrained nin_mnist weights file (evaluate / predict only need a well-formed one)."""
    path = tmp_path_factory.mktemp("weights") / "mnist.safetensors"
    torch.manual_seed(0)
    preprocessing = fit_preprocessing("scale", torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    save_weights(path, get_model("nin_mnist"), preprocessing, {"dataset": "mnist", "classes": [str(i) for i in range(10)]})
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8), "L").save(path)
    return path


@pytest.mark.parametrize("assignment, needle", [
    ("epochs=1.5", "--set epochs: expected an integer"),
    ("model.num_classes=abc", "--set model.num_classes"),
    ("milestones=10,x", "--set milestones: expected a number"),
    ("lr=inf", "--set lr: expected a finite number"),
    ("augment=perhaps", "--set augment: expected true or false"),
    ("=3", "unknown field ''"),
    ("model.blocks=1", "unknown model field 'blocks'"),
    ("model_args={}", "unknown field 'model_args'"),
    ("dataset=imagenet", "unknown dataset 'imagenet'"),
    ("model=nin_foo", "unknown model 'nin_foo'"),
    ("model.init=weird", "init must be"),
    ("schedule=cosine", "schedule must be"),
    ("train_split=bogus", "train_split"),
    ("eval_split=bogus", "eval_split"),
    ("preprocessing=whiten", "preprocessing"),
])
def test_malformed_set_values(capsys, tmp_path, assignment, needle):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--set", assignment, "--out", str(out)]) == 1
    _one_line_error(capsys, "train", needle)
    assert not out.exists()  # refused before the run folder is made


def test_unknown_dataset_and_split_for_evaluate(capsys, weights):
    before = _digest([weights])
    assert main(["evaluate", str(weights), "--dataset", "imagenet"]) == 1
    _one_line_error(capsys, "evaluate", "imagenet")
    assert main(["evaluate", str(weights), "--split", "holdout"]) == 1
    _one_line_error(capsys, "evaluate", "holdout")
    assert _digest([weights]) == before


def test_evaluate_on_a_dataset_of_other_image_shape(capsys, weights, data_root):
    assert main(["evaluate", str(weights), "--dataset", "cifar10", "--data-dir", str(data_root)]) == 1
    _one_line_error(capsys, "evaluate", "1×28×28", "cifar10")


def _rewrite(source: Path, target: Path, tensors=None, **meta_changes) -> Path:
    saved, meta = load_state(source)
    meta = {k: v for k, v in meta.items() if k != "format"}
    meta.update(meta_changes)
    save_state(target, saved if tensors is None else tensors, meta)
    return target


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_weights_of_another_model_or_config(capsys, tmp_path, weights, image, command):
    extra = [str(image)] if command == "predict" else []
    cifar = get_model("nin_cifar10").config.to_dict()
    no_bn = {**load_state(weights)[1]["model_config"]}
    cases = {
        "other-model.safetensors": dict(model_config=cifar),  # tensors of nin_mnist, config of nin_cifar10
        "unknown-field.safetensors": dict(model_config={**no_bn, "width": 3}),
        "not-a-dict.safetensors": dict(model_config="nin_mnist"),
        "no-config.safetensors": dict(model_config=None),
        "bad-preprocessing.safetensors": dict(preprocessing="whiten"),
        "missing-preprocess-state.safetensors": dict(preprocessing="standardize"),
    }
    for name, changes in cases.items():
        path = _rewrite(weights, tmp_path / name, **changes)
        before = _digest([path])
        assert main([command, str(path), *extra]) == 1, name
        _one_line_error(capsys, command, str(path))
        assert _digest([path]) == before
    missing = {k: v for k, v in load_state(weights)[0].items() if k != "model.blocks.0.convs.0.weight"}
    path = _rewrite(weights, tmp_path / "missing-tensor.safetensors", tensors=missing)
    assert main([command, str(path), *extra]) == 1
    _one_line_error(capsys, command, str(path), "does not match")
    tensors, meta = load_state(weights)
    for key in ("model_config", "preprocessing"):  # a safetensors file nin did not write: says what it lacks
        path = tmp_path / f"no-{key}.safetensors"
        save_state(path, tensors, {k: v for k, v in meta.items() if k not in ("format", key)})
        assert main([command, str(path), *extra]) == 1
        _one_line_error(capsys, command, str(path), f"its metadata has no {key}; expected a weights file written by nin")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _damaged_files(weights: Path, folder: Path) -> dict[str, Path]:
    data = weights.read_bytes()
    header = int.from_bytes(data[:8], "little")
    files = {
        "truncated-header": data[:100],
        "truncated-tensors": data[: len(data) - 1000],
        "empty": b"",
        "random-bytes": np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "bad-json-header": data[:8] + b"{" * header + data[8 + header:],
        "text": b"hello, not weights\n",
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.safetensors" for name in files}
    for name, content in files.items():
        paths[name].write_bytes(content)
    return paths


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_corrupted_or_truncated_weights(capsys, tmp_path, weights, image, command):
    extra = [str(image)] if command == "predict" else []
    for name, path in _damaged_files(weights, tmp_path).items():
        before = _digest([path])
        assert main([command, str(path), *extra]) == 1, name
        _one_line_error(capsys, command, str(path))
        assert _digest([path]) == before
    run = tmp_path / "run"  # a run folder whose model.safetensors is damaged: reported, not skipped silently
    run.mkdir()
    (run / "model.safetensors").write_bytes(weights.read_bytes()[:-7])
    assert main([command, str(run), *extra]) == 1
    _one_line_error(capsys, command, "model.safetensors")


def test_an_exported_model_given_as_weights_says_what_to_pass_instead(capsys, tmp_path, weights, image):
    """`nin predict model.onnx img.png` (or a .pt / .xml export, or the authors' .caffemodel) said only `header too
    large`: now one line that names the file, says what it is, and what the command takes."""
    pytest.importorskip("onnx")
    exported = tmp_path / "mnist.onnx"
    assert main(["export", str(weights), "--out", str(exported)]) == 0
    capsys.readouterr()
    assert main(["predict", str(exported), str(image)]) == 1
    _one_line_error(capsys, "predict", str(exported), "an exported model", "--backend onnxruntime")
    assert main(["evaluate", str(exported)]) == 1
    _one_line_error(capsys, "evaluate", str(exported), "an exported model")
    caffe = tmp_path / "cifar10_nin.caffemodel"
    caffe.write_bytes(b"\n\x0bCIFAR10_fullsome protobuf bytes")
    assert main(["predict", str(caffe), str(image)]) == 1
    _one_line_error(capsys, "predict", str(caffe), "nin import-caffe")


def test_pickle_or_torch_save_as_weights_is_refused_and_not_run(capsys, tmp_path, image):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"model": _Evil(marker)}))
    saved = tmp_path / "torch-save.safetensors"
    torch.save({"model.x": torch.zeros(3), "evil": _Evil(marker)}, saved)
    for path in (evil, saved):
        assert main(["evaluate", str(path)]) == 1
        _one_line_error(capsys, "evaluate", str(path), "not a readable safetensors file")
        assert main(["predict", str(path), str(image)]) == 1
        _one_line_error(capsys, "predict", str(path))
        run = tmp_path / f"run-{path.stem}"
        run.mkdir()
        shutil.copy(path, run / "checkpoint.safetensors")
        assert main(["train", "--resume", str(run), "--device", "cpu"]) == 1
        _one_line_error(capsys, "train", "checkpoint.safetensors")
    assert not marker.exists()


def test_resume_damaged_or_foreign_checkpoints(capsys, tmp_path, baseline, weights):
    full = baseline()
    checkpoint = full / "checkpoint.safetensors"
    _, meta = load_state(checkpoint)
    train_config = meta["train_config"]
    cases = {
        **{name: path for name, path in _damaged_files(checkpoint, tmp_path / "damaged").items()},
        "weights-file": weights,
        "other-model": _rewrite(checkpoint, tmp_path / "x" / "other-model", model_config=None,
                                train_config={**train_config, "model": "nin_cifar10", "model_args": {}}),
        "other-config": _rewrite(checkpoint, tmp_path / "x" / "other-config",
                                 train_config={**train_config, "model_args": {"batch_norm": False}}),
        "unknown-field": _rewrite(checkpoint, tmp_path / "x" / "unknown-field", train_config={**train_config, "wd": 1}),
        "no-train-config": _rewrite(checkpoint, tmp_path / "x" / "no-train-config", train_config=None),
        "no-position": _rewrite(checkpoint, tmp_path / "x" / "no-position", step=None),
        # a momentum buffer lost, or cut short (copy_ would broadcast a 1-element one over its parameter)
        **{name: _rewrite(checkpoint, tmp_path / "x" / name, tensors=change(dict(load_state(checkpoint)[0])))
           for name, change in (("no-momentum-buffer", lambda t: {k: v for k, v in t.items() if k != "optim.0.1"}),
                                ("short-momentum-buffer", lambda t: {**t, "optim.0.1": t["optim.0.1"].flatten()[:1]}))},
    }
    for name, source in cases.items():
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        shutil.copy(source, run / "checkpoint.safetensors")
        before = _digest([run / "checkpoint.safetensors"])
        assert main(["train", "--resume", str(run), "--device", "cpu"]) == 1, name
        _one_line_error(capsys, "train", str(run / "checkpoint.safetensors"))
        assert _digest([run / "checkpoint.safetensors"]) == before, name
        assert sorted(p.name for p in run.iterdir()) == ["checkpoint.safetensors"], name  # nothing written
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 1
    _one_line_error(capsys, "train", "no such folder, expected a run folder")
    assert main(["train", "--resume", str(cases[next(iter(cases))])]) == 1  # a file, not its folder
    _one_line_error(capsys, "train", "a file, expected a run folder")
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 1
    _one_line_error(capsys, "train", "no checkpoint.safetensors")


def test_predict_non_images(capsys, tmp_path, weights, image):
    png = image.read_bytes()
    files = {
        "notes.jpg": b"just text",
        "empty.png": b"",
        "header-only.png": png[:8],
        "truncated.png": png[: len(png) // 2],
        "noise.png": b"\x89PNG\r\n\x1a\n" + np.random.default_rng(2).integers(0, 256, 300, dtype=np.uint8).tobytes(),
        "weights.png": weights.read_bytes()[:4096],
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    before = _digest([weights, *(tmp_path / n for n in files)])
    for name in files:
        assert main(["predict", str(weights), str(image), str(tmp_path / name)]) == 1, name
        _one_line_error(capsys, "predict", name)
    assert main(["predict", str(weights), str(tmp_path / "absent.png")]) == 1
    _one_line_error(capsys, "predict", "absent.png", "not found")
    assert main(["predict", str(weights), str(tmp_path)]) == 1  # a folder where an image belongs
    _one_line_error(capsys, "predict", str(tmp_path))
    assert _digest([weights, *(tmp_path / n for n in files)]) == before

    # --skip-bad: the good image is scored and written, every bad one named on stderr
    out = tmp_path / "out" / "preds.csv"
    out.parent.mkdir()
    assert main(["predict", str(weights), str(image), str(tmp_path), "--skip-bad", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert [line.split(",")[0] for line in out.read_text().splitlines()[1:]] == [str(image)]
    skipped = [line for line in captured.err.splitlines() if line.startswith("nin predict: skipped ")]
    assert len(skipped) == len(files) and all(any(name in line for line in skipped) for name in files)
    assert f"1 image -> {out} ({len(files)} skipped, named above)" in captured.out
    out.unlink()
    assert main(["predict", str(weights), str(tmp_path), "--skip-bad", "--output", str(out)]) == 1  # none readable
    assert "no image could be read" in capsys.readouterr().err and not out.exists()
    # a folder without images and a glob matching nothing: named and skipped too
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("text")
    assert main(["predict", str(weights), str(tmp_path / "texts"), str(tmp_path / "*.webp"), str(image),
                 "--skip-bad", "--json"]) == 0
    captured = capsys.readouterr()
    assert [row["image"] for row in json.loads(captured.out)["predictions"]] == [str(image)]
    assert "texts: a folder without images" in captured.err and "*.webp: no file matches" in captured.err
    (tmp_path / "texts" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a link inside a folder: named too
    assert main(["predict", str(weights), str(tmp_path / "texts"), str(image), "--skip-bad", "--json"]) == 0
    assert "gone.png: a broken symbolic link" in capsys.readouterr().err


def test_unwritable_or_full_output_folder(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    for out in (blocker / "run", blocker):
        assert main(["train", "--dataset", "mnist", "--epochs", "1", "--out", str(out), "--device", "cpu"]) == 1
        _one_line_error(capsys, "train", str(out))
    assert blocker.read_text() == "keep me"

    import shutil as shutil_module

    real = shutil_module.disk_usage
    monkeypatch.setattr("nin.engine.run_folder.shutil.disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    monkeypatch.setattr("nin.engine.start._prepare_data", lambda *a, **k: pytest.fail("read data before checking the folder"))
    out = tmp_path / "full"
    assert main(["train", "--dataset", "mnist", "--epochs", "1", "--out", str(out), "--device", "cpu"]) == 1
    _one_line_error(capsys, "train", str(out), "MiB free")
    assert not (out / "checkpoint.safetensors").exists() and not (out / "config.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
@pytest.mark.parametrize("device", ["tpu", "cuda", "cuda:1", "gpu0"])
def test_bad_device(capsys, tmp_path, weights, image, device):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--out", str(out), "--device", device]) == 1
    _one_line_error(capsys, "train", "--device", device)
    assert not (out / "checkpoint.safetensors").exists()
    assert main(["evaluate", str(weights), "--device", device]) == 1
    _one_line_error(capsys, "evaluate", "--device")
    assert main(["predict", str(weights), str(image), "--device", device]) == 1
    _one_line_error(capsys, "predict", "--device")


def test_debug_shows_the_traceback(weights):
    with pytest.raises(CheckpointError):
        main(["--debug", "evaluate", str(weights.parent / "absent.safetensors")])


# ---- security: nothing unpickles, nothing runs code from a file --------------------------------------------


def _calls(text: str, name: str) -> list[str]:
    """Each call `name(...)` in source text, with its balanced argument list."""
    calls = []
    for match in re.finditer(re.escape(name) + r"\s*\(", text):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        calls.append(text[match.start(): end + 1])
    return calls


def test_source_never_unpickles_outside_the_restricted_unpickler():
    sources = {path.relative_to(SRC).as_posix(): path.read_text() for path in SRC.rglob("*.py")}
    assert "checkpoint.py" in sources and "data/pickles.py" in sources
    problems = []
    for name, text in sources.items():
        for call in _calls(text, "torch.load"):
            if not re.search(r"weights_only\s*=\s*True", call):
                problems.append(f"{name}: {call}")
        for pattern in (r"pickle\.loads?\s*\(", r"\b(?:np|numpy)\.load\s*\([^)]*allow_pickle\s*=\s*True",
                        r"\byaml\.load\s*\(", r"\bmarshal\.loads?\s*\(", r"\bjoblib\.load\s*\(", r"\bdill\."):
            problems += [f"{name}: {m.group(0)}" for m in re.finditer(pattern, text)]
        for match in re.finditer(r"class\s+(\w+)\s*\(\s*pickle\.Unpickler\s*\)", text):
            if (name, match.group(1)) != ("data/pickles.py", "_RestrictedUnpickler"):
                problems.append(f"{name}: unpickler {match.group(1)}")
        for match in re.finditer(r"pickle\.Unpickler\s*\(", text):
            problems.append(f"{name}: plain {match.group(0)}")
    assert not problems, problems
    unpickler = sources["data/pickles.py"]
    assert "def find_class" in unpickler and "refused to unpickle" in unpickler  # the allow-list is in force


def test_restricted_unpickler_refuses_every_global_outside_the_list(tmp_path):
    for payload in (_Evil(tmp_path / "pwned"), dataclasses, print, {b"data": eval}):
        path = tmp_path / "batch"
        try:
            path.write_bytes(pickle.dumps(payload, protocol=2))
        except (pickle.PicklingError, TypeError):
            continue
        with pytest.raises(DataError, match="refused to unpickle|not a readable pickle|expected a dict"):
            read_pickle_dict(path)
    assert not (tmp_path / "pwned").exists()


# ---- property tests ------------------------------------------------------------------------------------------



@st.composite
def _uint8_batches(draw):
    count, channels, size = draw(st.integers(1, 6)), draw(st.sampled_from([1, 3])), draw(st.integers(1, 6))
    shape = (count, channels, size, size)
    style = draw(st.sampled_from(["random", "constant", "two-values"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if style == "constant":
        array = np.full(shape, draw(st.integers(0, 255)), dtype=np.uint8)
    elif style == "two-values":
        array = rng.choice(np.array([0, 255], dtype=np.uint8), size=shape)
    else:
        array = rng.integers(0, 256, shape, dtype=np.uint8)
    return torch.from_numpy(array)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["scale", "standardize", "gcn_zca", "gcn_lcn"]), train=_uint8_batches(),
       seed=st.integers(0, 2**16))
def test_preprocessing_finite_and_state_round_trip(kind, train, seed):
    fitted = fit_preprocessing(kind, train)
    test = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, *train.shape[1:]), dtype=np.uint8))
    for images in (train, test):  # the training batch itself, and unseen images of the same shape
        out = fitted(images)
        assert out.shape == images.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all(), (kind, images.unique())
    state = fitted.state_dict()
    assert all(isinstance(v, torch.Tensor) and torch.isfinite(v).all() for v in state.values())
    rebuilt = Preprocessing(kind, {k: v.clone() for k, v in state.items()})
    assert torch.equal(rebuilt(test), fitted(test)) and torch.equal(rebuilt(train), fitted(train))


_HEADERS = [b"", b"\x00\x00\x08\x03", b"\x00\x00\x08\x01", b"\x80\x02}q\x00", b"\x89PNG\r\n\x1a\n", b"GIF89a",
            b"\xff\xd8\xff\xe0", b"BM", b"\x1f\x8b\x08\x00"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.sampled_from(_HEADERS), body=st.binary(max_size=400), gz=st.booleans())
def test_readers_on_random_bytes_raise_data_error_only(tmp_path_factory, header, body, gz):
    folder = tmp_path_factory.mktemp("junk")
    data = header + body
    name = "junk.gz" if gz else "junk"
    (folder / name).write_bytes(gzip.compress(data) if gz and body[:1] != b"x" else data)
    path = folder / name
    readers = [lambda: read_idx(path, 2051), lambda: read_idx(path, 2049), lambda: read_cifar_binary(path, 10),
               lambda: read_pickle_dict(path), lambda: read_image(path, 8, 3)]
    with no_hang():
        for read in readers:
            try:
                read()
            except DataError as error:
                assert "\n" not in str(error) and str(path) in str(error)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       truncate=st.booleans())
def test_damaged_checkpoint_bytes_give_checkpoint_error_or_load(tmp_path_factory, weights, cuts, truncate):
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for position, value in cuts:  # damage the length field and the JSON header, where structure lives
        data[position % header] = value
    if truncate:
        data = data[: cuts[0][0] % len(data)]
    path = tmp_path_factory.mktemp("damaged") / "w.safetensors"
    path.write_bytes(bytes(data))
    with no_hang():
        try:
            load_weights(path)
        except CheckpointError as error:
            assert "\n" not in str(error) and str(path) in str(error)


def test_atomic_write_failure_names_the_target_not_its_temporary(tmp_path, capsys):
    """A write that fails (a full disk, a parent that is a file) is the same OSError naming the file the user gave,
    never the hidden temporary (a checkpoint's caller still sees a full disk); no temporary is left, and the
    command says it in one line."""
    import errno

    from nin.files import atomic_write

    def full_disk(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)

    target = tmp_path / "scores.csv"
    with pytest.raises(OSError) as caught:
        atomic_write(target, full_disk, flag="--output")
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(target))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "file" / "x.csv", lambda tmp: Path(tmp).write_text("x"))
    assert caught.value.filename == str(tmp_path / "file" / "x.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "mine"
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    assert main(["predict", "paper-mnist", str(image), "--output", "/proc/nin-test.csv"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: /proc/nin-test.csv: " in err and ".tmp" not in err
