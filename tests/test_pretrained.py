"""Pretrained weights by tag: shipped in the package, checked by sha256, loadable by name, scored as recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from nin.cli import main
from nin.data.readers import file_digest
from nin.errors import NinError
from nin.inference import agrees_with_record
from nin import get_model
from nin.pretrained import EXACT_1000, JPEG_10000, PRETRAINED, get_weights, list_pretrained

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tag", list(PRETRAINED))
def test_every_tag_ships_its_file_and_loads(tag):
    weights = PRETRAINED[tag]
    assert file_digest(weights.path, "sha256") == weights.sha256
    model, preprocessing, meta = weights.load()
    assert len(meta["classes"]) == model.config.num_classes
    assert (REPO / "docs" / "model_cards" / f"{tag}.md").read_text() == weights.model_card()  # cards kept in step
    copy = REPO / "weights" / f"{tag}.safetensors"
    if copy.is_file():  # the checkout's copy is the same file
        assert file_digest(copy, "sha256") == weights.sha256


def test_get_model_by_tag_default_and_pretrained():
    assert get_model("nin_cifar10", pretrained=True).state_dict().keys() == \
        get_model("nin_cifar10", weights="fast-cifar10").state_dict().keys()
    assert "fast-cifar10" in list_pretrained("nin_cifar10") and "fast-mnist" not in list_pretrained("nin_cifar10")
    with pytest.raises(NinError, match="for nin_mnist"):
        get_weights("fast-mnist", model="nin_cifar10")
    with pytest.raises(NinError, match="unknown pretrained"):
        get_weights("fast-imagenet")
    with pytest.raises(NinError, match="overrides"):
        get_model("nin_cifar10", weights="DEFAULT", dropout=0.1)


def test_a_damaged_shipped_file_is_refused(tmp_path, monkeypatch):
    import dataclasses

    damaged = tmp_path / "fast-mnist.safetensors"
    damaged.write_bytes(PRETRAINED["fast-mnist"].path.read_bytes()[:-10] + b"0" * 10)
    entry = dataclasses.replace(PRETRAINED["fast-mnist"])
    monkeypatch.setattr(type(entry), "path", property(lambda self: damaged))
    with pytest.raises(NinError, match="sha256"):
        entry.load()


@pytest.mark.parametrize("tag", ["fast-mnist"])  # paper-mnist: the test below, on MNIST's own test file
def test_mnist_weights_by_tag_reproduce_their_recorded_accuracy(tag, data_root, capsys):
    import json

    assert main(["evaluate", tag, "--data-dir", str(data_root), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    recorded = get_weights(tag).accuracy["MNIST test (10,000)"]
    assert agrees_with_record(result["correct"], result["n"], recorded), (result["correct"], recorded)


def test_paper_mnist_weights_file_scores_as_recorded_on_the_idx_file_and_predicts_digits(data_root, tmp_path, capsys):
    """The Table 4 run's weights in weights/ give its recorded error on MNIST's own test file (`--data-file`), and
    `nin predict paper-mnist IMAGE` reads a digit PNG as the paper's model (standardized pixels inside)."""
    import json

    from PIL import Image

    from nin.data import load_dataset

    record = json.loads((REPO / "results" / "mnist-paper.json").read_text())
    assert not record["in_progress"] and record["weights_sha256"] == get_weights("paper-mnist").sha256
    test_file = data_root / "mnist" / "t10k-images-idx3-ubyte.gz"
    if not test_file.is_file():
        pytest.skip("MNIST's original test files are not in the data folder")
    assert main(["evaluate", str(REPO / record["weights"]), "--data-file", str(test_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 10_000 and agrees_with_record(result["correct"], 10_000, 1 - record["final_error"])
    recorded = get_weights("paper-mnist").accuracy["MNIST test (10,000)"]  # what the tag's registry entry says
    assert agrees_with_record(result["correct"], 10_000, recorded), (result["correct"], recorded)
    alone = tmp_path / test_file.name  # an IDX images file without its labels file beside it
    alone.write_bytes(test_file.read_bytes())
    assert main(["evaluate", "paper-mnist", "--data-file", str(alone)]) == 1
    assert "its labels file t10k-labels-idx1-ubyte[.gz] beside it, which is not there" in capsys.readouterr().err
    test = load_dataset("mnist", "test", data_root)
    for i in range(4):
        Image.fromarray(test.images[i, 0].numpy()).save(tmp_path / f"digit{i}.png")
    assert main(["predict", "paper-mnist", *(str(tmp_path / f"digit{i}.png") for i in range(4)), "--json",
                 "--top-k", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert [row["top"][0]["class"] for row in rows] == [str(label) for label in test.labels[:4].tolist()]


def test_paper_cifar10_weights_file_scores_as_recorded_on_both_test_files_and_predicts(data_root, tmp_path, capsys):
    """Table 1's run to its end: its weights in weights/ give its recorded errors with `nin evaluate --data-file` on
    the JPEG copy's test batch (10,000) and on the exact first 1,000, the tag is that file, and `nin predict
    paper-cifar10 IMAGE` names what the exact images show (GCN + ZCA inside)."""
    import json

    from PIL import Image

    from nin.data import load_dataset

    record = json.loads((REPO / "results" / "cifar10-paper.json").read_text())
    weights = get_weights("paper-cifar10")
    assert not record["in_progress"] and record["weights_sha256"] == weights.sha256
    assert get_model("nin_cifar10", weights="paper-cifar10").state_dict().keys() == \
        get_model("nin_cifar10").state_dict().keys()
    jpeg = data_root / "cifar-10-batches-bin" / "test_batch.bin"
    exact = data_root / "cifar-10-test-lossless-first1000" / "test_batch_first1000.bin"
    if not (jpeg.is_file() and exact.is_file()):
        pytest.skip("the CIFAR-10 test files are not in the data folder")
    for test_file, n, recorded, tag_says in ((jpeg, 10_000, 1 - record["final_error"], weights.accuracy[JPEG_10000]),
                                             (exact, 1_000, 1 - record["exact_1000_error"],
                                              weights.accuracy[EXACT_1000])):
        assert main(["evaluate", str(REPO / record["weights"]), "--data-file", str(test_file), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["n"] == n
        assert agrees_with_record(result["correct"], n, recorded), (test_file.name, result["correct"], recorded)
        assert agrees_with_record(result["correct"], n, tag_says), (test_file.name, result["correct"], tag_says)
    test = load_dataset("cifar10-lossless-first1000", "test", data_root)
    classes = weights.meta["categories"]
    for i in range(8):
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(tmp_path / f"image{i}.png")
    assert main(["predict", "paper-cifar10", *(str(tmp_path / f"image{i}.png") for i in range(8)), "--json",
                 "--top-k", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    right = sum(row["top"][0]["class"] == classes[label] for row, label in zip(rows, test.labels[:8].tolist()))
    assert right >= 6, [row["top"][0]["class"] for row in rows]  # 7 of 8 on this host (a ship read as a car)


def test_installed_wheel_computes_what_the_checkout_computes(tmp_path, data_root):
    """Built as a wheel and installed into a fresh virtual environment (not this checkout), the package's
    shipped CIFAR-10 weights load through get_model / Classifier by tag and give, on 200 of the exact test images,
    the logits and probabilities this checkout gives. (That these weights score their recorded number on all
    1,000: tests/test_folder.py::test_one_answer_for_the_same_weights_everywhere.)"""
    import json
    import site
    import subprocess
    import sys
    import sysconfig

    import torch

    from nin.classifier import Classifier
    from nin.data import load_dataset

    if not (data_root / "cifar-10-test-lossless-first1000").is_dir():
        pytest.skip("the pixel-exact CIFAR-10 test images are not in the data folder")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("network_in_network-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    # the dependencies (torch, numpy, ...) from this environment; a plain path entry, so the checkout's
    # editable-install hook in it is not run and `import nin` can only find the installed wheel
    dependencies = [p for p in {sysconfig.get_path("purelib"), *site.getsitepackages()} if Path(p).is_dir()]
    (target / "deps.pth").write_text("\n".join(dependencies) + "\n")
    script = f"""
import json, torch, nin
from nin.classifier import Classifier
from nin.data import load_dataset
from nin import get_model
from nin.pretrained import get_weights
torch.set_num_threads({torch.get_num_threads()})   # as this process: the same kernels, the same sums
images = load_dataset("cifar10-lossless-first1000", "test", {str(data_root)!r}).images[:200]
model = get_model("nin_cifar10", weights="fast-cifar10")   # fp32, the plain model with the shipped weights
with torch.no_grad():
    logits = model(get_weights("fast-cifar10").transforms()(images))
print(json.dumps({{"file": nin.__file__, "plain": logits.tolist(),
                  "classifier": Classifier.load("fast-cifar10").predict(images).tolist()}}))
"""
    out = subprocess.run([str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(target)  # the installed package, not the checkout

    test = load_dataset("cifar10-lossless-first1000", "test", data_root)
    images = test.images[:200]
    model = get_model("nin_cifar10", weights="fast-cifar10")
    with torch.no_grad():
        logits = model(get_weights("fast-cifar10").transforms()(images))
    torch.testing.assert_close(torch.tensor(result["plain"]), logits, rtol=0, atol=1e-4)
    probabilities = Classifier.load("fast-cifar10").predict(images)  # nin's inference path (bf16 where fast)
    torch.testing.assert_close(torch.tensor(result["classifier"]), probabilities, rtol=0, atol=1e-4)
    assert (probabilities.argmax(1) == test.labels[:200]).double().mean() > 0.8  # a classifier, not noise


def test_data_file_tells_idx_from_cifar_by_content(data_root, tmp_path, capsys):
    """MNIST's test pair as the official .gz files, uncompressed, under the dotted names other mirrors use, and
    mixed; a labels file given for the images, and a name the labels cannot be found by, refused in one line.
    The files hold the test set's first 2,000 digits (IDX headers saying so): every form scores them alike, as the
    model does (the full 10,000 from the official file: the test above)."""
    import gzip
    import json

    from nin.evaluate import evaluate_weights

    source = data_root / "mnist"
    if not (source / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("MNIST's original test files are not in the data folder")
    images, labels = (gzip.decompress((source / f"t10k-{kind}.gz").read_bytes())
                      for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
    n = 2_000
    count = n.to_bytes(4, "big")
    images, labels = images[:4] + count + images[8:16 + n * 28 * 28], labels[:4] + count + labels[8:8 + n]
    expected, _, _ = evaluate_weights("paper-mnist", data_dir=data_root, subset=n)  # the data set's own reader
    assert expected.n == n and expected.correct >= 0.99 * n
    pairs = {"plain": ("t10k-images-idx3-ubyte", images, "t10k-labels-idx1-ubyte", labels),
             "dotted": ("t10k-images.idx3-ubyte", images, "t10k-labels.idx1-ubyte", labels),
             "mixed": ("t10k-images-idx3-ubyte", images, "t10k-labels-idx1-ubyte.gz", gzip.compress(labels))}
    for name, (image_name, image_bytes, label_name, label_bytes) in pairs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / image_name).write_bytes(image_bytes)
        (tmp_path / name / label_name).write_bytes(label_bytes)
        assert main(["evaluate", "paper-mnist", "--data-file", str(tmp_path / name / image_name), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert (result["n"], result["correct"]) == (n, expected.correct), name
    assert main(["evaluate", "paper-mnist", "--data-file", str(tmp_path / "dotted" / "t10k-labels.idx1-ubyte")]) == 1
    assert "an IDX labels file; give the images file" in capsys.readouterr().err
    (tmp_path / "renamed").mkdir()
    (tmp_path / "renamed" / "test.gz").write_bytes(gzip.compress(images))
    assert main(["evaluate", "paper-mnist", "--data-file", str(tmp_path / "renamed" / "test.gz")]) == 1
    assert "found beside it by name" in capsys.readouterr().err
    for extra in (["--split", "val"], ["--dataset", "mnist"]):  # flags that choose another test set: not with a file
        assert main(["evaluate", "paper-mnist", "--data-file", str(tmp_path / "plain" / "t10k-images-idx3-ubyte"),
                     *extra]) == 1
        assert f"{extra[0]}" in capsys.readouterr().err
