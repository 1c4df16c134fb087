"""The Python user's pieces (timm / torchvision style) and one answer through every door for the same photo."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nin
from nin import Classifier, get_model, get_weights
from nin.cli import main
from nin.data import load_dataset
from nin.errors import NinError
from nin.inference import accuracy_tolerance, agrees_with_record, inference_model, predict_logits
from nin.models import UnknownModelError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# One number per result: the recorded accuracy, within what another CPU's bf16 kernels may move it
# ---------------------------------------------------------------------------------------------

def test_the_tolerance_check_fails_a_number_off_by_more_than_the_tolerance():
    n, recorded = 10_000, 0.8971
    allowed = accuracy_tolerance(n)
    assert allowed >= 1 and accuracy_tolerance(1_000) <= allowed
    assert agrees_with_record(8971, n, recorded) and agrees_with_record(8971 + allowed, n, recorded)
    assert agrees_with_record(8971 - allowed, n, recorded)
    assert not agrees_with_record(8971 + allowed + 1, n, recorded)  # one image more than the arithmetic allows
    assert not agrees_with_record(8971 - allowed - 1, n, recorded)
    assert not agrees_with_record(8900, n, recorded)


def test_weights_meta_says_categories_input_flips_host_and_tolerance():
    meta = get_weights("fast-cifar10").meta
    assert meta["categories"][:3] == ["airplane", "automobile", "bird"] and len(meta["categories"]) == 10
    assert (meta["input_size"], meta["in_channels"], meta["tta_flip"]) == (32, 3, True)
    assert meta["recorded_on"] and set(meta["tolerance_images"]) == set(meta["accuracy"])
    assert "centre square" in meta["input"]["crop"] and "white" in meta["input"]["alpha"]
    assert get_weights("fast-mnist").meta["categories"] == [str(d) for d in range(10)]


# ---------------------------------------------------------------------------------------------
# Fine-tuning and inspecting from Python
# ---------------------------------------------------------------------------------------------

def test_arguments_that_were_quietly_taken_for_something_else_are_refused():
    """weights="" had loaded the DEFAULT weights, an unknown precision ran as "auto", a negative subset scored the
    last images, and a smaller num_classes than the model's gave a confusion matrix counted past its rows."""
    from nin.evaluate import evaluate, evaluate_weights

    for weights in ("", " ", 123):
        with pytest.raises(NinError, match="expected a pretrained tag"):
            get_model("nin_mnist", weights=weights)
    with pytest.raises(NinError, match='pass model='):
        get_weights("DEFAULT")
    for call in (lambda: Classifier.load("paper-mnist", precision="fp16"),
                 lambda: evaluate_weights("paper-mnist", precision="fp8", subset=10)):
        with pytest.raises(NinError, match="precision 'fp\\d+': expected one of auto, fp32, bf16"):
            call()
    with pytest.raises(NinError, match="subset=-5"):
        evaluate_weights("paper-mnist", subset=-5)
    model = get_model("nin_mnist").eval()
    batches = [(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.int64))]
    with pytest.raises(NinError, match="num_classes=3, but the model has 10 class maps"):
        evaluate(model, batches, num_classes=3)
    assert evaluate(model, batches, num_classes=10).n == 2


def test_unknown_model_names_are_nin_errors():
    with pytest.raises(NinError, match="unknown model 'nin_cifar11'"):
        get_model("nin_cifar11")
    with pytest.raises(KeyError):  # and still a KeyError, for code that caught that
        nin.models.model_config("nin_cifar11")
    with pytest.raises(UnknownModelError, match="unknown NiNConfig field"):
        get_model("nin_cifar10", colour=True)
    with pytest.raises(NinError, match="overrides"):
        get_model("nin_cifar10", weights="fast-cifar10", dropout=0.1)


