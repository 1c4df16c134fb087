"""Test-time augmentation beyond flips: how much do small translations add, on real test images?

    python experiments/tta_views.py fast-cifar10 --data-dir ../shared/data

Scores one set of weights on the CIFAR-10 copy's 10,000 test images and the 1,000 pixel-exact ones with
the logits averaged over: the image alone; + its mirror (what `nin evaluate` does for weights with
``tta_flip``); and + translations of both by ±``--shift`` pixels, across only (6 views) or across and up/down
(10 views), with zero padding in the preprocessed space (the training augmentation's fill). Every variant runs
nin's inference path (`nin.inference.inference_model`), so the only difference is the views.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from nin.pretrained import load as load_weights  # a tag, a weights file or a run folder
from nin.data import load_dataset
from nin.inference import inference_model
from nin.runtime import select_precision


def shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``x`` moved by (dx, dy) pixels, zeros shifted in."""
    pad = max(abs(dx), abs(dy))
    padded = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[2:]
    return padded[:, :, pad - dy : pad - dy + h, pad - dx : pad - dx + w]


def views(shifts: list[int]) -> dict[str, list[tuple[bool, int, int]]]:
    plans = {"1 view": [(False, 0, 0)], "flip (2 views)": [(False, 0, 0), (True, 0, 0)]}
    for shift in shifts:
        across = [(shift, 0), (-shift, 0)]
        moves = across + [(0, shift), (0, -shift)]
        flips = plans["flip (2 views)"]
        plans[f"flip + ±{shift} px across (6 views)"] = flips + [(f, *m) for f in (False, True) for m in across]
        plans[f"flip + ±{shift} px (10 views)"] = flips + [(f, *m) for f in (False, True) for m in moves]
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("weights")
    parser.add_argument("--data-dir")
    parser.add_argument("--shift", type=int, nargs="+", default=[2], help="one or more shifts in pixels")
    args = parser.parse_args()
    model, preprocessing, _ = load_weights(args.weights)
    runner = inference_model(model, select_precision("auto", torch.device("cpu")))
    sets = {"JPEG 10,000": load_dataset("cifar10", "test", args.data_dir),
            "exact 1,000": load_dataset("cifar10-lossless-first1000", "test", args.data_dir)}
    plans = views(args.shift)
    for name, data in sets.items():
        x = preprocessing(data.images)
        seconds: dict[tuple[bool, int, int], float] = {}
        logits: dict[tuple[bool, int, int], torch.Tensor] = {}
        for view in dict.fromkeys(v for plan in plans.values() for v in plan):  # each view once, in order
            flip, dx, dy = view
            start = time.perf_counter()
            logits[view] = torch.cat([runner(shifted(batch.flip(-1) if flip else batch, dx, dy)).float()
                                      for batch in x.split(500)])
            seconds[view] = time.perf_counter() - start
        for label, plan in plans.items():
            summed = sum(logits[v] for v in plan)
            accuracy = (summed.argmax(1) == data.labels).double().mean().item()
            cost = sum(seconds[v] for v in plan)
            print(f"{args.weights}  {name:<12} {label:<32} {accuracy:.2%}  ({cost:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
