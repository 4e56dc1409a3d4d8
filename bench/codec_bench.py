"""Storage benchmark: bytes on disk and load-and-decode time per checkpoint, fp32 vs. a
compressed copy, plus the decoded weights' worst error relative to the stated bound.

    python bench/codec_bench.py --model dcgan-k10 --compressed dcgan-k10-q
"""

from __future__ import annotations

import argparse
import time

import safetensors.torch
import torch

from models_store import ModelStore, default_store_root
from models_store.codec import max_error


def load_time(store: ModelStore, model_id: str) -> float:
    """Seconds per checkpoint to stream the whole trajectory (read, hash-check, decode), on the
    consumer side with prefetch off so the number is the full cost, not the overlapped one."""
    t0 = time.perf_counter()
    n = sum(1 for _ in store.checkpoints(model_id, prefetch=False))
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--compressed", required=True)
    p.add_argument("--models-dir")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    store = ModelStore(args.models_dir or default_store_root())
    raw_m, comp_m = store.manifest(args.model), store.manifest(args.compressed)
    raw_b = sum(c.bytes for c in raw_m.checkpoints)
    comp_b = sum(c.bytes for c in comp_m.checkpoints)
    worst, worst_rel = 0.0, 0.0
    for a, b in zip(store.checkpoints(args.model), store.checkpoints(args.compressed), strict=True):
        raw = safetensors.torch.load_file(
            store.path(args.compressed) / comp_m.checkpoints[a.index].file
        )
        bounds = max_error(comp_m, raw)
        for name, w in a.tensors.items():
            err = float((b.tensors[name].double() - w.double()).abs().max()) if w.numel() else 0.0
            if name in bounds:
                worst = max(worst, err / bounds[name])
                worst_rel = max(worst_rel, err / max(float(w.abs().max()), 1e-12))
            elif err != 0.0:
                raise AssertionError(f"{name} at {a.index} should be exact, error {err}")
    t_raw, t_comp = load_time(store, args.model), load_time(store, args.compressed)
    print("| trajectory | checkpoints | MB on disk | fraction of fp32 | load+decode ms/ckpt |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.model} (fp32) | {len(raw_m.checkpoints)} | {raw_b / 1e6:.1f} | 1.000 | "
        f"{1000 * t_raw:.1f} |"
    )
    print(
        f"| {args.compressed} ({comp_m.encoding}) | {len(comp_m.checkpoints)} | "
        f"{comp_b / 1e6:.1f} | {comp_b / raw_b:.3f} | {1000 * t_comp:.1f} |"
    )
    print(
        f"\nworst |decoded - original| / stated bound: {worst:.4f} (must be <= 1); "
        f"worst error relative to the tensor's max |w|: {worst_rel:.4f}"
    )


if __name__ == "__main__":
    main()
