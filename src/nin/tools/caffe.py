"""Import the authors' trained Caffe weights (Caffe Model Zoo) into an ordinary nin weights file.

    nin import-caffe cifar10_nin.caffemodel --prototxt cifar10_nin_train_val.prototxt \\
        --arch nin_cifar10_caffe --data-dir ../shared/data --out weights/nin_cifar10_caffe.safetensors

The files are read by `nin.tools.caffe_format` (a ``.caffemodel``'s protobuf and a ``.prototxt``, without Caffe
or protobuf). Caffe and PyTorch share the (out, in, k, k) layout, so the weights are copied unchanged through
the one table of `nin.models.original_layer_names`. Sections, in reading order: checking a net against a model
(names, shapes, strides, pads, pooling); `import_caffe`; the ``nin import-caffe`` subcommand. Every problem is a
`NinError` of one line, raised before anything is written.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from nin.checkpoint import load_state, save_weights
from nin.data import load_dataset
from nin.data.datasets import CIFAR10_CLASSES
from nin.errors import CheckpointError, NinError, path_arg
from nin.files import claim_output
from nin.models import NiN, get_model, list_models, model_config, original_layer_names
from nin.tools.caffe_format import (
    POOL_METHODS,
    CaffeNet,
    read_caffemodel,
    read_prototxt,
)
from nin.transforms import (
    FITTED_KINDS,
    PREPROCESSING_KINDS,
    Preprocessing,
    fit_preprocessing,
)

__all__ = ["read_caffemodel", "read_prototxt", "check_structure", "map_blobs", "import_caffe", "add_arguments", "run"]

ARCHS = ("nin_cifar10_caffe", "nin_cifar10", "nin_imagenet")  # the models the authors published weights for


# ---------------------------------------------------------------------------------------------
# Checking a net against a model
# ---------------------------------------------------------------------------------------------


def _pair(params: dict[str, list[int]], name: str, default: int) -> tuple[int, int]:
    """Caffe's (h, w) of a kernel/stride/pad: ``name_h``/``name_w``, else ``name`` (repeated), else the default."""
    if f"{name}_h" in params or f"{name}_w" in params:
        return params.get(f"{name}_h", [default])[-1], params.get(f"{name}_w", [default])[-1]
    values = params.get(name, [])
    if len(values) >= 2:
        return values[0], values[1]
    return (values[0], values[0]) if values else (default, default)


def _conv_geometry(model: NiN) -> dict[str, tuple[int, int]]:
    """prefix -> (stride, padding) of every convolution in the model."""
    geometry = {}
    for b, block in enumerate(model.blocks):
        for i, conv in enumerate(block.convs):
            geometry[f"blocks.{b}.convs.{i}"] = (conv.stride[0], conv.padding[0])
    return geometry


def check_structure(net: CaffeNet, model: NiN, arch: str, where: str) -> None:
    """Check what blobs cannot show: convolution strides and pads, and the kind and size of every pooling.

    Only the parameters a net states are checked (a caffemodel usually carries them; a prototxt always).
    Dropout is not compared: at test time it is the identity in Caffe (it scales while training) and here.
    """
    mapping = original_layer_names(model)
    geometry = _conv_geometry(model)
    config = model.config
    block_of = {name: int(prefix.split(".")[1]) for name, prefix in mapping.items()}
    for name, prefix in mapping.items():
        layer = net.layer(name)
        if layer is None or not layer.convolution:
            continue
        stride, pad = _pair(layer.convolution, "stride", 1), _pair(layer.convolution, "pad", 0)
        ours = geometry[prefix]
        if stride != (ours[0], ours[0]) or pad != (ours[1], ours[1]):
            raise NinError(f"{where}: layer {name} has stride {stride[0]} pad {pad[0]}; {arch} {prefix} has "
                           f"stride {ours[0]} pad {ours[1]}")
    last_block = len(config.blocks) - 1
    seen_block, pooled = -1, set()
    for layer in net.layers:
        if layer.name in block_of:
            seen_block = block_of[layer.name]
            continue
        if layer.type != "Pooling" or not layer.pooling or seen_block < 0:
            continue
        method = POOL_METHODS.get(layer.pooling.get("pool", [0])[-1], "?")
        kernel, stride = _pair(layer.pooling, "kernel_size", 0)[0], _pair(layer.pooling, "stride", 1)[0]
        pad = _pair(layer.pooling, "pad", 0)[0]
        if seen_block == last_block:  # the head: average over the whole final map, so its size must agree
            size = config.feature_size()
            if method != "AVE":
                raise NinError(f"{where}: layer {layer.name} is {method} pooling over the class maps; "
                               f"{arch} averages them (global average pooling)")
            if not layer.pooling.get("global_pooling", [0])[-1] and (kernel, stride, pad) != (size, 1, 0):
                raise NinError(f"{where}: layer {layer.name} averages {kernel}×{kernel} windows; {arch}'s class maps "
                               f"are {size}×{size} (Caffe's and our pooling would give other map sizes)")
            continue
        spec = config.blocks[seen_block]
        expected = {"max": "MAX", "avg": "AVE", None: None}[spec.pool]
        if method != expected:
            pool = {"MAX": "max", "AVE": "avg"}.get(method)
            hint = [name for name in ARCHS if name != arch and len(model_config(name).blocks) == len(config.blocks)
                    and model_config(name).blocks[seen_block].pool == pool]
            raise NinError(f"{where}: layer {layer.name} is {method} pooling; {arch} has {expected or 'no'} pooling "
                           f"after block {seen_block}" + (f" (--arch {hint[0]}?)" if hint else ""))
        if (kernel, stride, pad) != (config.pool_kernel, config.pool_stride, 0):
            raise NinError(f"{where}: layer {layer.name} pools {kernel}×{kernel} stride {stride} pad {pad}; {arch} "
                           f"pools {config.pool_kernel}×{config.pool_kernel} stride {config.pool_stride} pad 0")
        pooled.add(seen_block)
    missing = [b for b, spec in enumerate(config.blocks) if spec.pool is not None and b not in pooled]
    if pooled and missing:
        raise NinError(f"{where}: no pooling layer after block {missing[0]}, where {arch} pools")


