#!/usr/bin/env bash
# Issue 5's open GPU measurements in one call (about 5 minutes on an H100, under DEADLINE):
#   1. tests/test_graphs.py on the GPU: the captured CUDA graphs (surfing.graphs) against eager
#      solvers, while dcgan-k10 trains in the background (3 epochs, every 40 steps, as on the CPU);
#   2. bench/gpu_bench.py alone: one Adam step eager vs. graphed (the library's GraphedAdam);
#   3. bench/surf_bench.py, TF32 at PyTorch's default (cuDNN convolutions on TF32): A = I and
#      m = 50, rows paper / paper graphed / auto (= lm-stride with its rescue pass, no graph
#      path) / lm / lm graphed / portfolio (the default) / portfolio with torch.func Jacobians
#      (chain=0: what the layer chain of session 14 does on a GPU) plus the graphed baseline, and
#      the I/O share after session 3's streaming rebuild; then batching (one 300-target pass vs. one-target jobs, default);
#   4. the same A = I rows with TF32 off: the "median dist" column answers whether TF32 is why
#      GPU solutions sit ~1000x farther from x* than CPU ones (3.5e-4 vs 5.3e-7).
# Writes logs under $RESULTS (default out/gpu5, git-ignored); TARBALL=path packs them into one
# file. Never edits docs. On the device machine (which has no dataset package):
#   here:  mkdir .fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/ &&
#          echo /.fmnist/ >> .git/info/exclude
#   run:   carry [".fmnist"], command "TARBALL=$OUT/gpu5.tgz bash scripts/gpu_issue5.sh",
#          timeout_s 560 (the deadline is 420 s; the machine's start counts on top)
# Plumbing check without a GPU:
#   DEVICE=cpu TARGETS=4 SINGLES=1 TRAIN_ARGS="--max-steps 8 --width 0.125" scripts/gpu_issue5.sh
set -uo pipefail
cd "$(dirname "$0")/.."

DEADLINE=${DEADLINE:-420}
DEVICE=${DEVICE:-cuda}
TARGETS=${TARGETS:-300}
SINGLES=${SINGLES:-5}
TRAIN_ARGS=${TRAIN_ARGS:-}
RESULTS=${RESULTS:-out/gpu5}  # not named OUT, which the device tool sets
MODELS=${MODELS:-/tmp/surfing-models-gpu5}
export SURFING_MODELS_DIR=$MODELS OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
# The device machine has no dataset package: carry the .gz files in .fmnist (git-excluded).
if [ -z "${SURFING_DATA_DIR:-}" ] && [ -d .fmnist ]; then export SURFING_DATA_DIR=$PWD/.fmnist; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$RESULTS" "$MODELS"
END=$((SECONDS + DEADLINE))
stamp() { echo "=== +${SECONDS}s $*"; }

# step LOG CMD...: CMD under what is left of the deadline, output appended to $RESULTS/LOG.
step() {
    local log=$RESULTS/$1 t=$((END - SECONDS)) rc
    shift
    if [ "$t" -le 5 ]; then
        echo "deadline: skipped $*" | tee -a "$log"
        return 1
    fi
    echo "+ $*" >>"$log"
    timeout -k 5 "$t" "$@" >>"$log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || echo "FAILED or stopped ($rc): $* (see $log)"
    return $rc
}

stamp "start: device $DEVICE, deadline ${DEADLINE}s"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

if python3 -m surfing.cli models show dcgan-k10 >/dev/null 2>&1; then
    touch "$RESULTS/.trained"
else
    (step train.log python3 -m surfing.cli train --method dcgan --latent-dim 10 --epochs 3 \
        --every 40 --id dcgan-k10 --device "$DEVICE" $TRAIN_ARGS && touch "$RESULTS/.trained") &
fi
# --noconftest: the service fixtures need fastapi/pydantic, which a bare GPU image lacks
step tests.log python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_graphs.py &&
    stamp "tests passed"
wait
[ -e "$RESULTS/.trained" ] || { stamp "training failed (see $RESULTS/train.log)"; exit 1; }
stamp "dcgan-k10 ready"

if [ "$DEVICE" = cuda ]; then
    # --compile-batches with none: torch.compile failed in session 3 and costs a minute to fail
    step gpu_bench.txt python3 bench/gpu_bench.py --steps 300 --batches 1 10 100 300 \
        --compile-batches &&
        stamp "gpu_bench done"
fi
step surf_bench.txt python3 bench/surf_bench.py --device "$DEVICE" --model dcgan-k10 \
    --targets "$TARGETS" --m 0 50 --variants paper paper:graphs=1 auto lm lm:graphs=1 \
    portfolio portfolio:chain=0 --graphs &&
    stamp "surf_bench (TF32 default) done"
step batching.txt python3 bench/surf_bench.py --device "$DEVICE" \
    --model dcgan-k10 --skip-operators --batch-targets "$TARGETS" --single-jobs "$SINGLES" &&
    stamp "batching done"
step surf_bench_tf32_off.txt python3 bench/surf_bench.py --device "$DEVICE" --model dcgan-k10 \
    --targets "$TARGETS" --m 0 --variants paper auto --tf32 off && stamp "surf_bench (TF32 off) done"

stamp "done"
grep -h -A12 "^### " "$RESULTS"/*.txt 2>/dev/null
if [ -n "${TARBALL:-}" ]; then
    tar czf "$TARBALL" -C "$RESULTS" . && stamp "packed into $TARBALL"
fi
exit 0
