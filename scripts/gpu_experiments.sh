#!/usr/bin/env bash
# Full-size reproduction of the paper's experiments (issue 4) on one GPU, in a fixed time.
#
# Trains the trajectories (VAE, DCGAN, WGAN, WGAN-GP x k = 5, 10, 20, plus a k = 2 VAE for
# Fig 1), then runs the experiments in parallel lanes on the one GPU: at these sizes every
# solver is launch-bound (tiny kernels), so several processes share one GPU well. Every
# command runs under a deadline (DEADLINE seconds after the start), so the script always ends
# on time and reports whatever finished; a lane that ran out of time says so in its log.
# Writes CSV/PNG and per-lane markdown under $RESULTS (default out/gpu, git-ignored) and never edits
# docs/results.md; with TARBALL=path it also packs them (logs included) into one .tgz at the end. Trajectories go to $MODELS (~25 GB; tmpfs when it has room).
#
#   scripts/gpu_experiments.sh                               # everything, 480 s
#   DEADLINE=1200 scripts/gpu_experiments.sh                 # more time, same work
#   DEVICE=cpu TRAIN_ARGS="--max-steps 8 --width 0.125" TRIALS=4 CS_TRIALS=4 BENCH=0 \
#       KS=10 METHODS=dcgan scripts/gpu_experiments.sh       # plumbing check without a GPU
#
# Lanes (each starts once the trajectories it needs are trained):
#   bench     bench/gpu_bench.py (alone, before training) and bench/surf_bench.py on dcgan-k10
#   t1a, t1b  Table 1 (surf paper / Adam / Adam x R / surf default), TRIALS per model
#   fig3/fig4 compressed sensing on the k = 20 DCGAN and WGAN, CS_TRIALS per m
#   base      compute-matched baselines on the k = 10 models, then Fig 1 on vae-k2
#   fig2      Figs 2/5 at the end, from Table 1's per-trial distances (no new solves)
set -uo pipefail
cd "$(dirname "$0")/.."

DEADLINE=${DEADLINE:-480}
EPOCHS=${EPOCHS:-3}
KS=${KS:-"5 10 20"}
METHODS=${METHODS:-"dcgan wgan wgan-gp vae"}
TRIALS=${TRIALS:-300}
CS_TRIALS=${CS_TRIALS:-200}
DEVICE=${DEVICE:-cuda}
BENCH=${BENCH:-1}
PARALLEL_TRAIN=${PARALLEL_TRAIN:-7}
TRAIN_ARGS=${TRAIN_ARGS:-}
RESULTS=${RESULTS:-out/gpu}  # git-ignored; not named OUT, which some machines' tools set
if [ -z "${MODELS:-}" ]; then
    shm_free=$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1 || echo 0)
    MODELS=$([ "${shm_free:-0}" -gt 40 ] && echo /dev/shm/surfing-models || echo /tmp/surfing-models)
fi
export SURFING_MODELS_DIR=$MODELS OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOGS=$RESULTS/logs
mkdir -p "$RESULTS" "$LOGS" "$MODELS"
END=$((SECONDS + DEADLINE))

# A bare GPU machine has torch but not this package installed: run the CLI from the checkout
# (a file on PATH, not a shell function, so that `timeout` can run it).
if ! command -v surfing >/dev/null; then
    mkdir -p "$LOGS/bin"
    printf '#!/bin/sh\nexec python3 -m surfing.cli "$@"\n' >"$LOGS/bin/surfing"
    chmod +x "$LOGS/bin/surfing"
    PATH="$(cd "$LOGS/bin" && pwd):$PATH"
fi

stamp() { echo "=== +${SECONDS}s $*"; }
left() { echo $((END - SECONDS)); }

# run LANE CMD...: CMD under the deadline, output appended to the lane's log.
run() {
    local lane=$1 t
    shift
    t=$(left)
    if [ "$t" -le 5 ]; then
        echo "deadline: skipped $*" | tee -a "$LOGS/$lane.log"
        return 1
    fi
    echo "+ $*" >>"$LOGS/$lane.log"
    timeout -k 5 "$t" "$@" >>"$LOGS/$lane.log" 2>&1
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "deadline: stopped $*" | tee -a "$LOGS/$lane.log"
    elif [ $rc -ne 0 ]; then
        echo "FAILED ($rc): $* (see $LOGS/$lane.log)"
    fi
    return $rc
}

# need ID...: wait until those trajectories are trained (false if one failed or time ran out).
need() {
    local id
    for id in "$@"; do
        while [ ! -e "$LOGS/ready-$id" ]; do
            [ -e "$LOGS/failed-$id" ] && return 1
            [ "$(left)" -le 5 ] && return 1
            sleep 2
        done
    done
}

every_for() { case $1 in wgan*) echo 10 ;; *) echo 40 ;; esac; }  # WGANs: 5 critic steps each

