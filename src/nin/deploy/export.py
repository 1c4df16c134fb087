"""A trained NiN out of Python: ONNX, TorchScript or OpenVINO, with its preprocessing inside the graph.

    nin export weights/fast-cifar10.safetensors --format onnx --out nin-cifar10.onnx
    nin export paper-mnist                              # paper-mnist.onnx (and its .json) in the current folder

Every exported graph takes what a camera or a PNG gives, a uint8 image batch (N, C, H, W) with a dynamic N, and
returns two tensors: ``probabilities`` (N, K) and ``class_maps`` (N, K, h, w), the paper's category-confidence
maps. The fitted preprocessing (per-channel standardization, /255, or GCN + ZCA / LCN) is part of the graph,
batch norm is folded into the convolutions, and when the weights say ``tta_flip`` the graph also runs the
mirrored batch and averages, so its probabilities are the softmax of the logits that `nin evaluate` and
`nin predict` compute. Beside FILE a sidecar FILE.json describes the graph (classes, input, outputs,
preprocessing, opset, the source weights' sha256); docs/deploy.md shows a 10-line onnxruntime client.

Every output is claimed before any work (`nin.files.claim_output`: no symbolic link, no existing file unless
it is an earlier export of the same format or ``--force`` says so, never the weights being exported), written
to a temporary file, checked there, and only then moved into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from nin.__about__ import __version__
from nin.data.images import INPUT_HANDLING
from nin.data.readers import file_digest
from nin.errors import NinError, path_arg, require_package
from nin.files import atomic_write, atomic_write_bytes, claim_output, output_path, read_json_object
from nin.inference import InferencePipeline, optimize_for_inference
from nin.models import NiNConfig
from nin.pretrained import PRETRAINED, load, resolve
from nin.transforms import Preprocessing

__all__ = ["ExportedNiN", "build_exported", "export_onnx", "export_torchscript", "export_openvino", "sidecar",
           "read_sidecar", "first_line", "claim_outputs", "check_opset", "default_out", "FORMATS", "OPSET", "OPSETS",
           "INPUT_NAME", "OUTPUT_NAMES"]

OPSET = 17  # ONNX opset of the exported graph; onnxruntime >= 1.14 and OpenVINO read it
# The opsets an export may ask for: from 10 (the first with Flip, which test-time flips need) to 20, the last one
# torch 2.13's TorchScript-based exporter supports (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET).
OPSETS = range(10, 21)
INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "class_maps")
FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "openvino": ".xml"}


class ExportedNiN(nn.Module):
    """uint8 images (N, C, H, W) -> (probabilities (N, K), class maps (N, K, h, w)), preprocessing included.

    `nin.inference.InferencePipeline` (the fitted preprocessing module, the batch-norm-folded model, test-time
    flips) with a softmax after it: the same module that `Classifier`, `nin predict` and `nin serve` run, here in
    ``dtype`` (exports: fp32). With ``tta_flip`` the class maps are the average of the image's maps and the
    mirrored image's maps mirrored back, so that (with the GAP head) their spatial means are exactly the
    flip-averaged logits.
    """

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, tta_flip: bool,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        # unfused: oneDNN's fused conv + ReLU is not an ONNX operator (the numbers are the same)
        self.pipeline = InferencePipeline(preprocessing, optimize_for_inference(model, amp_dtype=dtype,
                                                                                fuse_relu=False), tta_flip)

    @property
    def model(self) -> nn.Module:
        """The folded model (its ``config`` is the architecture's)."""
        return self.pipeline.model.model

    @property
    def kind(self) -> str:
        return self.pipeline.preprocessing.kind

    @property
    def tta_flip(self) -> bool:
        return self.pipeline.tta_flip

    def train(self, mode: bool = True) -> ExportedNiN:
        super().train(False)  # inference only: dropout stays off whatever the caller asks
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, maps = self.pipeline(images)
        return logits.softmax(dim=1), maps


def build_exported(weights: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ExportedNiN, dict]:
    """Load ``weights`` (a tag, a file or a run folder) on the CPU and wrap it; also returns the weights' meta."""
    model, preprocessing, meta = load(weights, "cpu")
    return ExportedNiN(model, preprocessing, bool(meta.get("tta_flip")), dtype).eval(), meta


def _example(module: ExportedNiN, count: int = 2, seed: int = 0) -> torch.Tensor:
    config = module.model.config
    generator = torch.Generator().manual_seed(seed)
    shape = (count, config.in_channels, config.input_size, config.input_size)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)


