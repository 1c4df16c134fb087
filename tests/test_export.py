"""Exported graphs compute what `nin predict` computes: parity on the 1,000 pixel-exact CIFAR-10 test images."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nin.deploy.backends import load_runner
from nin.cli import main
from nin.data import load_dataset
from nin.errors import NinError
from nin.deploy.export import INPUT_NAME, build_exported, export_onnx, export_openvino, export_torchscript

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = REPO / "weights" / "fast-cifar10.safetensors"  # standardize, batch norm, tta_flip
MNIST = REPO / "weights" / "fast-mnist.safetensors"  # 1 channel, 28 px, scale
PAPER = REPO / "weights" / "caffe-authors-cifar10.safetensors"  # the authors' model: GCN + ZCA inside the graph
CLIENT_MARKER = "<!-- the client below is run by tests/test_export.py and tests/test_python_api.py -->"


@pytest.fixture(scope="module")
def cifar_images(data_root) -> np.ndarray:
    if not (data_root / "cifar-10-test-lossless-first1000").is_dir():
        pytest.skip("the pixel-exact CIFAR-10 test images are not in the data folder")
    return load_dataset("cifar10-lossless-first1000", "test", data_root).images.numpy()  # uint8 (1000, 3, 32, 32)


@pytest.fixture(scope="module")
def reference(cifar_images) -> np.ndarray:
    """The plain fp32 torch model (flip-averaged, unfolded), on the 1,000 images."""
    runner = load_runner("torch-fp32", CIFAR10)
    return np.concatenate([runner(chunk) for chunk in np.split(cifar_images, 4)])


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exports")
    export_onnx(CIFAR10, folder / "cifar10.onnx")
    export_torchscript(CIFAR10, folder / "cifar10.pt")
    return folder


def _parity(runner, images: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    got = np.concatenate([runner(chunk) for chunk in np.split(images, 4)])
    assert got.shape == reference.shape and got.dtype == np.float32
    return float(np.abs(got - reference).max()), float((got.argmax(1) == reference.argmax(1)).mean())


def test_sidecar_describes_the_graph(exports):
    info = json.loads((exports / "cifar10.onnx.json").read_text())
    assert info["classes"][3] == "cat" and info["opset"] == 17 and info["tta_flip"] is True
    assert info["input"] == {**info["input"], "name": INPUT_NAME, "layout": "NCHW uint8", "shape": ["N", 3, 32, 32]}
    assert info["outputs"] == {"probabilities": ["N", 10], "class_maps": ["N", 10, 8, 8]}
    assert info["preprocessing"]["kind"] == "standardize" and len(info["preprocessing"]["std"]) == 3
    assert re.fullmatch(r"[0-9a-f]{64}", info["source_weights"]["sha256"])


@pytest.mark.parametrize("backend, file", [("onnxruntime", "cifar10.onnx"), ("torchscript", "cifar10.pt")])
def test_parity_on_1000_real_images(backend, file, exports, cifar_images, reference):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    max_difference, agreement = _parity(load_runner(backend, exports / file), cifar_images, reference)
    print(f"{backend}: max |Δp| {max_difference:.2e}, top-1 agreement {agreement:.2%}")
    assert agreement >= 0.999 and max_difference < 1e-4


def test_nin_inference_path_on_1000_real_images(cifar_images, reference):
    """`nin predict` / `nin evaluate`'s path (batch norm folded, bf16 where the CPU has it) against plain fp32."""
    from nin.runtime import select_precision

    max_difference, agreement = _parity(load_runner("torch", CIFAR10), cifar_images, reference)
    print(f"nin path ({select_precision('auto', torch.device('cpu'))}): max |Δp| {max_difference:.2e}, "
          f"top-1 agreement {agreement:.2%}")
    if select_precision("auto", torch.device("cpu")) is None:  # fp32 here: the same function as the reference
        assert agreement >= 0.999 and max_difference < 1e-4
    else:  # bf16: rounding moves probabilities by up to a few 1e-2, and a close call may flip
        assert agreement >= 0.99 and max_difference < 0.1


