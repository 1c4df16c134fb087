"""`nin bench --quick` runs end to end and reports every field; timings are not asserted."""

import json

import pytest
import torch

from nin.tools.bench import forward_flops
from nin.cli import main
from nin.inference import optimize_for_inference
from nin.models import get_model
from nin.runtime import cpu_has_bf16


def test_bench_quick_prints_the_expected_fields(capsys):
    assert main(["bench", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for side in ("train_baseline", "train_nin_malloc_defaults", "train_nin", "train_nin_same_model"):
        for key in ("images_per_s", "gflops", "peak_fraction", "outside_compute", "peak_rss_mib"):
            assert result[side][key] >= 0, (side, key)
    assert result["train_ratio"] > 0 and result["inference_ratio"] > 0 and result["train_ratio_same_model"] > 0
    assert result["inference_path_ratio"] > 0
    assert {"baseline", "nin_autocast", "nin_eager", "nin_jit"} <= set(result["inference"])
    assert set(result["matmul_peak_gflops"]) == {"fp32", "bf16"} and result["matmul_peak_gflops"]["fp32"] > 0
    # bf16's peak only where the CPU has bf16 units (elsewhere nin runs fp32, and emulated bf16 crawls)
    assert (result["matmul_peak_gflops"]["bf16"] is not None) == cpu_has_bf16()
    assert result["precision"] == ("bf16" if cpu_has_bf16() else "fp32")
    assert isinstance(result["keep_freed_memory"], bool) and result["machine"]["device"] == "cpu"


def test_bench_quick_text_report(capsys):
    assert main(["bench", "--quick"]) == 0
    out = capsys.readouterr().out
    for text in ("img/s", "ratio nin fast model / baseline", "ratio nin same model / baseline", "outside compute",
                 "of peak", "peak RSS", "matmul peak"):
        assert text in out


def test_forward_flops_of_the_paper_model():
    # NiN paper's CIFAR-10 model: ≈ 222.5 M multiply-adds per CIFAR-10 image, 2 FLOPs each
    assert abs(forward_flops(get_model("nin_cifar10"), (3, 32, 32)) / 445e6 - 1) < 0.01


def test_optimized_inference_matches_the_model():
    torch.manual_seed(0)
    model = get_model("nin_cifar10", batch_norm=True, class_map_relu=False, init="kaiming").eval()
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # non-trivial statistics
        norm.running_mean.uniform_(-0.1, 0.1)
        norm.running_var.uniform_(0.5, 2.0)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        for method in ("eager", "jit"):
            fp32 = optimize_for_inference(model, amp_dtype=None, channels_last=False, method=method, example=images)
            torch.testing.assert_close(fp32(images), expected, rtol=1e-4, atol=1e-4)
            bf16 = optimize_for_inference(model, method=method, example=images)
            assert bf16(images[:3]).dtype == torch.float32 and bf16(images[:3]).shape == (3, 10)  # other batch sizes
            assert (bf16(images) - expected).abs().max() < 0.1 * expected.abs().max() + 0.05


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_bench_on_a_missing_gpu_says_so(capsys):
    assert main(["bench", "--quick", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda" in err and "CUDA" in err


def test_fused_conv_relu_gives_the_same_numbers():
    """The inference path runs each conv + ReLU as one oneDNN kernel (`fuse_conv_relu`): bit for bit the numbers of
    the conv and the ReLU apart, in bf16 and in fp32, and an ONNX-exportable unfused model on request."""
    from nin import get_model
    from nin.inference import FusedConvReLU

    model = get_model("nin_cifar10", weights="fast-cifar10").to(memory_format=torch.channels_last)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.bfloat16, None):
        fused = optimize_for_inference(model, amp_dtype=dtype)
        plain = optimize_for_inference(model, amp_dtype=dtype, fuse_relu=False)
        if any(isinstance(m, FusedConvReLU) for m in fused.modules()):
            assert not any(isinstance(m, FusedConvReLU) for m in plain.modules())
        assert torch.equal(fused(images), plain(images)), dtype
        assert torch.equal(fused.forward_features(images), plain.forward_features(images))


def test_bf16_models_stay_unfused_where_onednn_has_no_bf16(monkeypatch):
    """An AVX2-only CPU has no oneDNN bf16 kernels: the fused op would refuse the model, so the bf16 inference path
    keeps conv and ReLU apart there (plain convs run bf16 outside oneDNN); fp32 still fuses."""
    from nin import inference, runtime
    from nin.inference import FusedConvReLU

    monkeypatch.setattr(runtime, "onednn_has_bf16", lambda: False)
    model = get_model("nin_cifar10", init="kaiming").eval()
    images = torch.randn(2, 3, 32, 32)
    bf16 = optimize_for_inference(model, amp_dtype=torch.bfloat16)
    assert not any(isinstance(m, FusedConvReLU) for m in bf16.modules())
    assert bf16(images).shape == (2, 10) and torch.isfinite(bf16(images)).all()
    if inference._CONV_POINTWISE is not None and torch.backends.mkldnn.is_available():
        fp32 = optimize_for_inference(model, amp_dtype=None)
        assert any(isinstance(m, FusedConvReLU) for m in fp32.modules())
