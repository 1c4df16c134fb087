"""A trained NiN behind HTTP: `POST /predict`, `GET /health`, the API at /docs, and a small web page at /.

    nin serve weights/fast-cifar10.safetensors --port 8000
    curl -F file=@cat.png 'http://127.0.0.1:8000/predict?top_k=3'

The model is loaded once as `nin.classifier.Classifier` loads it, and /predict runs its pipeline
(`nin.inference.InferencePipeline`: the fitted preprocessing, batch norm folded, bf16 where the CPU runs it fast,
test-time flips), the very module `nin predict` runs, so /predict gives what `nin predict` gives. An upload is
decoded in memory by `nin.data.images.decode_image`, the decoder `nin predict` reads files with (the format
sniffed from the bytes, only those of the image files `nin predict` takes from a folder: PNG, JPEG, BMP, GIF,
WebP, TIFF, PPM/PGM/PBM; EXIF orientation, alpha over white, 16-bit; the centre square). Nothing is written to
disk and no file path comes from a request. Every refusal is a JSON ``{"error": ...}`` with a 4xx status: 413 for
too many bytes or pixels (decompression bombs), 415 for a type that is not an allowed image, 400 for an empty,
damaged or malformed upload, 404 / 405 for a route or method that does not exist, 422 for a bad query parameter
(and a 500, should one happen, is JSON too). HEAD is answered wherever GET is. /docs is a page of nin's own that
reads /openapi.json: no CDN, so it works offline.

One upload is decoded at a time, always on one thread of its own (memory stays bounded by one image, whatever
the number of concurrent uploads: docs/reliability.md has the measured peaks), and one request at a time runs
the model (a lock): on a CPU the convolutions already use every core, and batching concurrent requests
together did not pay (docs/deploy.md has the measurement).
"""
# No `from __future__ import annotations`: FastAPI reads the route functions' annotations (Request, Query) at runtime.

import argparse
import asyncio
import concurrent.futures
import errno
import math
import shlex
import socket
import threading
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from nin.classifier import Classifier
from nin.data.datasets import LIGHT_ON_DARK
from nin.data.folders import IMAGE_SUFFIXES
from nin.data.images import DEFAULT_MAX_PIXELS, DecodedImage, ImageTooLarge, NotAnImage, decode_image
from nin.errors import DataError, NinError, path_arg, require_package
from nin.transforms import invert_ink, odd_polarity

__all__ = ["ALLOWED_FORMATS", "MAX_UPLOAD_BYTES", "MAX_PIXELS", "RequestError", "check_limits", "decode_upload",
           "create_app"]

