"""GPU benchmark: one direct-Adam step of the InfoGAN generator, eager vs. CUDA graph vs.
torch.compile, at small and large batch, with achieved FLOP/s as a share of measured matmul.

A one-target job on a GPU is launch-bound: each Adam step is ~30 small kernels whose launch
cost dwarfs their arithmetic. Replaying the whole step (forward, backward, Adam update) as one
captured CUDA graph removes the launches (`direct(..., graphs=True)`, surfing.graphs);
`torch.compile(mode="reduce-overhead")` does the same through Inductor's cudagraph trees. This
measures both against the eager solver (`surfing.solvers.direct`), checks they compute the
same latents, and prints one table. Not a
timed test: run it by hand on a machine with CUDA, e.g.

    python bench/gpu_bench.py --batches 1 10 100 300 --steps 400
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from surf_bench import generator_flops

from surfing.nets import InfoGANGenerator
from surfing.solvers import direct, uniform_latents
from surfing.trajectory import frozen


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """fn(*args, **kwargs) and its wall time, the GPU queue drained on both sides."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def matmul_peak(tf32: bool, n: int = 8192) -> float:
    """Best FLOP/s of a few n^3 fp32 products (TF32 tensor cores if `tf32`)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
    best = float("inf")
    for _ in range(6):
        best = min(best, timed(torch.matmul, a, b)[1])
    torch.backends.cuda.matmul.allow_tf32 = before
    return 2.0 * n**3 / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent-dim", type=int, default=10)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 10, 100, 300])
    p.add_argument("--steps", type=int, default=400, help="Adam steps timed per variant")
    p.add_argument("--compile-batches", type=int, nargs="*", default=[1])
    p.add_argument("--lr", type=float, default=0.01)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench.py needs a CUDA device")

    fp32, tf32 = matmul_peak(False), matmul_peak(True)
    print(
        f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; matmul 8192^3 "
        f"fp32 {fp32 / 1e12:.1f} TFLOP/s, tf32 {tf32 / 1e12:.1f} TFLOP/s; cudnn conv tf32 "
        f"{torch.backends.cudnn.allow_tf32}, matmul tf32 {torch.backends.cuda.matmul.allow_tf32}",
        flush=True,
    )
    torch.manual_seed(0)
    G = frozen(InfoGANGenerator(args.latent_dim).cuda())  # weights do not change the FLOPs
    per_latent = 2 * generator_flops(G)  # forward + backward w.r.t. the latent
    compiled = torch.compile(G, mode="reduce-overhead")

    rows = []
    for B in args.batches:
        x_star = uniform_latents(B, args.latent_dim, 0, "cuda")
        x0 = uniform_latents(B, args.latent_dim, 1, "cuda")
        with torch.no_grad():
            b = G(x_star).flatten(1)
        direct(G, b, x0, steps=5, lr=args.lr)  # warm-up (cuDNN algorithm choice)
        eager, t_eager = timed(direct, G, b, x0, steps=args.steps, lr=args.lr)
        direct(G, b, x0, steps=5, lr=args.lr, graphs=True)  # warm-up: allocator, capture
        graphed, t_graph = timed(direct, G, b, x0, steps=args.steps, lr=args.lr, graphs=True)
        diff = float((graphed.x - eager.x).abs().max())
        t_comp, comp_diff, t_first = float("nan"), float("nan"), float("nan")
        if B in args.compile_batches:
            try:
                _, t_first = timed(direct, compiled, b, x0, steps=5, lr=args.lr)
                comp, t_comp = timed(direct, compiled, b, x0, steps=args.steps, lr=args.lr)
                comp_diff = float((comp.x - eager.x).abs().max())
            except Exception as err:  # report, do not hide: the table says it failed
                print(f"  torch.compile failed at batch {B}: {type(err).__name__}: {err}")
        ms = [1e3 * t / args.steps for t in (t_eager, t_graph, t_comp)]
        rows.append((B, ms, diff, comp_diff, t_first))
        print(
            f"  batch {B}: eager {ms[0]:.3f} ms/step, graph {ms[1]:.3f}, compiled {ms[2]:.3f} "
            f"(first call {t_first:.1f} s); max |x_graph - x_eager| {diff:.1e}, "
            f"compiled {comp_diff:.1e}",
            flush=True,
        )

    print(f"\n### direct Adam step on the GPU, k = {args.latent_dim}, {args.steps} steps\n")
    print(
        "| batch | eager ms/step | CUDA graph ms/step | torch.compile ms/step | graph speed-up | "
        "eager FLOP/s % of fp32 matmul | graph FLOP/s % of fp32 | graph % of tf32 | "
        "max abs x diff graph / compiled |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for B, (e, g, c), diff, comp_diff, _ in rows:
        flops = per_latent * B
        print(
            f"| {B} | {e:.3f} | {g:.3f} | {c:.3f} | {e / g:.1f}x | "
            f"{100 * flops / (e / 1e3) / fp32:.1f} | {100 * flops / (g / 1e3) / fp32:.1f} | "
            f"{100 * flops / (g / 1e3) / tf32:.1f} | {diff:.1e} / {comp_diff:.1e} |"
        )
    one = rows[0]
    big = rows[-1]
    print(
        f"\nthroughput per target, batch {big[0]} vs batch {one[0]}: eager "
        f"{big[0] * one[1][0] / big[1][0]:.0f}x, graph {big[0] * one[1][1] / big[1][1]:.0f}x",
        flush=True,
    )


if __name__ == "__main__":
    main()