train_one() {
    local id=$1 method=${1%-k*} k=${1##*-k}
    if surfing models show "$id" >/dev/null 2>&1 ||
        run "train-$id" surfing train --method "$method" --latent-dim "$k" --epochs "$EPOCHS" \
            --every "$(every_for "$method")" --id "$id" --device "$DEVICE" $TRAIN_ARGS; then
        touch "$LOGS/ready-$id"
        stamp "trained $id"
    else
        touch "$LOGS/failed-$id"
        stamp "training $id failed (log: $LOGS/train-$id.log)"
    fi
}

stamp "start: device $DEVICE, deadline ${DEADLINE}s, models in $MODELS"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

# 0. The kernel-level GPU benchmark first, alone on the GPU (it needs no trajectory).
if [ "$BENCH" = 1 ] && [ "$DEVICE" = cuda ]; then
    stamp "bench/gpu_bench.py"
    run bench timeout 90 python3 bench/gpu_bench.py --steps 300
fi

# 1. Trajectories, the ones the lanes need first at the front of the queue.
ids=()
for k in $KS; do for m in $METHODS; do ids+=("$m-k$k"); done; done
first=(dcgan-k10 dcgan-k20 wgan-k20)
order=()
for id in "${first[@]}" "${ids[@]}"; do
    [[ " ${ids[*]} " == *" $id "* ]] && [[ " ${order[*]} " != *" $id "* ]] && order+=("$id")
done
[[ " $METHODS " == *" vae "* ]] && order+=(vae-k2)
(
    for id in "${order[@]}"; do
        while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL_TRAIN" ]; do sleep 1; done
        train_one "$id" &
    done
    wait
) &

# 2. The experiment lanes.
has() { [[ " ${order[*]} " == *" $1 "* ]]; }
k10=()
for m in $METHODS; do has "$m-k10" && k10+=("$m-k10"); done
cs=()
for id in dcgan-k20 wgan-k20; do has "$id" && cs+=("$id"); done
[ ${#cs[@]} -eq 0 ] && cs=("${k10[@]:0:1}")
t1=("${order[@]/vae-k2/}")

if [ "$BENCH" = 1 ] && has dcgan-k10; then
    (need dcgan-k10 && run bench python3 bench/surf_bench.py --device "$DEVICE" \
        --model dcgan-k10 --targets "$TRIALS" --m 0 50 --variants paper auto \
        --batch-targets "$TRIALS" --single-jobs 5) &
fi
table1_lane() {
    local lane=$1 id
    shift
    for id in "$@"; do
        [ -n "$id" ] || continue
        need "$id" || continue
        run "$lane" surfing experiment table1 --models "$id" --trials "$TRIALS" --fast --merge \
            --device "$DEVICE" --out "$RESULTS/$lane" --results-md "$RESULTS/$lane/results.md" &&
            stamp "table1 $id done"
    done
}
t1a=() t1b=()  # alternate, so both lanes get models from the front of the training queue
for i in "${!t1[@]}"; do
    if ((i % 2)); then t1b+=("${t1[$i]}"); else t1a+=("${t1[$i]}"); fi
done
table1_lane t1a "${t1a[@]}" &
table1_lane t1b "${t1b[@]}" &
for fig in fig3 fig4; do
    (need "${cs[@]}" && run "$fig" surfing experiment "$fig" --models "${cs[@]}" \
        --trials "$CS_TRIALS" --batch "$CS_TRIALS" --every-steps 100 --schedule auto \
        --no-progress --device "$DEVICE" --out "$RESULTS/$fig" --results-md "$RESULTS/$fig/results.md" &&
        stamp "$fig done") &
done
(
    if need "${k10[@]}"; then
        run base surfing experiment baselines --models "${k10[@]}" --trials "$TRIALS" \
            --no-progress --device "$DEVICE" --out "$RESULTS/base" \
            --results-md "$RESULTS/base/results.md" && stamp "baselines done"
    fi
    if has vae-k2 && need vae-k2; then
        run base surfing experiment fig1 --model vae-k2 --no-progress --device "$DEVICE" \
            --out "$RESULTS/base" --results-md "$RESULTS/base/results.md" && stamp "fig1 done"
    fi
) &

wait

# 3. Figs 2/5 from Table 1's per-trial distances (no solving: seconds, so past the deadline).
trials=("$RESULTS"/t1*/table1_trials_*.csv)
if [ -e "${trials[0]}" ]; then
    awk 'FNR > 1 || NR == 1' "${trials[@]}" >"$RESULTS/table1_trials.csv"
    done_ids=$(for f in "${trials[@]}"; do f=${f##*/table1_trials_}; printf '%s ' "${f%.csv}"; done)
    END=$((SECONDS + 60))
    run fig2 surfing experiment fig2 --models $done_ids --trials-csv "$RESULTS/table1_trials.csv" \
        --no-progress --device "$DEVICE" --out "$RESULTS/fig2" \
        --results-md "$RESULTS/fig2/results.md" && stamp "fig2 done"
fi
stamp "done; outputs:"
find "$RESULTS" -type f \( -name '*.csv' -o -name '*.png' -o -name '*.md' \) | sort
for f in "$RESULTS"/t1*/table1.csv; do [ -e "$f" ] && cat "$f"; done
if [ -n "${TARBALL:-}" ]; then
    tar czf "$TARBALL" --exclude=bin -C "$RESULTS" . && stamp "packed into $TARBALL"
fi
exit 0
