"""Algorithm 3.2 (projected-gradient surfing) against Algorithm 3.1 and direct descent, with
a brute-force global minimum as the referee, on small expansive ReLU networks with biases.

The network flow theta(s) is a short training run recorded every `--every` steps: the
expansive net G: R^k -> R^n is fitted by Adam to a wavy map F(x) = sin(omega B x + phi), so
the final surface x -> 1/2 ||G_T(x) - y||^2 has several basins (F repeats itself) while
theta(0) is the random N(0, 1/n_i) network of Theorem 3.1. Targets are y = G_T(x*)
(`--target range`) or y = F(x*), the map being fitted (`--target map`): the realistic case,
as with a real image, where y is off the range of G_T and f_T > 0 at its minimum.

Per trial and per slack tau, Algorithm 3.2 starts from the global minimiser of f_0 and is
scored at checkpoints against `surfing.pgsurf.global_minimum`: does it sit on the global
minimum there (tracking), does it end on it, and how many pieces did each step search?
Algorithm 3.1 runs from the paper's random start and, to isolate the piece search, also from
the same argmin f_0 as Algorithm 3.2 (optionally with long, converged stages).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from surfing.experiments.common import add_schedule, command, link, pyplot, save_figure, schedule
from surfing.experiments.report import markdown_table, write_csv, write_section
from surfing.nets import ExpansiveReLUNet
from surfing.pgsurf import (
    Params,
    all_pieces,
    exhaustive_minimum,
    global_minimum,
    objective,
    pg_surf_step,
)
from surfing.solvers import SolveResult, direct, surf, uniform_latents

HELP = "Alg 3.2: projected-gradient surfing vs. Alg 3.1 vs. Adam, against a brute-force optimum"
GAP = 1e-6  # f - f_global below this (relative to 1 + f_global) counts as "at the global min"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", "--latent-dim", dest="k", type=int, default=2)
    p.add_argument("--hidden", nargs="+", type=int, default=[16, 32])
    p.add_argument("--n", type=int, default=32, help="output dimension")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--every", type=int, default=2, help="training steps between checkpoints")
    p.add_argument("--omega", type=float, default=3.0, help="frequency of the fitted map")
    p.add_argument("--taus", nargs="+", type=float, default=[0.0, 0.01, 0.03, 0.1, 0.3])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--check-every", type=int, default=5, help="brute-force every j-th step")
    p.add_argument("--grid", type=int, default=0, help="brute-force grid per axis (0: auto)")
    p.add_argument("--extent", type=float, default=3.0)
    p.add_argument(
        "--polish-tau",
        type=float,
        default=0.0,
        help="referee: after the grid, repeat Alg 3.2 steps with this slack from the best "
        "point until f stops dropping (needed at k = 3, whose grid is coarse)",
    )
    p.add_argument(
        "--verify",
        type=int,
        default=0,
        help="check the referee at this many checked steps by enumerating every piece",
    )
    p.add_argument(
        "--target",
        choices=["range", "map"],
        default="range",
        help="y = G_T(x*) (range) or y = F(x*), the fitted map, off the range of G_T (map)",
    )
    p.add_argument(
        "--long-steps",
        type=int,
        default=0,
        help="also run Alg 3.1 from argmin f_0 with this many Adam steps per stage (0: skip)",
    )
    p.add_argument(
        "--pgd",
        action="store_true",
        help="run the literal projected-gradient loop per piece (default: its limit, the "
        "exact piece minimum -- same answer, tests/test_pgsurf.py, ~50x faster)",
    )
    p.add_argument("--steps", type=int, default=20, help="Adam steps per Alg 3.1 stage")
    p.add_argument("--final-steps", type=int, default=1000)
    p.add_argument("--direct-steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--results-md", type=Path, default=Path("docs/results.md"))
    p.add_argument("--tag", default=None, help="suffix of output names, to keep several configs")
    p.add_argument("--no-progress", action="store_true")
    add_schedule(p)


def relu_flow(
    args: argparse.Namespace,
) -> tuple[list[ExpansiveReLUNet], Callable[[torch.Tensor], torch.Tensor]]:
    """theta(0), theta(delta), ...: the net after every `every` Adam steps of regression on
    F(x) = sin(omega B x + phi), x ~ U[-1,1]^k (batches of 256); and F itself."""
    torch.manual_seed(args.seed)
    G = ExpansiveReLUNet(args.k, list(args.hidden), args.n)
    g = torch.Generator().manual_seed(args.seed + 1)
    B = torch.randn(args.n, args.k, generator=g)
    phi = torch.rand(args.n, generator=g) * 2 * math.pi

    def F(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(args.omega * x @ B.T + phi)

    opt = torch.optim.Adam(G.parameters(), lr=1e-2)
    flow = [_copy(G)]
    for step in range(1, args.train_steps + 1):
        x = torch.rand(256, args.k, generator=g) * 2 - 1
        loss = (G(x) - F(x)).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.train_steps:
            flow.append(_copy(G))
    return flow, F


def _copy(G: ExpansiveReLUNet) -> ExpansiveReLUNet:
    H = ExpansiveReLUNet(G.latent_dim, [layer.out_features for layer in G.layers], G.V.out_features)
    H.load_state_dict(G.state_dict())
    for q in H.parameters():
        q.requires_grad_(False)
    return H.eval()


def at_global(f: float, f_star: float) -> bool:
    return f - f_star <= GAP * (1.0 + abs(f_star))


Best = tuple[np.ndarray, float, int]  # (argmin, min, pieces solved) from the referee


def descents(
    flow: list[ExpansiveReLUNet],
    args: argparse.Namespace,
    y: torch.Tensor,
    x_init: torch.Tensor,
    x0: torch.Tensor,
) -> dict[str, SolveResult]:
    """The gradient baselines, all trials in one batch: Adam on f_0 (does plain descent find
    argmin f_0?), Algorithm 3.1 from x_init (the paper) and from x0 = argmin f_0 (Algorithm
    3.2's start, so any difference is the piece search), Adam on f_T."""
    stages = [(t, t, G) for t, G in enumerate(flow)]
    kw = {"steps": args.direct_steps, "lr": args.lr}

    def alg31(start: torch.Tensor, steps: int) -> SolveResult:
        return surf(
            stages,
            y,
            start,
            steps=steps,
            lr=args.lr,
            final_steps=args.final_steps,
            **schedule(args),
        )

    out = {
        "f0": direct(flow[0], y, x_init, **kw),
        "alg3.1": alg31(x_init, args.steps),
        "alg3.1 x0": alg31(x0, args.steps),
        "adam": direct(flow[-1], y, x_init, **kw),
    }
    if args.long_steps:
        out["alg3.1 x0 long"] = alg31(x0, args.long_steps)
    return out


BASELINES = {  # descents() key -> table label
    "adam": "Adam on f_T (direct)",
    "alg3.1": "Alg 3.1 (surf, Adam) from x_init",
    "alg3.1 x0": "Alg 3.1 from argmin f_0",
    "alg3.1 x0 long": "Alg 3.1 from argmin f_0, long stages",
}


def reached(x: np.ndarray, f: float, best: Best) -> bool:
    """A descent's end point counts as the global minimum if its objective is (to GAP) the
    brute-force minimum, or it lies within 0.01 of the minimiser: Adam at a fixed rate stops
    a little above the exact value, which the objective test alone would call a miss."""
    return at_global(f, best[1]) or float(np.linalg.norm(x - best[0])) < 0.01


def checked_steps(T: int, args: argparse.Namespace) -> list[int]:
    return sorted(set(range(0, T + 1, args.check_every)) | {T})


def referee(
    params: list[Params], b: np.ndarray, checks: list[int], args: argparse.Namespace, grid: int
) -> dict[int, Best]:
    return {
        t: global_minimum(params[t], None, b, args.extent, grid, polish_tau=args.polish_tau)
        for t in checks
    }


def verify(
    params: list[Params], ys: np.ndarray, best: list[dict[int, Best]], checks: list[int], n: int
) -> list[dict]:
    """Enumerate every piece at `n` interior checked steps and compare the grid referee
    with the exact global minimum; where the grid missed, the exact one replaces it."""
    picks = sorted({checks[round(i * (len(checks) - 1) / (n + 1))] for i in range(1, n + 1)})
    rows = []
    for t in picks:
        pieces = all_pieces(params[t])
        for j, b in enumerate(ys):
            x, f, solved = exhaustive_minimum(pieces, None, b)
            grid_f = best[j][t][1]
            rows.append(
                {
                    "t": t,
                    "trial": j,
                    "pieces": len(pieces),
                    "solved": solved,
                    "grid f": grid_f,
                    "exact f": f,
                    "agree": at_global(grid_f, f),
                }
            )
            if f < grid_f:
                best[j][t] = (x, f, best[j][t][2])
    return rows


def run_trial(
    params: list[Params],
    j: int,
    b: np.ndarray,
    base: dict[str, tuple[np.ndarray, float]],
    best: dict[int, Best],
    args: argparse.Namespace,
) -> tuple[dict, list[dict]]:
    """One target: score the baselines, then run Alg 3.2 for every tau."""
    T = len(params) - 1
    row: dict = {
        "trial": j,
        "f_global_T": best[T][1],
        "gd reaches argmin f_0": reached(*base["f0"], best[0]),
        "f0 gap": base["f0"][1] - best[0][1],
    }
    for key in BASELINES:
        if key in base:
            row[f"{key} final"] = reached(*base[key], best[T])
            row[f"{key} gap"] = base[key][1] - best[T][1]
    x0 = best[0][0]
    step_rows = []
    for tau in args.taus:
        x, tracked, lost_at = x0, 0, None
        for t in range(1, T + 1):
            st = pg_surf_step(params[t], None, b, x, tau, exact=not args.pgd)
            x = st.x
            step_rows.append(
                {
                    "trial": j,
                    "tau": tau,
                    "t": t,
                    "slack rows": st.slack_rows,
                    "candidates": st.candidates,
                    "pieces": st.pieces,
                    "objective": st.objective,
                }
            )
            if t in best:
                ok = at_global(st.objective, best[t][1])
                tracked += ok
                if not ok and lost_at is None:
                    lost_at = t
        f_T = objective(params[T], None, b, x)
        row[f"alg3.2 tau={tau} final"] = at_global(f_T, best[T][1])
        row[f"alg3.2 tau={tau} gap"] = f_T - best[T][1]
        row[f"alg3.2 tau={tau} tracked"] = tracked / (len(best) - 1)
        row[f"alg3.2 tau={tau} lost at"] = -1 if lost_at is None else lost_at
    return row, step_rows


def targets(
    flow: list[ExpansiveReLUNet],
    F: Callable[[torch.Tensor], torch.Tensor],
    args: argparse.Namespace,
) -> torch.Tensor:
    x_star = uniform_latents(args.trials, args.k, args.seed + 2)
    with torch.no_grad():
        return flow[-1](x_star) if args.target == "range" else F(x_star)


def run(args: argparse.Namespace) -> list[dict]:
    flow, F = relu_flow(args)
    params = [Params.of(G) for G in flow]
    grid = args.grid or {1: 4001, 2: 161, 3: 41}.get(args.k, 15)
    y = targets(flow, F, args)
    ys = y.double().numpy()
    x_init = uniform_latents(args.trials, args.k, args.seed + 3)
    checks = checked_steps(len(flow) - 1, args)
    best = [
        referee(params, b, checks, args, grid)
        for b in tqdm(ys, desc="alg32 referee", disable=args.no_progress)
    ]
    checked = verify(params, ys, best, checks, args.verify) if args.verify else []
    x0 = torch.tensor(np.stack([bj[0][0] for bj in best]), dtype=torch.float32)
    base = descents(flow, args, y, x_init, x0)
    stem = f"alg32_k{args.k}" + (f"_{args.tag}" if args.tag else "")
    rows, steps = [], []
    for j in tqdm(range(args.trials), desc="alg32 trials", disable=args.no_progress):
        mine = {n: (r.x[j].double().numpy(), float(r.objective[j])) for n, r in base.items()}
        r, s = run_trial(params, j, ys[j], mine, best[j], args)
        rows.append(r)
        steps += s
    write_csv(args.out / f"{stem}_trials.csv", rows)
    write_csv(args.out / f"{stem}_steps.csv", steps)
    if checked:
        write_csv(args.out / f"{stem}_referee.csv", checked)
    summary = summarise(rows, steps, args)
    write_csv(args.out / f"{stem}.csv", summary)
    png = args.out / f"{stem}_pieces.png"
    plot(summary, png)
    keys = [
        "k",
        "hidden",
        "n",
        "train_steps",
        "every",
        "omega",
        "target",
        "taus",
        "trials",
        "check_every",
        "grid",
        "extent",
        "polish_tau",
        "verify",
        "steps",
        "long_steps",
        "pgd",
        "seed",
        "tag",
    ]
    target = "y = G_T(x*)" if args.target == "range" else "y = F(x*) (off the range of G_T)"
    body = (
        f"## Algorithm 3.2: projected-gradient surfing, k = {args.k}"
        f"{f' ({args.tag})' if args.tag else ''} (not run in the paper)\n\n"
        f"`{command('alg32', args, keys)}` on cpu. Flow: {len(flow)} checkpoints of an "
        f"expansive ReLU net {args.k} -> {args.hidden} -> {args.n} (N(0, 1/n_i) weights and "
        f"biases at theta_0) trained by Adam to fit F(x) = sin({args.omega:g} B x + phi); "
        f"{target}, x* ~ U[-1,1]^k. Referee: brute-force global minimum (grid {grid}^{args.k} "
        f"on [-{args.extent:g}, {args.extent:g}]^{args.k}, exact minimum over the pieces of "
        "the best grid points"
        + (
            f", then Alg 3.2 steps with slack {args.polish_tau:g} until f stops dropping"
            if args.polish_tau
            else ""
        )
        + f") at every {args.check_every}-th checkpoint"
        + (f"; {verified(checked)}" if checked else "")
        + ". `final` = share of trials ending on the global minimum of f_T; `tracked` = share "
        "of checked steps on the global minimum; `beats 3.1` (`rescued`) = share of trials "
        "where this Alg 3.2 run ends on the global minimum and every Alg 3.1 run (every "
        "gradient method, direct Adam included) above missed it; "
        "`pieces` = non-empty pieces searched per step; `mean #S` = mean |S(x, theta, tau)|, "
        "the rows within tau of their kink (at most 16 are freed, those nearest zero). "
        "Alg 3.2 starts from argmin f_0; Adam and the paper's Alg 3.1 from x_init ~ "
        f"U[-1,1]^k; Alg 3.1 runs {args.steps} Adam steps per stage"
        + (f" ({args.long_steps} in `long stages`)" if args.long_steps else "")
        + f" and {args.final_steps} on f_T.\n\n"
        "Paper: Theorem 3.3 -- for delta < tau / (L max(M,1)^(d+1)) Algorithm 3.2 returns the "
        "global minimiser at every step; Section 6 expects |S| <= dk for small tau, so few "
        "pieces. No experiment in the paper.\n\n"
        + markdown_table(summary)
        + f"\n\n![pieces searched vs. tau]({link(png, args.results_md)})\n"
    )
    write_section(stem.replace("_", "-"), body, args.results_md)
    return summary


def verified(rows: list[dict]) -> str:
    steps = sorted({r["t"] for r in rows})
    pieces = sorted({r["pieces"] for r in rows})
    agree = sum(r["agree"] for r in rows)
    return (
        f"checked against exhaustive enumeration of every piece ({', '.join(map(str, pieces))} "
        f"pieces) at step(s) {', '.join(map(str, steps))}: the grid referee agreed on "
        f"{agree}/{len(rows)} trials (the exact value is used where it did not)"
    )


def summarise(rows: list[dict], steps: list[dict], args: argparse.Namespace) -> list[dict]:
    n = len(rows)
    blank = {
        "tracked %": float("nan"),
        "mean pieces": float("nan"),
        "max pieces": float("nan"),
        "mean #S": float("nan"),
        "beats 3.1 %": float("nan"),
        "rescued %": float("nan"),
    }
    keys = [key for key in BASELINES if f"{key} final" in rows[0]]
    surfs = [key for key in keys if key.startswith("alg3.1")]
    out = [
        {
            "solver": BASELINES[key],
            "final %": 100 * sum(r[f"{key} final"] for r in rows) / n,
            **blank,
        }
        for key in keys
    ]
    for tau in args.taus:
        mine = [s for s in steps if s["tau"] == tau]
        won = f"alg3.2 tau={tau} final"
        out.append(
            {
                "solver": f"Alg 3.2 tau={tau:g}",
                "final %": 100 * sum(r[won] for r in rows) / n,
                "tracked %": 100 * float(np.mean([r[f"alg3.2 tau={tau} tracked"] for r in rows])),
                "mean pieces": float(np.mean([s["pieces"] for s in mine])),
                "max pieces": float(max(s["pieces"] for s in mine)),
                "mean #S": float(np.mean([s["slack rows"] for s in mine])),
                "beats 3.1 %": 100
                * sum(r[won] and not any(r[f"{key} final"] for key in surfs) for r in rows)
                / n,
                "rescued %": 100
                * sum(r[won] and not any(r[f"{key} final"] for key in keys) for r in rows)
                / n,
            }
        )
    out.append(
        {
            "solver": "Adam on f_0 ends at argmin f_0",
            "final %": 100 * sum(r["gd reaches argmin f_0"] for r in rows) / n,
            **blank,
        }
    )
    return out


def plot(summary: list[dict], path: Path) -> None:
    """Pieces searched per step (left) and success (right) against tau."""
    plt = pyplot()
    pg = [r for r in summary if r["solver"].startswith("Alg 3.2")]
    taus = [float(r["solver"].split("=")[1]) for r in pg]
    xs = [max(t, 1e-3) for t in taus]  # tau = 0 drawn at 1e-3 on the log axis
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    a.plot(xs, [r["mean pieces"] for r in pg], "o-", label="mean")
    a.plot(xs, [r["max pieces"] for r in pg], "s--", label="max")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("slack tau (0 drawn at 1e-3)")
    a.set_ylabel("pieces searched per step")
    a.legend(fontsize=7)
    b.plot(xs, [r["final %"] for r in pg], "o-", color="tab:green", label="Alg 3.2 final")
    b.plot(xs, [r["tracked %"] for r in pg], "s--", color="tab:olive", label="Alg 3.2 tracked")
    colours = ("tab:blue", "tab:red", "tab:purple", "tab:brown")
    baselines = [r for r in summary if r["solver"] in BASELINES.values()]
    for r, c in zip(baselines, colours, strict=False):
        b.axhline(r["final %"], color=c, ls=":", label=r["solver"])
    b.set_xscale("log")
    b.set_ylim(-3, 103)
    b.set_xlabel("slack tau")
    b.set_ylabel("% of trials / checks at global min")
    b.legend(fontsize=6)
    save_figure(fig, path)
