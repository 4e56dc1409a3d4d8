"""Does TF32 explain why GPU solutions sit ~1000x farther from x* than CPU ones? (CPU only.)

On the H100 the median ||x_T - x*|| of converged solutions was 3.5e-4, on the CPU 5.3e-7
(docs/performance.md). PyTorch's GPU default runs cuDNN convolutions on TF32 tensor cores
(`torch.backends.cudnn.allow_tf32 = True`; matmuls stay fp32): their inputs keep 10 of fp32's
23 mantissa bits. This bench emulates exactly that on the CPU -- the inputs and weights of the
generator's transposed convolutions rounded to TF32 on every forward pass -- and solves the same
targets (y = G(x*) computed in full fp32, as a stored target would be) by Levenberg–Marquardt
to convergence from a point near x*, with and without the rounding. The tangents of the
Jacobian pass through unrounded (straight-through): the fixed point LM converges to is set by
the residual, which is rounded. The last column is the largest relative residual
||A G(x) - b||^2 / ||b||^2 of those solved targets: surf's rescue pass re-surfs a target above
StageRule.rescue_rtol, so rounding must stay well below it. Not a timed test; run it by
hand, e.g.

    python bench/tf32_emulation.py --model dcgan-k10 --targets 100
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from models_store import ModelStore, default_store_root
from surfing.lm import levenberg_marquardt
from surfing.measure import gaussian_matrix
from surfing.solvers import uniform_latents
from surfing.trajectory import final_generator


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32's 10-bit mantissa (nearest, ties to even), kept in fp32 storage."""
    bits = t.contiguous().view(torch.int32)
    bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


def straight_through(t: torch.Tensor) -> torch.Tensor:
    """TF32 value forward, identity derivative (so jvp/vjp still pass tangents)."""
    return t + (to_tf32(t.detach()) - t.detach())


def tf32_convolutions(G: nn.Module) -> nn.Module:
    """A copy of G whose (transposed) convolutions see TF32-rounded inputs and weights."""
    G = copy.deepcopy(G)
    for mod in G.modules():
        if isinstance(mod, nn.Conv2d | nn.ConvTranspose2d):
            with torch.no_grad():
                mod.weight.copy_(to_tf32(mod.weight))
            mod.register_forward_pre_hook(lambda _m, args: (straight_through(args[0]),))
    return G


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--models-dir")
    p.add_argument("--targets", type=int, default=100)
    p.add_argument("--m", type=int, nargs="*", default=[0, 50], help="0 = identity")
    p.add_argument("--start-noise", type=float, default=0.01, help="x_init = x* + this * N(0,1)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    store = ModelStore(args.models_dir or default_store_root())
    G = final_generator(store, args.model)
    k, n_pix = G.latent_dim, store.manifest(args.model).n_pixels
    G_tf32 = tf32_convolutions(G)
    x_star = uniform_latents(args.targets, k, 0)
    noise = torch.randn(args.targets, k, generator=torch.Generator().manual_seed(1))
    x_init = x_star + args.start_noise * noise
    with torch.no_grad():
        y = G(x_star).flatten(1)
        gap = float((G_tf32(x_star).flatten(1) - y).abs().max())
    print(f"{args.model}: max |G_tf32(x*) - G(x*)| over the targets' pixels: {gap:.1e}")
    print(
        "\n| operator | forward | median dist to x* | 90th pct | max | median objective "
        "| max relative residual |"
    )
    print("|---|---|---|---|---|---|---|")
    for m in args.m:
        A = gaussian_matrix(2, m, n_pix) if m else None
        b = y if A is None else y @ A.T
        for name, net in (("fp32", G), ("TF32 convolutions (emulated)", G_tf32)):
            res = levenberg_marquardt(net, x_init, b, A, max_iters=100, xtol=1e-7)
            d = (res.x - x_star).norm(dim=1)
            # what surf's rescue tests (surfing.solvers.not_fitted): 2f / ||b||^2, to compare
            # with StageRule.rescue_rtol -- rounding must not make a solved target look missed
            rel = float((2 * res.objective / b.pow(2).sum(1)).max())
            print(
                f"| {'A = I' if A is None else f'm = {m}'} | {name} | {float(d.median()):.1e} | "
                f"{float(d.quantile(0.9)):.1e} | {float(d.max()):.1e} | "
                f"{float(res.objective.median()):.1e} | {rel:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
