"""Your own images, end to end: a real 3-class folder -> train -> evaluate -> predict -> visualize, 3 classes everywhere."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from nin.pretrained import load
from nin.cli import main
from nin.data import load_dataset

CLASSES = {0: "airplane", 3: "cat", 8: "ship"}  # CIFAR-10 label -> folder name
REPO = Path(__file__).resolve().parents[1]


def _write(image: torch.Tensor, path: Path, kind: str) -> None:
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    picture.save(path, **({"quality": 95} if kind == "jpg" else {}))


@pytest.fixture(scope="module")
def folder(data_root, tmp_path_factory) -> Path:
    """my_images/{train,test}/{airplane,cat,ship}/: real CIFAR-10 images, PNG and JPEG mixed."""
    root = tmp_path_factory.mktemp("my_images")
    for split, per_class in (("train", 60), ("test", 20)):
        data = load_dataset("cifar10", split, data_root)
        for label, name in CLASSES.items():
            (root / split / name).mkdir(parents=True)
            chosen = torch.nonzero(data.labels == label).flatten()[:per_class]
            for j, index in enumerate(chosen.tolist()):
                kind = "jpg" if j % 2 else "png"
                _write(data.images[index], root / split / name / f"{j:03d}.{kind}", kind)
    return root


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "mine"
    assert main(["train", "--dataset", "folder", "--data-dir", str(folder), "--epochs", "2", "--batch-size", "32",
                 "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_folder_run_has_three_classes_in_its_weights(run):
    model, _, meta = load(run)
    assert model.config.num_classes == 3
    assert meta["classes"] == ["airplane", "cat", "ship"]
    assert json.loads((run / "config.json").read_text())["train_config"]["model_args"]["num_classes"] == 3


def test_evaluate_uses_the_recorded_folder_and_three_classes(run, capsys):
    assert main(["evaluate", str(run), "--json"]) == 0  # no --data-dir: the run's own folder
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 60 and len(result["confusion"]) == 3 and all(len(row) == 3 for row in result["confusion"])
    assert result["classes"] == ["airplane", "cat", "ship"]


def test_predict_files_folder_and_csv(run, folder, tmp_path, capsys):
    image = folder / "test" / "cat" / "000.png"
    assert main(["predict", str(run), str(image), "--top-k", "5", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert len(top) == 3 and {t["class"] for t in top} == {"airplane", "cat", "ship"}  # no phantom classes
    assert abs(sum(t["probability"] for t in top) - 1) < 1e-4
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(run), str(folder / "test"), "--output", str(out), "--batch-size", "16"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 60 and {r["class1"] for r in rows} <= {"airplane", "cat", "ship"}
    glob = str(folder / "test" / "ship" / "*.jpg")
    assert main(["predict", str(run), glob, "--output", str(tmp_path / "p.jsonl")]) == 0
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == 10 and all(json.loads(line)["image"].endswith(".jpg") for line in lines)


def test_visualize_the_folder_run(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figures"
    assert main(["visualize", str(run), "--out", str(out), "--per-class", "2"]) == 0
    maps = json.loads((out / "maps.json").read_text())
    assert maps["n"] == 60
    assert (out / "confidence_maps.png").stat().st_size > 0 and (out / "confusion.png").stat().st_size > 0


def test_fine_tuning_from_cifar10_weights_reinitialises_the_class_maps(folder, tmp_path, capsys):
    weights = REPO / "weights" / "fast-cifar10.safetensors"
    out = tmp_path / "ft"
    assert main(["train", "--dataset", "folder", "--data-dir", str(folder), "--epochs", "1", "--batch-size", "32",
                 "--init-from", str(weights), "--set", "lr=0.02", "--out", str(out), "--device", "cpu"]) == 0
    assert "re-initialised the class-map layer for these 3 classes" in capsys.readouterr().out
    model, _, _ = load(out)
    source, _, _ = load(weights)
    assert model.config.num_classes == 3
    # the first block still carries the source's features, moved by one short epoch only
    first = "blocks.0.convs.0.weight"
    change = (model.state_dict()[first] - source.state_dict()[first]).norm() / source.state_dict()[first].norm()
    assert change < 0.2, float(change)


def test_init_from_a_model_of_another_shape_is_one_line(folder, tmp_path, capsys):
    weights = REPO / "weights" / "fast-mnist.safetensors"  # 1×28×28 input
    out = tmp_path / "bad"
    assert main(["train", "--dataset", "folder", "--data-dir", str(folder), "--epochs", "1", "--init-from",
                 str(weights), "--model", "nin_cifar10", "--out", str(out), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init-from" in err and "Traceback" not in err


def test_one_answer_for_the_same_weights_everywhere(data_root, tmp_path, capsys):
    """`nin evaluate`, `nin visualize`'s confusion matrix and the Python Classifier agree on real test images: the
    first 300 of the JPEG copy (visualize --limit, the Classifier) and the exact 1,000 (evaluate, the Classifier),
    where the shipped weights also give their recorded number. Not the 10,000: on an AVX2-only CPU (fp32) each pass
    over them took minutes of the suite's time."""
    pytest.importorskip("matplotlib")
    from nin.classifier import Classifier
    from nin import get_model
    from nin.inference import agrees_with_record
    from nin.pretrained import EXACT_1000, get_weights

    classifier = Classifier.load("fast-cifar10")

    def python_accuracy(dataset: str, n: int = 1000) -> tuple[int, float]:
        test = load_dataset(dataset, "test", data_root)
        images, labels = test.images[:n], test.labels[:n]
        predicted = torch.cat([classifier.predict(chunk).argmax(1) for chunk in images.split(500)])
        return int((predicted == labels).sum()), float((predicted == labels).double().mean())

    assert main(["visualize", "fast-cifar10", "--data-dir", str(data_root), "--limit", "300",
                 "--out", str(tmp_path / "v")]) == 0
    capsys.readouterr()
    visualized = json.loads((tmp_path / "v" / "maps.json").read_text())
    assert visualized["n"] == 300 and visualized["accuracy"] == python_accuracy("cifar10", 300)[1], visualized

    assert main(["evaluate", "fast-cifar10", "--dataset", "cifar10-lossless-first1000", "--data-dir",
                 str(data_root), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    correct, accuracy = python_accuracy("cifar10-lossless-first1000")
    assert evaluated["n"] == 1000 and (evaluated["correct"], evaluated["accuracy"]) == (correct, accuracy)
    # the recorded number of the shipped weights, through the pretrained registry, to within what another CPU's
    # bf16 kernels may move it (nin.inference.accuracy_tolerance)
    recorded = get_weights("fast-cifar10").accuracy[EXACT_1000]
    assert agrees_with_record(evaluated["correct"], evaluated["n"], recorded), (evaluated["correct"], recorded)
    model = get_model("nin_cifar10", weights="DEFAULT")
    assert model.config.batch_norm and not model.training


def test_float_uint8_and_pil_inputs_give_the_same_probabilities(data_root):
    from nin.classifier import Classifier

    images = load_dataset("cifar10-lossless-first1000", "test", data_root).images[:16]
    classifier = Classifier.load("fast-cifar10")
    as_uint8 = classifier.predict(images)
    as_float = classifier.predict(images.float() / 255)
    as_pil = classifier.predict([Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images])
    one = classifier.predict(images[0])  # a single (C, H, W) image
    torch.testing.assert_close(as_float, as_uint8, rtol=0, atol=1e-6)
    torch.testing.assert_close(as_pil, as_uint8, rtol=0, atol=1e-6)
    torch.testing.assert_close(one, as_uint8[:1], rtol=0, atol=1e-6)
    gray = images[:, :1]  # a one-channel image for a three-channel model: converted as a gray PIL image would be
    as_gray_pil = classifier.predict([Image.fromarray(image[0].numpy(), "L") for image in gray])
    torch.testing.assert_close(classifier.predict(gray), as_gray_pil, rtol=0, atol=1e-6)
    for bad in (images.float(), images[:, :2], images[:, :, :0], "no-such-file.png", 5):
        with pytest.raises(Exception) as error:
            classifier.predict(bad)
        assert type(error.value).__name__ in ("NinError", "DataError"), error.value


def test_init_from_weights_with_other_class_names_starts_the_class_maps_afresh(run, folder, tmp_path, capsys):
    """Same class count, other names: a map trained for "cat" must not answer for another class."""
    import shutil

    renamed = tmp_path / "renamed"
    for split in ("train", "test"):
        for old, new in (("airplane", "x"), ("cat", "y"), ("ship", "z")):
            shutil.copytree(folder / split / old, renamed / split / new)
    out = tmp_path / "renamed-run"
    assert main(["train", "--dataset", "folder", "--data-dir", str(renamed), "--epochs", "1", "--batch-size", "32",
                 "--init-from", str(run), "--train-subset", "32", "--out", str(out), "--device", "cpu"]) == 0
    assert "re-initialised the class-map layer" in capsys.readouterr().out
    same = tmp_path / "same-names"
    assert main(["train", "--dataset", "folder", "--data-dir", str(folder), "--epochs", "1", "--batch-size", "32",
                 "--init-from", str(run), "--train-subset", "32", "--out", str(same), "--device", "cpu"]) == 0
    assert "re-initialised" not in capsys.readouterr().out


def test_init_from_ten_class_weights_for_cifar100_takes_its_hundred_classes(tmp_path, capsys):
    """docs/training.md: a class count that differs re-initialises the class maps, for a named data set too."""
    from data_fixtures import write_cifar100_tree

    write_cifar100_tree(tmp_path / "data", "bin", count=64)
    out = tmp_path / "c100"
    assert main(["train", "--dataset", "cifar100", "--data-dir", str(tmp_path / "data"), "--init-from", "fast-cifar10",
                 "--epochs", "1", "--batch-size", "32", "--set", "eval_subset=32", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert "re-initialised the class-map layer" in capsys.readouterr().out
    model, _, meta = load(out)
    assert model.config.num_classes == 100 and len(meta["classes"]) == 100
    reference, _, _ = load("fast-cifar10")
    assert model.config.batch_norm and {k: v.shape for k, v in model.state_dict().items() if "blocks.0." in k} == \
        {k: v.shape for k, v in reference.state_dict().items() if "blocks.0." in k}  # the weights' architecture


def test_predict_output_never_overwrites_a_file(run, folder, tmp_path, capsys):
    mine = tmp_path / "mine.csv"
    mine.write_text("my data\n")
    assert main(["predict", str(run), str(folder / "test" / "cat"), "--output", str(mine)]) == 1
    assert "not overwriting" in capsys.readouterr().err and mine.read_text() == "my data\n"


@pytest.fixture(scope="module")
def flat(folder, tmp_path_factory) -> Path:
    """my_images/<class>/*: no train/ or test/ sub-folders (the 60 training images of each class)."""
    import shutil

    root = tmp_path_factory.mktemp("flat")
    for name in CLASSES.values():
        shutil.copytree(folder / "train" / name, root / name)
    return root


def test_a_folder_without_test_images_holds_out_a_stratified_split(flat, tmp_path, capsys):
    out = tmp_path / "held"
    assert main(["train", "--dataset", "folder", "--data-dir", str(flat), "--epochs", "1", "--batch-size", "32",
                 "--out", str(out), "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert "10% of each class held out" in said
    config = json.loads((out / "config.json").read_text())["train_config"]
    assert config["val_split"] == 0.1
    assert main(["evaluate", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 18 and [sum(row) for row in result["confusion"]] == [6, 6, 6]  # 10% of 60 per class
    from nin.data import load_dataset as load

    train = load("folder", "train", flat, val_split=0.1, seed=0)
    held = load("folder", "test", flat, val_split=0.1, seed=0)
    assert len(train) == 162 and len(held) == 18
    rows = {tuple(image.flatten().tolist()) for image in train.images}
    assert not any(tuple(image.flatten().tolist()) in rows for image in held.images)  # disjoint
    other = load("folder", "test", flat, val_split=0.1, seed=1)
    assert not torch.equal(other.images, held.images)  # seeded: another seed, another held-out set


def test_val_split_zero_scores_the_training_images_and_says_so(flat, tmp_path, capsys):
    out = tmp_path / "none"
    assert main(["train", "--dataset", "folder", "--data-dir", str(flat), "--epochs", "1", "--batch-size", "64",
                 "--val-split", "0", "--out", str(out), "--device", "cpu"]) == 0
    assert "measured on the training images" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 180


def test_val_split_is_refused_where_it_cannot_apply(folder, tmp_path, capsys):
    assert main(["train", "--dataset", "folder", "--data-dir", str(folder), "--val-split", "0.2", "--epochs", "1",
                 "--out", str(tmp_path / "a"), "--device", "cpu"]) == 1
    assert "has a test/ sub-folder already" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["train", "--dataset", "mnist", "--val-split", "0.2", "--dry-run"]) == 1
    assert "own test split" in capsys.readouterr().err
    assert main(["train", "--dataset", "folder", "--data-dir", str(folder), "--val-split", "1.5", "--dry-run"]) == 1
    assert "--val-split must be in [0, 1)" in capsys.readouterr().err
    import dataclasses

    from nin.engine import data_files, recipe
    from nin.errors import NinError

    cfg = dataclasses.replace(recipe("fast", "folder"), data_dir=str(folder), val_split=0.2)
    with pytest.raises(NinError, match="has a test/ sub-folder already"):  # the library's check, as the CLI's
        data_files(cfg)


def test_image_size_trains_and_predicts_at_that_size(folder, tmp_path, capsys):
    out = tmp_path / "big"
    assert main(["train", "--dataset", "folder", "--data-dir", str(folder), "--image-size", "40", "--epochs", "1",
                 "--batch-size", "64", "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    model, _, _ = load(out)
    assert model.config.input_size == 40
    photo = next((folder / "test" / "cat").iterdir())
    assert main(["predict", str(out), str(photo), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == 1


def test_a_folder_with_one_class_is_refused_in_one_line(folder, tmp_path, capsys):
    """One class sub-folder (e.g. --data-dir my_images/ holding only cat/) trains nothing: the loss is 0 from the
    start and every prediction is that class. Refused before the run folder is made, naming the folder."""
    import shutil

    root = tmp_path / "one"
    shutil.copytree(folder / "train" / "cat", root / "cat")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data-dir", str(root), "--epochs", "1", "--batch-size", "32",
                 "--out", str(out), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{root}: one class sub-folder (cat)" in err and "at least two" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_class_maps_other_than_the_folders_classes_are_refused(folder, tmp_path, capsys):
    """`--set model.num_classes` above the folder's class count had trained a run whose weights no command could
    load (K maps, fewer class names); below it, labels past the last map. Refused before the run folder is made."""
    for count in (2, 5):
        out = tmp_path / f"run{count}"
        assert main(["train", "--dataset", "folder", "--data-dir", str(folder), "--epochs", "1", "--out", str(out),
                     "--device", "cpu", "--set", f"model.num_classes={count}"]) == 1
        err = capsys.readouterr().err
        assert f"model.num_classes={count}" in err and "expected 3 class maps" in err and not out.exists()


def test_evaluate_pretrained_weights_on_a_folder_labels_by_class_name(folder, data_root, tmp_path, capsys):
    """`nin evaluate fast-cifar10 --dataset folder --data-dir my_images` with {airplane, cat, ship}: each image is
    labelled with the model's index of its class name (cat = 3), not the folder's sorted position (cat = 1, which
    scored every cat as an automobile); a sub-folder the model has no class for is refused in one line; and a
    named data set with other classes (a Fashion-MNIST model on MNIST digits) is refused, not scored."""
    weights = REPO / "weights" / "fast-cifar10.safetensors"
    assert main(["evaluate", str(weights), "--dataset", "folder", "--data-dir", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 60 and result["accuracy"] > 0.6, result["accuracy"]
    rows = [sum(row) for row in result["confusion"]]
    assert rows == [20, 0, 0, 20, 0, 0, 0, 0, 20, 0]  # airplane, cat, ship in the model's own order
    other = tmp_path / "other"
    (other / "penguin").mkdir(parents=True)
    for image in list((folder / "test" / "cat").iterdir())[:2]:
        (other / "penguin" / image.name).write_bytes(image.read_bytes())
    assert main(["evaluate", str(weights), "--dataset", "folder", "--data-dir", str(other)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "penguin" in err and "Traceback" not in err
    assert main(["evaluate", "fast-fashion-mnist", "--dataset", "mnist", "--data-dir", str(data_root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "T-shirt/top" in err and "mnist" in err and "Traceback" not in err


def test_evaluate_a_held_out_run_on_another_folder_scores_all_of_it(folder, flat, tmp_path, capsys):
    """A run trained on a folder without test/ is scored on its 10% held out; `nin evaluate RUN --data-dir OTHER`
    held out the same 10% of OTHER too, silently scoring 18 of its 180 images. Its own folder keeps the 18, also
    moved or copied (scored whole, it would hold the 162 trained images)."""
    import shutil

    out = tmp_path / "held"
    assert main(["train", "--dataset", "folder", "--data-dir", str(flat), "--epochs", "1", "--batch-size", "64",
                 "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    other = folder / "test"  # other images of the same classes: 20 of each
    assert main(["evaluate", str(out), "--data-dir", str(other), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 60
    assert main(["evaluate", str(out), "--dataset", "folder", "--data-dir", str(other), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 60
    assert main(["evaluate", str(out), "--data-dir", str(flat), "--json"]) == 0  # its own folder, named
    assert json.loads(capsys.readouterr().out)["n"] == 18
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 18
    copy = tmp_path / "copy"
    shutil.copytree(flat, copy)
    assert main(["evaluate", str(out), "--data-dir", str(copy), "--json"]) == 0  # the same files: its held-out part
    assert json.loads(capsys.readouterr().out)["n"] == 18


def test_evaluate_refuses_a_held_out_part_its_folder_no_longer_gives(flat, tmp_path, capsys):
    """`nin evaluate RUN` drew the held-out part again from the folder as it is now: an image added since training
    moved others (trained ones among them) into it, and the score looked like a held-out score."""
    import shutil

    mine = tmp_path / "mine"
    shutil.copytree(flat, mine)
    out = tmp_path / "held"
    assert main(["train", "--dataset", "folder", "--data-dir", str(mine), "--epochs", "1", "--batch-size", "64",
                 "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    (mine / "notes.txt").write_text("not an image")  # not an image: the same held-out part
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 18
    assert main(["evaluate", str(out), "--split", "val", "--json"]) == 0  # the held-out part too
    said = capsys.readouterr()
    assert json.loads(said.out)["n"] == 18 and "made of training images" not in said.err  # had said so
    from nin.data.datasets import _folder_samples

    held = _folder_samples(mine, "test", None, 0.1, 0)[0][0][0]
    renamed = held.with_name(held.stem + "x" + held.suffix)  # the same place in the sorted list: the same split
    held.rename(renamed)
    assert main(["train", "--resume", str(out), "--epochs", "2", "--device", "cpu"]) == 1  # had recorded the new part
    assert "its held-out images are not the ones this run held out" in capsys.readouterr().err
    renamed.rename(held)

    # a trained image copied over a held-out one under its name: the same names, a trained image scored as held out
    original, trained = held.read_bytes(), _folder_samples(mine, "train", None, 0.1, 0)[0][0][0]
    held.write_bytes(trained.read_bytes())
    moved = tmp_path / "moved"
    shutil.copytree(mine, moved)  # the run's folder, moved: found by its held-out names, then checked the same way
    for flags in ([], ["--data-dir", str(moved)]):
        assert main(["evaluate", str(out), "--json", *flags]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "changed since training (images added, removed, renamed or rewritten)" in err
    assert main(["train", "--resume", str(out), "--epochs", "2", "--device", "cpu"]) == 1
    assert "renamed or rewritten since it began" in capsys.readouterr().err
    held.write_bytes(original)
    assert main(["evaluate", str(out), "--json"]) == 0 and json.loads(capsys.readouterr().out)["n"] == 18

    cat = mine / "cat"
    shutil.copy(next(cat.iterdir()), cat / "0-new.png")
    assert main(["evaluate", str(out), "--json"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "changed since training (images added, removed, renamed or rewritten)" in err
    assert main(["evaluate", str(out), "--split", "train", "--json"]) == 0  # its training part is not checked


def test_numbered_classes_label_a_complete_folder_of_other_names_in_sorted_order(tmp_path):
    """A model imported without class names (classes "0".."n-1", as `nin import-caffe --arch nin_imagenet` stores)
    scores a folder of synset-named sub-folders in sorted order, as Caffe labels them; only a complete one."""
    from nin.data.folders import NumberedClasses, list_image_folder
    from nin.errors import DataError

    for name in ("n03", "n01", "n02"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "a.png")
    samples, classes = list_image_folder(tmp_path, NumberedClasses(["0", "1", "2"]))
    assert classes == ["n01", "n02", "n03"] and [(p.parent.name, label) for p, label in samples] == \
        [("n01", 0), ("n02", 1), ("n03", 2)]
    with pytest.raises(DataError, match="a folder of all 4 classes is labelled in sorted order; this one has 3"):
        list_image_folder(tmp_path, NumberedClasses(["0", "1", "2", "3"]))
    for named in (["cat", "dog", "ship"], ["0", "1", "2"]):  # named classes (MNIST's are digits): refused as before
        with pytest.raises(DataError, match="class 'n01' is not in the class list"):
            list_image_folder(tmp_path, named)


def test_a_folders_subsets_are_drawn_from_every_class():
    """A folder is read class by class, so its first N images were one class (`--train-subset 10` had trained on
    airplanes alone); a named data set's files are in no class order and keep their first N."""
    from nin.engine.start import _subset

    labels = torch.arange(3).repeat_interleave(20)  # as a folder of 3 classes × 20 reads
    images = labels.view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    _, first = _subset(images, labels, 10, False, 0)
    assert first.tolist() == [0] * 10
    drawn_images, drawn = _subset(images, labels, 10, True, 0)
    assert len(drawn) == 10 and set(drawn.tolist()) == {0, 1, 2} and drawn.tolist() == sorted(drawn.tolist())
    assert torch.equal(drawn_images[:, 0, 0, 0], drawn)  # images and labels drawn together
    assert torch.equal(_subset(images, labels, 10, True, 0)[1], drawn)  # seeded: a resumed run draws the same
    assert not torch.equal(_subset(images, labels, 10, True, 1)[1], drawn)
    assert _subset(images, labels, 0, True, 0)[1] is labels and _subset(images, labels, 99, True, 0)[1] is labels


def test_a_test_folder_added_after_training_is_named_not_scored_in_the_held_out_parts_place(folder, tmp_path, capsys):
    """A run on my_images/train/ (no test/) holds out 10% of it. A test/ added since: `--resume` was refused for a
    --val-split nobody passed, and `nin evaluate RUN` scored the held-out part without a word of test/."""
    import shutil

    mine = tmp_path / "mine"
    shutil.copytree(folder / "train", mine / "train")
    out = tmp_path / "held"
    assert main(["train", "--dataset", "folder", "--data-dir", str(mine), "--epochs", "1", "--batch-size", "64",
                 "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    shutil.copytree(folder / "test", mine / "test")  # 20 new images of each class
    assert main(["train", "--resume", str(out), "--epochs", "2", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["train_config"]["val_split"] == 0.1
    assert main(["train", "--resume", str(out), "--epochs", "2", "--device", "cpu"]) == 0
    said = capsys.readouterr()
    assert f"{mine / 'test'} was added since this run began" in said.out and not said.err
    assert f"`nin evaluate {out} --data-dir {mine / 'test'}` scores test/" in said.out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["evaluate", str(out), "--json"]) == 0
    said = capsys.readouterr()
    assert json.loads(said.out)["n"] == 18  # what the run held out, as it recorded
    assert said.err.count("\n") == 1 and said.err.startswith("nin evaluate: note: ")
    assert f"not on the images in {mine / 'test'}/ (--data-dir {mine / 'test'} scores those)" in said.err
    assert main(["evaluate", str(out), "--split", "train", "--json"]) == 0
    assert not capsys.readouterr().err  # its training part: test/ is not in its place
    assert main(["evaluate", str(out), "--data-dir", str(mine / "test"), "--json"]) == 0  # as the note says
    assert json.loads(capsys.readouterr().out)["n"] == 60
