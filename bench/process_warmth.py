"""Benchmark: does a process run direct Adam faster after it has run Levenberg–Marquardt?

surf_bench's rows all run in one process, the direct-Adam baseline first. Session 12 found
that Adam's 60-step probe runs slower in a fresh process than after an LM solve (the same
batch, the same machine), so a baseline measured first was slower than it would be in the
process state of the rows after it. This prints the probe's time fresh, after 300 Adam
steps, and after a 2-iteration LM solve. Not a timed test; e.g.

    python bench/process_warmth.py --model dcgan-k10 --threads 2
"""

from __future__ import annotations

import argparse

import torch
from surf_bench import PROBE_STEPS, probe

from models_store import ModelStore, default_store_root
from surfing.lm import levenberg_marquardt
from surfing.solvers import direct, uniform_latents
from surfing.trajectory import final_generator


def probes(G: torch.nn.Module, b: torch.Tensor, x: torch.Tensor, n: int) -> list[float]:
    """n of surf_bench's probes in a row, in seconds."""
    return [round(probe(G, b, x, None), 2) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dcgan-k10")
    ap.add_argument("--targets", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = ModelStore(default_store_root())
    G = final_generator(store, args.model, torch.device("cpu"))
    k = store.manifest(args.model).latent_dim
    x_star, x_init = uniform_latents(args.targets, k, 0), uniform_latents(args.targets, k, 1)
    with torch.no_grad():
        b = G(x_star).flatten(1)
    print(f"{args.model}, {args.targets} targets, A = I, {args.threads} threads: "
          f"{PROBE_STEPS}-step direct-Adam probe, seconds")  # fmt: skip
    print("fresh process:           ", probes(G, b, x_init, args.repeat))
    direct(G, b, x_init, steps=300)
    print("after 300 Adam steps:    ", probes(G, b, x_init, args.repeat))
    levenberg_marquardt(G, x_init, b, None, max_iters=2)
    print("after a 2-iteration LM:  ", probes(G, b, x_init, args.repeat))


if __name__ == "__main__":
    main()
