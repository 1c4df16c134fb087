"""nin serve through FastAPI's TestClient: real CIFAR-10 test images, every refusal a 4xx JSON, still serving after."""

import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="nin serve needs the serve extra (fastapi, uvicorn, python-multipart)")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette 1.x suggests httpx2 for its TestClient (a deprecation note)
    from fastapi.testclient import TestClient  # noqa: E402

from nin.data import load_dataset  # noqa: E402
from nin.deploy.serve import MAX_UPLOAD_BYTES, create_app  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "fast-cifar10.safetensors"


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app(WEIGHTS))


@pytest.fixture(scope="module")
def cat_png(data_root) -> bytes:
    """Test image 0 (a cat, which the shipped weights classify correctly) as a PNG file's bytes."""
    data = load_dataset("cifar10-lossless-first1000", "test", data_root)
    assert data.classes[int(data.labels[0])] == "cat"
    return _encode(data.images[0].permute(1, 2, 0).numpy(), "PNG")


def _encode(pixels: np.ndarray, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format, **options)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit RGB pixels: a decompression bomb's first bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _still_serving(client: TestClient, cat_png: bytes) -> None:
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/predict", files={"file": ("cat.png", cat_png, "image/png")}).json()["top"][0]["class"] == "cat"


def test_health_page_and_docs(client):
    health = client.get("/health").json()
    assert health["classes"][3] == "cat" and health["input"] == [3, 32, 32]
    page = client.get("/")
    assert page.status_code == 200 and 'src="/static/app.js"' in page.text and "http" not in page.text.split("<body>")[1]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/serve.py").status_code == 404
    assert client.get("/docs").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_predict_real_test_image(client, cat_png):
    answer = client.post("/predict?top_k=3", files={"file": ("cat.png", cat_png, "image/png")}).json()
    assert [item["class"] for item in answer["top"]][0] == "cat" and len(answer["top"]) == 3
    assert answer["top"][0]["probability"] > 0.5
    assert sum(item["probability"] for item in answer["top"]) <= 1.0 + 1e-6
    heat = answer["confidence_map"]
    assert heat["class"] == "cat" and heat["size"] == [8, 8] and np.array(heat["values"]).shape == (8, 8)
    assert heat["box"] == {"left": 0.0, "top": 0.0, "width": 32.0, "height": 32.0}
    raw = client.post("/predict?top_k=1", content=cat_png, headers={"content-type": "image/png"}).json()
    assert raw["top"][0] == answer["top"][0]


@pytest.mark.parametrize("format", ["JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM"])  # what `nin predict` takes too
def test_allowed_formats(client, cat_png, format):
    pixels = np.asarray(Image.open(io.BytesIO(cat_png)))
    response = client.post("/predict", files={"file": ("x", _encode(pixels, format), "application/octet-stream")})
    assert response.status_code == 200 and len(response.json()["top"]) == 5


def test_exif_orientation_applied(client):
    image = Image.fromarray(np.zeros((40, 64, 3), np.uint8))  # 64 wide, 40 high
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    answer = client.post("/predict", files={"file": ("r.jpg", buffer.getvalue(), "image/jpeg")}).json()
    assert answer["image"] == {"width": 40, "height": 64}
    assert answer["confidence_map"]["box"]["top"] == pytest.approx(11.25)  # 40x64 -> 32x51, rows 9 to 41 of 51


@pytest.mark.parametrize("case, status", [
    ("oversized", 413), ("text", 415), ("ico", 415), ("empty", 400), ("truncated", 400), ("bomb", 413),
    ("no_file_field", 400), ("top_k_zero", 422)])
