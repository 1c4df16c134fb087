"""The training engine: lr rules, overrides, a real short run, exact resume, stall and NaN stops."""

import dataclasses
import json
import math

import pytest
import torch

from nin.checkpoint import load_state
from nin.pretrained import load
from nin.errors import NinError, NonFiniteLoss, TrainingStalled
from nin.engine import FAST, PAPER, PlateauRule, TrainConfig, apply_overrides, lr_at, recipe, total_steps, train
from nin.engine.loop import _stalled, dead_class_maps

from small_models import TINY_NIN_BLOCKS


def test_paper_recipe_values():
    cfg = recipe("paper", "cifar10")
    assert (cfg.model, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == ("nin_cifar10", 128, 0.1, 0.9, 1e-4)
    assert (cfg.bias_lr_mult, cfg.class_map_lr_mult, cfg.schedule, cfg.preprocessing) == (2.0, 0.1, "plateau", "gcn_zca")
    c100 = recipe("paper", "cifar100")
    assert (c100.lr, c100.weight_decay, c100.model) == (0.02, 5e-4, "nin_cifar100")
    assert recipe("paper", "mnist").preprocessing == "standardize"  # [0, 1] stalls at the paper's init (docs/training.md)
    assert recipe("paper", "svhn").preprocessing == "gcn_lcn"
    caffe = recipe("caffe", "cifar10")
    assert caffe.model == "nin_cifar10_caffe" and caffe.milestones == (100_000,) and caffe.max_steps == 120_000
    with pytest.raises(NinError, match="unknown recipe"):
        recipe("slow", "cifar10")


def test_parameter_groups_follow_the_authors_caffe_definition():
    """cccp6 (the class-map layer): blobs_lr 0.1 for its weights and its bias; every other bias 2x, no decay on
    biases. A run configured before class_map_bias_lr_mult existed keeps the 0.2x its class-map bias trained with."""
    from nin.engine.optim import param_groups
    from nin.models import NiN, model_config

    def lr_of(cfg):
        model = NiN(model_config("nin_cifar10"))
        lrs = {id(p): (group["lr"], group["weight_decay"]) for group in param_groups(model, cfg) for p in group["params"]}
        head = model.class_map_layer
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        found = [lrs[id(p)] for p in (head.weight, head.bias, first.weight, first.bias)]
        return [round(value, 12) for pair in found for value in pair]  # lr, decay of each

    paper = recipe("paper", "cifar10")
    assert lr_of(paper) == [0.01, 1e-4, 0.01, 0.0, 0.1, 1e-4, 0.2, 0.0]
    older = {key: value for key, value in paper.to_dict().items() if key != "class_map_bias_lr_mult"}
    assert lr_of(TrainConfig.from_dict(older))[2:4] == [0.02, 0.0]
    assert TrainConfig.from_dict(paper.to_dict()) == paper
    fast = recipe("fast", "cifar10")
    assert set(lr_of(fast)[::2]) == {fast.lr}


def test_paper_recipe_and_model_follow_the_authors_prototxt_layer_by_layer(data_root):
    """Read from the authors' own CIFAR-10 definition, every convolution in order: its lr multipliers (blobs_lr),
    weight-decay multipliers and Gaussian init std are what `--recipe paper` gives the same layer of nin_cifar10
    (base lr 0.1, weight decay 1e-4); its biases start at zero; dropout 0.5 follows the first and second blocks."""
    from nin.engine.optim import param_groups
    from nin.models import NiN, model_config
    from nin.tools.caffe_format import _parse_text

    prototxt = data_root / "caffe-nin-cifar10" / "cifar10_nin_train_val.prototxt"
    if not prototxt.is_file():
        pytest.skip("the authors' Caffe definition is not in the data folder")

    def values(entries, key):
        return [value for k, value in entries if k == key]

    convs, dropouts = [], []
    for layer in values(_parse_text(prototxt.read_text(), str(prototxt)), "layers"):
        kind = values(layer, "type")[0]
        if kind == "CONVOLUTION":
            conv = values(layer, "convolution_param")[0]
            filler = values(values(conv, "weight_filler")[0], "std")
            convs.append((values(layer, "name")[0], [float(v) for v in values(layer, "blobs_lr")],
                          [float(v) for v in values(layer, "weight_decay")], float(filler[0])))
        elif kind == "DROPOUT":
            dropouts.append((len(convs), float(values(values(layer, "dropout_param")[0], "dropout_ratio")[0])))
    assert [name for name, *_ in convs] == ["conv1", "cccp1", "cccp2", "conv2", "cccp3", "cccp4", "conv3", "cccp5",
                                            "cccp6"]

    cfg = recipe("paper", "cifar10")
    torch.manual_seed(0)
    model = NiN(model_config("nin_cifar10", **cfg.model_args))
    groups = {id(p): (group["lr"], group["weight_decay"]) for group in param_groups(model, cfg)
              for p in group["params"]}
    ours = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(ours) == len(convs)
    for (name, blobs_lr, decay, std), conv in zip(convs, ours):
        for param, lr_mult, decay_mult in ((conv.weight, blobs_lr[0], decay[0]), (conv.bias, blobs_lr[1], decay[1])):
            assert groups[id(param)] == pytest.approx((cfg.lr * lr_mult, cfg.weight_decay * decay_mult)), name
        assert conv.weight.std().item() == pytest.approx(std, rel=0.05), name  # N(0, std^2)
        assert not conv.bias.any(), name
    ends = [3, 6]  # the convolutions before each block's pooling
    assert dropouts == [(end, 0.5) for end in ends]
    drops = [m for m in model.drops]
    assert [type(m).__name__ for m in drops] == ["Dropout", "Dropout", "Identity"]
    assert [m.p for m in drops[:2]] == [0.5, 0.5]
    assert [len(block.convs) for block in model.blocks] == [3, 3, 3]


def test_data_set_model_changes_add_to_the_fast_recipe():
    c10 = recipe("fast", "cifar10")
    assert c10.model_args == {**FAST.model_args, "dropout": 0.0}  # CIFAR-10 drops dropout, keeps batch norm etc.
    mnist = recipe("fast", "mnist")
    assert mnist.model_args == FAST.model_args and mnist.model_args is not FAST.model_args  # a copy to change
    assert FAST.model_args["dropout"] == 0.25  # the shared recipe is not changed by building one
    assert apply_overrides(c10, ["model.dropout=0.25"]).model_args == FAST.model_args


def test_lr_at_known_steps():
    multistep = dataclasses.replace(PAPER, schedule="multistep", milestones=(200, 230), epochs=260)
    assert lr_at(0, multistep, 100) == pytest.approx(0.1)
    assert lr_at(200 * 100 - 1, multistep, 100) == pytest.approx(0.1)
    assert lr_at(200 * 100, multistep, 100) == pytest.approx(0.01)
    assert lr_at(230 * 100, multistep, 100) == pytest.approx(0.001)
    caffe = recipe("caffe", "cifar10")
    assert lr_at(99_999, caffe, 391) == pytest.approx(0.1) and lr_at(100_000, caffe, 391) == pytest.approx(0.01)
    assert total_steps(caffe, 391) == 120_000
    assert lr_at(5, PAPER, 100, lr_drops=2) == pytest.approx(0.001)
    one = dataclasses.replace(FAST, epochs=10, lr=0.2, warmup_fraction=0.2, start_lr_fraction=0.1)
    total = 10 * 50
    assert lr_at(0, one, 50) == pytest.approx(0.02)
    assert lr_at(100, one, 50) == pytest.approx(0.2)  # the peak at 20% of the steps
    assert lr_at(300, one, 50) == pytest.approx(0.1)
    assert lr_at(total, one, 50) == pytest.approx(0.0)
    values = [lr_at(s, one, 50) for s in range(total)]
    assert max(values) == pytest.approx(0.2) and all(v >= 0 for v in values)


def test_plateau_rule_drops_twice_then_finishes():
    rule = PlateauRule(patience=2, max_drops=2)
    events = [rule.update(a) for a in [0.5, 0.6, 0.6, 0.59, 0.7, 0.7, 0.7, 0.71, 0.71, 0.70]]
    # 0.6 then two epochs without a new best -> drop at index 3; 0.7 best, 2 epochs flat -> drop at 6;
    # 0.71 best, then two flat epochs -> finish at 9
    assert events == [None, None, None, "drop", None, None, "drop", None, None, "finish"]
    assert rule.drops == 2 and rule.finished
    again = PlateauRule()
    again.load_state_dict(rule.state_dict())
    assert again == rule


def test_overrides_parse_with_field_types():
    cfg = apply_overrides(PAPER, ["lr=0.05", "nesterov=true", "milestones=10,20", "model.batch_norm=1",
                                  "model.dropout=0.3", "data_dir=none"])
    assert cfg.lr == 0.05 and cfg.nesterov is True and cfg.milestones == (10.0, 20.0) and cfg.data_dir is None
    assert cfg.model_args == {"batch_norm": True, "dropout": 0.3}
    for bad, message in [("lr=fast", "expected a number"), ("nesterov=maybe", "expected true or false"),
                         ("lrr=0.1", "unknown field"), ("model.width=3", "unknown model field"),
                         ("epochs", "expected key=value"), ("lr=nan", "finite")]:
        with pytest.raises(NinError, match=message):
            apply_overrides(PAPER, [bad])


def _tiny(tmp_path, **changes) -> TrainConfig:
    cfg = recipe("fast", "mnist")
    base = {"train_subset": 2048, "eval_subset": 500, "batch_size": 64, "epochs": 2, "eval_every": 1}
    return dataclasses.replace(cfg, **{**base, **changes})


def test_svhn_without_its_extra_images_says_so(tmp_path):
    """The paper's SVHN model trained on train + extra; a run where extra_32x32.mat is absent says it trains on
    train alone (a step on 32 tiny synthetic images in SVHN's genuine .mat format)."""
    from data_fixtures import balanced_labels, random_images, write_svhn_mat

    for part in ("train", "test"):
        write_svhn_mat(tmp_path / "data" / "svhn" / f"{part}_32x32.mat", random_images(32, 1), balanced_labels(32, 10))
    cfg = dataclasses.replace(recipe("fast", "svhn"), data_dir=str(tmp_path / "data"), epochs=1, batch_size=16,
                              max_steps=1, eval_every=1)
    said = []
    train(cfg, tmp_path / "run", log=said.append)
    notes = [line for line in said if "extra_32x32.mat" in line]
    assert len(notes) == 1 and "training on train_32x32.mat alone" in notes[0] and "nin download svhn-extra" in notes[0]
    write_svhn_mat(tmp_path / "data" / "svhn" / "extra_32x32.mat", random_images(16, 2), balanced_labels(16, 10))
    said.clear()
    train(cfg, tmp_path / "run2", log=said.append)
    assert not [line for line in said if "extra_32x32.mat" in line]


def test_train_from_python_records_its_data_place_absolute(data_root, tmp_path, monkeypatch):
    """`train()` with a relative data_dir (docs/training.md's example) records it absolute, as `nin train` does,
    so that the run resumes from any folder."""
    import os

    monkeypatch.chdir(tmp_path)
    cfg = _tiny(tmp_path, data_dir=os.path.relpath(data_root, tmp_path), epochs=1, train_subset=128, eval_subset=100)
    train(cfg, "run", log=lambda *_: None)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["train_config"]["data_dir"]
    assert recorded == str(data_root.resolve())
    monkeypatch.chdir(tmp_path / "run")
    train(None, ".", resume=True, epochs=2, log=lambda *_: None)  # from another folder
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2


def test_a_run_whose_folder_is_removed_or_moved_while_training_stops(data_root, tmp_path):
    """Before, the next write made the folder again (the atomic writes make their folder): a checkpoint and a
    log, no config.json, and training went on into a folder the user had removed."""
    import shutil

    def move_as_the_second_epoch_ends(line):  # logged after the epoch's metrics line, before its checkpoint
        if line.startswith("epoch   2/"):
            shutil.move(str(tmp_path / "run"), str(tmp_path / "moved"))

    with pytest.raises(NinError, match=r"run: the run folder is gone \(its config.json is not there any more"):
        train(_tiny(tmp_path, epochs=3, train_subset=256, eval_subset=100, checkpoint_every=0), tmp_path / "run",
              log=move_as_the_second_epoch_ends)
    assert not (tmp_path / "run").exists()
    moved = [json.loads(line) for line in (tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in moved] == [1, 2]  # epoch 2's checkpoint was not written: it is trained again
    train(None, tmp_path / "moved", resume=True, log=lambda *_: None)  # the moved run goes on from its checkpoint
    assert [json.loads(l)["epoch"] for l in (tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_short_real_run_learns_and_writes_its_files(data_root, tmp_path):
    out = tmp_path / "run"
    record = train(_tiny(tmp_path, epochs=3), out, log=lambda *_: None)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert record["test_error"] < 0.3  # 2,048 MNIST digits, 96 steps: far better than chance (0.9); ~0.07 seen
    for key in ("train_loss", "train_error", "test_loss", "test_error", "lr", "images_per_s", "train_time_s"):
        assert key in lines[0]
    assert (out / "metrics.csv").read_text().startswith("epoch,")
    config = json.loads((out / "config.json").read_text())
    assert config["train_config"]["train_subset"] == 2048 and "command" in config
    model, preprocessing, meta = load(out)
    assert meta["dataset"] == "mnist" and len(meta["classes"]) == 10
    _, ckpt = load_state(out / "checkpoint.safetensors")
    assert ckpt["epoch"] == 3 and ckpt["step"] == 3 * 32


def test_resume_mid_epoch_is_bit_identical(data_root, tmp_path):
    # a small NiN (two 16-wide MLPconv blocks) with dropout 0.5: resuming is the same for any width, and the full
    # model made this test minutes long on an AVX2-only CPU
    cfg = _tiny(tmp_path, checkpoint_every=12,
                model_args={**recipe("fast", "mnist").model_args, "dropout": 0.5, "blocks": TINY_NIN_BLOCKS})
    full = tmp_path / "full"
    train(cfg, full, log=lambda *_: None)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, cut, log=lambda *_: None, interrupt_after=37)  # a checkpoint at step 36, mid-epoch 2
    _, meta = load_state(cut / "checkpoint.safetensors")
    assert (meta["epoch"], meta["batches_done"], meta["step"]) == (1, 4, 36)
    with pytest.raises(NinError, match="inside epoch 2 .*--epochs 2 or more"):  # no model from a half epoch
        train(None, cut, resume=True, epochs=1, log=lambda *_: None)
    assert not (cut / "model.safetensors").exists()
    from nin.engine.start import planned_config

    with pytest.raises(NinError, match="inside epoch 2"):  # `--dry-run` says so too
        planned_config(None, cut, resume=True, epochs=1)
    train(None, cut, resume=True, log=lambda *_: None)
    a, _ = load_state(full / "checkpoint.safetensors")
    b, _ = load_state(cut / "checkpoint.safetensors")
    weights = [k for k in a if k.startswith("model.")]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)
    full_metrics = (full / "metrics.jsonl").read_text().splitlines()
    cut_metrics = (cut / "metrics.jsonl").read_text().splitlines()
    strip = lambda r: {k: v for k, v in json.loads(r).items() if "time" not in k and "per_s" not in k}
    assert [strip(r) for r in full_metrics] == [strip(r) for r in cut_metrics]


def test_resume_removes_temp_files_of_killed_writes(data_root, tmp_path):
    run = tmp_path / "run"
    cfg = _tiny(tmp_path, epochs=1, train_subset=128)
    train(cfg, run, log=lambda *_: None)
    torn = [run / ".checkpoint.safetensors.k1ll3d.tmp", run / ".model.safetensors.x.tmp"]
    for path in torn:
        path.write_bytes(b"half a file")
    keep = run / ".notes.tmp"  # not one of ours
    keep.write_text("mine")
    said = []
    train(None, run, resume=True, epochs=2, log=said.append)
    assert not any(path.exists() for path in torn) and keep.read_text() == "mine"
    assert sum("left by a write that was killed" in line for line in said) == 2
    # finished: resuming it again writes nothing (it had rewritten model.safetensors and added a resume to config.json)
    before = {path: path.stat().st_mtime_ns for path in run.rglob("*")}
    said.clear()
    train(None, run, resume=True, log=said.append)
    assert {path: path.stat().st_mtime_ns for path in run.rglob("*")} == before
    assert any("is already finished (epoch 2" in line for line in said)


def test_refuses_to_overwrite_a_run(data_root, tmp_path):
    out = tmp_path / "run"
    train(_tiny(tmp_path, epochs=1, train_subset=128), out, log=lambda *_: None)
    with pytest.raises(NinError, match="already holds a run"):
        train(_tiny(tmp_path, epochs=1, train_subset=128), out, log=lambda *_: None)


def test_stall_detector_names_the_dead_class_maps(data_root, tmp_path):
    # a paper model whose weights start ~0 gives every image the same scores: the dead start of other ports
    cfg = dataclasses.replace(recipe("paper", "mnist"), train_subset=256, eval_subset=100, epochs=1,
                              model_args={"init_std": 1e-5}, stall_check_steps=2)
    with pytest.raises(TrainingStalled, match="ln 10") as info:
        train(cfg, tmp_path / "run", log=lambda *_: None)
    assert "class_map_relu=false" in str(info.value)
    assert _stalled(torch.zeros(8, 10), math.log(10), 10)
    assert not _stalled(torch.randn(8, 10), math.log(10), 10)
    # after a whole first epoch: scores that barely differ and a loss that never left ln K are as dead
    faint = 0.001 * torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    assert _stalled(faint, math.log(10) - 0.0005, 10, whole_epoch=True)
    assert not _stalled(faint, math.log(10) - 0.0005, 10)  # early, only identical scores count
    assert not _stalled(faint, 2.2673, 10, whole_epoch=True)  # the paper's CIFAR-10 model after its first epoch
    assert not _stalled(0.2 * torch.randn(8, 10), math.log(10), 10, whole_epoch=True)
    # one class map dead behind its ReLU (the paper's MNIST model, seed 0, class 5 in its first epoch)
    logits = torch.relu(torch.randn(16, 10, generator=torch.Generator().manual_seed(1))) + 0.01
    labels = torch.arange(16) % 10
    assert dead_class_maps(logits, labels) == []
    logits[:, 5] = 0
    assert dead_class_maps(logits, labels) == [5]
    assert dead_class_maps(logits, labels.clamp(max=4)) == []  # no image of class 5 in the batch: no verdict


@pytest.mark.parametrize("classes", [3, 10])
def test_init_from_an_fc_model_starts_its_last_fc_layer_afresh(classes):
    """Fine-tuning weights with a fully connected head: its last layer gives the classes, so it starts afresh
    (another count, or other names) and every convolution is kept, the last one included."""
    from nin.engine.start import _start_from
    from nin.models import get_model

    source = get_model("nin_cifar10_fc")
    model = get_model("nin_cifar10_fc", num_classes=classes)
    said = []
    _start_from(model, source, "w", said.append, same_classes=False)
    target, weights = model.state_dict(), source.state_dict()
    last = next(n for n, m in model.named_modules() if m is model.head[-1])
    assert model.head[-1].out_features == classes and said and "re-initialised" in said[0]
    kept = [k for k in weights if not k.startswith(last + ".")]
    assert kept and all(torch.equal(target[k], weights[k]) for k in kept)  # blocks.2.convs.2 among them
    assert any(k.startswith("blocks.2.convs.2") for k in kept)
    assert not torch.equal(target[last + ".weight"][:3], weights[last + ".weight"][:3])


def test_no_checkpoint_follows_an_unchecked_step():
    """On a GPU the loss is checked for NaN every 50th step, and at every step a checkpoint follows: mid-epoch
    (every --checkpoint-every), at an epoch's end and the last; on a CPU at every step."""
    from nin.engine.loop import checks_finite

    def checked(device, steps=390, every=30, per_epoch=100, last=390):
        return [s for s in range(1, steps + 1)
                if checks_finite(device, s, every, end_of_epoch=s % per_epoch == 0, last=s >= last)]

    assert checked("cpu") == list(range(1, 391))
    gpu = checked("cuda")
    assert set(gpu) == {s for s in range(1, 391) if s % 50 == 0 or s % 30 == 0 or s % 100 == 0 or s == 390}
    assert checked("cuda", every=0) == [50, 100, 150, 200, 250, 300, 350, 390]


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(data_root, tmp_path):
    cfg = dataclasses.replace(recipe("paper", "mnist"), train_subset=512, eval_subset=100, epochs=3, lr=1e9,
                              precision="fp32", stall_check_steps=0, checkpoint_every=1)
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    with pytest.raises(NonFiniteLoss, match=f"last good checkpoint stays in {ckpt}") as stopped:
        train(cfg, tmp_path / "run", log=lambda *_: None)
    assert "--set model.batch_norm=true" in str(stopped.value)  # the paper's model has none: the advice applies
    tensors, _ = load_state(ckpt)  # the checkpoint the message names exists, with finite weights
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("model."))


def test_config_json_keeps_the_starting_command_across_resumes(data_root, tmp_path):
    run = tmp_path / "run"
    cfg = _tiny(tmp_path, epochs=1, train_subset=128)
    train(cfg, run, command="nin train --dataset mnist (start)", log=lambda *_: None)
    train(None, run, resume=True, epochs=2, command="nin train --resume run --epochs 2", log=lambda *_: None)
    train(None, run, resume=True, epochs=3, command="nin train --resume run --epochs 3", log=lambda *_: None)
    saved = json.loads((run / "config.json").read_text())
    assert saved["command"] == "nin train --dataset mnist (start)" and saved["resumed"] is True
    assert [r["command"] for r in saved["resumes"]] == ["nin train --resume run --epochs 2",
                                                       "nin train --resume run --epochs 3"]
    _, meta = load_state(run / "checkpoint.safetensors")
    assert meta["command"] == saved["command"] and len(meta["resumes"]) == 2


def test_whiten_init_whitens_conv1_on_the_preprocessed_training_images(data_root, tmp_path):
    from nin.data import load_dataset
    from nin.layers import patch_whitening_
    from nin.engine.start import start_run

    cfg = dataclasses.replace(_tiny(tmp_path), data_dir=str(data_root), whiten_init=True)
    lines = []
    run, state = start_run(cfg, tmp_path / "run", resume=False, epochs=None, checkpoint_every=None, command="test",
                           device="cpu", log=lines.append)
    conv = state.model.blocks[0].convs[0]
    expected = torch.nn.Conv2d(1, conv.out_channels, 5, padding=2)
    images = load_dataset("mnist", "train", data_root).images[:2048]
    assert patch_whitening_(expected, run.preprocessing(images)) == 50
    torch.testing.assert_close(conv.weight[:50], expected.weight[:50])  # from the scaled images, not raw uint8
    assert any("whiten_init: 50 of conv1's 96 filters" in line for line in lines)
    plain = start_run(dataclasses.replace(cfg, whiten_init=False), tmp_path / "plain", resume=False, epochs=None,
                      checkpoint_every=None, command="test", device="cpu", log=lines.append)[1].model
    assert not torch.allclose(plain.blocks[0].convs[0].weight[:50], conv.weight[:50])
    with pytest.raises(NinError, match="whiten_init initialises a fresh model"):
        train(dataclasses.replace(cfg, init_from=str(tmp_path / "run")), tmp_path / "other", log=lambda *_: None)
