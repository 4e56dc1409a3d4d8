"""Recorder overhead: milliseconds per recorded checkpoint vs. one training step, per generator.

    python bench/record_bench.py [--steps 20] [--threads 1] [--dir /tmp]

The training step is one real DCGAN step of this project (surfing.train.Method: discriminator
and generator updates, batch 64, random images), so the ratio says what recording costs a
loop like ours. Each recorded checkpoint is a `rec.step` that saves (every=1): state_dict copy
to CPU float32, safetensors serialisation, SHA-256, atomic write with fsync, manifest rewrite.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator

import torch

from models_store import ModelStore
from surfing.architectures import build_generator
from surfing.record import TrajectoryRecorder
from surfing.train import Method, TrainConfig

ARCHS = {
    "paper InfoGAN (k=10, width 1.0)": {"kind": "infogan", "latent_dim": 10, "width": 1.0},
    "small InfoGAN (k=10, width 0.25)": {"kind": "infogan", "latent_dim": 10, "width": 0.25},
}


def random_batches(batch_size: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.rand(batch_size, 1, 28, 28, generator=g)


def bench(name: str, arch: dict, steps: int, root: str) -> dict[str, float]:
    torch.manual_seed(0)
    G = build_generator(arch)
    cfg = TrainConfig(method="dcgan", latent_dim=arch["latent_dim"], width=arch["width"])
    method = Method(cfg, G, torch.device("cpu"))
    data = random_batches(cfg.batch_size)
    for _ in range(3):  # warm-up: allocator, kernels, first Adam state
        method.step(data)
    train_s, record_s = [], []
    store = ModelStore(root)
    with TrajectoryRecorder(store, name.split()[0], G, every=1, arch=arch, overwrite=True) as rec:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            method.step(data)
            t1 = time.perf_counter()
            assert rec.step(step)
            t2 = time.perf_counter()
            train_s.append(t1 - t0)
            record_s.append(t2 - t1)
    params = sum(p.numel() for p in G.parameters())
    mb = rec.manifest.checkpoints[-1].bytes / 1e6
    return {
        "params": params,
        "mb": mb,
        "train_ms": 1000 * statistics.median(train_s),
        "record_ms": 1000 * statistics.median(record_s),
        "record_max_ms": 1000 * max(record_s),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="training steps (each one recorded)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", help="folder for the temporary store (default: system temp)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} steps, medians")
    print(
        "| generator | parameters | MB/ckpt | train step ms | record ms | record max ms "
        "| record / step | overhead at every=40 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, arch in ARCHS.items():
        with tempfile.TemporaryDirectory(dir=args.dir) as root:
            r = bench(name, arch, args.steps, root)
        ratio = r["record_ms"] / r["train_ms"]
        print(
            f"| {name} | {r['params']:,} | {r['mb']:.1f} | {r['train_ms']:.1f} | "
            f"{r['record_ms']:.1f} | {r['record_max_ms']:.1f} | {ratio:.2f} | "
            f"{100 * ratio / 40:.2f} % |"
        )


if __name__ == "__main__":
    main()
