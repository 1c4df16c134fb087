"""The one inference path through every door, each in a fresh process: images/s and one-image latency.

    NIN_DATA=../shared/data .venv/bin/python benchmarks/doors.py                 # fast-cifar10, 500 images
    .venv/bin/python benchmarks/doors.py --weights fast-mnist --json

Every door runs nin's inference path (batch norm folded, bf16 where the CPU has it); a door is measured in a
process of its own (as a user's program or command would run it), on the same 500 CIFAR-10 test images, with
and without the weights' test-time flips:

- reference: what `nin bench`'s `nin_eager` row times: `inference_model` on a preprocessed batch, no flips;
- get_model: `nin.get_model(name, weights=)` + `weights.transforms()` + `inference_model`, a Python user's path;
- Classifier: `Classifier.predict` on uint8 images (its preprocessing and flips included);
- evaluate: `nin.evaluate.evaluate` over the preprocessed images, as `nin evaluate` scores;
- predict: `nin.tools.predict.predict_files` on the images saved as PNG (decoding included: reported apart);
- serve: `POST /predict` of one PNG at a time to `nin serve`'s app (latency; throughput = one over it);
- bench --inference: the "torch" row of `nin.deploy.backends.time_backends`.

Images/s with flips count each image once; "× reference" divides the door's images/s (doubled with flips: two
forward passes an image) by the reference's. Latency: the median of one-image calls, "÷ reference" the same way
(halved with flips); `nin serve` answers one image a request, so it has a latency and no batch throughput.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DOORS = ("reference", "get_model", "Classifier", "evaluate", "predict", "serve", "bench --inference")


def _images(count: int) -> "torch.Tensor":
    from nin.data import load_dataset

    return load_dataset("cifar10", "test", os.environ.get("NIN_DATA")).images[:count]


def _measure(door: str, weights: str, count: int, flips: bool, repeats: int) -> dict:
    """One door, in this process: {"images_per_s", "latency_ms", ...}."""
    import torch

    from nin import Classifier, get_model, get_weights
    from nin.data import TensorLoader
    from nin.evaluate import evaluate
    from nin.inference import inference_model, predict_logits
    from nin.runtime import median_seconds, select_precision, timings

    images = _images(count)
    amp = select_precision("auto", torch.device("cpu"))
    entry = get_weights(weights)
    name = entry.model
    one = images[:1]
    if door in ("reference", "get_model"):
        model = get_model(name, weights=weights)
        transform = entry.transforms()
        runner = inference_model(model.to(memory_format=torch.channels_last), amp)
        if door == "reference":  # nin bench's nin_eager: preprocessed once, outside the timing
            batch = transform(images).contiguous(memory_format=torch.channels_last)
            call = lambda x: predict_logits(runner, x, tta_flip=flips)  # noqa: E731
            return _timed(lambda: call(batch), lambda: call(batch[:1]), count, repeats)
        call = lambda x: predict_logits(runner, transform(x), tta_flip=flips).softmax(1)  # noqa: E731
        return _timed(lambda: call(images), lambda: call(one), count, repeats)
    if door == "Classifier":
        classifier = Classifier.load(weights)
        classifier.pipeline.tta_flip = flips
        return _timed(lambda: classifier.predict(images), lambda: classifier.predict(one), count, repeats)
    if door == "evaluate":
        classifier = Classifier.load(weights)
        batch = classifier.transforms(images).contiguous(memory_format=torch.channels_last)
        labels = torch.zeros(count, dtype=torch.int64)
        loader = TensorLoader(batch, labels, count, shuffle=False)
        run = lambda: evaluate(classifier.runner, loader, num_classes=10, tta_flip=flips)  # noqa: E731
        return {"images_per_s": count / median_seconds(run, repeats)}
    if door == "predict":
        from PIL import Image

        from nin.tools import predict

        with tempfile.TemporaryDirectory() as folder:
            for i, image in enumerate(images):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(Path(folder) / f"{i:04d}.png")
            original = predict.Classifier

            class Flipped(original):  # the door as `nin predict` runs it, flips on or off as this row asks
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    self.pipeline.tta_flip = flips

            predict.Classifier = Flipped
            run = lambda: predict.predict_files(weights, [folder], batch_size=count)  # noqa: E731
            whole = median_seconds(run, repeats)
            decode = median_seconds(lambda: [predict.read_image(p, 32, 3) for p in sorted(Path(folder).iterdir())],
                                    repeats)
        return {"images_per_s": count / whole, "decoding_s": decode, "scoring_images_per_s": count / (whole - decode)}
    if door == "serve":
        from fastapi.testclient import TestClient
        from PIL import Image

        from nin.deploy.serve import create_app

        client = TestClient(create_app(weights))
        client.app.state.pipeline.tta_flip = flips
        payloads = []
        for image in images[:50]:
            buffer = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "PNG")
            payloads.append(buffer.getvalue())
        calls = iter(range(10**9))
        post = lambda: client.post("/predict", content=payloads[next(calls) % len(payloads)])  # noqa: E731
        latency = statistics.median(timings(post, 50, warmup=5))
        return {"latency_ms": latency * 1e3}  # one image a request: no batch throughput
    if door == "bench --inference":
        from nin.deploy.backends import time_backends

        if not flips:
            return {"skipped": "the torch backend runs the weights' flips"}
        row = time_backends(weights, images, backends=["torch"], batch_size=count, repeats=repeats,
                            latency_calls=50)[0]
        return {"images_per_s": row.images_per_second, "latency_ms": row.latency_p50_ms}
    raise ValueError(door)


def _timed(batch_call, one_call, count: int, repeats: int) -> dict:
    import statistics

    from nin.runtime import median_seconds, timings

    seconds = median_seconds(batch_call, repeats)
    latency = statistics.median(timings(one_call, 50, warmup=5))
    return {"images_per_s": count / seconds, "latency_ms": latency * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--weights", default="fast-cifar10", help="a pretrained tag (default fast-cifar10)")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--doors", nargs="*", default=list(DOORS))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("DOOR", "FLIPS"), help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_measure(args.one[0], args.weights, args.images, args.one[1] == "1", args.repeats)))
        return 0
    rows = []
    for flips in (False, True):
        for door in args.doors:
            command = [sys.executable, __file__, "--weights", args.weights, "--images", str(args.images),
                       "--repeats", str(args.repeats), "--one", door, "1" if flips else "0"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{door}: {done.stderr[-2000:]}")
            rows.append({"door": door, "flips": flips, **json.loads(done.stdout.strip().splitlines()[-1])})
    base = next(r for r in rows if r["door"] == "reference" and not r["flips"])
    for row in rows:
        passes = 2 if row["flips"] else 1  # forward passes an image
        if "images_per_s" in row:
            row["of_reference"] = row["images_per_s"] * passes / base["images_per_s"]
        if "latency_ms" in row:
            row["latency_of_reference"] = row["latency_ms"] / passes / base["latency_ms"]
    if args.json:
        print(json.dumps({"weights": args.weights, "images": args.images, "rows": rows}, indent=2))
        return 0
    print(f"weights {args.weights}, {args.images} CIFAR-10 test images, batch {args.images}; each door in a fresh "
          "process")
    print("| door | flips | images/s | × reference (flips: × 2) | one-image latency (ms) | ÷ reference (flips: ÷ 2) "
          "| note |")
    print("|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        if "skipped" in row:
            continue
        note = (f"decoding {row['decoding_s']:.2f} s of it; scoring alone {row['scoring_images_per_s']:,.0f} img/s"
                if "decoding_s" in row else "")
        speed = (f"{row['images_per_s']:,.0f} | {row['of_reference']:.2f}" if "images_per_s" in row else "– | –")
        latency = (f"{row['latency_ms']:.2f} | {row['latency_of_reference']:.2f}" if "latency_ms" in row else "– | –")
        print(f"| {row['door']} | {'yes' if row['flips'] else 'no'} | {speed} | {latency} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
