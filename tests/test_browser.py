"""The web page in a real browser: `nin serve` in a subprocess, Debian's headless Chromium driven by Playwright."""

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nin.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights" / "fast-cifar10.safetensors"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]

if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("playwright", reason="playwright (Python) not installed; the browser itself comes from Debian")
pytest.importorskip("uvicorn", reason="nin serve needs the serve extra")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from guards import serving  # noqa: E402


def _serve(weights: str):
    """`nin serve weights` with this checkout's code: yields its URL, stops it after."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    with serving(weights, env=env) as (url, _):
        yield url


@pytest.fixture(scope="module")
def server():
    yield from _serve(str(WEIGHTS))


@pytest.fixture(scope="module")
def mnist_server():
    yield from _serve("fast-mnist")


@contextlib.contextmanager
def _page(url: str, dataset: str):
    """The page at ``url`` in headless Chromium, once it names the ``dataset`` model; a page error fails the test.
    (The page's CSP forbids eval: wait with locators, not with JavaScript functions.)"""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 820, "height": 560})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url + "/")
            expect(page.locator("#model")).to_contain_text(dataset, timeout=30_000)
            yield page
            assert not errors, errors
        finally:
            browser.close()


def test_page_classifies_an_uploaded_test_image(server, data_root, tmp_path):
    data = load_dataset("cifar10-lossless-first1000", "test", data_root)
    assert data.classes[int(data.labels[0])] == "cat"  # test image 0, which the shipped weights get right
    photo = tmp_path / "cat.png"
    Image.fromarray(data.images[0].permute(1, 2, 0).numpy()).save(photo)
    with _page(server, "cifar10") as page:
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("#result:not([hidden])", timeout=30_000)
        top = page.locator("#top li")
        assert top.count() == 5
        assert top.first.locator(".name").inner_text() == "cat"
        overlay = page.locator("#overlay")
        assert overlay.is_visible()
        box = overlay.bounding_box()
        assert box["width"] > 200 and box["height"] > 200  # drawn over the whole (scaled-up) photo
        assert page.evaluate("document.getElementById('overlay').width") == 32  # the photo's own resolution
        painted = page.evaluate("""() => {
            const c = document.getElementById('overlay');
            return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data).some((v, i) => i % 4 == 3 && v > 0);
        }""")
        assert painted, "the confidence map was not drawn"
        page.screenshot(path=str(tmp_path / "serve_demo.png"), full_page=True)
        if os.environ.get("NIN_SAVE_SCREENSHOT"):  # regenerate the docs figure on purpose only
            shutil.copy(tmp_path / "serve_demo.png", REPO / "docs" / "figures" / "serve_demo.png")
    assert (tmp_path / "serve_demo.png").stat().st_size > 10_000


def test_page_inverts_dark_ink_on_paper_for_mnist_weights(mnist_server, data_root, tmp_path):
    """MNIST weights: the page offers the invert box, says when an upload is dark on light, and reads it right
    once the box is ticked."""
    data = load_dataset("mnist", "test", data_root)
    label = str(int(data.labels[0]))
    scan = tmp_path / "scan.png"
    Image.fromarray((255 - data.images[0, 0].numpy()).astype(np.uint8)).resize((140, 140)).save(scan)
    with _page(mnist_server, "mnist") as page:
        assert page.locator("#invert-row").is_visible()
        page.set_input_files("#file", str(scan))
        status = page.locator("#status")
        expect(status).to_contain_text("it looks dark on light: tick", timeout=30_000)
        page.check("#invert")  # classifies the same file again, inverted
        expect(status).to_have_text(f"scan.png: {label}", timeout=30_000)
        assert page.locator("#top li").first.locator(".name").inner_text() == label


def test_cifar10_page_has_no_invert_box(server):
    with _page(server, "cifar10") as page:
        assert not page.locator("#invert-row").is_visible()


def test_docs_page_lists_the_routes_from_this_server_only(server):
    """/docs draws the API from /openapi.json with nin's own script: no request leaves the server (FastAPI's Swagger
    page loaded its scripts from a CDN and stayed blank offline)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            requests, errors = [], []
            page.on("request", lambda request: requests.append(request.url))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server + "/docs")
            expect(page.locator("#api")).to_contain_text("POST /predict", timeout=30_000)
            expect(page.locator("#api")).to_contain_text("top_k")
            assert not errors, errors
            assert requests and all(url.startswith(server + "/") for url in requests), requests
        finally:
            browser.close()