# Pillow's names for the image files `nin predict` takes from a folder (`IMAGE_SUFFIXES`: PNG, JPEG, BMP, GIF,
# WebP, TIFF, PPM/PGM/PBM); no other format is even tried on an upload
ALLOWED_FORMATS = tuple(sorted({Image.registered_extensions().get(suffix) for suffix in IMAGE_SUFFIXES} - {None}))
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # 10 MiB per upload
MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to 120 MB of RGB; a PNG bomb of 1 MB can claim far more
# The largest limits a server may be started with: 1 GiB of upload, and Pillow's own refusal threshold (twice its
# default MAX_IMAGE_PIXELS) in pixels, which decodes in at most about 2.9 GB (docs/reliability.md: 16 B a pixel).
UPLOAD_BYTES_CEILING = 2**30
PIXELS_CEILING = 2 * DEFAULT_MAX_PIXELS
MULTIPART_OVERHEAD = 16 * 1024  # boundaries and part headers around the file in a multipart body (never reported)
STATIC_FILES = {"app.js": "text/javascript", "docs.js": "text/javascript", "style.css": "text/css"}  # a fixed list
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class RequestError(Exception):
    """A refused request: the HTTP status and a one-line message for the JSON body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def check_limits(max_upload_bytes: int, max_pixels: int) -> None:
    """Refuse limits that would refuse every upload, or none (checked before the model is loaded)."""
    if not 1 <= max_upload_bytes <= UPLOAD_BYTES_CEILING:
        raise NinError(f"--max-upload-mb {max_upload_bytes / 2**20:g}: expected more than 0 and at most "
                       f"{UPLOAD_BYTES_CEILING // 2**20} (MiB)")
    if not 1 <= max_pixels <= PIXELS_CEILING:
        raise NinError(f"--max-pixels {max_pixels}: expected 1 to {PIXELS_CEILING:,}")


def decode_upload(data: bytes, image_size: int, channels: int, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """An upload decoded as `nin predict` decodes a file (`nin.data.images.decode_image`), refusals as HTTP errors.

    Raises:
        RequestError: 400 empty or damaged, 413 more than ``max_pixels`` pixels, 415 not an allowed image type.
    """
    try:
        return decode_image(data, image_size, channels, max_pixels, formats=ALLOWED_FORMATS)
    except ImageTooLarge as error:
        raise RequestError(413, str(error)) from None
    except NotAnImage as error:
        raise RequestError(415, str(error)) from None
    except DataError as error:
        raise RequestError(400, str(error)) from None


async def _read_body(request, limit: int, overhead: int = 0) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` + ``overhead`` bytes (declared or
    streamed); the message names ``limit``, the one the server was started with (and /health says)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + overhead:
        raise RequestError(413, f"upload of {int(declared):,} bytes exceeds the {limit:,}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit + overhead:
            raise RequestError(413, f"upload exceeds the {limit:,}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_upload(request, max_bytes: int) -> bytes:
    """The uploaded file's bytes: the ``file`` field of a multipart form, or the whole body for any other type."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return await _read_body(request, max_bytes)
    body = await _read_body(request, max_bytes, MULTIPART_OVERHEAD)

    async def stream():
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=1, max_fields=8)
    parser.spool_max_size = len(body) + 1  # keep the part in memory: never spooled to a temporary file
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise RequestError(400, f"malformed multipart upload ({error.message})") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise RequestError(400, "multipart upload without a 'file' field")
    data = await upload.read()
    await form.close()
    if len(data) > max_bytes:
        raise RequestError(413, f"upload of {len(data):,} bytes exceeds the {max_bytes:,}-byte limit")
    return data


def _static(name: str) -> bytes:
    return (resources.files("nin.deploy") / "static" / name).read_bytes()


