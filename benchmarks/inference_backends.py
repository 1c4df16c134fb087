"""Inference speed of every backend on nin_cifar10 in one run: batch throughput and one-image latency.

    PYTHONPATH=src python benchmarks/inference_backends.py                      # weights/fast-cifar10, batch 500
    PYTHONPATH=src python benchmarks/inference_backends.py --backends torch onnxruntime --json

Ratios are against the plain fp32 torch model ("torch", as `nin predict` runs it) timed in the same run, so a
busy machine slows every row alike only if the load stays steady; the table prints the load average to judge.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from nin.deploy.backends import BACKENDS, available_backends, format_table, time_backends
from nin.data import load_dataset

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--weights", default=str(REPO / "weights" / "fast-cifar10.safetensors"))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, help="default: every installed backend")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per backend (median counts)")
    parser.add_argument("--latency-calls", type=int, default=100, help="timed one-image calls per backend")
    parser.add_argument("--data-dir", help="data root with cifar-10-batches-bin (default: $NIN_DATA)")
    parser.add_argument("--threads", type=int, help="threads for every backend (default: torch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = load_dataset("cifar10", "test", args.data_dir).images[: args.batch_size]
    load_before = os.getloadavg()[0]
    rows = time_backends(args.weights, images, backends=args.backends or available_backends(),
                         batch_size=args.batch_size, repeats=args.repeats, latency_calls=args.latency_calls,
                         log=None if args.json else print)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "load_average_before": load_before,
               "load_average_after": os.getloadavg()[0]}
    if args.json:
        print(json.dumps({"weights": args.weights, "machine": machine, "rows": [r.to_dict() for r in rows]}))
    else:
        print(f"\n{args.weights}, batch {args.batch_size}; {machine['cores']} cores, torch threads "
              f"{machine['torch_threads']}, load average {load_before:.1f} before, {machine['load_average_after']:.1f} after")
        print(format_table(rows))
