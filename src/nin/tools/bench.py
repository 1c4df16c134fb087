"""Training and inference throughput: nin's engine against the plain PyTorch port most NiN repos are.

    nin bench                              # CIFAR-10 from $NIN_DATA, batch 128
    nin bench --steps 30 --json            # one JSON object
    nin bench --quick                      # a few steps (the test suite); a synthetic batch without data
    python benchmarks/throughput.py        # the same

Both sides train nin_cifar10 on the same CIFAR-10 images in one process:
- baseline: the paper model (`get_model("nin_cifar10")`), NCHW fp32 eager, a per-image augmentation
  (pad-crop 4 + flip) `Dataset` in a `DataLoader`, plain `torch.optim.SGD`;
- nin: exactly what `nin train --recipe fast` runs on CIFAR-10: its model_args, channels_last, `select_precision("auto")`,
  `make_optimizer`, `TensorLoader` + `Augment`, `lr_at` and `train_step`.
Each step's time is split into the batch (loader + augmentation) and the step; medians after warm-up.
The baseline runs first, with glibc malloc at its defaults; nin's engine is timed once with those defaults
and once after `nin.runtime.keep_freed_memory()`, as `nin train` runs it (`--device cuda`: GPU, no malloc step).
Inference: the baseline in NCHW fp32; nin's model under bf16 autocast (unfolded, for comparison); and
`optimize_for_inference` eager (= `inference_model`, the path `nin evaluate` / `nin predict` take), jit, compile.
FLOPs come from the convolutions' shapes; peaks from a large torch.mm in fp32 and bf16 timed here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from nin.checkpoint import read_meta
from nin.data import TensorLoader, load_dataset
from nin.deploy.backends import format_table, time_backends
from nin.engine.config import recipe
from nin.engine.loop import train_step
from nin.engine.optim import make_optimizer
from nin.engine.schedule import lr_at
from nin.errors import DataError, NinError, non_negative_int, path_arg, positive_int
from nin.inference import optimize_for_inference, predict_logits
from nin.models import get_model, multiply_adds
from nin.pretrained import resolve
from nin.runtime import (
    cpu_has_bf16,
    keep_freed_memory,
    median_seconds,
    resolve_device,
    select_precision,
)
from nin.transforms import Augment, fit_preprocessing

__all__ = ["add_arguments", "check_arguments", "run", "forward_flops", "matmul_peak", "PerImageCifar"]

BASELINE_PADDING = 4  # the usual port: RandomCrop(32, padding=4) + RandomHorizontalFlip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # counts are checked here, by argparse, before anything is loaded or timed: a bad one is one line, exit 2
    parser.add_argument("--steps", type=positive_int, default=20, help="timed training steps per side (default 20)")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first (default 3; 0: none)")
    parser.add_argument("--batch-size", type=positive_int, default=128,
                        help="training batch (default 128, the paper's)")
    parser.add_argument("--eval-batch-size", type=positive_int, default=500,
                        help="inference batch (default 500, as train())")
    parser.add_argument("--eval-repeats", type=positive_int, default=5, help="timed inference batches per variant")
    parser.add_argument("--threads", type=positive_int, help="torch threads, 1 or more (default: torch's choice)")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="baseline DataLoader workers (default 0: in the main process)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd inference (slow to build)")
    parser.add_argument("--compile-train", action="store_true",
                        help="torch.compile nin's training model (`--set compile=on`); off by default: it did not "
                             "pay on CPU")
    parser.add_argument("--device", help="cpu (default) or cuda[:N]: on CUDA both sides run there, nin's data "
                                         "resident on the GPU")
    parser.add_argument("--data-dir", help="data root (default: $NIN_DATA, else ~/.cache/nin)")
    parser.add_argument("--quick", action="store_true", help="tiny run for tests: 2 steps, small batches")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--inference", nargs="?", const="fast-cifar10", type=path_arg, metavar="WEIGHTS",
                        help="instead: time every inference backend (nin's path, torch fp32, folded, TorchScript, ONNX "
                             "Runtime, OpenVINO) on WEIGHTS (a weights file or a pretrained tag; default fast-cifar10, "
                             "the packaged weights) in one run, throughput at --eval-batch-size and one-image latency "
                             "p50/p99")


def _device_type(name: str) -> str:
    try:
        return torch.device(name).type
    except RuntimeError:  # not a device name: resolve_device's one line says what it expected
        return resolve_device(name).type


def check_arguments(args) -> None:
    """What argparse cannot check, checked before anything is loaded or timed (and before the CIFAR-10 data is
    looked for): the device, and --inference's weights (they exist and take CIFAR-10's 3×32×32 images; read from
    the file's header alone).

    Raises:
        NinError: one line naming the flag and what it expected.
    """
    if not args.inference:
        resolve_device(args.device or "cpu")
        return
    if args.device is not None and _device_type(args.device) != "cpu":
        raise NinError(f"--device {args.device}: --inference times the deployment backends on the CPU (ONNX Runtime, "
                       "OpenVINO, TorchScript); leave --device out, or drop --inference to time training there")
    try:
        config = read_meta(resolve(args.inference)).get("model_config") or {}
    except NinError as e:
        raise NinError(f"--inference {e}") from None
    shape = (config.get("in_channels", 3), config.get("input_size", 32))
    if shape != (3, 32):
        raise NinError(f"--inference {args.inference}: weights for {shape[0]}×{shape[1]}×{shape[1]} images; nin bench "
                       "times them on CIFAR-10's 3×32×32 images (expected CIFAR weights, e.g. fast-cifar10)")


# ---------------------------------------------------------------------------------------------
# Measuring: medians, FLOPs, the machine's matmul peak, peak memory
# ---------------------------------------------------------------------------------------------

def forward_flops(model: nn.Module, image_shape: tuple[int, ...]) -> int:
    """FLOPs (2 per multiply-add) of one image's forward pass (`nin.models.multiply_adds`)."""
    return 2 * multiply_adds(model, tuple(image_shape))


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """GFLOP/s of the fastest of ``repeats`` size×size torch.mm in ``dtype`` (and of 2·size, when size ≥ 1024).

    The practical peak of this machine for that dtype: the best time, not the median, since a peak is what the
    hardware can do and a shared host only ever slows a product down. oneDNN's convolutions can still beat it.
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    best = 0.0
    for n in (size, 2 * size) if size >= 1024 else (size,):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        for _ in range(2):
            torch.mm(a, b)
        for _ in range(repeats):
            seconds = median_seconds(lambda: torch.mm(a, b), 1, warmup=0, sync=sync)
            best = max(best, 2 * n**3 / seconds / 1e9)
    return best


class PeakRss:
    """Peak resident memory (MiB) while the block runs: /proc/self/statm sampled every 2 ms (Linux), else maxrss."""

    def __init__(self) -> None:
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page / 2**20
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_mib = max(self.peak_mib, self._rss())

    def __enter__(self) -> PeakRss:
        self.peak_mib = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self._rss())


def timed_steps(batches: Iterator, step: Callable, steps: int, warmup: int,
                sync: Callable[[], None] | None = None) -> dict:
    """Run warmup + steps iterations of ``step(*next(batches))``; medians of the batch, step and total times.

    With ``sync`` (GPU) the queue is drained after fetching the batch and after the step, so each part is
    charged its own device time.
    """
    data, compute, total = [], [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = next(batches)
        if sync:
            sync()
        fetched = time.perf_counter()
        step(*batch)
        if sync:
            sync()
        done = time.perf_counter()
        if i >= warmup:
            data.append(fetched - start)
            compute.append(done - fetched)
            total.append(done - start)
    return {"data_s": statistics.median(data), "step_s": statistics.median(compute),
            "total_s": statistics.median(total), "outside_compute": sum(data) / sum(total)}


def _forever(loader) -> Iterator:
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


# ---------------------------------------------------------------------------------------------
# The baseline: what a typical PyTorch port of NiN does
# ---------------------------------------------------------------------------------------------

class PerImageCifar(Dataset):
    """torchvision-style: per image, RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = F.pad(self.images[i], (BASELINE_PADDING,) * 4)
        top, left = torch.randint(0, 2 * BASELINE_PADDING + 1, (2,)).tolist()
        image = image[:, top : top + 32, left : left + 32]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return (image.float() / 255 - self.mean) / self.std, int(self.labels[i])


