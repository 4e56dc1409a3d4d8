"""Benchmark: how much of a surfing pass waits for checkpoints, by number of parallel readers.

On a GPU a surfing stage of the default schedule takes ~28 ms (300 targets, H100) while the
host threads only wait for kernels; the checkpoint pipeline (read + sha256 + parse + decode,
~35-50 ms per 26 MB checkpoint on one core) must keep ahead of that. This streams a stored
trajectory through `surfing.trajectory.Generators` while the "solver" sleeps `--stage-ms`
per checkpoint (a GPU-bound solver leaves the CPU free, like a sleep), and prints the wait
share for each reader count. Not a timed test; e.g.

    python bench/stream_bench.py --model dcgan-k10 --stage-ms 28 --readers 1 2 4
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from models_store import ModelStore, default_store_root
from surfing.trajectory import Generators, checkpoint_generator, meta_generator


def one_pass(store: ModelStore, model_id: str, stage_s: float, readers: int) -> tuple[float, float]:
    """(wall seconds, seconds spent waiting in next()) of one pass over the trajectory."""
    wait, t0 = 0.0, time.perf_counter()
    it = iter(Generators(store, model_id, readers=readers))
    while True:
        w0 = time.perf_counter()
        if next(it, None) is None:
            break
        wait += time.perf_counter() - w0
        time.sleep(stage_s)
    return time.perf_counter() - t0, wait


def module_ms(store: ModelStore, model_id: str, repeats: int = 72) -> float:
    """Milliseconds to give one loaded checkpoint its own module (what the stream does per
    stage since the fix of issue 12), on the consumer thread: part of the wait below."""
    arch = store.manifest(model_id).arch
    tensors, template = store.load(model_id, 0), meta_generator(arch)
    t0 = time.perf_counter()
    for _ in range(repeats):
        checkpoint_generator(arch, tensors, template)
    return 1e3 * (time.perf_counter() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--models-dir")
    p.add_argument("--stage-ms", type=float, nargs="+", default=[28.0])
    p.add_argument("--readers", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args()
    torch.set_num_threads(1)
    store = ModelStore(args.models_dir or default_store_root())
    n = len(store.manifest(args.model).checkpoints)
    mb = sum(c.bytes for c in store.manifest(args.model).checkpoints) / 1e6
    print(f"{args.model}: {n} checkpoints, {mb:.0f} MB; {os.cpu_count()} CPU cores")
    one_pass(store, args.model, 0.0, 1)  # warm the page cache: measure the pipeline, not disk
    print(f"a module per checkpoint (no copy): {module_ms(store, args.model):.2f} ms")
    print("\n| stage ms | readers | wall s | waiting s | wait % of wall | ms per checkpoint |")
    print("|---|---|---|---|---|---|")
    for stage_ms in args.stage_ms:
        for readers in args.readers:
            wall, wait = one_pass(store, args.model, stage_ms / 1e3, readers)
            print(
                f"| {stage_ms:g} | {readers} | {wall:.2f} | {wait:.2f} | "
                f"{100 * wait / wall:.1f} | {1e3 * wall / n:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