def test_reset_classifier_keeps_the_features_and_starts_the_class_maps_afresh():
    trained = get_model("nin_cifar10", weights="fast-cifar10")
    assert trained.classes[3] == "cat"
    model = get_model("nin_cifar10", weights="fast-cifar10", num_classes=3)
    assert model.config.num_classes == 3 and model.classes is None
    assert model.class_map_layer.out_channels == 3
    assert type(model.blocks[-1].norms[-1]) is type(trained.blocks[-1].norms[-1])  # the fast model's: no norm there
    kept = {k: v for k, v in trained.state_dict().items() if not k.startswith("blocks.2.convs.2")
            and not k.startswith("blocks.2.norms.2")}
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in kept.items())
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    fresh = get_model("nin_cifar10", batch_norm=True)  # a class-map layer with a ReLU, so with a batch norm
    fresh.reset_classifier(5, classes=list("abcde"))
    assert fresh.blocks[-1].norms[-1].num_features == 5
    assert fresh.classes == list("abcde") and fresh(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    fc = get_model("nin_cifar10_fc")
    fc.reset_classifier(4)
    assert fc(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_fine_tuning_from_python_beats_chance_on_a_three_class_folder(data_root):
    """get_model(..., weights=, num_classes=3) -> a few SGD steps on real CIFAR-10 images of three classes."""
    torch.manual_seed(0)
    data = load_dataset("cifar10", "train", data_root)
    test = load_dataset("cifar10-lossless-first1000", "test", data_root)
    wanted = torch.tensor([0, 3, 8])  # airplane, cat, ship

    def pick(split, count):
        index = torch.cat([torch.nonzero(split.labels == c).flatten()[:count] for c in wanted.tolist()])
        return split.images[index], torch.bucketize(split.labels[index], wanted)

    train_x, train_y = pick(data, 64)
    test_x, test_y = pick(test, 30)
    weights = get_weights("fast-cifar10")
    transform = weights.transforms()
    model = get_model("nin_cifar10", weights="fast-cifar10", num_classes=3).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    x = transform(train_x)
    for step in range(24):
        batch = torch.randperm(len(x))[:32]
        loss = torch.nn.functional.cross_entropy(model(x[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(transform(test_x)).argmax(1) == test_y).double().mean())
    assert accuracy > 0.6, accuracy  # chance is 1/3


# ---------------------------------------------------------------------------------------------
# Transforms and data sets as a Python user meets them
# ---------------------------------------------------------------------------------------------

def test_transforms_resize_tensors_of_any_size_as_they_resize_pil_images():
    transform = get_weights("fast-cifar10").transforms()
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 227, 300), dtype=torch.uint8, generator=generator)
    as_pil = transform(Image.fromarray(image.permute(1, 2, 0).numpy()))
    assert torch.equal(transform(image), as_pil) and as_pil.shape == (1, 3, 32, 32)
    as_float = transform(image.float() / 255)  # floats resized in Pillow's 32-bit float mode: close, not rounded
    assert (as_float - as_pil).abs().max() < 0.05
    assert transform(torch.rand(2, 1, 40, 50)).shape == (2, 3, 32, 32)


def test_image_dataset_reads_and_indexes_like_a_torch_dataset(data_root):
    data = load_dataset("mnist", "test", data_root)
    text = repr(data)
    assert len(text) < 200 and "10000 images" in text and "1×28×28" in text
    image, label = data[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and label == int(data.labels[0])
    assert len(data) == 10_000 and data[-1][1] == int(data.labels[-1])


def test_evaluate_json_numbers_mean_what_they_say(data_root, capsys):
    assert main(["evaluate", "fast-mnist", "--data-dir", str(data_root), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["error"] == (result["n"] - result["correct"]) / result["n"]
    assert len(repr(result["error"])) <= 8  # 0.003, not 0.0030000000000000027


# ---------------------------------------------------------------------------------------------
# One answer through every door
# ---------------------------------------------------------------------------------------------

def _photos(data_root: Path, folder: Path) -> dict[str, Path]:
    """Three CIFAR-10 test images as a user would hold them: an RGBA PNG with a transparent border, a JPEG with an
    EXIF rotation, and a wide photo (the image in the middle of a wider canvas)."""
    images = load_dataset("cifar10-lossless-first1000", "test", data_root).images
    cat, ship, plane = (Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((96, 96), Image.BICUBIC)
                        for i in (0, 1, 3))
    rgba = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    rgba.paste(cat.convert("RGBA"), (16, 16))
    paths = {"rgba": folder / "rgba.png", "rotated": folder / "rotated.jpg", "wide": folder / "wide.png"}
    rgba.save(paths["rgba"])
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: stored turned the other way
    ship.rotate(90, expand=True).save(paths["rotated"], quality=95, exif=exif)
    wide = Image.new("RGB", (240, 96), (127, 127, 127))
    wide.paste(plane, (72, 0))
    wide.save(paths["wide"])
    return paths


def test_one_answer_through_every_door(data_root, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    fastapi = pytest.importorskip("fastapi.testclient")
    from nin.deploy.export import export_onnx
    from nin.deploy.serve import create_app

    photos = _photos(data_root, tmp_path)
    order = list(photos)
    classifier = Classifier.load("fast-cifar10")
    doors = {"Classifier": classifier.predict([photos[k] for k in order]).numpy()}

    assert main(["predict", "fast-cifar10", *[str(photos[k]) for k in order], "--json", "--top-k", "10"]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    predicted = np.zeros((len(order), 10))
    for i, row in enumerate(rows):
        for item in row["top"]:
            predicted[i, item["index"]] = item["probability"]
    doors["nin predict"] = predicted

    client = fastapi.TestClient(create_app("fast-cifar10"))
    served = np.zeros((len(order), 10))
    for i, key in enumerate(order):
        answer = client.post("/predict?top_k=10", files={"file": (photos[key].name, photos[key].read_bytes())}).json()
        for item in answer["top"]:
            served[i, item["index"]] = item["probability"]
    doors["nin serve"] = served

    weights = get_weights("fast-cifar10")  # the Python user's own path: get_model + transforms + the meta's flips
    runner = inference_model(get_model("nin_cifar10", weights="fast-cifar10"), classifier.amp_dtype)
    batch = weights.transforms()([photos[k] for k in order])
    doors["get_model + transforms"] = predict_logits(runner, batch, tta_flip=weights.meta["tta_flip"]).softmax(1).numpy()

    model_file = tmp_path / "c10.onnx"
    export_onnx("fast-cifar10", model_file)
    client_code = _documented_client()
    clients = []
    for key in order:
        out = subprocess.run([sys.executable, "-c", client_code, str(model_file), str(photos[key])],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        clients.append(out.stdout.split())
    reference = doors["Classifier"]
    for name, probabilities in doors.items():
        assert (probabilities.argmax(1) == reference.argmax(1)).all(), (name, probabilities.argmax(1))
        assert np.abs(probabilities - reference).max() < 1e-5 or name == "nin predict" and \
            np.abs(probabilities - reference).max() < 1e-4, (name, np.abs(probabilities - reference).max())
    names = weights.meta["categories"]
    for (label, probability), row in zip(clients, reference):  # fp32 ONNX against the bf16 path: bf16's rounding
        assert label == names[row.argmax()] and math.isclose(float(probability), row.max(), abs_tol=2e-2)


def _documented_client() -> str:
    text = (REPO / "docs" / "deploy.md").read_text()
    start = text.index("<!-- the client below is run by tests/")
    block = text[start:].split("```python\n", 1)[1].split("```", 1)[0]
    return block
