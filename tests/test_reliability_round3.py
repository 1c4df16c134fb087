"""Reliability, round 3 (issue 28): bounded memory for every input, no write outside what a command owns, one line.

docs/reliability.md ("Round 3") lists each class, the cases tried, the bound or message, and the test here.

* memory: how far the peak resident set (VmHWM) of a real `nin predict` / `nin serve` process rises for one
  input stays under ``16 bytes × the image's declared pixels + 48 MiB`` (thin and tall strips, RGBA at the pixel
  limit, concurrent uploads), and under 48 MiB for weights that declare huge widths;
* writes: every writer refuses a symbolic link and an existing file it did not write (or wants ``--force``),
  and `nin reproduce` records under ``--out-root`` unless told otherwise;
* flags and files: one line, exit 1, nothing left behind;
* the server: ``{"error": ...}`` for every refusal, HEAD wherever GET is served, /docs without a CDN.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from nin.checkpoint import load_state
from nin.cli import main
from nin.errors import NinError

from guards import no_hang, serving

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = REPO / "weights" / "fast-cifar10.safetensors"
MNIST = REPO / "weights" / "fast-mnist.safetensors"
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MiB = 2**20
BYTES_PER_PIXEL = 16  # docs/reliability.md, round 3: the decoder's bound, per pixel the image declares
SLACK = 48 * MiB  # ... plus this, for the allocator and Pillow's decoder buffers


def _bound(pixels: int) -> int:
    return BYTES_PER_PIXEL * pixels + SLACK


def _one_line(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nin {command}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _png(path: Path, mode: str, size: tuple[int, int], colour) -> Path:
    Image.new(mode, size, colour).save(path)
    return path


def _rgba(path: Path, side: int) -> Path:
    """A side×side RGBA PNG with varying half-transparent content: a few KB that decode to side² × 4 bytes."""
    pixels = np.zeros((side, side, 4), np.uint8)
    pixels[..., 0] = np.arange(side, dtype=np.uint8)[None, :]
    pixels[..., 1] = 90
    pixels[..., 3] = np.arange(side, dtype=np.uint8)[:, None] | 1
    Image.fromarray(pixels, "RGBA").save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Memory: bounded by what the input declares (a real `nin predict` process)
# ---------------------------------------------------------------------------------------------------------------

_PEAKS = textwrap.dedent("""
    import json, sys
    from nin.cli import main

    def resident(key):  # VmHWM (the peak since the last reset) or VmRSS (now), in bytes
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    growth = {}
    for label, argv in json.loads(sys.argv[1]):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: the peak starts again from the resident set of now
        before = resident("VmRSS")
        status = main(argv)
        growth[label] = [status, resident("VmHWM") - before]
    print(json.dumps(growth))
