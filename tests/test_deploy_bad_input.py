"""Bad input to `nin predict --backend`, `nin export` and `nin serve`: one line naming the file or flag, exit 1.

The graphs are the shipped paper-mnist weights exported once (ONNX, TorchScript, and OpenVINO when installed);
each test damages a copy of them, or of their sidecar, in its own folder.
"""

import importlib.util
import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nin.cli import main
from nin.deploy.export import OPSET, build_exported, export_onnx, export_openvino, export_torchscript, sidecar

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
GRAPHS = {"onnxruntime": "m.onnx", "torchscript": "m.pt", **({"openvino": "m.xml"} if HAS_OPENVINO else {})}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    """paper-mnist as every format (1×28×28, 10 classes), and fast-cifar10's sidecar (3×32×32) as cifar.json."""
    folder = tmp_path_factory.mktemp("graphs")
    export_onnx("paper-mnist", folder / "m.onnx")
    export_torchscript("paper-mnist", folder / "m.pt")
    if HAS_OPENVINO:
        export_openvino("paper-mnist", folder / "m.xml")
    module, meta = build_exported("fast-cifar10")
    (folder / "cifar.json").write_text(json.dumps(sidecar(module, meta, "fast-cifar10", "onnx", OPSET)))
    return folder


def _copy(exports: Path, name: str, folder: Path) -> Path:
    """The export ``name`` with its sidecar (and OpenVINO's .bin) copied into ``folder``."""
    for file in (name, f"{name}.json", *([Path(name).with_suffix(".bin").name] if name.endswith(".xml") else [])):
        shutil.copy(exports / file, folder / file)
    return folder / name


def _digit(folder: Path) -> Path:
    path = folder / "digit.png"
    Image.new("L", (28, 28)).save(path)
    return path


