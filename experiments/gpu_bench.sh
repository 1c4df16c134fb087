#!/usr/bin/env bash
# `nin bench` on a CUDA GPU, eager and with a compiled training step. Its eager half ran on an H200 through
# experiments/gpu_cifar10.sh (docs/performance.md, "GPU runs"); the compiled half has not run on a GPU yet.
#
#   experiments/gpu_bench.sh                     # needs CIFAR-10 under NIN_DATA (or DATA_PARTS, see gpu_reproduce.sh)
#
# Writes results/bench-<gpu name>.json and prints the table: the baseline (NCHW fp32, per-image DataLoader,
# pinned host batches) and nin's engine (bf16 autocast, channels_last, data resident on the GPU), eager and
# torch.compile'd for training, and every inference variant including torch.compile. The table names the card;
# `seconds_per_cifar10_epoch` is 50,000 images at nin's training rate.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export NIN_DATA=${NIN_DATA:-$(cd .. && pwd)/shared/data}
if [ -n "${DATA_PARTS:-}" ]; then
    "$PYTHON" experiments/pack_data.py unpack "$DATA_PARTS" "$NIN_DATA"
fi
mkdir -p results
gpu=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
for mode in eager compiled; do
    flags=(--device cuda --steps 50 --warmup 10 --compile --json)
    [ "$mode" = compiled ] && flags+=(--compile-train --warmup 20)
    "$PYTHON" -m nin bench "${flags[@]}" > "results/bench-$gpu-$mode.json"
    "$PYTHON" -c "import json, sys; from nin.tools.bench import report; print(report(json.load(open(sys.argv[1]))))" \
        "results/bench-$gpu-$mode.json"
done
