"""Test-time augmentation beyond flips: how much do small translations add, on real test images?

    python experiments/tta_views.py fast-cifar10 --data-dir ../shared/data

Scores one set of weights on the CIFAR-10 copy's 10,000 test images and the 1,000 pixel-exact ones with
the logits averaged over: the image alone; + its mirror (what `nin evaluate` does for weights with
``tta_flip``); and + translations by ±``--shift`` pixels (zero padding in the preprocessed space, i.e.
the training augmentation's fill) of both. Every variant runs nin's inference path
(`nin.inference.inference_model`), so the only difference is the views.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from nin.checkpoint import load_weights
from nin.data import load_dataset
from nin.inference import inference_model
from nin.runtime import select_precision


def shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``x`` moved by (dx, dy) pixels, zeros shifted in."""
    pad = max(abs(dx), abs(dy))
    padded = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[2:]
    return padded[:, :, pad - dy : pad - dy + h, pad - dx : pad - dx + w]


def views(shift: int) -> dict[str, list[tuple[bool, int, int]]]:
    moves = [(shift, 0), (-shift, 0), (0, shift), (0, -shift)]
    return {"1 view": [(False, 0, 0)],
            "flip (2 views)": [(False, 0, 0), (True, 0, 0)],
            f"flip + ±{shift} px (10 views)": [(f, 0, 0) for f in (False, True)] + [(f, *m) for f in (False, True) for m in moves]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights")
    parser.add_argument("--data-dir")
    parser.add_argument("--shift", type=int, default=2)
    args = parser.parse_args()
    model, preprocessing, _ = load_weights(args.weights)
    runner = inference_model(model, select_precision("auto", torch.device("cpu")))
    sets = {"JPEG 10,000": load_dataset("cifar10", "test", args.data_dir),
            "exact 1,000": load_dataset("cifar10-lossless-first1000", "test", args.data_dir)}
    for name, data in sets.items():
        x = preprocessing(data.images)
        for label, plan in views(args.shift).items():
            start = time.perf_counter()
            logits = torch.zeros(len(x), model.config.num_classes)
            for chunk in range(0, len(x), 500):
                batch = x[chunk : chunk + 500]
                for flip, dx, dy in plan:
                    view = shifted(batch.flip(-1) if flip else batch, dx, dy)
                    logits[chunk : chunk + 500] += runner(view)
            accuracy = (logits.argmax(1) == data.labels).double().mean().item()
            print(f"{args.weights}  {name:<12} {label:<26} {accuracy:.2%}  ({time.perf_counter() - start:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