""")


def _growth(steps: list[tuple[str, list[str]]]) -> dict[str, tuple[int, int]]:
    """Run `nin` commands one after another in one fresh process: {label: (exit status, how far its peak resident
    set rose above the resident set before it)}. Freed memory goes back to the system between steps
    (NIN_KEEP_FREED_MEMORY=0), so no step runs in what an earlier one left."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs to reset the peak resident set with")
    done = subprocess.run([sys.executable, "-c", _PEAKS, json.dumps(steps)], capture_output=True, text=True,
                          env={**CHILD_ENV, "NIN_KEEP_FREED_MEMORY": "0"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _declaring_huge_widths(path: Path, width: int) -> Path:
    """fast-mnist's weights file with every hidden width set to ``width`` in its model config and one number per
    tensor: a few KB that declare ``width``² weights per 1×1 layer."""
    tensors, meta = load_state(MNIST)
    for block in meta["model_config"]["blocks"][:-1]:
        block["widths"] = [width] * len(block["widths"])
    save_file({name: torch.zeros(1) for name in tensors}, str(path), metadata={"nin": json.dumps(meta)})
    return path


@pytest.fixture(scope="module")
def predict_growth(tmp_path_factory) -> tuple[dict, dict]:
    """One process running `nin predict` on a 32×32 image (first calls warm up), then on weights declaring widths
    of 16000, thin and tall strips, RGBA at 2000×2000: how far each one's peak rose, and its declared pixels."""
    folder = tmp_path_factory.mktemp("memory")
    small = _png(folder / "small.png", "RGB", (32, 32), (200, 30, 60))
    wide = _declaring_huge_widths(folder / "wide.safetensors", 16000)
    strips = {"300000x1": (300_000, 1), "1x300000": (1, 300_000), "1000000x1": (1_000_000, 1)}
    paths = {label: _png(folder / f"{label}.png", "RGB", size, (10, 20, 30)) for label, size in strips.items()}
    rgba = _rgba(folder / "rgba.png", 2000)
    assert wide.stat().st_size < 8000 and all(p.stat().st_size < 4000 for p in paths.values())
    steps = [("warm-up", ["predict", str(CIFAR10), str(small)]),
             ("small", ["predict", str(CIFAR10), str(small)]),
             ("widths", ["predict", str(wide), str(small)]),
             *((label, ["predict", str(CIFAR10), str(path)]) for label, path in paths.items()),
             ("rgba", ["predict", str(CIFAR10), str(rgba)])]
    pixels = {label: width * height for label, (width, height) in strips.items()} | {"rgba": 2000 * 2000}
    return _growth(steps), pixels


def test_weights_declaring_huge_widths_are_refused_before_allocating(predict_growth):
    """A 5 KB weights file whose model_config declares widths of 16000 (1 GB of float32 as declared)."""
    growth, _ = predict_growth
    status, grown = growth["widths"]
    assert status == 1 and growth["small"][0] == 0
    assert grown < SLACK, f"{grown / MiB:.0f} MiB (a 32×32 image: {growth['small'][1] / MiB:.0f} MiB)"


@pytest.mark.parametrize("label", ["300000x1", "1x300000", "1000000x1"])
def test_thin_and_tall_images_cost_their_own_pixels(predict_growth, label):
    """A few-hundred-byte PNG of 300000×1 pixels (the square is cut before any resize: never 9.6M×32)."""
    growth, pixels = predict_growth
    status, grown = growth[label]
    assert status == 0
    assert grown < _bound(pixels[label]), f"{grown / MiB:.0f} MiB (a 32×32 image: {growth['small'][1] / MiB:.0f} MiB)"


def test_rgba_is_composited_a_tile_at_a_time(predict_growth):
    """2000×2000 RGBA (4 megapixels): composited in uint8/int32 tiles of a megapixel, not in whole-image int64."""
    growth, pixels = predict_growth
    status, grown = growth["rgba"]
    assert status == 0
    assert grown < _bound(pixels["rgba"]), f"{grown / MiB:.0f} MiB (a 32×32 image: {growth['small'][1] / MiB:.0f} MiB)"


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_region_cut_from_the_stored_pixels_then_turned_upright(format):
    """The square is cut before the EXIF orientation is applied (the photo is never turned whole): for every
    orientation, size and mode the pixels, box and size equal those of the photo turned upright first."""
    from PIL import ImageOps

    from nin.data.images import decode_image, model_pixels

    generator = np.random.default_rng(0)
    for width, height in ((70, 40), (40, 70), (200, 5), (33, 32)):
        for mode, bands in (("RGB", 3), ("RGBA", 4), ("L", 1)):
            if format == "JPEG" and mode == "RGBA":
                continue
            pixels = generator.integers(0, 256, (height, width, bands), dtype=np.uint8).squeeze()
            for orientation in range(1, 9):
                exif = Image.Exif()
                exif[0x0112] = orientation
                buffer = io.BytesIO()
                Image.fromarray(pixels, mode).save(buffer, format, exif=exif)
                for channels in (1, 3):
                    got = decode_image(buffer.getvalue(), 32, channels)
                    with Image.open(io.BytesIO(buffer.getvalue())) as image:
                        upright = ImageOps.exif_transpose(image)
                        want, box = model_pixels(upright, 32, channels)
                    case = (width, height, mode, orientation, channels)
                    assert torch.equal(got.pixels, want) and got.box == box, case
                    assert (got.width, got.height) == upright.size, case


def test_pillow_limit_is_set_for_each_decode(monkeypatch):
    """docs/deploy.md: Pillow's MAX_IMAGE_PIXELS is the server's limit while an upload is decoded (and is put
    back after)."""
    from nin.data import images

    seen = []
    opener = images.Image.open

    def open_and_note(*args, **kwargs):
        seen.append(images.Image.MAX_IMAGE_PIXELS)
        return opener(*args, **kwargs)

    monkeypatch.setattr(images.Image, "open", open_and_note)
    before = Image.MAX_IMAGE_PIXELS
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buffer, "PNG")
    images.decode_image(buffer.getvalue(), 32, 3, max_pixels=1234)
    assert seen == [1234] and Image.MAX_IMAGE_PIXELS == before


# ---------------------------------------------------------------------------------------------------------------
# Memory: `nin serve` under concurrent uploads at the pixel limit (a real server process)
# ---------------------------------------------------------------------------------------------------------------

def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "image/png"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _resident(pid: int, key: str) -> int:
    """VmHWM (the peak since the last reset) or VmRSS (now) of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key}")


def _growth_of(pid: int, call) -> int:
    """How far process ``pid``'s peak resident set rises above its resident set of now while ``call()`` runs."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # Linux: the peak starts again from the resident set of now
    before = _resident(pid, "VmRSS")
    call()
    return _resident(pid, "VmHWM") - before


def test_serve_memory_thin_uploads_and_concurrent_uploads_at_the_pixel_limit(tmp_path):
    """`nin serve --max-pixels 4000000`: a 957-byte PNG of 300000×1 pixels costs a few MiB (was 1.5 GB), and four
    2000×2000 RGBA uploads at once (each exactly at the limit) are all answered while the server's peak grows by
    what one such image may cost, not four."""
    pytest.importorskip("uvicorn", reason="nin serve needs the serve extra")
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/PID/clear_refs to reset the peak resident set with")
    side = 2000
    small, thin = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 60)).save(small, "PNG")
    Image.new("RGB", (300_000, 1), (10, 20, 30)).save(thin, "PNG")
    upload = _rgba(tmp_path / "rgba.png", side).read_bytes()
    with serving(str(CIFAR10), "--max-pixels", str(side * side), env=CHILD_ENV) as (url, server):
        assert _post(url + "/predict", small.getvalue())[0] == 200  # warm-up: first calls initialise torch
        answers = []
        grown = _growth_of(server.pid, lambda: answers.append(_post(url + "/predict", thin.getvalue())))
        assert answers[0][0] == 200 and answers[0][1]["image"] == {"width": 300_000, "height": 1}
        assert grown < _bound(300_000), f"300000×1: {grown / MiB:.0f} MiB"

        def concurrently() -> None:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                answers[:] = pool.map(lambda _: _post(url + "/predict", upload), range(4))

        grown = _growth_of(server.pid, concurrently)
        assert [status for status, _ in answers] == [200] * 4, answers
        assert all(answer["image"] == {"width": side, "height": side} for _, answer in answers)
        assert grown < _bound(side * side), f"4 × {side}×{side} RGBA at once: {grown / MiB:.0f} MiB"
        status, answer = _post(url + "/predict", _rgba(tmp_path / "over.png", side + 1).read_bytes())
        assert status == 413 and "pixel" in answer["error"]  # one pixel row and column over the limit