def map_blobs(net: CaffeNet, model: NiN, arch: str, where: str) -> dict[str, torch.Tensor]:
    """The model's state_dict entries from the net's blobs, every name and shape checked first.

    Returns:
        ``{"blocks.0.convs.0.weight": tensor, ...}`` covering every convolution of ``model``.

    Raises:
        NinError: A layer is missing, has other than two blobs (weights, biases), or a blob's shape differs.
    """
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for name, prefix in original_layer_names(model).items():
        layer = net.layer(name)
        if layer is None:
            raise NinError(f"{where}: no layer {name!r} (for {arch} {prefix}); its layers are "
                           f"{', '.join(layer.name for layer in net.layers[:20])}: a model of another net?")
        if len(layer.blobs) != 2:
            raise NinError(f"{where}: layer {name} has {len(layer.blobs)} blobs, expected 2 (weights, biases)")
        weight, bias = layer.blobs
        expected = tuple(state[f"{prefix}.weight"].shape)
        if weight.shape != expected:
            raise NinError(f"{where}: layer {name} weights have the shape {weight.shape}; {arch} {prefix}.weight "
                           f"has {expected}")
        # old Caffe files store a bias as a (1, 1, 1, out) blob, newer ones as (out,)
        out = expected[0]
        if bias.size != out or sum(d != 1 for d in bias.shape) > 1:
            raise NinError(f"{where}: layer {name} biases have the shape {bias.shape}; {arch} {prefix}.bias "
                           f"has {(out,)}")
        for kind, blob in (("weights", weight), ("biases", bias)):
            bad = int(blob.size - np.isfinite(blob).sum())
            if bad:
                raise NinError(f"{where}: layer {name} {kind} hold {bad:,} NaN or infinite values; trained weights "
                               "are finite (a damaged file?)")
        tensors[f"{prefix}.weight"] = torch.from_numpy(weight.copy())
        tensors[f"{prefix}.bias"] = torch.from_numpy(bias.reshape(out).copy())
    extra = set(state) - set(tensors)
    if extra:  # batch-norm statistics or an FC head: nothing in a Caffe NiN fills them
        raise NinError(f"{arch} has parameters no Caffe layer fills: {', '.join(sorted(extra)[:4])}")
    return tensors


# ---------------------------------------------------------------------------------------------
# import_caffe
# ---------------------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _earlier_import(path: Path) -> bool:
    """True when ``path`` is a weights file that `import_caffe` wrote (an import may replace an earlier one)."""
    try:
        _, meta = load_state(path)
    except CheckpointError:
        return False
    return meta.get("kind") == "weights" and (meta.get("source") or {}).get("format") == "caffemodel"


