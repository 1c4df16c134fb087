"""Every registered model: shapes, parameter counts, gradients, and the MLPConv block's semantics."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nin.layers import GlobalAvgPool, MLPConv, patch_whitening_
from nin.models import MLPConvSpec, NiNConfig, get_model, list_models, model_config, original_layer_names

EXPECT = Path(__file__).parent / "expect"

# The paper's architectures' counts; the ablations and ImageNet computed from their definitions (documented in docs/models.md)
PARAMETERS = {
    "nin_cifar10": 966_986,
    "nin_cifar10_caffe": 966_986,
    "nin_cifar100": 984_356,
    "nin_svhn": 1_986_026,
    "nin_mnist": 349_674,
    "nin_imagenet": 7_595_176,
    "nin_cifar10_fc": 973_396,
    "nin_cifar10_fc_dropout": 973_396,
    "cnn_cifar10_gap": 953_674,
    "cnn_cifar10_fc": 960_084,
    "cnn_cifar10_fc_dropout": 960_084,
}
MAP_SIZE = {"nin_mnist": 7, "nin_imagenet": 6}


def test_every_model_has_a_known_count():
    assert sorted(PARAMETERS) == list_models()


@pytest.mark.parametrize("name", list_models())
def test_model_shapes_count_and_gradients(name):
    torch.manual_seed(0)
    model = get_model(name)
    config = model.config
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]
    batch = 1 if name == "nin_imagenet" else 2
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size)
    maps = model.forward_features(x)
    size = MAP_SIZE.get(name, 8)
    assert maps.shape == (batch, config.num_classes, size, size)
    logits = model(x)
    assert logits.shape == (batch, config.num_classes)
    assert torch.isfinite(logits).all()
    # a loss that depends on every class reaches every parameter (with the paper's ReLU a dead
    # class map has no gradient, so check with the linear class maps)
    model = get_model(name, class_map_relu=False, init="kaiming")
    model(x).pow(2).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


def test_issue_example():
    m = get_model("nin_cifar10")
    assert sum(p.numel() for p in m.parameters()) == 966986
    assert m.forward_features(torch.zeros(2, 3, 32, 32)).shape == (2, 10, 8, 8)


@pytest.mark.parametrize("name, sizes", [("nin_cifar10", [16, 8, 8]), ("nin_mnist", [14, 7, 7])])
def test_spatial_size_after_each_block(name, sizes):
    model = get_model(name).eval()
    s = model.config.input_size
    x = torch.zeros(1, model.config.in_channels, s, s)
    seen = []
    for block, pool in zip(model.blocks, model.pools):
        x = pool(block(x))
        seen.append(x.shape[-1])
    assert seen == sizes
    assert model.config.feature_size() == sizes[-1]


def test_caffe_variant_differs_only_in_second_pool():
    paper, caffe = model_config("nin_cifar10"), model_config("nin_cifar10_caffe")
    assert [b.pool for b in paper.blocks] == ["max", "max", None]
    assert [b.pool for b in caffe.blocks] == ["max", "avg", None]


def test_one_layer_mlpconv_equals_conv_relu():
    torch.manual_seed(0)
    block = MLPConv(3, (8,), kernel_size=5, padding=2)
    x = torch.randn(2, 3, 9, 9)
    conv = block.convs[0]
    expected = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=2))
    torch.testing.assert_close(block(x), expected)


def test_one_by_one_layers_act_per_pixel():
    torch.manual_seed(0)
    block = MLPConv(4, (6, 5, 3), kernel_size=1, padding=0)
    x = torch.randn(1, 4, 5, 7)
    out = block(x)
    # an MLP applied to one pixel's channel vector gives that pixel's output
    for i, j in [(0, 0), (2, 3), (4, 6)]:
        v = x[0, :, i, j]
        for conv in block.convs:
            v = F.relu(conv.weight[:, :, 0, 0] @ v + conv.bias)
        torch.testing.assert_close(out[0, :, i, j], v)
    # changing one pixel changes only that pixel's output
    y = x.clone()
    y[0, :, 2, 3] += 1.0
    diff = (block(y) - out).abs().sum(dim=1)[0]
    assert diff[2, 3] > 0 and diff.sum() == diff[2, 3]


def test_mlpconv_options():
    block = MLPConv(3, (8, 4), kernel_size=3, stride=2, last_activation=False, batch_norm=True)
    assert block.convs[0].stride == (2, 2) and block.convs[0].padding == (1, 1)
    assert isinstance(block.norms[0], nn.BatchNorm2d) and block.convs[0].bias is None
    assert isinstance(block.norms[1], nn.Identity) and block.convs[1].bias is not None
    out = block(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 4, 4, 4)
    assert (out < 0).any(), "the last layer has no activation, so it can be negative"


def test_gap_is_the_spatial_mean_and_reproduces_logits():
    model = get_model("nin_cifar10").eval()
    x = torch.randn(3, 3, 32, 32)
    maps = model.forward_features(x)
    torch.testing.assert_close(GlobalAvgPool()(maps), maps.mean(dim=(2, 3)))
    torch.testing.assert_close(model(x), maps.mean(dim=(2, 3)))


def test_options_every_user_needs():
    m = get_model("nin_cifar10", batch_norm=True, class_map_relu=False, dropout=0.3, init="kaiming")
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert isinstance(m.blocks[-1].acts[-1], nn.Identity)
    assert [d.p for d in m.drops if isinstance(d, nn.Dropout)] == [0.3, 0.3]
    paper = get_model("nin_cifar10")
    assert isinstance(paper.blocks[-1].acts[-1], nn.ReLU)
    weights = torch.cat([p.flatten() for n, p in paper.named_parameters() if n.endswith("weight")])
    assert abs(weights.std().item() - 0.05) < 0.002
    assert all(p.abs().sum() == 0 for n, p in paper.named_parameters() if n.endswith("bias"))
    assert get_model("nin_cifar10", num_classes=7)(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(KeyError, match="unknown model"):
        get_model("nin_cifar11")
    with pytest.raises(KeyError, match="unknown NiNConfig field"):
        get_model("nin_cifar10", widht=3)


def test_cifar100_per_layer_init():
    m = get_model("nin_cifar100")
    assert abs(m.blocks[0].convs[0].weight.std().item() - 0.001) < 1e-4
    assert abs(m.blocks[0].convs[1].weight.std().item() - 0.01) < 1e-3


def test_config_round_trips_through_json():
    import json

    for name in list_models():
        config = model_config(name)
        again = NiNConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config


def test_original_layer_mapping():
    names = original_layer_names(get_model("nin_cifar10"))
    assert list(names) == ["conv1", "cccp1", "cccp2", "conv2", "cccp3", "cccp4", "conv3", "cccp5", "cccp6"]
    assert names["cccp6"] == "blocks.2.convs.2"
    state = get_model("nin_cifar10").state_dict()
    assert state[names["conv2"] + ".weight"].shape == (192, 96, 5, 5)


def test_golden_output():
    """A seeded model on a seeded input; regenerate on purpose with NIN_REGENERATE_GOLDEN=1."""
    import os

    torch.manual_seed(1234)
    model = get_model("nin_cifar10", init="kaiming", class_map_relu=False).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        logits = model(x)
    path = EXPECT / "nin_cifar10_golden.pt"
    if os.environ.get("NIN_REGENERATE_GOLDEN") == "1":
        torch.save({"logits": logits}, path)
    expected = torch.load(path, weights_only=True)["logits"]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_patch_whitening_decorrelates_the_first_layer():
    torch.manual_seed(0)
    x = torch.randn(32, 3, 12, 12)
    x[:, 1] = 0.9 * x[:, 0] + 0.1 * x[:, 1]  # strongly correlated channels: an ill-conditioned input
    for stride, padding in ((1, 1), (2, 0)):
        conv = nn.Conv2d(3, 160, 3, stride=stride, padding=padding)
        kept = conv.weight[54:].clone()
        assert patch_whitening_(conv, x, eps=1e-8) == 2 * 27
        patches = F.unfold(x, 3, padding=padding, stride=stride).transpose(1, 2).reshape(-1, 27)
        out = patches @ conv.weight[:27].reshape(27, -1).T  # the layer's outputs over the patches it sees
        torch.testing.assert_close(out.T @ out / len(out), torch.eye(27), atol=2e-3, rtol=0)
        torch.testing.assert_close(conv.weight[27:54], -conv.weight[:27])  # each filter with its negation
        torch.testing.assert_close(conv.weight[54:], kept)  # filters beyond 2·27 keep their init


@pytest.mark.parametrize("call, message", [
    (lambda conv: patch_whitening_(conv, torch.randn(2, 1, 8, 8)), r"\(N >= 1, 3, H, W\)"),
    (lambda conv: patch_whitening_(conv, torch.randn(0, 3, 8, 8)), r"\(N >= 1, 3, H, W\)"),
    (lambda conv: patch_whitening_(conv, torch.randn(2, 3, 2, 2)), "hold no 5×5 patch"),
    (lambda conv: patch_whitening_(conv, torch.full((2, 3, 8, 8), float("nan"))), "NaN"),
    (lambda conv: patch_whitening_(conv, torch.randn(2, 3, 8, 8), eps=0.0), "eps must be positive"),
    (lambda conv: patch_whitening_(conv, torch.randn(2, 3, 8, 8), max_patches=0), "max_patches"),
    (lambda conv: patch_whitening_(nn.Conv1d(3, 8, 3), torch.randn(2, 3, 8, 8)), "nn.Conv2d"),
])
def test_patch_whitening_refuses_bad_input(call, message):
    conv = nn.Conv2d(3, 192, 5)
    before = conv.weight.clone()
    with pytest.raises(ValueError, match=message):
        call(conv)
    assert torch.equal(conv.weight, before)  # nothing written


_CIFAR = model_config("nin_cifar10")


@pytest.mark.parametrize("build, message", [
    (lambda: dataclasses.replace(_CIFAR, batch_norm="no"), "batch_norm must be true or false, got 'no'"),
    (lambda: dataclasses.replace(_CIFAR, class_map_relu=1), "class_map_relu must be true or false"),
    (lambda: dataclasses.replace(_CIFAR, num_classes=7), "one map per class"),
    (lambda: dataclasses.replace(_CIFAR, dropout=1.0), r"dropout must be in \[0, 1\)"),
    (lambda: dataclasses.replace(_CIFAR, head="mlp"), "head must be 'gap' or 'fc'"),
    (lambda: dataclasses.replace(_CIFAR, blocks=()), "at least one block"),
    (lambda: dataclasses.replace(_CIFAR, init_std=(0.05, 0.05)), "2 stds for 9 convolutions"),
    (lambda: MLPConvSpec(3, (8,), pool="median"), "pool must be"),
    (lambda: MLPConvSpec(3, (8,), dropout="yes"), "dropout must be true or false"),
    (lambda: MLPConvSpec(3, (), pool=None), "widths must be one or more positive numbers"),  # had an IndexError
    (lambda: MLPConvSpec(0, (8,)), "kernel_size and stride must be at least 1"),
    (lambda: MLPConv(0, (8,)), "in_channels must be positive"),
    (lambda: MLPConv(3, ()), "widths must be"),
    (lambda: MLPConv(3, (8, 0)), "widths must be"),
    (lambda: MLPConv(3, (8,), kernel_size=0), "kernel_size and stride must be positive"),
    (lambda: get_model("nin_cifar10").reset_classifier(0), "num_classes must be at least 1"),
])
def test_bad_architectures_are_refused_with_a_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_numpy_bools_are_bools():
    config = dataclasses.replace(_CIFAR, batch_norm=np.True_, class_map_relu=np.False_)
    assert config.batch_norm is True and config.class_map_relu is False  # stored as Python bools: JSON takes them
    assert MLPConvSpec(3, (8,), dropout=np.False_).dropout is False


def test_architecture_checks_hold_under_python_O():
    # asserts vanish under `python -O`; these checks must not
    code = ("from nin.models import model_config\nimport dataclasses\n"
            "dataclasses.replace(model_config('nin_cifar10'), num_classes=7)")
    result = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "ValueError: with global average pooling" in result.stderr
