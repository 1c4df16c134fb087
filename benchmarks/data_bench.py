"""Time the CIFAR-10 data path: augmentation, loader + augmentation, preprocessing, ZCA fit; and a per-image baseline.

    NIN_DATA=../shared/data .venv/bin/python benchmarks/data_bench.py
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nin.data import TensorLoader, load_dataset
from nin.transforms import Augment, fit_preprocessing

BATCH_SIZE = 128  # NIN paper's mini-batch
PADDING = 4  # translation in pixels


def median_ms(function, repeats: int = 50, warmup: int = 5) -> float:
    """Median wall time of `function()` in milliseconds, warm-up calls excluded."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def per_image_baseline(images: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The usual torchvision-style path: one Python iteration per image (pad, random crop, random flip)."""
    out = []
    for image in images:
        padded = F.pad(image, (PADDING,) * 4)
        top, left = rng.randint(0, 2 * PADDING), rng.randint(0, 2 * PADDING)
        crop = padded[:, top : top + image.shape[1], left : left + image.shape[2]]
        out.append(crop.flip(-1) if rng.random() < 0.5 else crop)
    return torch.stack(out)


def main() -> None:
    root = Path(os.environ.get("NIN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, data {root}")
    train = load_dataset("cifar10", "train", root)

    start = time.perf_counter()
    preprocessing = fit_preprocessing("gcn_zca", train.images)
    print(f"ZCA fit (GCN + covariance + eigh) on {len(train)} x 3072: {time.perf_counter() - start:.1f} s")

    batch_uint8 = train.images[:BATCH_SIZE]
    print(f"preprocessing apply (gcn_zca), batch {BATCH_SIZE}: {median_ms(lambda: preprocessing(batch_uint8)):.2f} ms")
    start = time.perf_counter()
    images = preprocessing(train.images)
    print(f"preprocessing apply, all {len(train)} images once: {time.perf_counter() - start:.1f} s")

    # One batch of 3x32x32 is too small to split across threads; with other processes busy on the same cores,
    # 2 intra-op threads made the batched gather 20x slower here. The engine may do the same.
    torch.set_num_threads(1)
    batch = images[:BATCH_SIZE].contiguous()
    augment = Augment(flip=True, translate=PADDING)
    generator = torch.Generator().manual_seed(0)
    batched = median_ms(lambda: augment(batch, generator))
    rng = random.Random(0)
    looped = median_ms(lambda: per_image_baseline(batch, rng))
    print(f"augmentation (flip + translate {PADDING}), batch {BATCH_SIZE}: {batched:.3f} ms")
    print(f"baseline per-image Python loop, batch {BATCH_SIZE}: {looped:.3f} ms  (batched is {looped / batched:.1f}x faster)")

    loader = TensorLoader(images, train.labels, BATCH_SIZE, seed=0, augment=augment)
    sum(1 for _ in loader)  # warm-up epoch
    loader.set_epoch(1)
    start = time.perf_counter()
    count = sum(1 for _ in loader)
    per_batch = 1000 * (time.perf_counter() - start) / count
    print(f"whole data path (TensorLoader + augment), per batch over one epoch of {count} batches: {per_batch:.3f} ms")


if __name__ == "__main__":
    main()
