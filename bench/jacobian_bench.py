"""Jacobian time: along the generator's layer chain (surfing.dual) against torch.func's jvp.

On a trajectory's final network, for each batch size: milliseconds per `surfing.lm.jacobian`
call with surfing.lm.LAYER_CHAIN on and off, and of a plain forward pass over the same
B(k + 1) rows (what the chain's pass costs at least). The two ways alternate call by call
and the median of --repeats is reported, so drift of a shared machine hits both alike; the
ratio is chain / torch.func in this one run. The largest difference between the two
Jacobians, relative to the largest entry, is printed too. E.g.

    python bench/jacobian_bench.py --model dcgan-k10 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import surfing.lm
from models_store import ModelStore, default_store_root
from surfing.lm import jacobian
from surfing.solvers import uniform_latents
from surfing.trajectory import final_generator


def timed(fn: Callable[..., object], *args: object) -> float:
    """Milliseconds of one call fn(*args)."""
    t0 = time.perf_counter()
    fn(*args)
    return 1e3 * (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--models-dir")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 5, 23, 100])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    store = ModelStore(args.models_dir or default_store_root())
    G = final_generator(store, args.model)
    k = store.manifest(args.model).latent_dim
    print(f"{args.model}, k = {k}, {args.threads} threads, median of {args.repeats} calls (ms)")
    print("| targets | torch.func | layer chain | ratio | forward of B(k+1) rows | max rel diff |")
    print("|---|---|---|---|---|---|")
    for B in args.batches:
        x = uniform_latents(B, k, seed=B)
        rows = x.repeat(k + 1, 1)
        times: dict[str, list[float]] = {"func": [], "chain": [], "forward": []}
        with torch.no_grad():
            for flag in (False, True):  # warm both paths
                surfing.lm.LAYER_CHAIN = flag
                jacobian(G, x, None)
            for _ in range(args.repeats):
                for name, flag in (("func", False), ("chain", True)):
                    surfing.lm.LAYER_CHAIN = flag
                    times[name].append(timed(jacobian, G, x, None))
                times["forward"].append(timed(G, rows))
            surfing.lm.LAYER_CHAIN = False
            _, J_func = jacobian(G, x, None)
            surfing.lm.LAYER_CHAIN = True
            _, J_chain = jacobian(G, x, None)
        diff = float((J_chain - J_func).abs().max() / J_func.abs().max())
        med = {name: statistics.median(v) for name, v in times.items()}
        print(f"| {B} | {med['func']:.1f} | {med['chain']:.1f} | "
              f"{med['chain'] / med['func']:.2f} | {med['forward']:.1f} | {diff:.1e} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
