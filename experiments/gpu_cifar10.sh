#!/usr/bin/env bash
# The GPU check of the CIFAR-10 speed work, in one call of about 9 minutes at most: `nin bench` on the card, the
# default fast run timed alone (evaluated every epoch, so the time to each accuracy shows), then lever runs side
# by side on the same card, each at the default run's full length (accuracy only: they share the card).
#
#   experiments/gpu_cifar10.sh                        # CIFAR-10 under NIN_DATA (or DATA_PARTS, see below)
#   LEVERS="d0=--set model.dropout=0;d0s1=--set model.dropout=0 --seed 1" experiments/gpu_cifar10.sh
#   DEVICE=cpu EXTRA="--epochs 1 --train-subset 512" experiments/gpu_cifar10.sh     # smoke test on a CPU
#
# Environment:
#   NIN_DATA     data root with cifar-10-batches-bin/ and cifar-10-test-lossless-first1000/ (default ../shared/data)
#   DATA_PARTS   a folder made by `experiments/pack_data.py pack`: checked and unpacked into NIN_DATA first
#   OUT          where results go (default results/gpu): summary.txt, bench.json, runs.tar (each run's
#                config.json, metrics.csv, metrics.jsonl and log), default-model.safetensors (the default run's)
#   LEVERS       name=flags pairs separated by ';' (default: whitening init, EMA 0.999, 96 epochs); each becomes
#                `nin train --dataset cifar10 ... --out RUNS/name flags`
#   BENCH_S, DEFAULT_S, LEVER_S: seconds the bench, the default run and each lever run may take (90, 200, 230);
#                a run stopped by its limit keeps its checkpoint (RUNS/name): `nin train --resume` goes on
#   DEVICE       cuda (default) or cpu;  EXTRA: more `nin train` flags for every run (smoke tests)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NIN_DATA=${NIN_DATA:-$(cd .. && pwd)/shared/data}
OUT=${OUT:-results/gpu}
DEVICE=${DEVICE:-cuda}
LEVERS=${LEVERS:-"whiten=--set whiten_init=true;ema=--set ema_decay=0.999;long96=--epochs 96"}
LEVER_S=${LEVER_S:-230}
RUNS=${RUNS:-$(mktemp -d)}
read -r -a extra <<< "${EXTRA:-}"
mkdir -p "$OUT"
summary="$OUT/summary.txt"
say() { echo "$*" | tee -a "$summary"; }

if [ -n "${DATA_PARTS:-}" ]; then
    "$PYTHON" experiments/pack_data.py unpack "$DATA_PARTS" "$NIN_DATA" || exit 1
fi
exact="$NIN_DATA/cifar-10-test-lossless-first1000/test_batch_first1000.bin"
say "card: $("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')")"
say "torch: $("$PYTHON" -c 'import torch; print(torch.__version__)')"

# 1. nin bench on the card (the baseline port and nin's engine, training and inference)
bench_flags=(--device "$DEVICE" --steps 50 --warmup 10 --json)
[ -n "${EXTRA:-}" ] && bench_flags=(--device "$DEVICE" --quick --json)
timeout "${BENCH_S:-90}" "$PYTHON" -m nin bench "${bench_flags[@]}" > "$OUT/bench.json" 2> "$RUNS/bench.log" \
    && "$PYTHON" -c "import json, sys; from nin.tools.bench import report; print(report(json.load(open(sys.argv[1]))))" \
        "$OUT/bench.json" | tee -a "$summary" || say "bench: failed or timed out (see bench.log in runs.tar)"

train() {  # name, seconds, flags...
    local name=$1 seconds=$2; shift 2
    local start=$SECONDS
    timeout "$seconds" "$PYTHON" -m nin train --dataset cifar10 --data-dir "$NIN_DATA" --device "$DEVICE" \
        --out "$RUNS/$name" --set eval_every=1 --set "extra_eval=$exact" "$@" "${extra[@]}" > "$RUNS/$name.log" 2>&1
    local status=$?
    say "$name: exit $status after $((SECONDS - start)) s wall; $(tail -n 1 "$RUNS/$name.log")"
}

# 2. the default fast run, alone on the card (timed); every epoch evaluated on both test sets
train default "${DEFAULT_S:-200}"

# 3. levers at the default's full length, side by side on the card (not timed against each other)
IFS=';' read -r -a levers <<< "$LEVERS"
for lever in "${levers[@]}"; do
    read -r -a flags <<< "${lever#*=}"
    train "${lever%%=*}" "$LEVER_S" "${flags[@]}" &
done
wait

# 4. per run: seconds to each accuracy on both test sets, from its metrics
"$PYTHON" - "$RUNS" <<'EOF' | tee -a "$summary"
import json, sys
from pathlib import Path
for run in sorted(p for p in Path(sys.argv[1]).iterdir() if (p / "metrics.jsonl").exists()):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "test_error" in r]
    elapsed, marks = 0.0, []
    for r in rows:
        elapsed += r.get("train_time_s", 0) + r.get("eval_time_s", 0)
        marks.append((r["epoch"], elapsed, 100 - 100 * r["test_error"], 100 - 100 * r.get("extra_error", 1)))
    def first(jpeg, exact):
        hit = next((m for m in marks if m[2] >= jpeg and m[3] >= exact), None)
        return f"epoch {hit[0]} at {hit[1]:.0f} s" if hit else "not reached"
    last = marks[-1] if marks else (0, 0, 0, 0)
    best = max(marks, key=lambda m: m[2]) if marks else last
    print(f"{run.name}: {len(rows)} epochs in {last[1]:.0f} s (train + eval); last JPEG 10k {last[2]:.2f}% / exact 1k "
          f"{last[3]:.2f}%; best JPEG {best[2]:.2f}% (epoch {best[0]}); to 91.2% exact + 90.0% JPEG: "
          f"{first(90.0, 91.2)}; to 92.6% exact: {first(0, 92.6)}")
EOF
tar -C "$RUNS" -cf "$OUT/runs.tar" --exclude=checkpoint.safetensors --exclude='*/model.safetensors' . 2>/dev/null
[ -f "$RUNS/default/model.safetensors" ] && cp "$RUNS/default/model.safetensors" "$OUT/default-model.safetensors"
say "done"