# ---------------------------------------------------------------------------------------------------------------
# Writes: only what a command owns
# ---------------------------------------------------------------------------------------------------------------

def _tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: a file's bytes, a link's target."""
    return {str(p.relative_to(folder)): (f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


def test_reproduce_records_under_out_root_not_into_the_repository(data_root, tmp_path, capsys, monkeypatch):
    """`nin reproduce fast-mnist --out-root runs/smoke` (its run already finished, so only recorded) leaves the
    weights/ and results/ of the folder it runs in untouched, and writes runs/smoke/{results,weights}."""
    from nin.engine import recipe, train

    monkeypatch.chdir(tmp_path)
    for name, text in (("weights/fast-mnist.safetensors", "the shipped weights"),
                       ("results/fast-mnist.json", '{"name": "fast-mnist", "final_error": 0.003}')):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    before = _tree(tmp_path)
    out_root = Path("runs") / "smoke"
    cfg = dataclasses.replace(recipe("fast", "mnist"), epochs=1, train_subset=256, eval_subset=200, batch_size=64,
                              data_dir=str(data_root))
    train(cfg, out_root / "fast-mnist", log=lambda *_: None)
    assert main(["reproduce", "fast-mnist", "--out-root", str(out_root), "--data-dir", str(data_root)]) == 0
    assert {k: v for k, v in _tree(tmp_path).items() if not k.startswith("runs/")} == before
    record = json.loads((out_root / "results" / "fast-mnist.json").read_text())
    assert record["weights"] == (out_root / "weights" / "fast-mnist.safetensors").as_posix()
    assert (out_root / "weights" / "fast-mnist.safetensors").read_bytes() == \
        (out_root / "fast-mnist" / "model.safetensors").read_bytes()
    # recording again replaces its own record; recording into the repository is an explicit step, and a record
    # that is not one of this name is kept unless --force
    assert main(["reproduce", "record", str(out_root / "fast-mnist"), "--name", "fast-mnist"]) == 0
    capsys.readouterr()
    (tmp_path / "results" / "fast-mnist.json").write_text("my notes")
    assert main(["reproduce", "record", str(out_root / "fast-mnist"), "--name", "fast-mnist",
                 "--results-dir", "results", "--weights-dir", "weights"]) == 1
    _one_line(capsys, "reproduce", "results/fast-mnist.json", "--force")
    assert (tmp_path / "results" / "fast-mnist.json").read_text() == "my notes"
    assert (tmp_path / "weights" / "fast-mnist.safetensors").read_text() == "the shipped weights"
    # `nin reproduce report` rewrites its own RESULTS.md, and no other file
    report = ["reproduce", "report", "--results-dir", str(out_root / "results"), "--no-curves"]
    assert main([*report, "--output", "R.md"]) == 0 and main([*report, "--output", "R.md"]) == 0
    capsys.readouterr()
    assert main([*report, "--output", "results/fast-mnist.json"]) == 1
    _one_line(capsys, "reproduce", "--output results/fast-mnist.json", "--force")
    assert (tmp_path / "results" / "fast-mnist.json").read_text() == "my notes"


def test_export_writes_only_new_files_or_its_own(tmp_path, capsys):
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(MNIST.read_bytes())
    weights = mine.read_bytes()
    assert main(["export", str(mine), "--out", str(mine)]) == 1  # was: exit 0, the weights replaced by ONNX
    _one_line(capsys, "export", "is the weights file being exported")
    assert main(["export", str(mine), "--out", str(mine), "--format", "torchscript", "--force"]) == 1
    _one_line(capsys, "export", "is the weights file being exported")
    (tmp_path / "user.onnx").write_text("a user's graph")
    (tmp_path / "notes.onnx.json").write_text("a user's notes")
    (tmp_path / "elsewhere.txt").write_text("a file elsewhere")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "elsewhere.txt")
    (tmp_path / "sidecar-link.pt.json").symlink_to(tmp_path / "elsewhere.txt")
    before = _tree(tmp_path)
    for out, needle in (("user.onnx", "not replacing it"), ("notes.onnx", "notes.onnx.json"),
                        ("link.onnx", "symbolic link"), ("sidecar-link.pt", "symbolic link")):
        fmt = "torchscript" if out.endswith(".pt") else "onnx"
        assert main(["export", str(mine), "--format", fmt, "--out", str(tmp_path / out)]) == 1, out
        _one_line(capsys, "export", needle)
    assert main(["export", str(mine), "--out", str(tmp_path / "link.onnx"), "--force"]) == 1  # never through a link
    _one_line(capsys, "export", "symbolic link")
    # sub/ does not exist, so sub/../mine.safetensors "does not exist" either, until the write makes sub/
    assert main(["export", str(mine), "--out", str(tmp_path / "sub" / ".." / mine.name), "--force"]) == 1
    _one_line(capsys, "export", "is the weights file being exported")
    assert _tree(tmp_path) == before
    # an earlier export of the same format is replaced without --force; a user's file with it
    assert main(["export", str(mine), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    assert main(["export", str(mine), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    assert main(["export", str(mine), "--out", str(tmp_path / "user.onnx"), "--force"]) == 0
    assert mine.read_bytes() == weights and (tmp_path / "elsewhere.txt").read_text() == "a file elsewhere"
    from nin.deploy.export import claim_outputs  # OpenVINO's .bin is claimed too (the package is optional)

    (tmp_path / "ir.bin").write_text("a user's bin")
    with pytest.raises(NinError, match="ir.bin: exists"):
        claim_outputs(mine, tmp_path / "ir.xml", "openvino")


@pytest.mark.parametrize("opset", [0, -1, 99999, 1, 6, 9, 21])
def test_export_opset_outside_the_range_is_one_line_and_leaves_nothing(tmp_path, capsys, opset):
    assert main(["export", str(MNIST), "--out", str(tmp_path / "sub" / "x.onnx"), "--opset", str(opset)]) == 1
    _one_line(capsys, "export", f"--opset {opset}", "10 to 20")
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    """A failure inside torch's exporter (any): one line, no file, no folder."""
    import nin.deploy.export as export

    def broken(module, path, opset):
        Path(path).write_bytes(b"half a graph")
        raise RuntimeError("the exporter broke\nsecond line")

    monkeypatch.setattr(export, "_onnx_graph", broken)
    assert main(["export", str(MNIST), "--out", str(tmp_path / "new" / "x.onnx")]) == 1
    _one_line(capsys, "export", "ONNX export at opset 17 failed", "the exporter broke")
    assert list(tmp_path.iterdir()) == []


