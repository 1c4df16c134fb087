"""What does JPEG q75 cost a model, on the same images? Pair the 1,000 pixel-exact test images with their JPEG copies.

    python experiments/jpeg_pairs.py --data-dir ../shared/data --out jpeg_first1000.bin
    nin evaluate WEIGHTS --data-file jpeg_first1000.bin          # the JPEG copies of the 1,000
    nin evaluate WEIGHTS --dataset cifar10-lossless-first1000     # their exact pixels

The CIFAR-10 copy's test batch is the official images after JPEG q75, in another order; the exact 1,000 are the
official first 1,000. Each exact image is paired with its nearest JPEG test image (Euclidean distance over the
3,072 bytes); the pairing is refused unless every exact image finds a different JPEG image, with the same label,
clearly nearer than the next one. The JPEG records are written in the exact file's order, in the CIFAR binary
layout, so that both files score the same images and the difference is the JPEG alone, not sampling.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from nin.errors import NinError
from nin.files import atomic_write_bytes, claim_output, output_path

RECORD = 1 + 3 * 32 * 32  # label byte + R, G, B planes


def records(path: Path, count: int) -> np.ndarray:
    """The ``count`` CIFAR records of ``path``."""
    if not path.is_file():
        raise NinError(f"{path}: no such file")
    data = np.fromfile(path, np.uint8)
    if data.size != count * RECORD:
        raise NinError(f"{path}: {data.size:,} bytes; expected {count:,} CIFAR records of {RECORD} bytes")
    return data.reshape(-1, RECORD)


def pair(exact: np.ndarray, jpeg: np.ndarray, margin: float = 1.5) -> np.ndarray:
    """Index into ``jpeg`` of each exact record's JPEG copy."""
    e, j = exact[:, 1:].astype(np.float32), jpeg[:, 1:].astype(np.float32)
    d2 = (e ** 2).sum(1)[:, None] - 2 * e @ j.T + (j ** 2).sum(1)[None]
    nearest = np.argsort(d2, axis=1)[:, :2]
    first, second = (np.sqrt(np.maximum(d2[np.arange(len(e)), nearest[:, k]], 0) / e.shape[1]) for k in (0, 1))
    index = nearest[:, 0]
    if len(set(index.tolist())) != len(index):
        raise SystemExit("two exact images share a nearest JPEG image: no one-to-one pairing")
    if not (jpeg[index, 0] == exact[:, 0]).all():
        raise SystemExit("a pair's labels differ: not the same images")
    if not (second > margin * first).all():
        raise SystemExit(f"an exact image has two JPEG images within {margin}x of each other: pairing ambiguous")
    print(f"paired {len(index)} images: RMSE to the JPEG copy {first.mean():.2f} on average (max {first.max():.2f}); "
          f"the next nearest at least {(second / np.maximum(first, 1e-6)).min():.1f}x farther")
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--data-dir", required=True, help="folder with cifar-10-batches-bin/ and "
                                                          "cifar-10-test-lossless-first1000/")
    parser.add_argument("--out", required=True, help="CIFAR binary file to write the paired JPEG records to (a new "
                                                     "file, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    args = parser.parse_args()
    root = Path(args.data_dir)
    inputs = [root / "cifar-10-test-lossless-first1000" / "test_batch_first1000.bin",
              root / "cifar-10-batches-bin" / "test_batch.bin"]
    try:
        if output_path(args.out).resolve() in {p.resolve() for p in inputs}:
            raise NinError(f"--out {args.out}: is one of the input files")
        claim_output(args.out, force=args.force)
        exact, jpeg = records(inputs[0], 1000), records(inputs[1], 10_000)
        atomic_write_bytes(args.out, jpeg[pair(exact, jpeg)].tobytes())
    except NinError as error:
        raise SystemExit(f"jpeg_pairs.py: error: {error}") from None
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
