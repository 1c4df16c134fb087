#!/usr/bin/env bash
# The paper-recipe reproduction on one GPU, in pieces of at most 10 minutes. Not yet run on a GPU
# (written and smoke-tested on a CPU with tiny settings only; see docs/reproduce.md).
#
#   experiments/gpu_reproduce.sh                              # every paper experiment, until all are done
#   BUDGET_S=540 experiments/gpu_reproduce.sh table4 table1   # one 9-minute slot; run it again to go on (exit 3)
#   DEVICE=cpu PIECE_S=20 EXTRA="--epochs 1 --train-subset 4096" experiments/gpu_reproduce.sh fast-mnist   # smoke test
#
# For each run that `nin reproduce EXPERIMENT --dry-run` prints: the first piece is
#   timeout $PIECE_S python -m nin train ... --checkpoint-every $CHECKPOINT_EVERY
# and every later piece is
#   timeout $PIECE_S python -m nin train --resume RUN --device cuda
# until RUN/model.safetensors exists; then `nin reproduce record` writes results/<name>.json and
# weights/<name>.safetensors (evaluating the weights again). A piece killed by its timeout loses at most
# CHECKPOINT_EVERY steps, so the script can be stopped and started again at any moment.
#
# Environment:
#   NIN_DATA          data root (default: ../shared/data beside the checkout)
#   DATA_PARTS        a folder made by `experiments/pack_data.py pack DATA_ROOT DATA_PARTS` (parts of <= 60 MiB):
#                     checked and unpacked into NIN_DATA first, once
#   RUNS              run folders (default: runs)
#   DEVICE            cuda (default) or cpu
#   PIECE_S           seconds per piece (default 570, so that a piece ends inside 10 minutes)
#   BUDGET_S          start no piece after this many seconds of this invocation (default 0: no limit);
#                     exit status 3 means "not finished yet: run me again"
#   CHECKPOINT_EVERY  optimizer steps between mid-epoch checkpoints (default 500)
#   EXTRA             more `nin reproduce` flags for every experiment, e.g. "--epochs 2 --train-subset 512"
#   RESULTS_DIR, WEIGHTS_DIR, REPORT   where records, weights copies and RESULTS.md go (default: results, weights, RESULTS.md)
#   PYTHON            the interpreter with nin installed (default: python)
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export NIN_DATA=${NIN_DATA:-$(cd .. && pwd)/shared/data}
RUNS=${RUNS:-runs}
DEVICE=${DEVICE:-cuda}
PIECE_S=${PIECE_S:-570}
BUDGET_S=${BUDGET_S:-0}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-500}
RESULTS_DIR=${RESULTS_DIR:-results}
WEIGHTS_DIR=${WEIGHTS_DIR:-weights}
REPORT=${REPORT:-RESULTS.md}
EXPERIMENTS=("$@")
[ ${#EXPERIMENTS[@]} -eq 0 ] && EXPERIMENTS=(table4 table1 table1-aug table5 table2 table3)
export PYTHONUNBUFFERED=1
start=$SECONDS

log() { echo "gpu_reproduce: $*"; }

if [ -n "${DATA_PARTS:-}" ]; then
    marker="$NIN_DATA/.unpacked-$(sha256sum "$DATA_PARTS/manifest.json" | cut -c1-16)"
    if [ ! -f "$marker" ]; then
        log "unpacking $DATA_PARTS into $NIN_DATA"
        "$PYTHON" experiments/pack_data.py unpack "$DATA_PARTS" "$NIN_DATA" || exit 1
        touch "$marker"
    fi
fi

gpu_flag=(); resume_device=(--device "$DEVICE")
[ "$DEVICE" = cuda ] && gpu_flag=(--gpu)
read -r -a extra <<< "${EXTRA:-}"

# Seconds the next piece may take, or nothing when the budget is spent (60 s kept for recording).
piece_seconds() {
    if [ "$BUDGET_S" -le 0 ]; then echo "$PIECE_S"; return; fi
    local left=$((BUDGET_S - (SECONDS - start) - 60))
    [ "$left" -ge 60 ] && echo $((left < PIECE_S ? left : PIECE_S))
}

failed=(); unfinished=0
for experiment in "${EXPERIMENTS[@]}"; do
    commands=$("$PYTHON" -m nin reproduce "$experiment" --dry-run --out-root "$RUNS" "${gpu_flag[@]}" "${extra[@]}") \
        || { failed+=("$experiment"); continue; }
    while IFS= read -r line; do
        eval "words=($line)"           # shlex-quoted by nin reproduce: safe to split this way
        args=("${words[@]:1}")         # drop the leading "nin"
        run=""
        for ((i = 0; i < ${#args[@]}; i++)); do [ "${args[i]}" = --out ] && run=${args[i + 1]}; done
        name=$(basename "$run")
        stalls=0
        while [ ! -f "$run/model.safetensors" ]; do
            before=$(stat -c %Y "$run/checkpoint.safetensors" 2>/dev/null || echo none)
            seconds=$(piece_seconds)
            if [ -z "$seconds" ]; then log "budget spent; $name is not finished: run me again"; unfinished=1; break 3; fi
            if [ -f "$run/checkpoint.safetensors" ]; then
                log "$name: resume for up to ${seconds}s"
                timeout --kill-after=30 "$seconds" "$PYTHON" -m nin train --resume "$run" "${resume_device[@]}" </dev/null
            else
                log "$name: start for up to ${seconds}s: $line --checkpoint-every $CHECKPOINT_EVERY"
                timeout --kill-after=30 "$seconds" "$PYTHON" -m nin "${args[@]}" --checkpoint-every "$CHECKPOINT_EVERY" </dev/null
            fi
            status=$?
            if [ $status -ne 0 ] && [ $status -ne 124 ] && [ $status -ne 137 ]; then
                log "$name: nin train failed (status $status); going on with the next run"; failed+=("$name"); continue 2
            fi
            # A piece must outlast start-up plus the longest stretch between checkpoints (an epoch's evaluation)
            after=$(stat -c %Y "$run/checkpoint.safetensors" 2>/dev/null || echo none)
            if [ $status -ne 0 ] && [ "$after" = "$before" ]; then
                stalls=$((stalls + 1))
                if [ $stalls -ge 2 ]; then
                    log "$name: two pieces without a new checkpoint: PIECE_S=$PIECE_S is too short"; failed+=("$name"); continue 2
                fi
            else
                stalls=0
            fi
        done
        [ -f "$RESULTS_DIR/$name.json" ] && [ "$RESULTS_DIR/$name.json" -nt "$run/model.safetensors" ] && continue
        "$PYTHON" -m nin reproduce record "$run" --name "$name" --device "$DEVICE" \
            --results-dir "$RESULTS_DIR" --weights-dir "$WEIGHTS_DIR" </dev/null || failed+=("$name")
    done <<< "$commands"
done

"$PYTHON" -m nin reproduce report --results-dir "$RESULTS_DIR" --output "$REPORT"
log "$((SECONDS - start)) s"
[ ${#failed[@]} -gt 0 ] && { log "failed: ${failed[*]}"; exit 1; }
[ $unfinished -eq 1 ] && exit 3
log "all done"
exit 0