def test_visualize_refuses_a_users_files_and_links(tmp_path, capsys):
    out = tmp_path / "v"
    out.mkdir()
    (out / "maps.json").write_text('{"mine": true}')
    (tmp_path / "picture.png").write_bytes(b"a user's picture")
    before = _tree(tmp_path)
    assert main(["visualize", str(MNIST), "--out", str(out)]) == 1  # before any data is read
    _one_line(capsys, "visualize", "maps.json", "--force")
    (out / "maps.json").unlink()
    (out / "confusion.png").symlink_to(tmp_path / "picture.png")
    assert main(["visualize", str(MNIST), "--out", str(out), "--force"]) == 1
    _one_line(capsys, "visualize", "confusion.png", "symbolic link")
    assert (tmp_path / "picture.png").read_bytes() == before["picture.png"]
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png"]
    from nin.tools.visualize import _claim_outputs  # a folder an earlier `nin visualize` wrote is its own

    (out / "confusion.png").unlink()
    report = {"weights": "w", "max_map_true_class": 0.9, "gap_accuracy": 0.9}
    (out / "maps.json").write_text(json.dumps(report))
    (out / "confusion.png").write_bytes(b"an earlier figure")
    _claim_outputs(out, ["maps.json", "confusion.png", "overlays.png"], force=False)