def _baseline_step(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    return step


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _images(args, count: int, batches: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``count`` CIFAR-10 training images (uint8) and labels; a synthetic batch under --quick without data.
    ``batches`` ({flag: size}) must each fit in the copy's training images: a training batch larger than them
    gives a loader with no batch (a wait forever), an inference batch a smaller batch than the one reported."""
    try:
        train = load_dataset("cifar10", "train", args.data_dir)
    except (DataError, NinError, OSError) as e:
        if not args.quick:
            raise NinError(f"nin bench needs CIFAR-10 ({e}); set NIN_DATA or --data-dir, or use --quick") from None
    else:
        for flag, size in batches.items():
            if size > len(train.images):
                raise NinError(f"{flag} {size}: this CIFAR-10 copy has {len(train.images):,} training images; "
                               f"expected at most that many")
        return train.images[:count], train.labels[:count], "cifar10 train"
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 10, (count,), generator=generator), "synthetic"


def measure(args) -> dict:
    """Every number of one `nin bench` run: the baseline, nin's engine (fast model and paper model), inference."""
    if args.quick:
        args.steps, args.warmup, args.batch_size = min(args.steps, 2), min(args.warmup, 1), min(args.batch_size, 16)
        args.eval_batch_size, args.eval_repeats = min(args.eval_batch_size, 32), min(args.eval_repeats, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device or "cpu")
    torch.manual_seed(0)
    count = max(args.batch_size * (args.steps + args.warmup), args.eval_batch_size)
    images, labels, source = _images(args, count, {"--batch-size": args.batch_size,
                                                   "--eval-batch-size": args.eval_batch_size})
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "device": str(device)}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    result: dict = {"machine": machine, "data": source, "batch_size": args.batch_size, "steps": args.steps,
                    "warmup": args.warmup, "eval_batch_size": args.eval_batch_size}
    size = 512 if args.quick else (8192 if device.type == "cuda" else 2048)
    # bf16 only where the hardware has it: an AVX2-only CPU emulates it at about 1 GFLOP/s (the 4096² product
    # alone took minutes there), and nin runs fp32 on such a CPU (`select_precision`)
    has_bf16 = device.type == "cuda" or cpu_has_bf16()
    peaks = {"fp32": matmul_peak(torch.float32, size, device=device),
             "bf16": matmul_peak(torch.bfloat16, size, device=device) if has_bf16 else None}
    result["matmul_peak_gflops"] = peaks

    # 1. The baseline, with everything at its defaults (malloc included): train, then infer.
    inference = _measure_baseline(args, images, labels, device, result)
    # 2. nin's engine, as `nin train` runs it: the fast recipe's model, and the baseline's own model and recipe.
    if device.type == "cpu":  # the malloc setting's own gain, measured before it is switched on
        _measure_engine(args, _fast_config(args), images, labels, device, result, "train_nin_malloc_defaults")
    result["keep_freed_memory"] = keep_freed_memory() if device.type == "cpu" else False
    model, train_x, cfg = _measure_engine(args, _fast_config(args), images, labels, device, result, "train_nin")
    _measure_engine(args, _same_model_config(args), images, labels, device, result, "train_nin_same_model")
    # 3. nin inference on the same images: what `evaluate` runs, then optimize_for_inference's variants.
    inference.update(_measure_inference(args, model, train_x, cfg, device, result))
    _derive(result, inference, peaks, args, device)
    return result


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def _measure_baseline(args, images: torch.Tensor, labels: torch.Tensor, device: torch.device, result: dict) -> dict:
    """The plain port: per-image Dataset + DataLoader, fp32, the paper model; returns its inference timing."""
    scaled = images.float() / 255
    mean, std = scaled.mean(dim=(0, 2, 3)), scaled.std(dim=(0, 2, 3))
    base_model = get_model("nin_cifar10").to(device)
    base_optimizer = torch.optim.SGD(base_model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    base_loader = DataLoader(PerImageCifar(images, labels, mean, std), batch_size=args.batch_size, shuffle=True,
                             drop_last=True, num_workers=args.workers, pin_memory=device.type == "cuda")
    result["forward_mflop_per_image"] = forward_flops(base_model, (3, 32, 32)) / 1e6
    base_model.train()
    with PeakRss() as memory:
        result["train_baseline"] = timed_steps(_forever(base_loader), _baseline_step(base_model, base_optimizer, device),
                                               args.steps, args.warmup, sync=_sync(device))
    result["train_baseline"]["peak_rss_mib"] = memory.peak_mib
    eval_base = ((scaled[: args.eval_batch_size] - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)).contiguous().to(device)
    base_model.eval()
    with torch.no_grad():
        return {"baseline": median_seconds(lambda: base_model(eval_base), args.eval_repeats, sync=_sync(device))}


def _fast_config(args):
    return dataclasses.replace(recipe("fast", "cifar10"), batch_size=args.batch_size, compile=bool(args.compile_train))


def _same_model_config(args):
    """nin's engine on exactly the baseline's model and recipe: the paper model (no batch norm), per-channel
    standardization, pad-4 crops + flips, SGD momentum 0.9 at a constant lr 0.01, weight decay 1e-4."""
    return dataclasses.replace(recipe("paper", "cifar10"), batch_size=args.batch_size, preprocessing="standardize",
                               augment=True, translate=BASELINE_PADDING, flip=True, schedule="constant", lr=0.01,
                               bias_lr_mult=1.0, class_map_lr_mult=1.0, compile=bool(args.compile_train))


def _measure_engine(args, cfg, images: torch.Tensor, labels: torch.Tensor, device: torch.device, result: dict,
                    label: str):
    """Time `train_step` as `nin train` runs it for ``cfg``; returns (model, preprocessed images, cfg)."""
    amp_dtype = select_precision(cfg.precision, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    train_x = fit_preprocessing(cfg.preprocessing, images)(images).to(device)
    augment = Augment(flip=cfg.flip, translate=cfg.translate) if cfg.augment else None
    torch.manual_seed(0)
    model = get_model(cfg.model, **cfg.model_args).to(device=device, memory_format=memory_format)
    optimizer = make_optimizer(model, cfg)
    train_model = torch.compile(model) if cfg.compile else model
    loader = TensorLoader(train_x, labels.to(device), cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment)
    steps_per_epoch, counter = len(loader), iter(range(10**9))

    def nin_step(x: torch.Tensor, y: torch.Tensor) -> None:
        train_step(train_model, optimizer, x, y, lr=lr_at(next(counter), cfg, steps_per_epoch), cfg=cfg,
                   amp_dtype=amp_dtype, memory_format=memory_format, check_finite=True)

    model.train()
    with PeakRss() as memory:
        timing = timed_steps(_forever(loader), nin_step, args.steps, args.warmup, sync=_sync(device))
    timing["peak_rss_mib"] = memory.peak_mib
    timing["model"] = f"{cfg.model} ({'batch norm' if cfg.model_args.get('batch_norm') else 'paper, no batch norm'})"
    result[label] = timing
    result["precision"] = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")
    result["channels_last"] = cfg.channels_last
    return model, train_x, cfg


def _measure_inference(args, model: nn.Module, train_x: torch.Tensor, cfg, device: torch.device,
                       result: dict) -> dict:
    """Seconds per batch: the unfolded model under autocast, then each `optimize_for_inference` method
    ("eager" is `inference_model`, what `evaluate` / `predict` run)."""
    amp_dtype = select_precision(cfg.precision, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    eval_x = train_x[: args.eval_batch_size].contiguous(memory_format=memory_format)
    sync, repeats, inference = _sync(device), args.eval_repeats, {}
    model.eval()
    with torch.no_grad():
        inference["nin_autocast"] = median_seconds(lambda: predict_logits(model, eval_x, amp_dtype=amp_dtype),
                                                   repeats, sync=sync)
        for method in ["eager", "jit"] + (["compile"] if args.compile else []):
            start = time.perf_counter()
            fast = optimize_for_inference(model, amp_dtype=amp_dtype, channels_last=cfg.channels_last, method=method,
                                          example=eval_x)
            fast(eval_x)  # build
            if sync:
                sync()
            result.setdefault("inference_build_s", {})[method] = time.perf_counter() - start
            inference[f"nin_{method}"] = median_seconds(lambda: fast(eval_x), repeats, sync=sync)
    return inference


def _derive(result: dict, inference: dict, peaks: dict, args, device: torch.device) -> None:
    """Images/s, GFLOP/s, fractions of the matmul peak, and the ratios against the baseline."""
    batch, n_eval = args.batch_size, args.eval_batch_size
    flops = result["forward_mflop_per_image"] * 1e6
    nin_peak = peaks.get(result["precision"]) or peaks["fp32"]
    for name in ("baseline", "nin", "nin_malloc_defaults", "nin_same_model"):
        timing = result.get(f"train_{name}")
        if timing is None:
            continue
        peak = peaks["fp32"] if name == "baseline" else nin_peak
        timing["images_per_s"] = batch / timing["total_s"]
        timing["gflops"] = 3 * flops * batch / timing["total_s"] / 1e9
        timing["peak_fraction"] = timing["gflops"] / peak
    base = result["train_baseline"]["images_per_s"]
    result["train_ratio"] = result["train_nin"]["images_per_s"] / base
    result["train_ratio_same_model"] = result["train_nin_same_model"]["images_per_s"] / base
    if device.type == "cuda":
        result["seconds_per_cifar10_epoch"] = 50_000 / result["train_nin"]["images_per_s"]
    result["inference"] = {
        name: {"images_per_s": n_eval / seconds, "gflops": flops * n_eval / seconds / 1e9,
               "peak_fraction": flops * n_eval / seconds / 1e9 / (peaks["fp32"] if name == "baseline" else nin_peak)}
        for name, seconds in inference.items()}
    best = max((k for k in inference if k != "baseline"), key=lambda k: result["inference"][k]["images_per_s"])
    result["inference_best"] = best
    speeds = {name: r["images_per_s"] for name, r in result["inference"].items()}
    result["inference_ratio"] = speeds[best] / speeds["baseline"]
    result["inference_path_ratio"] = speeds["nin_eager"] / speeds["baseline"]  # what evaluate / predict run
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        result["max_cuda_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def report(result: dict) -> str:
    b, n = result["train_baseline"], result["train_nin"]
    machine = result["machine"]
    where = machine.get("gpu", f"CPU, {machine['threads']} threads")
    peaks = result["matmul_peak_gflops"]
    bf16 = f"bf16 {peaks['bf16']:.0f} GFLOP/s" if peaks["bf16"] is not None else \
        "bf16 not measured (no bf16 units: nin runs fp32 here)"
    lines = [
        f"nin bench: {result['data']}, batch {result['batch_size']}, {result['steps']} timed steps after "
        f"{result['warmup']} warm-up; torch {machine['torch']}, {where}",
        f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, {bf16}; "
        f"nin_cifar10 forward {result['forward_mflop_per_image']:.0f} MFLOP/image (training step ≈ 3×)",
        "",
        f"{'training':<34}{'img/s':>9}{'GFLOP/s':>9}{'of peak':>9}{'outside compute':>17}{'peak RSS':>11}",
    ]
    rows = [("baseline (fp32 NCHW)", b)]
    if "train_nin_malloc_defaults" in result:
        rows.append(("nin fast, malloc defaults", result["train_nin_malloc_defaults"]))
    rows.append((f"nin fast model ({result['precision']}, NHWC)", n))
    rows.append(("nin, baseline's model and recipe", result["train_nin_same_model"]))
    for name, t in rows:
        lines.append(f"{name:<34}{t['images_per_s']:>9.1f}{t['gflops']:>9.1f}{t['peak_fraction']:>8.1%} "
                     f"{t['outside_compute']:>16.1%}{t['peak_rss_mib']:>8.0f} MiB")
    lines.append(f"{'ratio nin fast model / baseline':<34}{result['train_ratio']:>8.2f}×")
    lines.append(f"{'ratio nin same model / baseline':<34}{result['train_ratio_same_model']:>8.2f}×  (the engine alone)")
    if "seconds_per_cifar10_epoch" in result:
        lines.append(f"{'one CIFAR-10 epoch (50,000 images)':<34}{result['seconds_per_cifar10_epoch']:>8.1f} s")
    lines += ["", f"{'inference (batch ' + str(result['eval_batch_size']) + ')':<34}{'img/s':>9}{'GFLOP/s':>9}"
                  f"{'of peak':>9}"]
    for name, r in result["inference"].items():
        lines.append(f"{name:<34}{r['images_per_s']:>9.1f}{r['gflops']:>9.1f}{r['peak_fraction']:>8.1%}")
    lines.append(f"{'ratio evaluate/predict / baseline':<34}{result['inference_path_ratio']:>8.2f}×  (nin_eager)")
    lines.append(f"{'ratio best / baseline':<34}{result['inference_ratio']:>8.2f}×  ({result['inference_best']})")
    memory = f"process max RSS {result['max_rss_mib']:.0f} MiB"
    if "max_cuda_memory_mib" in result:
        memory += f", max CUDA memory {result['max_cuda_memory_mib']:.0f} MiB"
    lines.append(memory)
    return "\n".join(lines)


def run(args) -> int:
    check_arguments(args)  # before the data is looked for: a wrong flag is named even where there is no data
    if args.inference:
        return run_inference(args)
    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


def run_inference(args) -> int:
    """``nin bench --inference``: every backend on the same real images, ratios against plain fp32 torch."""
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = 16 if args.quick else args.eval_batch_size
    images, _, source = _images(args, batch, {"--eval-batch-size": batch})
    rows = time_backends(args.inference, images, batch_size=batch, repeats=2 if args.quick else args.eval_repeats,
                         latency_calls=5 if args.quick else 100, log=None if args.json else print)
    if args.json:
        print(json.dumps({"weights": args.inference, "data": source, "threads": torch.get_num_threads(),
                          "backends": [r.to_dict() for r in rows]}, indent=2))
    else:
        print(f"nin bench --inference: {args.inference}, {source}, batch {batch}, {torch.get_num_threads()} threads")
        print(format_table(rows))
    return 0
