"""`nin predict`'s and `--init-from`'s logic as library functions (the CLI only parses and calls them)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from nin.data import load_dataset
from nin.engine import recipe, starting_from
from nin.errors import NinError
from nin.tools.predict import check_output, polarity_hint, predict_files, write_predictions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(data_root, tmp_path_factory) -> Path:
    """Six real MNIST test digits as PNG files: three as MNIST draws them, three as dark ink on white paper."""
    folder = tmp_path_factory.mktemp("digits")
    test = load_dataset("mnist", "test", data_root)
    for i in range(3):
        Image.fromarray(test.images[i, 0].numpy()).save(folder / f"light{i}.png")
        Image.fromarray(255 - test.images[i, 0].numpy()).save(folder / f"paper{i}.png")
    return folder


def test_predict_files_scores_files_folders_and_globs(digits, data_root):
    labels = load_dataset("mnist", "test", data_root).labels[:3].tolist()
    report = predict_files("fast-mnist", [str(digits / "light0.png"), str(digits / "light*.png")], top_k=3)
    assert [Path(row["image"]).name for row in report.rows] == ["light0.png", "light0.png", "light1.png", "light2.png"]
    assert [row["top"][0]["index"] for row in report.rows[1:]] == labels and len(report.rows[0]["top"]) == 3
    assert report.odd == [] and report.dataset == "mnist"
    folder = predict_files("fast-mnist", [str(digits)], top_k=1)
    assert len(folder.rows) == 6 and {p.name for p in folder.odd} == {"paper0.png", "paper1.png", "paper2.png"}
    hint = polarity_hint(folder, len(folder.rows), inverted=False)
    assert len(hint) == 1 and "3 of 6 images" in hint[0] and "--invert" in hint[0]
    inverted = predict_files("fast-mnist", [str(digits / "paper*.png")], top_k=1, invert=True)
    assert [row["top"][0]["index"] for row in inverted.rows] == labels and inverted.odd == []


def test_write_predictions_csv_and_jsonl(digits, tmp_path):
    report = predict_files("fast-mnist", [str(digits / "light*.png")], top_k=2)
    write_predictions(tmp_path / "p.csv", report.rows)
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert rows[0] == ["image", "class1", "probability1", "class2", "probability2"] and len(rows) == 4
    write_predictions(tmp_path / "p.jsonl", report.rows)
    assert [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()] == report.rows
    for bad in (tmp_path / "p.csv", tmp_path / "p.txt"):  # an existing file; not a table's suffix
        with pytest.raises(NinError, match="--output"):
            check_output(bad)


def test_predict_json_with_output_prints_where_the_rows_went(digits, tmp_path, capsys):
    from nin.cli import main

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "p.jsonl"
    assert main(["predict", "fast-mnist", str(digits / "light*.png"), str(tmp_path / "broken.png"), "--skip-bad",
                 "--json", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)  # one JSON object, not the human line
    assert printed["output"] == str(out) and printed["images"] == 3 and "predictions" not in printed
    assert len(printed["skipped"]) == 1 and "broken.png" in printed["skipped"][0]
    assert len(out.read_text().splitlines()) == 3
    assert main(["predict", "fast-mnist", str(digits / "light0.png"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["predictions"]) == 1 and printed["skipped"] == []


def test_starting_from_takes_the_weights_architecture_and_preprocessing():
    cfg = starting_from(recipe("fast", "folder"), "fast-cifar10")
    assert cfg.init_from == "fast-cifar10" and cfg.model == "nin_cifar10"
    assert cfg.model_args["batch_norm"] is True and "num_classes" not in cfg.model_args  # the data set decides
    assert cfg.preprocessing == "standardize"
    kept = starting_from(dataclasses.replace(recipe("fast", "folder"), model="cnn_cifar10_gap"), "fast-cifar10",
                         keep_model=True)
    assert kept.model == "cnn_cifar10_gap"
    with pytest.raises(NinError, match="--init-from no-such.safetensors"):
        starting_from(recipe("fast", "folder"), "no-such.safetensors")


def test_classifier_inverts_as_nin_predict_does(digits, data_root):
    """`Classifier(..., invert=True)` reads dark ink on paper as `nin predict --invert` does: the same classes and
    probabilities, and the true digits, where the plain reading of the same files is wrong more often."""
    import torch

    from nin.classifier import Classifier

    labels = load_dataset("mnist", "test", data_root).labels[:3].tolist()
    papers = [str(digits / f"paper{i}.png") for i in range(3)]
    classifier = Classifier.load("paper-mnist")
    inverted = classifier.predict(papers, invert=True)
    assert inverted.argmax(1).tolist() == labels
    report = predict_files("paper-mnist", papers, top_k=1, invert=True)
    assert [row["top"][0]["index"] for row in report.rows] == labels
    assert torch.allclose(inverted.max(1).values, torch.tensor([row["top"][0]["probability"] for row in report.rows]))
    assert [top[0][0] for top in classifier.top(papers, k=1, invert=True)] == [str(label) for label in labels]
    logits, maps = classifier.logits_and_maps(papers, invert=True)
    assert torch.allclose(logits, classifier.logits(papers, invert=True), atol=1e-4) and maps.shape[:2] == (3, 10)
    assert not torch.equal(classifier.predict(papers), inverted)  # the flag changes what the model sees