def test_train_probe_and_tensorboard_never_go_through_links(tmp_path):
    from nin.engine.run_folder import check_output_dir

    run = tmp_path / "wt"
    run.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("a user's file")
    (run / ".write-test").symlink_to(precious)
    check_output_dir(run, resume=False)  # was: precious.txt held 4096 "0" bytes, then the link was deleted
    assert precious.read_text() == "a user's file" and (run / ".write-test").is_symlink()
    assert sorted(p.name for p in run.iterdir()) == [".write-test"]
    (run / "tensorboard").symlink_to(tmp_path)
    with pytest.raises(NinError, match="tensorboard is a symbolic link"):
        check_output_dir(run, resume=True)


def test_predict_output_never_through_a_link(tmp_path, capsys):
    (tmp_path / "elsewhere.csv").write_text("a user's table")
    (tmp_path / "out.csv").symlink_to(tmp_path / "elsewhere.csv")
    image = _png(tmp_path / "x.png", "L", (28, 28), 0)
    assert main(["predict", str(MNIST), str(image), "--output", str(tmp_path / "out.csv")]) == 1
    _one_line(capsys, "predict", "out.csv")
    assert (tmp_path / "elsewhere.csv").read_text() == "a user's table"


# ---------------------------------------------------------------------------------------------------------------
# Flags and files checked up front: one line, exit 1, nothing left behind
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, needle", [
    ("--max-upload-mb", "nan", "more than 0"), ("--max-upload-mb", "inf", "more than 0"),
    ("--max-upload-mb", "-1", "more than 0"), ("--max-upload-mb", "0", "more than 0"),
    ("--max-upload-mb", "1e308", "at most 1024"), ("--max-pixels", "0", "1 to"), ("--max-pixels", "-5", "1 to")])
def test_serve_limits_are_checked_before_serving(capsys, monkeypatch, flag, value, needle):
    uvicorn = pytest.importorskip("uvicorn", reason="nin serve needs the serve extra")

    def serve_forever(*args, **kwargs):
        raise AssertionError(f"nin serve started with {flag} {value}")

    monkeypatch.setattr(uvicorn, "run", serve_forever)
    assert main(["serve", str(MNIST), flag, value]) == 1
    _one_line(capsys, "serve", f"{flag} ", needle)