def import_caffe(caffemodel: str | os.PathLike, arch: str, out: str | os.PathLike,
                 prototxt: str | os.PathLike | None = None, preprocessing="gcn_zca",
                 data_dir: str | os.PathLike | None = None, force: bool = False) -> dict:
    """Put a Caffe model's weights into ``arch`` and write them as a nin weights file.

    Args:
        caffemodel: The binary ``.caffemodel``.
        arch: The nin model to fill, e.g. "nin_cifar10_caffe" for the authors' CIFAR-10 model.
        out: The weights file to write (``.safetensors``); an existing file is replaced only if an earlier
            import wrote it, or with ``force`` (never through a symbolic link).
        prototxt: The net definition; when given, its layer names and pooling are checked too.
        preprocessing: A kind (see `nin.transforms.fit_preprocessing`) fitted on the CIFAR-10 training images
            of ``data_dir``, or an already fitted `Preprocessing`. The authors' CIFAR-10 model was trained on
            pylearn2's GCN + ZCA, "gcn_zca".
        data_dir: Data root for the CIFAR-10 training images (default: $NIN_DATA, else ~/.cache/nin).
        force: Replace an existing ``out`` that no earlier import wrote.

    Returns:
        The ``source`` record written into the file's meta (file, sha256, arch, layer mapping).

    Raises:
        NinError: Anything wrong with the inputs; then nothing is written.
    """
    caffemodel, out = Path(caffemodel), Path(out)
    if arch not in list_models():
        raise NinError(f"--arch {arch!r}: unknown model; choose one of {', '.join(ARCHS)}")
    if isinstance(preprocessing, str) and preprocessing not in PREPROCESSING_KINDS:
        raise NinError(f"--preprocessing {preprocessing!r}: choose one of {', '.join(PREPROCESSING_KINDS)}")
    claim_output(out, flag="--out", force=force, ours=_earlier_import)
    if out.suffix != ".safetensors":  # what nin evaluate / predict / visualize read as a weights file
        raise NinError(f"--out {out}: expected a .safetensors file name")
    model = get_model(arch)
    config = model.config
    net = read_caffemodel(caffemodel)
    tensors = map_blobs(net, model, arch, str(caffemodel))
    check_structure(net, model, arch, str(caffemodel))
    if prototxt is not None:
        _check_prototxt(prototxt, model, arch)
    preprocessing = _fitted_preprocessing(preprocessing, config, arch, data_dir)

    model.load_state_dict(tensors)
    source = {"format": "caffemodel", "file": caffemodel.name, "sha256": _file_sha256(caffemodel),
              "net": net.name, "caffe_layers": net.format, "arch": arch,
              "prototxt": Path(prototxt).name if prototxt is not None else None,
              "layer_mapping": original_layer_names(model)}
    cifar = config.num_classes == 10 and config.input_size == 32
    meta = {"dataset": "cifar10" if cifar else None,
            "classes": CIFAR10_CLASSES if cifar else [str(k) for k in range(config.num_classes)],
            "tta_flip": False, "source": source}
    save_weights(out, model, preprocessing, meta)
    return source


def _check_prototxt(prototxt: str | os.PathLike, model: NiN, arch: str) -> None:
    """The net definition names every layer of ``arch`` and has its structure (pooling, kernel sizes)."""
    definition = read_prototxt(prototxt)
    missing = [name for name in original_layer_names(model) if definition.layer(name) is None]
    if missing:
        raise NinError(f"{prototxt}: no layer {missing[0]!r}; not the definition of {arch}")
    check_structure(definition, model, arch, str(prototxt))


def _fitted_preprocessing(preprocessing, config, arch: str, data_dir: str | os.PathLike | None):
    """``preprocessing`` as a fitted `Preprocessing`: a kind is fitted on CIFAR-10's training images (the
    kinds that need data) or on nothing; a fitted one is returned as it is."""
    if isinstance(preprocessing, str):
        needs_data = preprocessing in FITTED_KINDS
        if needs_data and (config.in_channels, config.input_size) != (3, 32):
            raise NinError(f"--preprocessing {preprocessing} is fitted on CIFAR-10's 3×32×32 training images; "
                           f"{arch} takes {config.in_channels}×{config.input_size}×{config.input_size} inputs")
        if needs_data:
            preprocessing = fit_preprocessing(preprocessing, load_dataset("cifar10", "train", data_dir).images)
        else:
            preprocessing = fit_preprocessing(preprocessing, torch.zeros(0, 3, 1, 1, dtype=torch.uint8))
    assert isinstance(preprocessing, Preprocessing), "preprocessing must be a kind or a fitted Preprocessing"
    return preprocessing


# ---------------------------------------------------------------------------------------------
# nin import-caffe
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Import a trained Caffe model (the authors' Caffe Model Zoo NIN) into a nin weights file "
                          "that nin evaluate / predict / visualize read.")
    parser.add_argument("caffemodel", type=path_arg, metavar="MODEL.caffemodel")
    parser.add_argument("--prototxt", type=path_arg, metavar="FILE",
                        help="the net definition: also check its layer names and pooling")
    parser.add_argument("--arch", required=True, choices=ARCHS, help="the nin model the weights go into")
    parser.add_argument("--preprocessing", default="gcn_zca", choices=PREPROCESSING_KINDS,
                        help="fitted on the CIFAR-10 training images (default: gcn_zca, as the authors trained)")
    parser.add_argument("--data-dir", help="data root (default: $NIN_DATA, else ~/.cache/nin)")
    parser.add_argument("--out", required=True, type=path_arg, metavar="W.safetensors", help="the weights file to write")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --out that no earlier import wrote (never through a symbolic link)")


def run(args: argparse.Namespace) -> int:
    """``nin import-caffe``: write ``--out`` and say what went where."""
    source = import_caffe(args.caffemodel, args.arch, args.out, prototxt=args.prototxt,
                          preprocessing=args.preprocessing, data_dir=args.data_dir, force=args.force)
    print(f"{source['file']} (sha256 {source['sha256'][:12]}…, {source['caffe_layers']} layers) -> {args.out} "
          f"as {args.arch} with {args.preprocessing}")
    for name, prefix in source["layer_mapping"].items():
        print(f"  {name:<12} -> {prefix}")
    return 0
