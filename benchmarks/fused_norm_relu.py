"""Batch norm + ReLU fused by inductor, block by block, against the eager training step, in one process.

    python benchmarks/fused_norm_relu.py             # fast-recipe nin_cifar10, batch 128, 32 px, 2 threads

Batch norm and ReLU are about 44% of nin's CPU training step (docs/performance.md, the profile), all of it
memory traffic: each reads and writes the whole activation in the forward pass and again in the backward.
This compiles each MLPConv block on its own (`torch.compile(block)`: the convolutions stay oneDNN calls,
inductor fuses the batch-norm statistics, normalisation and ReLU around them, forward and backward) and
times `nin.engine.train_step` on the fast recipe's nin_cifar10 (bf16 autocast where the CPU has it,
channels_last) with random images: eager, the per-block compiled model, and eager again to show the drift
of a shared host. Prints images/s, the ratio against eager, and the compile time.
"""

from __future__ import annotations

import argparse
import time

import torch

from nin.engine import recipe
from nin.models import get_model
from nin.runtime import keep_freed_memory, select_precision
from nin.engine import make_optimizer, train_step

from _steps import seconds_for_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    cfg = recipe("fast", "cifar10")
    amp_dtype = select_precision(cfg.precision, torch.device("cpu"))
    images, labels = torch.randn(cfg.batch_size, 3, args.size, args.size), torch.randint(0, 10, (cfg.batch_size,))

    def speed(model) -> float:
        seconds = seconds_for_steps(model, make_optimizer(model, cfg), images, labels, cfg=cfg, amp_dtype=amp_dtype,
                                    steps=args.steps)
        return cfg.batch_size * args.steps / seconds

    def fresh():
        torch.manual_seed(0)
        return get_model("nin_cifar10", **cfg.model_args).to(memory_format=torch.channels_last)

    base = speed(fresh())
    print(f"eager:                      {base:6.0f} img/s  1.00×", flush=True)
    model = fresh()
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block)
    start = time.perf_counter()
    optimizer = make_optimizer(model, cfg)
    train_step(model, optimizer, images, labels, lr=0.01, cfg=cfg, amp_dtype=amp_dtype)  # builds the kernels
    built = time.perf_counter() - start
    fused = speed(model)
    print(f"blocks compiled (inductor): {fused:6.0f} img/s  {fused / base:.2f}×  (built in {built:.0f} s)", flush=True)
    again = speed(fresh())
    print(f"eager, again:               {again:6.0f} img/s  {again / base:.2f}×", flush=True)


if __name__ == "__main__":
    main()