def test_serve_on_a_port_in_use_says_so_in_one_line(capsys, monkeypatch):
    uvicorn = pytest.importorskip("uvicorn", reason="nin serve needs the serve extra")
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("nin serve started on a port in use"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(MNIST), "--host", "127.0.0.1", "--port", str(port)]) == 1
    _one_line(capsys, "serve", f"--port {port}", "cannot listen there")


@pytest.mark.parametrize("assignment, needle", [
    ("translate=1000000", "translate must be smaller than the 28-pixel input"),
    ("model.pool_kernel=1000", "a 28×28 input does not fit through its layers"),
    ("model.num_classes=100000000", "parameters, more than the"),
    ("model.num_classes=5", "5 class maps for mnist's 10 classes"),
    ("model.num_classes=12", "12 class maps for mnist's 10 classes, expected 10"),  # its weights could not load
    ("small_size=64", "small_size must be at most the 28-pixel input"),
    ("model.input_size=40", "the model expects 1×40×40 images; mnist has 1×28×28"),
    ("model.in_channels=3", "the model expects 3×28×28 images; mnist has 1×28×28"),
])
def test_set_values_that_make_impossible_shapes(capsys, tmp_path, assignment, needle):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--out", str(out), "--epochs", "1", "--train-subset", "64",
                 "--device", "cpu", "--set", assignment]) == 1
    _one_line(capsys, "train", needle)
    assert main(["train", "--dataset", "mnist", "--dry-run", "--set", assignment]) == 1  # refused without data too
    _one_line(capsys, "train", needle)
    assert not out.exists()


def test_nan_loss_names_only_a_checkpoint_that_exists(data_root, tmp_path, capsys):
    """`--set lr=1e308`: the loss is non-finite at the first step, before any checkpoint."""
    out = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(data_root), "--train-subset", "64",
                 "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--out", str(out),
                 "--set", "lr=1e308", "--set", "eval_subset=32"]) == 1
    err = _one_line(capsys, "train", "non-finite", "no checkpoint was written")
    assert "checkpoint.safetensors" not in err and not (out / "checkpoint.safetensors").exists()
    assert "batch norm" not in err  # the fast recipe's model has it already: not advised
    assert main(["train", "--dataset", "mnist", "--data-dir", str(data_root), "--train-subset", "64",
                 "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--out", str(out),
                 "--set", "eval_subset=32"]) == 0  # the folder is reusable, as the message says
    capsys.readouterr()


def _caffemodel_with(tmp_path: Path, change) -> Path:
    from test_caffe import random_state, v1_cifar_model

    state = random_state("nin_cifar10_caffe")
    change(state)
    path = tmp_path / "net.caffemodel"
    path.write_bytes(v1_cifar_model(state))
    return path


def test_import_caffe_refuses_non_finite_values(tmp_path, capsys):
    path = _caffemodel_with(tmp_path, lambda state: state["blocks.1.convs.0.weight"].view(-1)[:3].fill_(math.nan))
    out = tmp_path / "w.safetensors"
    assert main(["import-caffe", str(path), "--arch", "nin_cifar10_caffe", "--preprocessing", "scale",
                 "--out", str(out)]) == 1
    _one_line(capsys, "import-caffe", "layer conv2 weights hold 3 NaN or infinite values")
    assert not out.exists()


@pytest.mark.parametrize("dims, needle", [
    ((2**63 - 1, 0), "holds 0 values"),
    ((1,) * 100, "declares 100 dimensions"),
    ((2**31, 2**31, 2**31, 0), "holds 0 values"),
    ((-4, 3), "negative size"),
])
def test_import_caffe_bounds_blob_shapes_before_numpy(tmp_path, capsys, dims, needle):
    from test_caffe import bytes_field, layer_new, varint

    blob = bytes_field(7, bytes_field(1, b"".join(varint(d) for d in dims)))
    path = tmp_path / "net.caffemodel"
    path.write_bytes(layer_new("conv1", "Convolution", [blob, blob]))
    out = tmp_path / "w.safetensors"
    assert main(["import-caffe", str(path), "--arch", "nin_cifar10_caffe", "--preprocessing", "scale",
                 "--out", str(out)]) == 1
    _one_line(capsys, "import-caffe", needle)
    assert not out.exists()



