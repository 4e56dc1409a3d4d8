"""Does computing Jacobians along the layer chain change what the default finds?

Solves one batch with the default (schedule "portfolio") twice, Jacobians along the
generator's layer chain (surfing.dual) and with torch.func (surfing.lm.LAYER_CHAIN off), and
prints per way: success (||x - x*|| < 0.01), generator evaluations per target, wall seconds;
then how many targets ended in different places (||x_chain - x_func|| > 1e-3) and how many
were fitted by one way only. The two Jacobians differ by float rounding (~1e-7 relative), so
a Levenberg–Marquardt path may branch on a near tie; the counts say how often that mattered.

    python bench/chain_agreement.py --model dcgan-k10 --m 0 50 --targets 300 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

import surfing.lm
from models_store import ModelStore, default_store_root
from surfing.measure import gaussian_matrix
from surfing.solvers import surf, uniform_latents
from surfing.trajectory import Generators, final_generator

SUCCESS = 0.01
APART = 1e-3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--models-dir")
    p.add_argument("--m", type=int, nargs="+", default=[0, 50], help="0 = A = I")
    p.add_argument("--targets", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = args.models_dir or default_store_root()
    store = ModelStore(root)
    manifest = store.manifest(args.model)
    k = manifest.latent_dim
    G = final_generator(store, args.model)
    x_star = uniform_latents(args.targets, k, args.seed)
    x_init = uniform_latents(args.targets, k, args.seed + 1)
    with torch.no_grad():
        y = G(x_star).flatten(1)
    print(f"{args.model}, {args.targets} targets, {args.threads} threads")
    for m in args.m:
        A = gaussian_matrix(args.seed + 2, m, manifest.n_pixels) if m else None
        b = y if A is None else y @ A.T
        ends, hits = {}, {}
        for name, flag in (("chain", True), ("torch.func", False)):
            surfing.lm.LAYER_CHAIN = flag
            t0 = time.perf_counter()
            res = surf(Generators(ModelStore(root), args.model), b, x_init, A)
            seconds = time.perf_counter() - t0
            ends[name], hits[name] = res.x, (res.x - x_star).norm(dim=1) < SUCCESS
            print(f"m = {m or 'I'}, {name}: success {100 * float(hits[name].float().mean()):.2f} %,"
                  f" {res.evals} evals per target, {seconds:.1f} s", flush=True)  # fmt: skip
        surfing.lm.LAYER_CHAIN = True
        apart = int(((ends["chain"] - ends["torch.func"]).norm(dim=1) > APART).sum())
        only_chain = int((hits["chain"] & ~hits["torch.func"]).sum())
        only_func = int((hits["torch.func"] & ~hits["chain"]).sum())
        print(f"m = {m or 'I'}: {apart} of {args.targets} targets ended more than {APART:g} apart;"
              f" fitted by the chain only {only_chain}, by torch.func only {only_func}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
