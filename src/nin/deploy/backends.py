"""One runner per inference backend, uint8 (N, C, H, W) images in, probabilities (N, K) out; and their timing.

    runner = load_runner("onnxruntime", "weights/fast-cifar10.safetensors")   # exports to a temporary folder
    probabilities = runner(images)                                              # numpy float32 (N, K)
    rows = time_backends("weights/fast-cifar10.safetensors", images)           # every backend, one run

Backends: "torch" is nin's own inference path, what `nin evaluate`, `nin predict` and `Classifier` run
(`nin.inference.inference_model`: batch norm folded, bf16 where the CPU runs it fast); "torch-fp32" is the
plain model in eager fp32, unfolded, the reference the speed-ups are measured against; "torch-folded" is the
exported module (batch norm folded, preprocessing and flips in the graph) run eagerly in fp32; "torchscript",
"onnxruntime" and "openvino" run the files `nin.export` writes. All of them compute the same function, so
their probabilities can be compared image by image (tests/test_export.py) and their speeds against "torch-fp32".
Every backend gets torch's thread count (``torch.set_num_threads``), so rows compare like with like.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import statistics
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nin.classifier import Classifier
from nin.data.readers import require_file
from nin.deploy import export
from nin.deploy.export import INPUT_NAME, OUTPUT_NAMES, build_exported
from nin.errors import NinError, require_package
from nin.inference import predict_logits
from nin.models import NiNConfig
from nin.pretrained import load
from nin.runtime import timings

__all__ = ["BACKENDS", "Runner", "load_runner", "available_backends", "BackendTiming", "time_backends",
           "format_table"]

BACKENDS = ("torch", "torch-fp32", "torch-folded", "torchscript", "onnxruntime", "openvino")
EXPORTED_SUFFIX = {"torchscript": ".pt", "onnxruntime": ".onnx", "openvino": ".xml"}


@dataclass
class Runner:
    """A backend ready to run: ``runner(images)`` -> float32 probabilities (N, K) as numpy."""

    name: str
    predict: Callable[[np.ndarray], np.ndarray]
    num_classes: int

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        images = images.numpy() if isinstance(images, torch.Tensor) else images
        assert images.dtype == np.uint8 and images.ndim == 4, f"expected uint8 (N, C, H, W), got {images.dtype} {images.shape}"
        return self.predict(np.ascontiguousarray(images))


def available_backends() -> list[str]:
    """The backends whose packages are installed here."""
    import importlib.util

    needs = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
    return [b for b in BACKENDS if b not in needs or importlib.util.find_spec(needs[b]) is not None]


def _torch_runner(name: str, weights: str | Path) -> Runner:
    model, preprocessing, meta = load(weights, "cpu")
    if name == "torch":  # nin's inference path: what `nin evaluate` / `nin predict` / `Classifier` run
        classifier = Classifier(model, preprocessing, meta, device="cpu")
        return Runner(name, lambda images: classifier.predict(torch.from_numpy(images)).numpy(),
                      model.config.num_classes)
    tta_flip = bool(meta.get("tta_flip"))

    @torch.no_grad()
    def predict(images: np.ndarray) -> np.ndarray:  # "torch-fp32": the plain model, eager fp32, unfolded
        logits = predict_logits(model.eval(), preprocessing(torch.from_numpy(images)), tta_flip=tta_flip)
        return logits.softmax(dim=1).numpy()

    return Runner(name, predict, model.config.num_classes)


def _exported_runner(name: str, path: Path, num_classes: int, sidecar: dict | None = None) -> Runner:
    """A runner on an exported file; with the ``sidecar`` read beside a file the user gave, the graph is checked
    against it before the runner is returned (`_check_against_sidecar`)."""
    if name == "torch-folded":
        module, _ = build_exported(path)
        num_classes = module.model.config.num_classes

        @torch.no_grad()
        def predict(images: np.ndarray) -> np.ndarray:
            return module(torch.from_numpy(images))[0].numpy()

        return Runner(name, predict, num_classes)
    declared = None  # the graph's (inputs, outputs): {name: shape}, where the format declares them
    if name == "torchscript":
        with _reading(path, "TorchScript file"), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path))

        @torch.no_grad()
        def predict(images: np.ndarray) -> np.ndarray:
            return module(torch.from_numpy(images))[0].numpy()
    elif name == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same thread budget as torch's rows
        with _reading(path, "ONNX model"):
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        declared = tuple({port.name: port.shape for port in ports} for ports in (session.get_inputs(),
                                                                                   session.get_outputs()))

        def predict(images: np.ndarray) -> np.ndarray:
            return session.run([OUTPUT_NAMES[0]], {INPUT_NAME: images})[0]
    else:
        import openvino

        weights = path.with_suffix(".bin")
        require_file(weights)
        core = openvino.Core()
        # f32: OpenVINO's CPU default on bf16-capable processors is bf16 (|Δp| up to 7e-3 on CIFAR-10)
        settings = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        with _reading(path, "OpenVINO model"):  # read as IR with its .bin: no other frontend tries (and logs)
            compiled = core.compile_model(core.read_model(str(path), str(weights)), "CPU", settings)
        declared = tuple({key: [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
                          for port in ports for key in port.get_names()}
                         for ports in (compiled.inputs, compiled.outputs))
        output = next((port for port in compiled.outputs if OUTPUT_NAMES[0] in port.get_names()), None)
        if output is None:
            raise NinError(f"{path}: no output {OUTPUT_NAMES[0]!r}; not a graph that nin export wrote")

        def predict(images: np.ndarray) -> np.ndarray:
            return compiled(images)[output]

    runner = Runner(name, predict, num_classes)
    if sidecar is not None:
        _check_against_sidecar(runner, path, sidecar, declared)
    return runner


@contextlib.contextmanager
def _reading(path: Path, what: str):
    """A runtime's failure to load ``path`` as one line naming the file, with the runtime's reason in brief."""
    try:
        yield
    except Exception as error:  # onnxruntime's InvalidProtobuf, torch's PytorchStreamReader, OpenVINO's RuntimeError
        raise NinError(f"{path}: unreadable {what} (damaged or truncated?): {export.first_line(error)}") from None


def _check_against_sidecar(runner: Runner, path: Path, sidecar: dict, declared: tuple[dict, dict] | None) -> None:
    """Refuse in one line, at load, a graph that does not fit the sidecar beside it (another model's, say), where
    the runtime would fail at the first batch or name the wrong classes: the input and output shapes the graph
    declares (ONNX, OpenVINO), or else what one image of the sidecar's shape gives (TorchScript declares none)."""
    config = NiNConfig.from_dict(sidecar["model"])  # `export.read_sidecar` has checked that it is one
    image, classes = [config.in_channels, config.input_size, config.input_size], len(sidecar["classes"])
    beside = f"its sidecar {path.name}.json"
    if declared is None:
        try:
            gives = list(runner(np.zeros((1, *image), np.uint8)).shape[1:])
        except Exception as error:
            raise NinError(f"{path}: does not take the {_shape(image)} images {beside} describes (is it another "
                           f"model's?): {export.first_line(error)}") from None
    else:
        inputs, outputs = declared
        if INPUT_NAME not in inputs or OUTPUT_NAMES[0] not in outputs:
            raise NinError(f"{path}: no input {INPUT_NAME!r} or no output {OUTPUT_NAMES[0]!r}; not a graph that "
                           "nin export wrote")
        takes, gives = list(inputs[INPUT_NAME])[1:], list(outputs[OUTPUT_NAMES[0]])[1:]
        if len(takes) != 3 or any(isinstance(t, int) and t != want for t, want in zip(takes, image)):
            raise NinError(f"{path}: takes {_shape(takes)} images, but {beside} describes {_shape(image)} images "
                           "(is it another model's?)")
    if len(gives) != 1 or (isinstance(gives[0], int) and gives[0] != classes):
        raise NinError(f"{path}: gives {_shape(gives)} class probabilities per image, but {beside} names {classes} "
                       "classes (is it another model's?)")


def _shape(dims: list) -> str:
    """(C, H, W) as 3×32×32; a dimension the graph leaves open as ?."""
    return "×".join(str(d) if isinstance(d, int) else "?" for d in dims) or "no"


def load_runner(backend: str, weights: str | Path, *, export_dir: str | Path | None = None) -> Runner:
    """A runner for ``backend`` on ``weights``.

    Args:
        backend: One of `BACKENDS`.
        weights: A nin weights file or run folder; for "torchscript", "onnxruntime" and "openvino" also an
            exported file (.pt, .onnx, .xml) with its sidecar .json beside it.
        export_dir: Where to export nin weights for the exported backends (default: a temporary folder,
            removed when the process exits).

    Raises:
        NinError: An exported file that is missing or unreadable, whose sidecar is missing or not a nin export
            description (`nin.deploy.export.read_sidecar`), or whose graph does not fit its sidecar.
    """
    if backend not in BACKENDS:
        raise NinError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend in ("torch", "torch-fp32"):
        return _torch_runner(backend, weights)
    path = Path(weights)
    if backend == "torch-folded":
        return _exported_runner(backend, path, 0)
    if backend in ("onnxruntime", "openvino"):
        require_package(backend, f"--backend {backend}", {"onnxruntime": "onnx", "openvino": "openvino"}[backend])
    if path.suffix == EXPORTED_SUFFIX[backend]:
        require_file(path)
        sidecar = export.read_sidecar(path)
        return _exported_runner(backend, path, len(sidecar["classes"]), sidecar)
    if export_dir is None:
        export_dir = tempfile.mkdtemp(prefix="nin-export-")
        atexit.register(shutil.rmtree, export_dir, ignore_errors=True)  # the runner may use it until then
    target = Path(export_dir) / f"model{EXPORTED_SUFFIX[backend]}"
    if backend == "torchscript":
        info = export.export_torchscript(weights, target)
    elif backend == "onnxruntime":
        info = export.export_onnx(weights, target)
    else:
        info = export.export_openvino(weights, target)
    return _exported_runner(backend, target, len(info["classes"]))


@dataclass
class BackendTiming:
    """One backend's speed: batch throughput and one-image latency, on this machine, in this run."""

    backend: str
    batch_size: int
    images_per_second: float  # median over repeats of batch_size / seconds per batch
    latency_p50_ms: float  # one image per call
    latency_p99_ms: float
    speedup: float = 1.0  # images_per_second / the "torch-fp32" row's (1.0 when it was not timed)
    latency_ratio: float = 1.0  # latency_p50_ms / the "torch-fp32" row's

    def to_dict(self) -> dict:
        return asdict(self)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def time_backends(weights: str | Path, images: np.ndarray | torch.Tensor, *, backends: list[str] | None = None,
                  batch_size: int = 500, repeats: int = 3, latency_calls: int = 100,
                  log: Callable[[str], None] | None = None) -> list[BackendTiming]:
    """Time every backend on the same images in one run; ratios are against the plain "torch-fp32" model.

    Args:
        weights: A nin weights file or run folder (nin_cifar10 for the documented table).
        images: uint8 (N, C, H, W), N >= batch_size; the first batch_size images form the batch.
        backends: Which to time (default: every available one, in `BACKENDS` order).
        batch_size: Images per batch for the throughput numbers.
        repeats: Timed batches per backend (after one warm-up batch); the median counts.
        latency_calls: Timed one-image calls per backend (after 10 warm-up calls); p50 and p99 count.
        log: Called with one line per finished backend.

    Returns:
        One `BackendTiming` per backend, in the order timed.
    """
    images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    assert len(images) >= batch_size, f"need at least {batch_size} images, got {len(images)}"
    batch = np.ascontiguousarray(images[:batch_size])
    names = backends or available_backends()
    rows: list[BackendTiming] = []
    with tempfile.TemporaryDirectory(prefix="nin-backends-") as folder:
        for name in names:
            runner = load_runner(name, weights, export_dir=Path(folder) / name)
            # the first batch warms up lazy initialisation, the allocator and oneDNN's primitive caches
            seconds = timings(lambda: runner(batch), repeats)
            calls = iter(range(10**9))
            latencies = [t * 1e3 for t in timings(lambda: runner(_one(batch, next(calls))), latency_calls, warmup=10)]
            row = BackendTiming(name, batch_size, batch_size / statistics.median(seconds),
                                _percentile(latencies, 50), _percentile(latencies, 99))
            rows.append(row)
            if log:
                log(f"{name}: {row.images_per_second:.0f} images/s, p50 {row.latency_p50_ms:.2f} ms")
    base = next((r for r in rows if r.backend == "torch-fp32"), None)
    if base is not None:
        for row in rows:
            row.speedup = row.images_per_second / base.images_per_second
            row.latency_ratio = row.latency_p50_ms / base.latency_p50_ms
    return rows


def _one(batch: np.ndarray, i: int) -> np.ndarray:
    """The i-th image of the batch (cycling) as a batch of one."""
    i %= len(batch)
    return batch[i : i + 1]


def format_table(rows: list[BackendTiming]) -> str:
    """A Markdown table of `time_backends` rows."""
    lines = [f"| backend | images/s (batch {rows[0].batch_size}) | × torch fp32 | latency p50 (ms) | p99 (ms) | "
             "p50 / torch fp32 |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.backend} | {r.images_per_second:,.0f} | {r.speedup:.2f} | {r.latency_p50_ms:.2f} | "
                     f"{r.latency_p99_ms:.2f} | {r.latency_ratio:.2f} |")
    return "\n".join(lines)