def _loops(tmp_path: Path) -> Path:
    """l/ with two images, links back up (loops), and a locked sub-folder."""
    root = tmp_path / "l"
    for folder in ("a", "b/c", "locked"):
        (root / folder).mkdir(parents=True)
    _png(root / "a" / "one.png", "L", (28, 28), 255)
    _png(root / "b" / "c" / "two.png", "L", (28, 28), 0)
    _png(root / "locked" / "three.png", "L", (28, 28), 0)
    (root / "a" / "up").symlink_to(root)
    (root / "b" / "c" / "loop").symlink_to(root / "b")
    return root


@pytest.mark.parametrize("pattern", ["l/**/*.png", "l", "l/**"])
def test_predict_globs_follow_no_link_loop_and_report_unreadable_folders(tmp_path, capsys, monkeypatch, pattern):
    root = _loops(tmp_path)
    monkeypatch.chdir(tmp_path)
    scandir = os.scandir

    def locked(path=".", *args):  # chmod 000 does not stop root: refuse the way the kernel would
        if isinstance(path, (str, os.PathLike)) and Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path, *args)

    monkeypatch.setattr(os, "scandir", locked)
    with no_hang(60):  # Python's own `**` walked the loops until the paths were too long, memory growing
        assert main(["predict", str(MNIST), pattern, "--json"]) == 0
    captured = capsys.readouterr()
    images = sorted(Path(row["image"]).name for row in json.loads(captured.out)["predictions"])
    assert images == ["one.png", "two.png"]
    assert "nin predict: skipped l/locked: cannot read it (Permission denied)" in captured.err
    assert root.is_dir()
    # a folder whose only sub-folder cannot be read: the error gives that reason; --skip-bad goes on past it
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "locked").mkdir()
    assert main(["predict", str(MNIST), "only"]) == 1
    assert "only: a folder without images" in (err := capsys.readouterr().err) and "only/locked: cannot read it" in err
    assert main(["predict", str(MNIST), "only", "l/a/one.png", "--skip-bad"]) == 0
    assert "nin predict: skipped only/locked: cannot read it" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["torchscript", "onnxruntime"])
def test_predict_backends_leave_no_temporary_export(tmp_path, capsys, monkeypatch, backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    image = _png(tmp_path / "x.png", "L", (28, 28), 0)
    assert main(["predict", str(MNIST), str(image), "--backend", backend]) == 0
    capsys.readouterr()
    assert list(temporary.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# The server's answers: one shape, HEAD where GET is, /docs without a CDN
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    from nin.deploy.serve import create_app

    return TestClient(create_app(MNIST), raise_server_exceptions=False)


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/nope", 404), ("POST", "/health", 405), ("GET", "/predict", 405), ("DELETE", "/predict", 405),
    ("HEAD", "/nope", 404), ("HEAD", "/predict", 405), ("POST", "/predict?top_k=0", 422), ("POST", "/predict?top_k=abc", 422),
    ("GET", "/static/missing.js", 404), ("GET", "/redoc", 404)])
def test_every_refusal_is_an_error_json(client, method, path, status):
    response = client.request(method, path)
    assert response.status_code == status
    if method != "HEAD":
        body = response.json()
        assert list(body) == ["error"] and "\n" not in body["error"], body


def test_an_unexpected_failure_is_an_error_json_too(client, monkeypatch):
    import nin.deploy.serve as serve

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug\nover two lines")

    monkeypatch.setattr(serve, "decode_upload", broken)
    response = client.post("/predict", content=b"\x89PNG", headers={"content-type": "image/png"})
    assert response.status_code == 500 and response.json() == {"error": "internal error (ZeroDivisionError)"}


@pytest.mark.parametrize("path", ["/", "/health", "/docs", "/openapi.json", "/static/app.js", "/static/docs.js"])
def test_head_is_answered_wherever_get_is(client, path):
    get, head = client.get(path), client.head(path)
    assert get.status_code == head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head.headers["content-length"] == str(len(get.content))


def test_docs_page_needs_no_other_host(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text
    for asset in ("/docs", "/static/docs.js", "/static/style.css"):
        text = client.get(asset).text
        assert not re.search(r"(https?:)?//[\w.-]+\.[a-z]{2,}", text), asset  # no URL of another host
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "/predict" in client.get("/openapi.json").json()["paths"]
