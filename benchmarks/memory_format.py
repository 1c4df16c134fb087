"""channels_last (NHWC, nin's layout) against NCHW, as ratios in one process: training steps and inference.

    python benchmarks/memory_format.py               # 5 rounds, 2 threads
    python benchmarks/memory_format.py --rounds 1    # a smoke run

For each of the paper model (the paper recipe: no batch norm, dropout 0.5) and the fast recipe's model, one
`nin.engine.train_step` of batch 128 in the precision `nin train` picks on this CPU (bf16 autocast where it has
bf16 units, else fp32), and the inference path (`optimize_for_inference`, batch 500, eager) in the dtype
`evaluate` picks, each built twice: once channels_last (`TrainConfig.channels_last`, what nin runs) and once
NCHW. The two layouts take turns within each round, so a shared host's drift falls on both; the table gives the
median images/s over the rounds and NCHW / channels_last.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nin.engine import make_optimizer, recipe
from nin.inference import optimize_for_inference
from nin.models import get_model
from nin.runtime import keep_freed_memory, select_precision

from _steps import seconds_for_steps

LAYOUTS = {"channels_last": torch.channels_last, "NCHW": torch.contiguous_format}


def training_round(sides: dict, images: torch.Tensor, labels: torch.Tensor, cfg, amp_dtype, steps: int) -> dict:
    """Images/s of ``steps`` training steps for each layout's (model, optimizer), one after the other."""
    return {layout: len(images) * steps / seconds_for_steps(model, optimizer, images, labels, cfg=cfg,
                                                           amp_dtype=amp_dtype, steps=steps, warmup=0,
                                                           memory_format=LAYOUTS[layout])
            for layout, (model, optimizer) in sides.items()}


def inference_round(sides: dict, images: torch.Tensor, passes: int) -> dict:
    speeds = {}
    with torch.inference_mode():
        for layout, runner in sides.items():
            start = time.perf_counter()
            for _ in range(passes):
                runner(images)
            speeds[layout] = len(images) * passes / (time.perf_counter() - start)
    return speeds


def measure(name: str, recipe_name: str, args) -> list[str]:
    cfg = recipe(recipe_name, "cifar10")
    cpu = torch.device("cpu")
    amp_dtype = select_precision(cfg.precision, cpu)
    torch.manual_seed(0)
    models = {layout: get_model(cfg.model, **cfg.model_args).to(memory_format=fmt) for layout, fmt in LAYOUTS.items()}
    for model in models.values():
        model.load_state_dict(models["channels_last"].state_dict())
    evaluation = {layout: optimize_for_inference(model.eval(), amp_dtype=select_precision("auto", cpu),
                                                 channels_last=layout == "channels_last")
                  for layout, model in models.items()}  # frozen copies: the models themselves train below
    training = {layout: (model.train(), make_optimizer(model, cfg)) for layout, model in models.items()}
    images, labels = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    batch = torch.randn(500, 3, 32, 32)
    training_round(training, images, labels, cfg, amp_dtype, 2)  # warm-up
    inference_round(evaluation, batch, 1)
    rounds = [(training_round(training, images, labels, cfg, amp_dtype, args.steps),
               inference_round(evaluation, batch, args.passes)) for _ in range(args.rounds)]
    rows = []
    for what, index in (("training step, batch 128", 0), ("inference, batch 500", 1)):
        median = {layout: statistics.median(r[index][layout] for r in rounds) for layout in LAYOUTS}
        rows.append(f"{name:<12} {what:<25} {median['channels_last']:8.1f} {median['NCHW']:8.1f} "
                    f"{median['NCHW'] / median['channels_last']:7.3f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="training steps per layout and round")
    parser.add_argument("--passes", type=int, default=2, help="inference passes per layout and round")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    precision = select_precision("auto", torch.device("cpu"))
    print(f"{args.threads} threads, {args.rounds} rounds; precision: {precision or 'fp32'}")
    print(f"{'model':<12} {'what':<25} {'NHWC':>8} {'NCHW':>8} {'ratio':>7}   (images/s, medians; ratio NCHW / NHWC)")
    for name, recipe_name in (("paper", "paper"), ("fast", "fast")):
        for row in measure(name, recipe_name, args):
            print(row, flush=True)


if __name__ == "__main__":
    main()