def sidecar(module: ExportedNiN, meta: dict, weights: str | Path, format: str, opset: int | None) -> dict:
    """The JSON description written beside an exported graph (FILE.json)."""
    config = module.model.config
    source = resolve(weights)
    if module.kind == "standardize":
        fitted = module.pipeline.preprocessing
        preprocessing = {"kind": "standardize", "formula": "(x / 255 - mean) / std, per channel",
                         "mean": fitted.mean.flatten().tolist(), "std": fitted.std.flatten().tolist()}
    elif module.kind == "scale":
        preprocessing = {"kind": "scale", "formula": "x / 255"}
    elif module.kind == "gcn_zca":
        preprocessing = {"kind": "gcn_zca", "formula": "GCN (scale 55) then ZCA", "zca": "ZCA inside"}
    else:
        preprocessing = {"kind": "gcn_lcn", "formula": "GCN (scale 55) then 7x7 LeCun LCN", "lcn": "LCN inside"}
    return {
        "format": format,
        "opset": opset,
        "model": config.to_dict(),
        "dataset": meta.get("dataset"),
        "classes": meta.get("classes") or [str(i) for i in range(config.num_classes)],
        "input": {"name": INPUT_NAME, "layout": "NCHW uint8", "shape": ["N", config.in_channels, config.input_size,
                  config.input_size], "channels": "RGB" if config.in_channels == 3 else "grayscale",
                  "resize": "shorter side to input size (bilinear), then center crop",
                  "handling": INPUT_HANDLING},  # how `nin predict` prepares an image: what a client should do
        "outputs": {OUTPUT_NAMES[0]: ["N", config.num_classes],
                    OUTPUT_NAMES[1]: ["N", config.num_classes, config.feature_size(), config.feature_size()]},
        "preprocessing": preprocessing,
        "tta_flip": module.tta_flip,
        "batch_norm_folded": True,
        "source_weights": {"file": source.name, "sha256": file_digest(source, "sha256")},
        "nin_version": __version__,
    }


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of the exported graph ``path`` (``path``.json), checked to be what `sidecar` writes as far as
    a reader needs it: a JSON object whose 'model' is a NiN config and whose 'classes' are its K class names.

    Raises:
        NinError: The sidecar is missing, or is not such an object (the message names it and says what it is).
    """
    path = Path(path)
    info_path = _sidecar_path(path)
    if not info_path.is_file():
        raise NinError(f"{path}: its sidecar {info_path.name} is missing")
    try:
        info = json.loads(info_path.read_bytes())
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, or nested past Python's limit
        problem = f"not JSON: {first_line(error)}"
    else:
        problem = _sidecar_problem(info)
    if problem:
        raise NinError(f"{info_path}: not a nin export description ({problem}); expected the JSON object that "
                       f"nin export writes beside {path.name}, with its 'model' and 'classes'")
    return info


def _sidecar_problem(info) -> str | None:
    """What keeps ``info`` (parsed JSON) from being a sidecar a reader can use; None when nothing does."""
    if not isinstance(info, dict):
        return f"a JSON {type(info).__name__}, not an object"
    missing = [key for key in ("model", "classes") if key not in info]
    if missing:
        return ", ".join(f"no {key!r}" for key in missing)
    try:
        config = NiNConfig.from_dict(info["model"])
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as error:
        return f"'model' is not a NiN config: {first_line(error)}"
    classes = info["classes"]
    if not (isinstance(classes, list) and len(classes) == config.num_classes
            and all(isinstance(name, str) for name in classes)):
        return f"'classes' is not a list of the model's {config.num_classes} class names"
    return None


def check_opset(opset: int) -> None:
    """Refuse an opset outside `OPSETS` in one line (torch's exporter would fail with a traceback, or write a graph
    that no runtime reads)."""
    if opset not in OPSETS:
        raise NinError(f"--opset {opset}: expected {OPSETS.start} to {OPSETS.stop - 1} (the opsets torch's exporter "
                       f"writes this graph in; default {OPSET})")


def _earlier_export(path: Path, format: str) -> bool:
    """True when an earlier `nin export` of ``format`` wrote ``path``: its sidecar (``path``.json) is one this
    module wrote for that format."""
    info = read_json_object(_sidecar_path(path))
    return info is not None and info.get("format") == format and {"nin_version", "source_weights"} <= set(info)


def claim_outputs(weights: str | Path, path: str | Path, format: str, *, force: bool = False) -> list[Path]:
    """The files an export of ``weights`` to ``path`` writes (the graph, OpenVINO's .bin, the sidecar), each
    checked with `nin.files.claim_output` before any work: ``--out`` may not be the weights themselves.

    Raises:
        NinError: ``path`` names a folder; one of them is the weights file, a symbolic link, a folder, or an
            existing file that is not an earlier export of this format (unless ``force``).
    """
    if Path(path).is_dir() or Path(path).name in ("", ".", "..") or str(path).endswith(("/", os.sep)):
        example = os.path.join(str(path), default_out(weights, format).name)
        raise NinError(f"--out {path}: names a folder; expected a file path such as {example}")
    path = Path(path)
    outputs = [path, *([path.with_suffix(".bin")] if format == "openvino" else []), _sidecar_path(path)]
    source = resolve(weights)
    for output in outputs:
        landing = output_path(output)  # `sub/../w.safetensors` is w.safetensors once the write makes sub/
        if landing.exists() and source.exists() and os.path.samefile(landing, source):  # links, hard links too
            raise NinError(f"--out {path}: {output} is the weights file being exported; choose another name")
    if path.suffix != FORMATS[format]:  # the suffix is how `nin predict --backend ...` recognises the file
        other = next((f for f, suffix in FORMATS.items() if suffix == path.suffix), None)
        raise NinError(f"--out {path}: --format {format} is written as FILE{FORMATS[format]}"
                       + (" (plus FILE.bin)" if format == "openvino" else "")
                       + (f"; for a {path.suffix} file, --format {other}" if other else ""))
    earlier = _earlier_export(path, format)  # then its graph, .bin and sidecar are all that export's
    for output in outputs:
        claim_output(output, flag="--out", force=force, ours=lambda _: earlier)
    return outputs


def default_out(weights: str | os.PathLike, format: str) -> Path:
    """Where `nin export` writes without ``--out``: NAME plus the format's suffix in the current folder, NAME the
    pretrained tag, the run folder's name or the weights file's name without .safetensors."""
    given = Path(weights).expanduser()
    if not given.exists() and str(weights) in PRETRAINED:
        name = str(weights)
    elif given.is_dir():
        name = given.resolve().name
    else:
        name = given.name.removesuffix(".safetensors")
    return Path((name or "model") + FORMATS[format])


def _check_default_out(weights: str | os.PathLike, path: Path, format: str, force: bool) -> None:
    """Without ``--out`` an existing file at the default name is replaced only when it is an earlier export of
    the same weights (its sidecar's sha256), or with ``force``: two runs' model.safetensors, or two run folders
    of one name, would otherwise overwrite each other's exports in silence."""
    outputs = [path, *([path.with_suffix(".bin")] if format == "openvino" else []), _sidecar_path(path)]
    existing = [output for output in outputs if output.exists() or output.is_symlink()]
    if force or not existing:
        return
    earlier = read_json_object(_sidecar_path(path))["source_weights"] if _earlier_export(path, format) else None
    earlier = earlier if isinstance(earlier, dict) else None
    if earlier is not None and earlier.get("sha256") == file_digest(resolve(weights), "sha256"):
        return
    what = (f"an export of other weights ({earlier.get('file', '?')}, sha256 {str(earlier.get('sha256'))[:12]}...)"
            if earlier is not None else "not an export of these weights")
    raise NinError(f"{existing[0]} (nin export's default name for {weights}): exists and is {what}; not replacing "
                   "it (name another file with --out, or add --force)")


def _write_sidecar(path: Path, info: dict) -> Path:
    target = _sidecar_path(path)
    atomic_write_bytes(target, (json.dumps(info, indent=2) + "\n").encode())
    return target


def _publish(path: Path, write_graph, info: dict) -> None:
    """Write the graph through ``write_graph(temporary_path)`` (which also checks it), move it into place, then
    write its sidecar; if the sidecar cannot be written, the new graph goes again."""
    atomic_write(path, write_graph)
    try:
        _write_sidecar(path, info)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _onnx_graph(module: ExportedNiN, path: Path, opset: int) -> None:
    dynamic = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates the TorchScript-based exporter
        torch.onnx.export(module, (_example(module),), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic)


def _check_onnx(module: ExportedNiN, path: Path) -> None:
    """onnx's checker, then onnxruntime (when installed) against torch on 3 random images (|Δp| < 1e-4)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as error:
        raise NinError(f"the exported ONNX graph is not valid ({first_line(error)})") from None
    try:
        import onnxruntime
    except ModuleNotFoundError:
        return
    images = _example(module, count=3, seed=1)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAMES[0]], {INPUT_NAME: images.numpy()})[0]
    with torch.no_grad():
        want = module(images)[0].numpy()
    difference = float(abs(got - want).max())
    if difference > 1e-4:
        raise NinError(f"onnxruntime differs from torch by {difference:.2e} in probability; nothing written")


def first_line(error: BaseException) -> str:
    """A library's message in one line: its first line that is not a source location (OpenVINO's "Exception from
    src/...cpp:84:"), at most 300 characters."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not re.search(r"\.(cpp|cc|h|hpp):\d+:$", line.strip())]
    return lines[0][:300] if lines else type(error).__name__


@contextlib.contextmanager
def _exporting(what: str):
    """Turn a failure inside torch's exporter into one line (the graph's temporary file is removed by the caller)."""
    try:
        yield
    except NinError:
        raise
    except Exception as error:  # torch.onnx / torch.jit errors: an operator or opset they cannot write
        raise NinError(f"{what} failed ({type(error).__name__}: {first_line(error)})") from None


def export_onnx(weights: str | Path, path: str | Path, *, opset: int = OPSET, check: bool = True,
                force: bool = False) -> dict:
    """Export ``weights`` to an ONNX file plus its sidecar ``path``.json.

    Args:
        weights: A pretrained tag, a weights file or a run folder.
        path: The .onnx file to write.
        opset: ONNX opset version, one of `OPSETS`.
        check: Run onnx's checker, and compare onnxruntime's output with torch's on 3 random images when
            onnxruntime is installed (max |Δprobability| < 1e-4), before the file is moved into place.
        force: Replace existing files that are not an earlier ONNX export (never a symbolic link).

    Returns:
        The sidecar dict.
    """
    check_opset(opset)
    require_package("onnx", "ONNX export", "onnx")  # torch's exporter writes through it
    claim_outputs(weights, path, "onnx", force=force)  # as given: "out/" names a folder
    path = Path(path)
    module, meta = build_exported(weights)

    def write(temporary: str) -> None:
        with _exporting(f"ONNX export at opset {opset}"):
            _onnx_graph(module, Path(temporary), opset)
        if check:
            _check_onnx(module, Path(temporary))

    info = sidecar(module, meta, weights, "onnx", opset)
    _publish(path, write, info)
    return info


def export_torchscript(weights: str | Path, path: str | Path, *, check: bool = True, force: bool = False) -> dict:
    """Export ``weights`` to a frozen TorchScript file (``torch.jit.load(path)(images)``) plus its sidecar.

    Args:
        weights: A weights file or run folder.
        path: The .pt file to write.
        check: Trace-check the graph on a batch of another size (the batch dimension must stay dynamic).
        force: Replace existing files that are not an earlier TorchScript export (never a symbolic link).

    Returns:
        The sidecar dict.
    """
    claim_outputs(weights, path, "torchscript", force=force)  # as given: "out/" names a folder
    path = Path(path)
    module, meta = build_exported(weights)

    def write(temporary: str) -> None:
        with torch.no_grad(), warnings.catch_warnings(), _exporting("TorchScript export"):
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript; it still works
            check_inputs = [(_example(module, count=5, seed=2),)] if check else None
            traced = torch.jit.trace(module, _example(module), check_inputs=check_inputs)
            torch.jit.save(torch.jit.freeze(traced), temporary)

    info = sidecar(module, meta, weights, "torchscript", None)
    _publish(path, write, info)
    return info


def export_openvino(weights: str | Path, path: str | Path, *, opset: int = OPSET, force: bool = False) -> dict:
    """Export ``weights`` to OpenVINO IR (``path`` .xml plus its .bin), fp32, through ONNX; plus the sidecar.

    Needs the ``openvino`` package (``pip install "network-in-network[openvino]"``). The IR is made in a temporary
    folder, then its two files are moved into place (the .bin first: an .xml is never without its weights).
    """
    require_package("openvino", "--format openvino", "openvino")
    import openvino
    check_opset(opset)
    claim_outputs(weights, path, "openvino", force=force)  # as given: "out/" names a folder
    path = Path(path)
    module, meta = build_exported(weights)
    with tempfile.TemporaryDirectory(prefix="nin-openvino-") as folder:
        onnx_path, ir_path = Path(folder) / "model.onnx", Path(folder) / "model.xml"
        with _exporting(f"OpenVINO export at opset {opset}"):
            _onnx_graph(module, onnx_path, opset)
            converted = openvino.convert_model(str(onnx_path))
            openvino.save_model(converted, str(ir_path), compress_to_fp16=False)  # the default would halve the weights
        info = sidecar(module, meta, weights, "openvino", opset)
        weights_file = path.with_suffix(".bin")
        atomic_write(weights_file, lambda temporary: shutil.copyfile(ir_path.with_suffix(".bin"), temporary))
        try:
            _publish(path, lambda temporary: shutil.copyfile(ir_path, temporary), info)
        except BaseException:
            weights_file.unlink(missing_ok=True)
            raise
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Export a trained model with its preprocessing inside: uint8 images (N, C, H, W) in, "
                          "probabilities and class maps out. Writes FILE and its description FILE.json.")
    parser.add_argument("weights", type=path_arg, metavar="WEIGHTS", help="weights file or run folder")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx", help="default: onnx")
    parser.add_argument("--out", type=path_arg, metavar="FILE",
                        help="output file (.onnx, .pt, .xml for openvino); default: NAME.onnx (.pt, .xml) in the "
                             "current folder, NAME the tag, the run folder's name or the weights file's")
    parser.add_argument("--opset", type=int, default=OPSET,
                        help=f"ONNX opset, {OPSETS.start}-{OPSETS.stop - 1} (default {OPSET})")
    parser.add_argument("--force", action="store_true",
                        help="replace existing files at --out (an earlier export of the same format is replaced "
                             "without it); never the weights being exported, never through a symbolic link")


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = str(default_out(args.weights, args.format))
        _check_default_out(args.weights, Path(args.out), args.format, args.force)
    if args.format == "onnx":
        info = export_onnx(args.weights, args.out, opset=args.opset, force=args.force)
    elif args.format == "torchscript":
        info = export_torchscript(args.weights, args.out, force=args.force)
    else:
        info = export_openvino(args.weights, args.out, opset=args.opset, force=args.force)
    print(f"{args.out}: {args.format}, {info['input']['layout']} {info['input']['shape']} -> "
          f"{', '.join(OUTPUT_NAMES)}; preprocessing {info['preprocessing']['kind']} inside, "
          f"tta_flip {info['tta_flip']}; described in {args.out}.json")
    return 0
