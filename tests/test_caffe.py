"""nin.tools.caffe: the authors' CIFAR-10 weights score 896/1,000; synthetic V1 and new-format files; bad files.

The synthetic files are written in the genuine protobuf wire format by the small encoder below, with
caffe.proto's field numbers (NetParameter, V1LayerParameter, LayerParameter, BlobProto, BlobShape).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from nin.checkpoint import load_state
from nin.tools.caffe import import_caffe, read_caffemodel
from nin.pretrained import load
from nin.cli import main
from nin.data import TensorLoader, load_cifar10_lossless_first1000, load_dataset
from nin.errors import NinError
from nin.evaluate import evaluate
from nin.models import get_model, original_layer_names
from nin.runtime import select_precision
from nin.transforms import fit_preprocessing

CAFFEMODEL_SHA256 = "d131ace82eeecbc14bfba817a99eaaef3ecf4fbfeac1d5da2bc2c3ef4d1fb3da"  # shared/data/README.md

# ---------------------------------------------------------------------------------------------
# A tiny protobuf encoder
# ---------------------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64: two's complement, 10 bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def int_field(number: int, value: int) -> bytes:
    return key(number, 0) + varint(value)


def bytes_field(number: int, payload: bytes | str) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return key(number, 2) + varint(len(payload)) + payload


def blob_new(array: np.ndarray) -> bytes:
    """BlobProto with a BlobShape (field 7, packed int64 dims) and packed float data (field 5)."""
    dims = b"".join(varint(d) for d in array.shape)
    return bytes_field(7, bytes_field(1, dims)) + bytes_field(5, array.astype("<f4").tobytes())


def blob_legacy(array: np.ndarray, packed: bool = True) -> bytes:
    """BlobProto with num/channels/height/width (fields 1-4) and float data, packed or one fixed32 per value."""
    shape = (1,) * (4 - array.ndim) + array.shape
    header = b"".join(int_field(n, d) for n, d in zip((1, 2, 3, 4), shape))
    flat = array.astype("<f4").ravel()
    if packed:
        return header + bytes_field(5, flat.tobytes())
    return header + b"".join(key(5, 5) + struct.pack("<f", v) for v in flat)


def conv_param(kernel: int, stride: int = 1, pad: int = 0) -> bytes:
    return int_field(4, kernel) + int_field(6, stride) + int_field(3, pad)


def pool_param(method: int, kernel: int, stride: int) -> bytes:  # method: 0 MAX, 1 AVE
    return int_field(1, method) + int_field(2, kernel) + int_field(3, stride)


def layer_new(name: str, kind: str, blobs: list[bytes] = (), conv: bytes = b"", pool: bytes = b"") -> bytes:
    """LayerParameter: name 1, type 2 (string), blobs 7, convolution_param 106, pooling_param 121."""
    body = bytes_field(1, name) + bytes_field(2, kind) + b"".join(bytes_field(7, b) for b in blobs)
    body += (bytes_field(106, conv) if conv else b"") + (bytes_field(121, pool) if pool else b"")
    return bytes_field(100, body)


def layer_v1(name: str, kind: int, blobs: list[bytes] = (), conv: bytes = b"", pool: bytes = b"") -> bytes:
    """V1LayerParameter: name 4, type 5 (enum), blobs 6, convolution_param 10, pooling_param 19."""
    body = bytes_field(4, name) + int_field(5, kind) + b"".join(bytes_field(6, b) for b in blobs)
    body += (bytes_field(10, conv) if conv else b"") + (bytes_field(19, pool) if pool else b"")
    return bytes_field(2, body)


def random_state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in get_model(arch).state_dict().items()}


def v1_cifar_model(state: dict[str, torch.Tensor], pools=(0, 1)) -> bytes:
    """The authors' CIFAR-10 layout as V1 layers: legacy 4-D blobs, biases (1, 1, 1, out), pooling layers."""
    CONVOLUTION, POOLING, RELU, DROPOUT = 4, 17, 18, 6
    net = bytes_field(1, "CIFAR10_synthetic")
    geometry = {"conv1": (5, 2), "conv2": (5, 2), "conv3": (3, 1)}
    for name, prefix in original_layer_names(get_model("nin_cifar10_caffe")).items():
        weight, bias = state[f"{prefix}.weight"].numpy(), state[f"{prefix}.bias"].numpy()
        kernel, pad = geometry.get(name, (1, 0))
        net += layer_v1(name, CONVOLUTION, [blob_legacy(weight), blob_legacy(bias, packed=name != "cccp6")],
                        conv=conv_param(kernel, 1, pad))
        net += layer_v1(f"relu_{name}", RELU)
        if name in ("cccp2", "cccp4"):
            net += layer_v1(f"pool{name[-1]}", POOLING, pool=pool_param(pools[name == "cccp4"], 3, 2))
            net += layer_v1(f"drop{name[-1]}", DROPOUT)
    return net + layer_v1("pool3", POOLING, pool=pool_param(1, 8, 1))