def _one_line_error(capsys, *parts: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("nin "), err
    assert all(part in err for part in parts), err
    return err


@pytest.mark.parametrize("text, what", [
    (b"side\n", "not JSON"), (b"{}", "no 'model', no 'classes'"), (b"[]", "a JSON list, not an object"),
    (b'{"model": {}, "classes": []}', "'model' is not a NiN config"),
    (b'{"model": {"in_channels": 1}, "classes": ["a"]}', "'model' is not a NiN config")])
def test_a_sidecar_that_is_not_an_export_description_is_named(exports, tmp_path, capsys, text, what):
    """Was a JSONDecodeError, KeyError 'classes' or TypeError traceback."""
    pytest.importorskip("onnxruntime")
    graph = _copy(exports, "m.onnx", tmp_path)
    (tmp_path / "m.onnx.json").write_bytes(text)
    assert main(["predict", str(graph), str(_digit(tmp_path)), "--backend", "onnxruntime"]) == 1
    _one_line_error(capsys, f"{graph}.json: not a nin export description ({what}", "'classes'")


def test_a_sidecar_with_the_wrong_class_names_is_named(exports, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    graph = _copy(exports, "m.onnx", tmp_path)
    info = json.loads((tmp_path / "m.onnx.json").read_text())
    (tmp_path / "m.onnx.json").write_text(json.dumps({**info, "classes": ["only", "three", "names"]}))
    assert main(["predict", str(graph), str(_digit(tmp_path)), "--backend", "onnxruntime"]) == 1
    _one_line_error(capsys, "'classes' is not a list of the model's 10 class names")


@pytest.mark.parametrize("backend, name, damage, what", [
    ("onnxruntime", "m.onnx", "truncate", "unreadable ONNX model (damaged or truncated?)"),
    ("torchscript", "m.pt", "truncate", "unreadable TorchScript file (damaged or truncated?)"),
    ("openvino", "m.xml", "truncate", "unreadable OpenVINO model (damaged or truncated?)"),
    ("openvino", "m.xml", "xml", "unreadable OpenVINO model (damaged or truncated?)"),
    ("openvino", "m.bin", "truncate", "unreadable OpenVINO model (damaged or truncated?)")])
def test_an_unreadable_graph_is_named(exports, tmp_path, capsys, backend, name, damage, what):
    """Was onnxruntime's InvalidProtobuf, torch's PytorchStreamReader or OpenVINO's RuntimeError traceback."""
    pytest.importorskip({"torchscript": "torch"}.get(backend, backend))
    graph = _copy(exports, GRAPHS[backend], tmp_path)
    damaged = tmp_path / name
    damaged.write_bytes(damaged.read_bytes()[:5000] if damage == "truncate" else b"<xml")
    assert main(["predict", str(graph), str(_digit(tmp_path)), "--backend", backend]) == 1
    err = _one_line_error(capsys, f"{graph}: {what}: ")
    assert "Exception from" not in err and ".cpp:" not in err  # OpenVINO's source locations left out


@pytest.mark.parametrize("backend, said", [
    ("onnxruntime", "takes 1×28×28 images, but its sidecar m.onnx.json describes 3×32×32 images"),
    ("torchscript", "does not take the 3×32×32 images its sidecar m.pt.json describes"),
    ("openvino", "takes 1×28×28 images, but its sidecar m.xml.json describes 3×32×32 images")])
def test_a_graph_beside_another_models_sidecar_is_refused_at_load(exports, tmp_path, capsys, backend, said):
    """An MNIST graph beside a CIFAR-10 sidecar: was onnxruntime's "index: 2 Got: 32 Expected: 28" traceback."""
    pytest.importorskip({"torchscript": "torch"}.get(backend, backend))
    graph = _copy(exports, GRAPHS[backend], tmp_path)
    shutil.copy(exports / "cifar.json", f"{graph}.json")
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["predict", str(graph), str(image), "--backend", backend]) == 1
    _one_line_error(capsys, f"{graph}: {said} (is it another model's?)")


def test_the_graphs_as_exported_still_predict(exports, tmp_path, capsys):
    """The checks at load pass the graphs `nin export` writes, each with its own sidecar."""
    digit = _digit(tmp_path)
    for backend, name in GRAPHS.items():
        if backend == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
            continue
        assert main(["predict", str(exports / name), str(digit), "--backend", backend, "--json"]) == 0, backend
        assert len(json.loads(capsys.readouterr().out)["predictions"][0]["top"]) == 5


@pytest.mark.parametrize("out", [".", "./", "/", "sub", "sub/", "new/"])
def test_export_out_naming_a_folder_says_so(tmp_path, capsys, monkeypatch, out):
    """Was `ValueError: PosixPath('.') has an empty name` for . ./ /, and "--format onnx is written as FILE.onnx"
    for an existing folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    assert main(["export", "paper-mnist", "--out", out]) == 1
    example = f"{out.rstrip('/')}/paper-mnist.onnx"
    _one_line_error(capsys, f"--out {out}: names a folder; expected a file path such as {example}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub"]


@pytest.fixture(scope="module")
def client():
    pytest.importorskip("fastapi", reason="nin serve needs the serve extra")
    pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    from nin.deploy.serve import create_app

    return TestClient(create_app("paper-mnist", max_upload_bytes=2**20))  # nin serve --max-upload-mb 1


def _png(size: int = 0) -> bytes:
    """A 28×28 PNG, padded with zeros after its end to ``size`` bytes (Pillow reads up to IEND)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((28, 28), 40, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue().ljust(size, b"\0")


def test_the_upload_limit_is_the_configured_one_everywhere(client):
    """Was "exceeds the 1,064,960-byte limit" (the limit plus the multipart allowance) for a multipart upload
    while /health and raw uploads said 1,048,576."""
    assert client.get("/health").json()["max_upload_bytes"] == 1_048_576
    big = _png(2_000_199)
    multipart = client.post("/predict", files={"file": ("big.png", big, "image/png")})
    raw = client.post("/predict", content=big, headers={"content-type": "image/png"})
    for response in (multipart, raw):
        assert response.status_code == 413 and "exceeds the 1,048,576-byte limit" in response.json()["error"]
    assert "1,064,960" not in multipart.json()["error"]
    at_limit = client.post("/predict", files={"file": ("full.png", _png(2**20), "image/png")})  # the form around it
    assert at_limit.status_code == 200, at_limit.text  # is allowed for
    over = client.post("/predict", files={"file": ("over.png", _png(2**20 + 1), "image/png")})
    assert over.status_code == 413
    assert over.json()["error"] == "upload of 1,048,577 bytes exceeds the 1,048,576-byte limit"


@pytest.mark.parametrize("suffix", [".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".bmp", ".webp"])
def test_serve_takes_the_image_formats_predict_takes(client, tmp_path, capsys, suffix):
    """Was 415 for TIFF (and PPM/PGM/PBM), which `nin predict` reads; the same top class either way."""
    path = tmp_path / f"digit{suffix}"
    pixels = np.zeros((28, 28), np.uint8)
    pixels[6:22, 12:16] = 255  # a one
    Image.fromarray(pixels).convert("1" if suffix == ".pbm" else "L").save(path)
    assert main(["predict", "paper-mnist", str(path), "--json", "--top-k", "1"]) == 0
    expected = json.loads(capsys.readouterr().out)["predictions"][0]["top"][0]
    upload = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
    response = client.post("/predict?top_k=1", files=upload)
    assert response.status_code == 200, response.text
    assert response.json()["top"][0]["class"] == expected["class"]


def test_serve_still_refuses_an_image_type_outside_the_list(client):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, "ICO")
    response = client.post("/predict", files={"file": ("x.ico", buffer.getvalue(), "image/x-icon")})
    assert response.status_code == 415 and "TIFF" in response.json()["error"] and "\n" not in response.json()["error"]
