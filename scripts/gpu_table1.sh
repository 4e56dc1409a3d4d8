#!/usr/bin/env bash
# The paper's full Table 1 on a GPU: train VAE, DCGAN, WGAN and WGAN-GP trajectories for
# k in {5, 10, 20} (checkpoint every 40 steps) and run 300 trials of surf / Adam / Adam with
# restarts on each. One trajectory at a time is kept on disk (20 epochs at every=40 is about
# 470 checkpoints = 12 GB in fp32): train -> table1 row -> delete.
# Usage: bash scripts/gpu_table1.sh [EPOCHS] [TRIALS]   (results in docs/results/gpu/)
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-20}
TRIALS=${2:-300}
OUT=docs/results/gpu
export SURFING_MODELS_DIR=${SURFING_MODELS_DIR:-data/gpu-models}
mkdir -p "$OUT"
for method in vae dcgan wgan wgan-gp; do
  for k in 5 10 20; do
    id="gpu-$method-k$k"
    surfing models show "$id" >/dev/null 2>&1 ||
      surfing train --method "$method" --latent-dim "$k" --epochs "$EPOCHS" --every 40 --id "$id" \
        --samples "$OUT/samples-$id.png"
    surfing experiment table1 --models "$id" --trials "$TRIALS" --fast --merge \
      --out "$OUT" --results-md "$OUT/table1.md"
    rm -rf "${SURFING_MODELS_DIR:?}/$id"
  done
done
cat "$OUT/table1.md"
