"""Per-layer profile of nin_cifar10 on this machine: where the time of inference and of a training step goes.

    python benchmarks/profile_layers.py                  # batch 500 inference, batch 128 training
    python benchmarks/profile_layers.py --recipe paper   # the paper's model (no batch norm, dropout 0.5) as trained
    python benchmarks/profile_layers.py --quick          # tiny batches (a smoke run)

Inference: the model as `optimize_for_inference` leaves it (batch norm folded, bf16 weights where the CPU has
bf16 units, else fp32; NHWC, eager), each conv timed with forward hooks (median of repeats) against the FLOPs of
its shape and the matrix-product peak in that dtype measured by the same script; what is not a conv (ReLU, pooling, casts) is the remainder. Training: one
`train_step` as `nin train --recipe fast` runs it, under torch.profiler, the ops grouped by input shape. This is
the profile docs/performance.md quotes to say where the limit is.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from nin.tools.bench import matmul_peak
from nin.inference import optimize_for_inference
from nin.models import get_model
from nin.runtime import keep_freed_memory
from nin.engine import recipe
from nin.runtime import select_precision
from nin.engine import make_optimizer, train_step


def conv_table(model: nn.Module, images: torch.Tensor, repeats: int, peak: float) -> list[str]:
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    times: dict[str, list[float]] = {name: [] for name, _ in convs}
    flops: dict[str, int] = {}
    starts: dict[str, float] = {}

    def before(name):
        def hook(module, inputs):
            starts[name] = time.perf_counter()
        return hook

    def after(name):
        def hook(module, inputs, output):
            times[name].append(time.perf_counter() - starts[name])
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            flops[name] = 2 * output.numel() * per_output
        return hook

    handles = [h for name, m in convs for h in (m.register_forward_pre_hook(before(name)),
                                                 m.register_forward_hook(after(name)))]
    totals = []
    with torch.no_grad():
        model(images)  # warm-up
        for values in times.values():
            values.clear()
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            totals.append(time.perf_counter() - start)
    for h in handles:
        h.remove()
    n = len(images)
    total = statistics.median(totals)
    # "of mm": against the 2048² torch.mm this script times; oneDNN's convolutions can beat it (> 100%)
    lines = [f"{'layer':<22}{'shape':<24}{'MFLOP/img':>10}{'ms':>9}{'GFLOP/s':>9}{'of mm':>9}{'of time':>9}"]
    conv_time = 0.0
    for name, m in convs:
        seconds = statistics.median(times[name])
        conv_time += seconds
        shape = f"{m.kernel_size[0]}x{m.kernel_size[1]} {m.in_channels}->{m.out_channels}"
        rate = flops[name] / seconds / 1e9
        lines.append(f"{name:<22}{shape:<24}{flops[name] / n / 1e6:>10.1f}{seconds * 1e3:>9.1f}{rate:>9.0f}"
                     f"{rate / peak:>8.0%}{seconds / total:>8.0%}")
    all_flops = sum(flops.values())
    lines.append(f"{'all convs':<46}{all_flops / n / 1e6:>10.1f}{conv_time * 1e3:>9.1f}"
                 f"{all_flops / conv_time / 1e9:>9.0f}{all_flops / conv_time / 1e9 / peak:>8.0%}{conv_time / total:>8.0%}")
    lines.append(f"{'whole forward':<56}{total * 1e3:>9.1f}  = {n / total:.0f} images/s; at the matmul peak above the "
                 f"convs alone would take {all_flops / peak / 1e6:.1f} ms = {n / (all_flops / peak / 1e9):.0f} images/s")
    return lines


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--eval-batch-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recipe", choices=["fast", "paper"], default="fast",
                        help="whose CIFAR-10 model and step to profile (default fast; paper: no batch norm, dropout)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.eval_batch_size, args.batch_size, args.repeats = 16, 8, 1
    keep_freed_memory()
    torch.manual_seed(0)
    cfg = recipe(args.recipe, "cifar10")
    amp = select_precision(cfg.precision, torch.device("cpu")) or torch.float32
    peak = matmul_peak(amp, 512 if args.quick else 2048)
    print(f"matmul peak ({str(amp).removeprefix('torch.')}): {peak:.0f} GFLOP/s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")

    model = get_model(cfg.model, **cfg.model_args).to(memory_format=torch.channels_last)
    dtype = amp if amp != torch.float32 else None
    # per conv: the unfused model (a fused conv + ReLU is one oneDNN call, no Conv2d forward to time)
    fast = optimize_for_inference(model.eval(), amp_dtype=dtype, fuse_relu=False)
    images = torch.randn(args.eval_batch_size, 3, 32, 32).to(amp).contiguous(memory_format=torch.channels_last)
    print(f"inference, batch {args.eval_batch_size}, optimize_for_inference (eager, convs and ReLUs apart), per conv:")
    print("\n".join(conv_table(fast.model, images, args.repeats, peak)))
    fused = optimize_for_inference(model.eval(), amp_dtype=dtype)  # what nin's inference path runs
    with torch.no_grad():
        fused.model(images)
        seconds = statistics.median([_timed(lambda: fused.model(images)) for _ in range(args.repeats)])
    print(f"the same forward with each conv + ReLU fused (nin's path): {seconds * 1e3:.1f} ms = "
          f"{len(images) / seconds:.0f} images/s")

    model.train()
    optimizer = make_optimizer(model, cfg)
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))

    def step() -> None:
        train_step(model, optimizer, x, y, lr=0.05, cfg=cfg, amp_dtype=None if amp == torch.float32 else amp,
                   memory_format=torch.channels_last, check_finite=True)

    step()
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                with_flops=True) as prof:
        for _ in range(args.repeats):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\ntraining step of the {args.recipe} recipe's model, batch {args.batch_size}: {total / 1e3 / args.repeats:.0f} ms per step "
          f"(= {args.batch_size / (total / 1e6 / args.repeats):.0f} images/s under the profiler), share by op:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"  {e.key:<40}{e.self_cpu_time_total / total:>7.1%}{e.self_cpu_time_total / 1e3 / args.repeats:>9.1f} ms")
    print("\nthe same, by op and input shape:")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=18,
                                                             max_name_column_width=28, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