def assert_same_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    model, _, meta = load(path)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert meta["tta_flip"] is False and meta["source"]["layer_mapping"] == original_layer_names(model)


# ---------------------------------------------------------------------------------------------
# Synthetic files: the new `layer` format (nin_imagenet) and the V1 `layers` format
# ---------------------------------------------------------------------------------------------


def test_new_format_nin_imagenet_tensor_by_tensor(tmp_path):
    state = random_state("nin_imagenet")
    model = get_model("nin_imagenet")
    geometry = {"conv1": (11, 4, 0), "conv2": (5, 1, 2), "conv3": (3, 1, 1), "conv4-1024": (3, 1, 1)}
    net = bytes_field(1, "nin_imagenet")
    for name, prefix in original_layer_names(model).items():
        blobs = [blob_new(state[f"{prefix}.weight"].numpy()), blob_new(state[f"{prefix}.bias"].numpy())]
        net += layer_new(name, "Convolution", blobs, conv=conv_param(*geometry.get(name, (1, 1, 0))))
        net += layer_new(f"relu_{name}", "ReLU")
        if name in ("cccp2", "cccp4", "cccp6"):
            net += layer_new(f"pool_{name}", "Pooling", pool=pool_param(0, 3, 2))
    net += layer_new("pool4", "Pooling", pool=pool_param(1, 6, 1))
    path = tmp_path / "nin_imagenet.caffemodel"
    path.write_bytes(net)
    assert list(original_layer_names(model))[-3:] == ["conv4-1024", "cccp7-1024", "cccp8-1024"]
    assert sum(t.numel() for t in state.values()) == 7_595_176

    source = import_caffe(path, "nin_imagenet", tmp_path / "w.safetensors", preprocessing="scale")
    assert source["caffe_layers"] == "new" and source["file"] == path.name
    assert_same_weights(tmp_path / "w.safetensors", state)


def test_v1_format_tensor_by_tensor(tmp_path):
    state = random_state("nin_cifar10_caffe", seed=1)
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(v1_cifar_model(state))
    net = read_caffemodel(path)
    assert net.format == "V1" and net.layer("cccp6").blobs[1].shape == (1, 1, 1, 10)  # unpacked floats
    assert main(["import-caffe", str(path), "--arch", "nin_cifar10_caffe", "--preprocessing", "scale",
                 "--out", str(tmp_path / "w.safetensors")]) == 0
    assert_same_weights(tmp_path / "w.safetensors", state)
    # replacing our own weights file is allowed
    assert import_caffe(path, "nin_cifar10_caffe", tmp_path / "w.safetensors", preprocessing="scale")