def test_openvino_parity(tmp_path, cifar_images, reference):
    pytest.importorskip("openvino", reason="openvino not installed (pip install 'network-in-network[openvino]')")
    export_openvino(CIFAR10, tmp_path / "cifar10.xml")
    max_difference, agreement = _parity(load_runner("openvino", tmp_path / "cifar10.xml"), cifar_images, reference)
    print(f"openvino: max |Δp| {max_difference:.2e}, top-1 agreement {agreement:.2%}")
    assert agreement >= 0.999 and max_difference < 1e-4


def test_folded_module_and_its_class_maps(cifar_images, reference):
    """The torch module behind every export (and nin serve): batch norm folded, flips in one pass."""
    module, _ = build_exported(CIFAR10)
    with torch.no_grad():
        probabilities, maps = module(torch.from_numpy(cifar_images[:200]))
    assert np.abs(probabilities.numpy() - reference[:200]).max() < 1e-5
    assert maps.shape == (200, 10, 8, 8)  # their spatial means are the flip-averaged logits
    torch.testing.assert_close(maps.mean(dim=(2, 3)).softmax(dim=1), probabilities, atol=1e-6, rtol=1e-5)


def test_mnist_export_one_channel(data_root, tmp_path):
    pytest.importorskip("onnxruntime")
    images = load_dataset("mnist", "test", data_root).images[:200].numpy()  # uint8 (200, 1, 28, 28)
    export_onnx(MNIST, tmp_path / "mnist.onnx")
    export_torchscript(MNIST, tmp_path / "mnist.pt")
    reference = load_runner("torch-fp32", MNIST)(images)
    for backend, file in [("onnxruntime", "mnist.onnx"), ("torchscript", "mnist.pt")]:
        got = load_runner(backend, tmp_path / file)(images)
        assert np.abs(got - reference).max() < 1e-4 and (got.argmax(1) == reference.argmax(1)).all()
    assert json.loads((tmp_path / "mnist.onnx.json").read_text())["input"]["shape"] == ["N", 1, 28, 28]


def test_gcn_zca_inside_the_graph(cifar_images, tmp_path):
    pytest.importorskip("onnxruntime")
    export_onnx(PAPER, tmp_path / "paper.onnx")
    assert json.loads((tmp_path / "paper.onnx.json").read_text())["preprocessing"]["zca"] == "ZCA inside"
    images = cifar_images[:37]  # a batch size the graph was not traced with
    got, reference = load_runner("onnxruntime", tmp_path / "paper.onnx")(images), load_runner("torch-fp32", PAPER)(images)
    assert np.abs(got - reference).max() < 1e-4


def test_gcn_lcn_inside_the_graph(cifar_images, tmp_path):
    """SVHN's preprocessing (GCN, then the 7x7 LCN convolution) exports too: its kernel is a constant of the graph."""
    pytest.importorskip("onnxruntime")
    from nin.checkpoint import save_weights
    from nin.models import NiN, model_config
    from nin.transforms import Preprocessing

    torch.manual_seed(0)
    weights = tmp_path / "svhn.safetensors"
    save_weights(weights, NiN(model_config("nin_svhn")).eval(), Preprocessing("gcn_lcn"),
                 {"dataset": "svhn", "classes": [str(digit) for digit in range(10)]})
    export_onnx(weights, tmp_path / "svhn.onnx")
    assert json.loads((tmp_path / "svhn.onnx.json").read_text())["preprocessing"]["lcn"] == "LCN inside"
    import onnxruntime

    images = cifar_images[:37]  # a batch size the graph was not traced with
    session = onnxruntime.InferenceSession(str(tmp_path / "svhn.onnx"), providers=["CPUExecutionProvider"])
    probabilities, maps = session.run(None, {INPUT_NAME: images})
    with torch.no_grad():
        reference_probabilities, reference_maps = (t.numpy() for t in build_exported(weights)[0](torch.from_numpy(images)))
    assert np.abs(probabilities - reference_probabilities).max() < 1e-4
    # the class maps of an untrained model are small but follow the input: compare them relative to their spread
    spread = reference_maps.std(axis=0).max()
    assert spread > 0 and np.abs(maps - reference_maps).max() < 1e-3 * spread


