"""One fast-recipe training step at other batch sizes and image sizes, as ratios in one process.

    python benchmarks/step_sizes.py                  # batch 128/256 at 32 px and 24 px, 2 threads

Measures the levers behind progressive resizing (`small_size`: the first epochs on 24 px images) and larger
batches: `nin.engine.train_step` on nin_cifar10 with the fast recipe's model (batch norm, bf16 autocast where the
CPU has it, channels_last), random images, 2 warm-up and 6 timed steps per setting, and prints images/s with
the ratio against the first setting (batch 128 at 32 px, today's default), which is timed again at the end to
show the drift of a shared host.
"""

from __future__ import annotations

import argparse

import torch

from nin.engine import recipe
from nin.models import get_model
from nin.runtime import keep_freed_memory, select_precision
from nin.engine import make_optimizer

from _steps import seconds_for_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    cfg = recipe("fast", "cifar10")
    amp_dtype = select_precision(cfg.precision, torch.device("cpu"))
    model = get_model("nin_cifar10", **cfg.model_args).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    settings = [(128, 32), (256, 32), (128, 24), (256, 24), (128, 32)]
    base = None
    for batch, size in settings:
        images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
        speed = batch * args.steps / seconds_for_steps(model, optimizer, images, labels, cfg=cfg,
                                                       amp_dtype=amp_dtype, steps=args.steps)
        base = base or speed
        print(f"batch {batch:>3}, {size} px: {speed:6.0f} img/s  {speed / base:.2f}×", flush=True)


if __name__ == "__main__":
    main()