def test_pooling_must_match_the_arch(tmp_path, capsys):
    """The authors' CIFAR-10 net average-pools after block 2: nin_cifar10 (max there) is refused."""
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(v1_cifar_model(random_state("nin_cifar10_caffe")))
    out = tmp_path / "w.safetensors"
    assert main(["import-caffe", str(path), "--arch", "nin_cifar10", "--preprocessing", "scale",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pool4 is AVE pooling" in err and not out.exists()
    assert main(["import-caffe", str(path), "--arch", "nin_cifar10_caffe", "--preprocessing", "scale",
                 "--out", str(tmp_path / "w.txt")]) == 1  # a weights file is .safetensors, or nothing reads it as one
    assert "--out" in capsys.readouterr().err and not (tmp_path / "w.txt").exists()
    path.write_bytes(v1_cifar_model(random_state("nin_cifar10"), pools=(0, 0)))
    assert main(["import-caffe", str(path), "--arch", "nin_cifar10", "--preprocessing", "scale",
                 "--out", str(out)]) == 0


def test_caffe_pooling_sizes_and_averages_match_ours():
    """Caffe's pooling rounds up, and divides a clipped border window by its clipped size (pad 0): so do we."""
    def caffe_size(size: int, kernel: int = 3, stride: int = 2) -> int:  # caffe/src/caffe/layers/pooling_layer.cpp
        return int(math.ceil((size - kernel) / stride)) + 1

    model = get_model("nin_cifar10_caffe").eval()
    x = torch.randn(1, 3, 32, 32)
    sizes = []
    with torch.no_grad():
        for block, pool in zip(model.blocks, model.pools):
            x = pool(block(x))
            sizes.append(x.shape[-1])
    assert sizes == [caffe_size(32), caffe_size(caffe_size(32)), 8] == [16, 8, 8]

    maps = torch.randn(2, 4, 16, 16)
    expected = torch.zeros(2, 4, 8, 8)
    for i in range(8):
        for j in range(8):
            window = maps[:, :, 2 * i : min(2 * i + 3, 16), 2 * j : min(2 * j + 3, 16)]
            expected[:, :, i, j] = window.sum(dim=(2, 3)) / window[0, 0].numel()
    torch.testing.assert_close(model.pools[1](maps), expected)
    torch.testing.assert_close(model.pools[0](maps), F.max_pool2d(maps, 3, 2, ceil_mode=True))


# ---------------------------------------------------------------------------------------------
# Bad files: one line on stderr, exit 1, nothing written
# ---------------------------------------------------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    good = v1_cifar_model(random_state("nin_cifar10_caffe"))
    other = bytes_field(1, "VGG") + b"".join(
        layer_new(name, "Convolution", [blob_new(np.zeros((4, 3, 3, 3))), blob_new(np.zeros(4))])
        for name in ("conv1_1", "conv1_2", "fc6"))
    short_blob = bytes_field(7, bytes_field(1, varint(192) + varint(3) + varint(5) + varint(5)))
    short_blob += bytes_field(5, np.zeros(100, "<f4").tobytes())
    wrong_shape = v1_cifar_model(random_state("nin_cifar100"))  # cccp6 with 100 maps
    return {
        "truncated": (good[: len(good) // 2], "truncated"),
        "truncated-in-header": (good[:3], "truncated"),
        "not-protobuf": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "Caffe model"),
        "text": (b"name: 'CIFAR10_full'\nlayers { name: 'conv1' }\n", "Caffe model"),
        "empty": (b"", "Caffe model"),
        "huge-length": (key(2, 2) + varint(1 << 40), "truncated"),
        "other-net": (other, "no layer 'conv1'"),
        "blob-count": (layer_new("conv1", "Convolution", [short_blob]), "holds 100 values"),
        "shape": (wrong_shape, "layer cccp6 weights have the shape (100, 192, 1, 1); nin_cifar10_caffe"),
    }


@pytest.mark.parametrize("case", ["truncated", "truncated-in-header", "not-protobuf", "text", "empty", "huge-length",
                                  "other-net", "blob-count", "shape"])
def test_bad_caffemodel_one_line_nothing_written(tmp_path, capsys, case):
    data, message = _bad_files(tmp_path)[case]
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(data)
    out = tmp_path / "w.safetensors"
    assert main(["import-caffe", str(path), "--arch", "nin_cifar10_caffe", "--preprocessing", "scale",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nin import-caffe: error: ") and message in err, err
    assert "Traceback" not in err and not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_existing_out_that_is_not_ours_is_kept(tmp_path, capsys):
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(v1_cifar_model(random_state("nin_cifar10_caffe")))
    out = tmp_path / "notes.safetensors"
    out.write_text("my notes")
    assert main(["import-caffe", str(path), "--arch", "nin_cifar10_caffe", "--preprocessing", "scale",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not replacing it" in err and "--force" in err and out.read_text() == "my notes"
    assert main(["import-caffe", str(path), "--arch", "nin_cifar10_caffe", "--preprocessing", "scale",
                 "--out", str(tmp_path)]) == 1
    assert "not a file" in capsys.readouterr().err
    imported = tmp_path / "w.safetensors"  # an earlier import is replaced by the next one without --force
    for _ in range(2):
        assert main(["import-caffe", str(path), "--arch", "nin_cifar10_caffe", "--preprocessing", "scale",
                     "--out", str(imported)]) == 0
    assert main(["import-caffe", str(path), "--arch", "nin_cifar10_caffe", "--preprocessing", "scale",
                 "--out", str(out), "--force"]) == 0
    assert load_state(out)[1]["source"]["format"] == "caffemodel"


def test_prototxt_of_another_net_is_refused(tmp_path, capsys):
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(v1_cifar_model(random_state("nin_cifar10_caffe")))
    for text, message in [('name: "x"\nlayers { name: "conv1" type: CONVOLUTION }\n', "no layer 'cccp1'"),
                          ('layers { name: "conv1" ', "unbalanced"), ("\x00\x01 binary", "no `layers")]:
        prototxt = tmp_path / "net.prototxt"
        prototxt.write_text(text)
        out = tmp_path / "w.safetensors"
        assert main(["import-caffe", str(path), "--prototxt", str(prototxt), "--arch", "nin_cifar10_caffe",
                     "--preprocessing", "scale", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and not out.exists(), err


# ---------------------------------------------------------------------------------------------
# The authors' CIFAR-10 model (shared/data/caffe-nin-cifar10)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authors_weights(data_root, tmp_path_factory) -> Path:
    """The real caffemodel imported once, with GCN + ZCA fitted once on the CIFAR-10 copy's training images."""
    folder = data_root / "caffe-nin-cifar10"
    if not (folder / "cifar10_nin.caffemodel").is_file():
        pytest.skip(f"{folder}: the authors' Caffe model is not there")
    preprocessing = fit_preprocessing("gcn_zca", load_dataset("cifar10", "train", data_root).images)
    out = tmp_path_factory.mktemp("caffe") / "nin_cifar10_caffe.safetensors"
    import_caffe(folder / "cifar10_nin.caffemodel", "nin_cifar10_caffe", out,
                 prototxt=folder / "cifar10_nin_train_val.prototxt", preprocessing=preprocessing)
    return out


def test_authors_weights_score_896_of_the_exact_1000(authors_weights, data_root):
    """89.6%, the zoo's number, on the pixel-exact official test images; as `nin evaluate` runs it, and in fp32."""
    model, preprocessing, meta = load(authors_weights)
    assert meta["dataset"] == "cifar10" and meta["tta_flip"] is False and meta["preprocessing"] == "gcn_zca"
    assert meta["source"]["sha256"] == CAFFEMODEL_SHA256 and meta["source"]["arch"] == "nin_cifar10_caffe"
    data = load_cifar10_lossless_first1000(data_root)
    device = torch.device("cpu")
    images = preprocessing(data.images).contiguous(memory_format=torch.channels_last)  # as cmd_evaluate
    model = model.to(memory_format=torch.channels_last)
    for amp_dtype in {select_precision("auto", device), None}:  # cmd_evaluate's choice, and fp32
        result = evaluate(model, TensorLoader(images, data.labels, 500, shuffle=False), num_classes=10,
                          amp_dtype=amp_dtype, tta_flip=bool(meta["tta_flip"]))
        assert (result.correct, result.n) == (896, 1000), amp_dtype


def test_authors_weights_through_the_cli(authors_weights, data_root, tmp_path, capsys):
    assert main(["evaluate", str(authors_weights), "--dataset", "cifar10-lossless-first1000",
                 "--data-dir", str(data_root), "--device", "cpu"]) == 0
    assert "(896/1000)" in capsys.readouterr().out
    cat = load_cifar10_lossless_first1000(data_root).images[0]  # test image 0 is a cat
    Image.fromarray(cat.permute(1, 2, 0).numpy()).save(tmp_path / "cat.png")
    assert main(["predict", str(authors_weights), str(tmp_path / "cat.png"), "--top-k", "1", "--device", "cpu"]) == 0
    assert "cat" in capsys.readouterr().out.splitlines()[1]


def test_authors_prototxt_is_checked(authors_weights, data_root, tmp_path, capsys):
    """The real prototxt with cccp6 renamed, and imported into nin_cifar10 (max pooling where it averages)."""
    folder = data_root / "caffe-nin-cifar10"
    prototxt = tmp_path / "renamed.prototxt"
    prototxt.write_text((folder / "cifar10_nin_train_val.prototxt").read_text().replace('"cccp6"', '"cccp6x"'))
    out = tmp_path / "w.safetensors"
    with pytest.raises(NinError, match="no layer 'cccp6'"):
        import_caffe(folder / "cifar10_nin.caffemodel", "nin_cifar10_caffe", out, prototxt=prototxt)
    expected = r"pool2 is AVE pooling; nin_cifar10 has MAX pooling after block 1 \(--arch nin_cifar10_caffe\?\)"
    with pytest.raises(NinError, match=expected):
        import_caffe(folder / "cifar10_nin.caffemodel", "nin_cifar10", out)
    assert not out.exists()


def test_fine_tuning_from_the_authors_weights_does_not_stall(authors_weights, data_root, tmp_path, capsys):
    """`nin train --init-from` keeps what the weights know: no loss stuck at ln 10, no dead class maps.

    The classic failure of Caffe fine-tuning (a loss at ln 10 = 2.3026 after loading) comes from feeding
    the weights an input they were not trained on, or from re-initialised class maps; the run takes the
    weights' architecture and their fitted GCN + ZCA.
    """
    out = tmp_path / "ft"
    assert main(["train", "--dataset", "cifar10", "--recipe", "fast", "--init-from", str(authors_weights),
                 "--epochs", "1", "--train-subset", "512", "--set", "eval_subset=500", "--set", "lr=0.01",
                 "--data-dir", str(data_root), "--out", str(out), "--device", "cpu"]) == 0
    config = json.loads((out / "config.json").read_text())["train_config"]
    assert config["model"] == "nin_cifar10_caffe" and config["preprocessing"] == "gcn_zca"
    assert config["init_from"] == str(authors_weights)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train_error"] < 0.4, record  # a fresh model is at ~90% after 4 steps
    assert record["test_error"] < 0.25, record