def test_cli_export_and_errors(tmp_path, capsys, monkeypatch):
    assert main(["export", str(MNIST), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    assert (tmp_path / "m.pt").is_file() and (tmp_path / "m.pt.json").is_file()
    assert main(["export", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x.onnx")]) == 1
    assert "missing.safetensors" in capsys.readouterr().err
    for fmt, name in [("onnx", "m.txt"), ("torchscript", "m.onnx")]:  # a file `--backend` would not recognise
        assert main(["export", str(MNIST), "--format", fmt, "--out", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert "is written as FILE." in err and not (tmp_path / name).exists()
    assert err.strip().endswith("for a .onnx file, --format onnx")  # the format the suffix asks for
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the package were absent
    with pytest.raises(NinError, match="network-in-network\\[openvino\\]"):
        export_openvino(MNIST, tmp_path / "m.xml")


@pytest.mark.parametrize("hidden, argv, extra", [
    ("onnx", ["export", "fast-mnist", "--format", "onnx", "--out", "m.onnx"], "onnx"),
    ("openvino", ["export", "fast-mnist", "--format", "openvino", "--out", "m.xml"], "openvino"),
    ("onnxruntime", ["predict", "fast-mnist", "digit.png", "--backend", "onnxruntime"], "onnx"),
    ("matplotlib", ["visualize", "fast-mnist", "--images", "digit.png", "--out", "vis"], "viz"),
    ("fastapi", ["serve", "fast-mnist", "--port", "18765"], "serve"),
])
def test_a_missing_extra_is_named_in_one_line(hidden, argv, extra, tmp_path, capsys, monkeypatch):
    """Without an optional package, the command says which extra to install, writes nothing, and exits 1."""
    monkeypatch.chdir(tmp_path)
    Image.new("L", (28, 28)).save("digit.png")
    monkeypatch.setitem(sys.modules, hidden, None)  # `import hidden` now fails as when it is not installed
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f'needs the {hidden} package: pip install "network-in-network[{extra}]"' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digit.png"]


def test_export_without_out_names_the_file_after_the_weights(tmp_path, capsys, monkeypatch):
    from nin.deploy.export import default_out

    monkeypatch.chdir(tmp_path)
    assert main(["export", "fast-mnist", "--format", "torchscript"]) == 0
    assert "fast-mnist.pt:" in capsys.readouterr().out
    assert (tmp_path / "fast-mnist.pt").is_file() and (tmp_path / "fast-mnist.pt.json").is_file()
    run = tmp_path / "runs" / "my-run"
    run.mkdir(parents=True)
    assert default_out(f"{run}/", "onnx") == Path("my-run.onnx")  # a run folder: its name, trailing slash or not
    assert default_out(MNIST, "openvino") == Path(MNIST.name.removesuffix(".safetensors") + ".xml")
    assert default_out("fast-cifar10", "onnx") == Path("fast-cifar10.onnx")
    assert default_out(tmp_path / ".safetensors", "onnx") == Path("model.onnx")
    # the same default name from other weights (two runs' model.safetensors) is refused, the earlier export kept
    for folder, source in (("a", MNIST), ("b", REPO / "weights" / "fast-fashion-mnist.safetensors")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.safetensors").write_bytes(source.read_bytes())
    assert main(["export", "a/model.safetensors", "--format", "torchscript"]) == 0
    assert main(["export", "a/model.safetensors", "--format", "torchscript"]) == 0  # its own: replaced
    before = (tmp_path / "model.pt").read_bytes()
    capsys.readouterr()
    assert main(["export", "b/model.safetensors", "--format", "torchscript"]) == 1
    err = capsys.readouterr().err
    assert "model.pt (nin export's default name" in err and "other weights" in err and "--out" in err
    assert (tmp_path / "model.pt").read_bytes() == before
    assert main(["export", "b/model.safetensors", "--format", "torchscript", "--force"]) == 0
    assert (tmp_path / "model.pt").read_bytes() != before


def _client_script() -> str:
    text = (REPO / "docs" / "deploy.md").read_text()
    return text.split(CLIENT_MARKER, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_docs_client_agrees_with_nin_predict(exports, cifar_images, tmp_path, capsys):
    script = _client_script()
    assert len(script.strip().splitlines()) <= 17 and not re.search(r"^\s*(from|import) nin", script, re.M)
    (tmp_path / "client.py").write_text(script)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"test{i}.png")
        Image.fromarray(cifar_images[i].transpose(1, 2, 0)).save(paths[-1])
    assert main(["predict", str(CIFAR10), *map(str, paths), "--json", "--device", "cpu"]) == 0
    predictions = json.loads(capsys.readouterr().out)["predictions"]
    for path, prediction in zip(paths, predictions):
        out = subprocess.run([sys.executable, str(tmp_path / "client.py"), str(exports / "cifar10.onnx"), str(path)],
                             capture_output=True, text=True, timeout=120, check=True).stdout.split()
        best = prediction["top"][0]  # nin predict's default path may run in bf16: the same class, close probability
        assert out[0] == best["class"] and abs(float(out[1]) - best["probability"]) < 0.02


def test_predict_backends_agree_with_torch(tmp_path, capsys):
    """`nin predict --backend` gives the torch path's top-1 through TorchScript and ONNX Runtime."""
    pytest.importorskip("onnxruntime")
    from nin.cli import main

    weights = Path(__file__).resolve().parents[1] / "weights" / "fast-cifar10.safetensors"
    images = load_dataset("cifar10-lossless-first1000", "test", os.environ.get("NIN_DATA")).images[:4]
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    tops = {}
    for backend in ("torch", "torch-fp32", "torchscript", "onnxruntime"):
        assert main(["predict", str(weights), str(tmp_path), "--backend", backend, "--json", "--top-k", "1"]) == 0
        tops[backend] = [p["top"][0] for p in json.loads(capsys.readouterr().out)["predictions"]]
    # an exported graph itself, read through its sidecar (as docs/deploy.md says)
    for backend, name in (("torchscript", "g.pt"), ("onnxruntime", "g.onnx")):
        assert main(["export", str(weights), "--format", backend.replace("onnxruntime", "onnx"),
                     "--out", str(tmp_path / "graphs" / name)]) == 0
        capsys.readouterr()
        assert main(["predict", str(tmp_path / "graphs" / name), str(tmp_path), "--backend", backend, "--json",
                     "--top-k", "1"]) == 0
        tops[name] = [p["top"][0] for p in json.loads(capsys.readouterr().out)["predictions"]]
    for backend, tolerance in (("torch", 0.02), ("torchscript", 1e-4), ("onnxruntime", 1e-4), ("g.pt", 1e-4),
                               ("g.onnx", 1e-4)):  # torch: maybe bf16
        assert [t["class"] for t in tops[backend]] == [t["class"] for t in tops["torch-fp32"]], backend
        assert max(abs(a["probability"] - b["probability"])
                   for a, b in zip(tops[backend], tops["torch-fp32"])) < tolerance, backend


def test_bench_inference_times_every_backend(capsys):
    pytest.importorskip("onnxruntime")
    from nin.cli import main

    weights = Path(__file__).resolve().parents[1] / "weights" / "fast-cifar10.safetensors"
    assert main(["bench", "--inference", str(weights), "--quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["backends"]
    assert {"torch", "torch-fp32", "torch-folded", "torchscript", "onnxruntime"} <= {r["backend"] for r in rows}
    assert all(r["images_per_second"] > 0 and r["latency_p99_ms"] >= r["latency_p50_ms"] > 0 for r in rows)
