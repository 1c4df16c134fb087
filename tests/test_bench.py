"""`nin bench --quick` runs end to end and reports every field; timings are not asserted."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nin.tools import bench
from nin.tools.bench import forward_flops
from nin.cli import build_parser, main
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
    """The inference path runs each conv + ReLU as one oneDNN kernel (`fuse_conv_relu`): the numbers of the conv and
    the ReLU apart, in bf16 and in fp32, and an ONNX-exportable unfused model on request. To the last bits only: at
    one thread an AVX2-only CPU's fused fp32 kernel sums in another order (4.8e-7 apart in the logits)."""
    from nin import get_model
    from nin.inference import FusedConvReLU

    model = get_model("nin_cifar10", weights="fast-cifar10").to(memory_format=torch.channels_last)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.bfloat16, None):
        fused = optimize_for_inference(model, amp_dtype=dtype)
        plain = optimize_for_inference(model, amp_dtype=dtype, fuse_relu=False)
        if any(isinstance(m, FusedConvReLU) for m in fused.modules()):
            assert not any(isinstance(m, FusedConvReLU) for m in plain.modules())
        tolerance = 1e-5 if dtype is None else 2e-2  # a few units of the last place of each
        torch.testing.assert_close(fused(images), plain(images), rtol=tolerance, atol=tolerance, msg=str(dtype))
        torch.testing.assert_close(fused.forward_features(images), plain.forward_features(images),
                                   rtol=tolerance, atol=tolerance)


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


@pytest.fixture
def no_data_no_timing(monkeypatch, tmp_path):
    """No CIFAR-10 anywhere ($NIN_DATA an empty folder), and the data loader and every timing loop fail the test
    when reached: a bad flag must be named before the data is looked for and before anything is measured."""
    monkeypatch.setenv("NIN_DATA", str(tmp_path))

    def reached(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} was reached: the arguments were not checked first")
        return fail

    for name in ("load_dataset", "matmul_peak", "time_backends"):
        monkeypatch.setattr(bench, name, reached(name))
    return monkeypatch


@pytest.mark.parametrize("argv, flag, expected", [
    (["--steps", "0"], "--steps", "expected a positive integer, got 0"),  # had run, then "no median for empty data"
    (["--steps", "-1"], "--steps", "expected a positive integer, got -1"),
    (["--warmup", "-1"], "--warmup", "expected 0 or a positive integer, got -1"),
    (["--batch-size", "0"], "--batch-size", "expected a positive integer, got 0"),  # had: torch's sampler ValueError
    (["--eval-batch-size", "0"], "--eval-batch-size", "expected a positive integer, got 0"),  # ZeroDivisionError
    (["--eval-repeats", "0"], "--eval-repeats", "expected a positive integer, got 0"),  # no median for empty data
    (["--threads", "-2"], "--threads", "expected a positive integer, got -2"),  # set_num_threads' RuntimeError
    (["--threads", "0"], "--threads", "expected a positive integer, got 0"),  # had meant torch's default, silently
    (["--workers", "-1"], "--workers", "expected 0 or a positive integer, got -1"),  # DataLoader's ValueError
    (["--steps", "two"], "--steps", "expected a positive integer, got 'two'"),
    (["--inference", "--threads", "0"], "--threads", "expected a positive integer, got 0"),
    (["--inference", "--eval-batch-size", "-4"], "--eval-batch-size", "expected a positive integer, got -4"),
    (["--inference="], "--inference", "an empty path"),  # had run the training benchmark instead
])
def test_bench_refuses_a_bad_count_before_looking_for_data(capsys, no_data_no_timing, argv, flag, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [err.splitlines()[-1]], err  # argparse's usage, then the one error line
    assert errors[0].startswith(f"nin bench: error: argument {flag}: ") and expected in errors[0], errors
    assert "Traceback" not in err and "CIFAR-10" not in err


def test_bench_zero_warmup_and_workers_are_allowed():
    args = build_parser().parse_args(["bench", "--warmup", "0", "--workers", "0", "--steps", "1"])
    assert (args.warmup, args.workers, args.steps, args.threads) == (0, 0, 1, None)


@pytest.mark.parametrize("weights, expected", [
    ("paper-mnsit", "no such weights file, run folder or pretrained tag (fast-cifar10"),  # a misspelt tag
    ("fast-mnist", "weights for 1×28×28 images"),  # had crashed in conv2d on the first backend
])
def test_bench_inference_weights_are_checked_before_the_data(capsys, no_data_no_timing, weights, expected):
    assert main(["bench", "--inference", weights]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nin bench: error: --inference {weights}: ") and expected in err
    assert "needs CIFAR-10" not in err  # had hidden the weights' problem behind the missing data


def test_bench_device_is_checked_before_the_data(capsys, no_data_no_timing):
    assert main(["bench", "--device", "gpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device 'gpu': expected cpu, cuda or cuda:N" in err


def test_bench_inference_refuses_a_device_it_would_not_use(capsys, no_data_no_timing):
    assert main(["bench", "--inference", "--device", "cuda"]) == 1  # had timed the CPU backends, silently
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda: --inference times the deployment backends on the CPU" in err
    bench.check_arguments(SimpleNamespace(inference="fast-cifar10", device="cpu:0"))  # the CPU, named otherwise


@pytest.mark.parametrize("argv, flag", [
    (["--batch-size", "64", "--steps", "1", "--warmup", "0"], "--batch-size"),  # had waited forever: no batch
    (["--batch-size", "8", "--eval-batch-size", "64"], "--eval-batch-size"),  # had timed a smaller batch than the one reported
    (["--inference", "--eval-batch-size", "64"], "--eval-batch-size"),  # had failed an assert in time_backends
])
def test_bench_batches_larger_than_the_data_copy_are_refused(capsys, no_data_no_timing, argv, flag):
    copy = SimpleNamespace(images=torch.zeros(20, 3, 32, 32, dtype=torch.uint8), labels=torch.zeros(20))
    no_data_no_timing.setattr(bench, "load_dataset", lambda *args: copy)
    assert main(["bench", *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag} 64: this CIFAR-10 copy has 20 training images" in err


def test_the_throughput_script_reports_bad_weights_in_one_line(tmp_path):
    """benchmarks/throughput.py shares `nin bench`'s parser and run: its errors are one line too."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    out = subprocess.run([sys.executable, str(script), "--inference", "paper-mnsit", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("throughput.py: error: --inference paper-mnsit: no such weights file")
