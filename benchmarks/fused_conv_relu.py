"""nin's inference path with each conv + ReLU fused (one oneDNN call) against the same path with them apart.

    python benchmarks/fused_conv_relu.py                     # the paper's nin_cifar10 and fast-cifar10, batch 500
    python benchmarks/fused_conv_relu.py --rounds 9 --dtype fp32

Both sides are `optimize_for_inference` of one model (batch norm folded, channels_last, eager), in the dtype
`select_precision("auto")` picks on this CPU unless --dtype says otherwise, under nin's malloc setting
(`keep_freed_memory`, as `inference_model` sets it). The two are timed in alternation, one batch each per round,
so that a shared host's drift falls on both; prints images/s of each (median of the rounds) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nin import get_model
from nin.inference import optimize_for_inference
from nin.runtime import keep_freed_memory, select_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed batches per side (default 5)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    args = parser.parse_args()
    keep_freed_memory()
    dtype = select_precision(args.dtype, torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {str(dtype or torch.float32)[6:]}, "
          f"batch {args.batch_size}, {args.rounds} alternating rounds")
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32)
    for name, model in (("nin_cifar10 (paper)", get_model("nin_cifar10").eval()),
                        ("fast-cifar10", get_model("nin_cifar10", weights="fast-cifar10"))):
        sides = {"fused": optimize_for_inference(model, amp_dtype=dtype),
                 "apart": optimize_for_inference(model, amp_dtype=dtype, fuse_relu=False)}
        times: dict[str, list[float]] = {side: [] for side in sides}
        for run in sides.values():
            run(images)  # warm-up
        for _ in range(args.rounds):
            for side, run in sides.items():
                start = time.perf_counter()
                run(images)
                times[side].append(time.perf_counter() - start)
        speed = {side: args.batch_size / statistics.median(t) for side, t in times.items()}
        print(f"{name:<22} fused {speed['fused']:7.0f} img/s   apart {speed['apart']:7.0f} img/s   "
              f"fused / apart {speed['fused'] / speed['apart']:.3f}")


if __name__ == "__main__":
    main()