def test_bad_requests_get_a_4xx_json_and_serving_goes_on(client, cat_png, case, status):
    files = None
    if case == "oversized":
        files = {"file": ("big.png", cat_png + b"\0" * MAX_UPLOAD_BYTES, "image/png")}
    elif case == "text":
        files = {"file": ("notes.txt", b"just some text, no pixels", "text/plain")}
    elif case == "ico":  # an image type that is not on the list
        files = {"file": ("x.ico", _encode(np.zeros((8, 8, 3), np.uint8), "ICO"), "image/x-icon")}
    elif case == "empty":
        files = {"file": ("empty.png", b"", "image/png")}
    elif case == "truncated":
        files = {"file": ("cut.png", cat_png[: len(cat_png) // 2], "image/png")}
    elif case == "bomb":
        files = {"file": ("bomb.png", _png_header_only(50_000, 50_000), "image/png")}
    if case == "no_file_field":
        response = client.post("/predict", data={"picture": "cat"}, files={"other": ("a.png", cat_png, "image/png")})
    elif case == "top_k_zero":
        response = client.post("/predict?top_k=0", files={"file": ("cat.png", cat_png, "image/png")})
    else:
        response = client.post("/predict", files=files)
    assert response.status_code == status, response.text
    body = response.json()
    assert ("error" in body and "\n" not in body["error"]) or "detail" in body
    _still_serving(client, cat_png)


def test_pillow_bomb_guard_is_caught(cat_png):
    """With a pixel limit below an image's size Pillow's own DecompressionBomb check is never reached first."""
    client = TestClient(create_app(WEIGHTS, max_pixels=32 * 32 - 1))
    response = client.post("/predict", files={"file": ("cat.png", cat_png, "image/png")})
    assert response.status_code == 413 and "pixel" in response.json()["error"]


def test_default_top_k_fits_a_model_with_few_classes(tmp_path):
    """A 3-class model: the default request (and the page, which sends no top_k) gets 3 classes, not a 500."""
    import torch

    from nin.checkpoint import load_weights, save_weights
    from nin.models import get_model

    model, preprocessing, meta = load_weights(WEIGHTS)
    small = get_model("nin_cifar10", batch_norm=True, class_map_relu=False, num_classes=3)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.2.")}
    small.load_state_dict(state, strict=False)
    path = tmp_path / "three.safetensors"
    save_weights(path, small, preprocessing, {**meta, "classes": ["a", "b", "c"]})
    client = TestClient(create_app(path))
    image = torch.zeros(3, 32, 32, dtype=torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    response = client.post("/predict", files={"file": ("x.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 200, response.text
    assert len(response.json()["top"]) == 3


def test_mnist_uploads_read_as_nin_predict_reads_them(data_root, tmp_path, capsys):
    """MNIST weights: a digit drawn only in alpha (a stencil), and dark ink on grey paper with and without
    invert, give what `nin predict` gives for the same files; the hint says which way round an upload is."""
    from nin.cli import main

    test = load_dataset("mnist", "test", data_root)
    ink = test.images[0, 0].numpy()
    stencil = np.zeros((28, 28, 4), dtype=np.uint8)
    stencil[..., 3] = ink  # black strokes on a transparent background
    paper = np.round(210 - 190 * (ink / 255)).astype(np.uint8)  # dark ink on grey paper
    files = {"stencil.png": Image.fromarray(stencil, "RGBA").resize((84, 84)),
             "paper.png": Image.fromarray(paper).resize((84, 84)).convert("RGB")}
    client = TestClient(create_app("fast-mnist"))
    assert client.get("/health").json()["light_on_dark"] is True
    label = str(int(test.labels[0]))
    for name, image in files.items():
        image.save(tmp_path / name)
        flags = ["--invert"] if name == "paper.png" else []
        assert main(["predict", "fast-mnist", str(tmp_path / name), "--json", *flags]) == 0
        expected = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
        answer = client.post(f"/predict?invert={bool(flags)}",
                             files={"file": (name, (tmp_path / name).read_bytes(), "image/png")}).json()
        assert answer["top"][0]["class"] == expected[0]["class"] == label, (name, answer["top"][0], expected[0])
        assert abs(answer["top"][0]["probability"] - expected[0]["probability"]) < 0.02 and "hint" not in answer
    plain = client.post("/predict", files={"file": ("paper.png", (tmp_path / "paper.png").read_bytes(), "image/png")})
    assert "send it with invert=true" in plain.json()["hint"]
    stencil_inverted = client.post("/predict?invert=true",
                                   files={"file": ("s.png", (tmp_path / "stencil.png").read_bytes(), "image/png")})
    assert "send it without invert" in stencil_inverted.json()["hint"]
    cifar = TestClient(create_app(WEIGHTS))
    assert cifar.get("/health").json()["light_on_dark"] is False
    upload = {"file": ("p.png", (tmp_path / "paper.png").read_bytes(), "image/png")}
    negative = cifar.post("/predict?invert=true", files=upload)
    assert "these are cifar10 weights, so the image was scored as a negative" in negative.json()["hint"]
    assert "hint" not in cifar.post("/predict", files=upload).json()