def create_app(weights: str | Path, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS):
    """The FastAPI application serving ``weights`` (a weights file or run folder), loaded once, on the CPU."""
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool

    check_limits(max_upload_bytes, max_pixels)

    # nin's one inference path, as `nin predict` runs it: batch norm folded, bf16 where the CPU runs it fast
    classifier = Classifier.load(weights, device="cpu")
    pipeline, meta, classes = classifier.pipeline, classifier.meta, classifier.classes
    config = pipeline.config
    light_on_dark = meta.get("dataset") in LIGHT_ON_DARK  # MNIST-style weights: the page offers invert
    # One upload decoded at a time, always on the same thread: with glibc's per-thread malloc arenas (and the CLI's
    # `keep_freed_memory`), decodes spread over the request threads would each keep an image's worth of memory.
    decoder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nin-decode")
    scoring = threading.Lock()  # one request at a time runs the model
    pipeline(torch.zeros(1, config.in_channels, config.input_size, config.input_size, dtype=torch.uint8))  # warm-up

    app = FastAPI(title="nin", version="1", description=f"Network In Network classifier ({meta.get('dataset')}): "
                  f"upload an image, get the top classes and the predicted class's confidence map.",
                  docs_url=None, redoc_url=None)  # FastAPI's pages load Swagger UI / ReDoc from a CDN
    app.state.pipeline = pipeline  # the module /predict runs (benchmarks/doors.py sets its flips)
    app.add_middleware(_HeadAsGet)
    _add_error_handlers(app)

    @app.get("/health")
    def health() -> dict:
        """The model being served."""
        return {"status": "ok", "dataset": meta.get("dataset"), "classes": classes,
                "input": [config.in_channels, config.input_size, config.input_size], "tta_flip": pipeline.tta_flip,
                "light_on_dark": light_on_dark, "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels}

    def classify(decoded: DecodedImage, top_k: int, invert: bool) -> dict:
        pixels = decoded.pixels[None]
        hint = _upload_hint(meta.get("dataset"), invert, bool(odd_polarity(pixels, meta.get("dataset"), invert)))
        with scoring:
            logits, maps = pipeline(invert_ink(pixels) if invert else pixels)  # (1, K), (1, K, h, w)
        answer = _prediction(logits[0].softmax(dim=0), maps[0], classes, decoded, top_k)
        return {**answer, "hint": hint} if hint else answer

    @app.post("/predict", openapi_extra=UPLOAD_SCHEMA)
    async def predict(request: Request,
                      top_k: int = Query(min(5, len(classes)), ge=1, le=len(classes),
                                         description="how many classes"),
                      invert: bool = Query(False, description="dark ink on light paper: inverted as "
                                           "`nin predict --invert` does (for MNIST-style weights)")) -> dict:
        """Top-k classes of an uploaded image (multipart field `file`, or the raw image as the body)."""
        data = await _read_upload(request, max_upload_bytes)
        decoded = await asyncio.wrap_future(decoder.submit(decode_upload, data, config.input_size,
                                                           config.in_channels, max_pixels))
        del data  # the upload's bytes are not kept while the model runs
        return await run_in_threadpool(classify, decoded, top_k, invert)

    _add_page(app)
    return app


def _add_error_handlers(app) -> None:
    """Every 4xx / 5xx answer as ``{"error": "<one line>"}``: nin's refusals, Starlette's 404 / 405, FastAPI's
    422 for a bad query parameter, and any unexpected failure (500, without the traceback)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestError)
    async def refuse(request, error: RequestError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException) -> JSONResponse:
        method = "HEAD" if request.scope.get(HEAD_AS_GET) else request.method
        message = {404: f"no route {request.url.path}", 405: f"{method} is not allowed on "
                   f"{request.url.path}"}.get(error.status_code, str(error.detail))
        return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "query")
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(Exception)
    async def failure(request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(error).__name__})"}, status_code=500)


HEAD_AS_GET = "nin.head"  # a key of the ASGI scope: this GET answers a HEAD request


class _HeadAsGet:
    """HEAD answered as GET without the body (RFC 9110: the same headers, Content-Length included), for every
    route that serves GET; FastAPI's ``@app.get`` routes answer HEAD with 405 otherwise."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body"):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET", HEAD_AS_GET: True}, receive, headers_only)


def _add_page(app) -> None:
    """The web page's routes: / and /docs and their /static/ files, read once, with a strict content-security
    policy."""
    from fastapi.responses import JSONResponse, Response

    pages = {name: _static(name) for name in ("index.html", "docs.html", *STATIC_FILES)}
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff"}

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return Response(pages["index.html"], media_type="text/html", headers=headers)

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return Response(pages["docs.html"], media_type="text/html", headers=headers)

    @app.get("/static/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in STATIC_FILES:  # the name selects from a fixed dict; it never reaches the file system
            return JSONResponse({"error": "not found"}, status_code=404)
        return Response(pages[name], media_type=STATIC_FILES[name], headers=headers)


def _upload_hint(dataset: str | None, invert: bool, odd: bool) -> str | None:
    """/predict's hint: ``invert`` for weights that do not take it, or an upload (``odd``) the other way round from
    what MNIST-style weights (and ``invert``) expect; None when all is as expected."""
    if invert and dataset not in LIGHT_ON_DARK:
        return (f"invert=true is for weights trained on light-on-black images ({', '.join(LIGHT_ON_DARK)}); these "
                f"are {dataset} weights, so the image was scored as a negative")
    if not odd:
        return None
    if invert:
        return f"this image looks light on a dark background already, as {dataset} images are: send it without invert"
    return (f"this image looks dark on a light background; {dataset} weights expect light on a dark background: "
            f"send it with invert=true")


# /predict's body in the OpenAPI page: a multipart field `file`, or the raw image
UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}


def _prediction(probabilities: torch.Tensor, maps: torch.Tensor, classes: list[str], decoded, top_k: int) -> dict:
    """/predict's answer for one image: the top-k classes, and the best class's map with its box in the image."""
    top = probabilities.topk(top_k)
    best = int(top.indices[0])
    left, top_edge, side, _ = decoded.box
    return {
        "top": [{"class": classes[i], "index": i, "probability": round(p, 6)}
                for p, i in zip(top.values.tolist(), top.indices.tolist())],
        "confidence_map": {"class": classes[best], "index": best, "size": list(maps.shape[1:]),
                           "values": [[round(v, 4) for v in row] for row in maps[best].tolist()],
                           "box": {"left": left, "top": top_edge, "width": side, "height": side}},
        "image": {"width": decoded.width, "height": decoded.height},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Serve a model over HTTP: POST /predict, GET /health, /docs, and a web page at /."
    parser.add_argument("weights", type=path_arg, metavar="WEIGHTS", help="weights file or run folder")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="default 8000")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20,
                        help=f"MiB per upload, above 0 and at most {UPLOAD_BYTES_CEILING // 2**20} (default 10)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"pixels per image, 1 to {PIXELS_CEILING:,} (default {MAX_PIXELS:,})")
    parser.add_argument("--threads", type=int, help="torch threads for the model (default: torch's choice; "
                        "1 gave the lowest latency on a busy 2-core host, docs/deploy.md)")


def check_address(host: str, port: int) -> None:
    """One line, before the model is loaded, when ``host:port`` cannot be listened on (a port in use, an address
    not this machine's), where uvicorn would print its own log lines and exit 3. Binds as asyncio's server does:
    every address the host resolves to, IPv6 ones IPv6-only, skipping those this machine lacks.

    Raises:
        NinError: The address cannot be bound.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise NinError(f"--host {shlex.quote(host)}: not an address of this machine ({e.strerror})") from None
    bound = 0
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL:  # e.g. ::1 where IPv6 is off
                    continue
                in_use = e.errno == errno.EADDRINUSE
                advice = "; is another server on that port? choose another --port" if in_use else ""
                where = f"--host {shlex.quote(host)} --port {port}"
                raise NinError(f"{where}: cannot listen there ({e.strerror or e}){advice}") from None
            bound += 1
    if not bound:
        raise NinError(f"--host {shlex.quote(host)}: not an address of this machine")


def run(args: argparse.Namespace) -> int:
    for package in ("fastapi", "uvicorn"):
        require_package(package, "nin serve", "serve")
    import uvicorn
    if not 0 < args.port < 65536:
        raise NinError(f"--port {args.port}: expected 1-65535")
    if args.threads is not None:
        if args.threads < 1:
            raise NinError(f"--threads {args.threads}: expected 1 or more")
        torch.set_num_threads(args.threads)
    megabytes = args.max_upload_mb
    if not (math.isfinite(megabytes) and 1 <= megabytes * 2**20 <= UPLOAD_BYTES_CEILING):  # nan, inf, 0, -1
        raise NinError(f"--max-upload-mb {megabytes:g}: expected more than 0 and at most "
                       f"{UPLOAD_BYTES_CEILING // 2**20} (MiB)")
    upload_bytes = int(megabytes * 2**20)
    check_limits(upload_bytes, args.max_pixels)  # before the model is loaded
    check_address(args.host, args.port)
    app = create_app(args.weights, max_upload_bytes=upload_bytes, max_pixels=args.max_pixels)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
