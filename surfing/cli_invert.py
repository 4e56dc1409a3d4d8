"""`surfing invert` (and the model look-up every command shares): progress bars on stderr,
a side-by-side PNG, and errors that say which models exist and where the store is."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from models_store import Manifest, ModelNotFound, ModelStore


def store_origin(models_dir: str | None) -> str:
    """Why the store is where it is, for error messages: the flag, the variable or the default."""
    if models_dir:
        return "from --models-dir"
    if os.environ.get("SURFING_MODELS_DIR"):
        return "from $SURFING_MODELS_DIR"
    return "the default ./data/models; set $SURFING_MODELS_DIR or --models-dir to look elsewhere"


def find_manifest(store: ModelStore, model_id: str, models_dir: str | None) -> Manifest:
    """The model's manifest, or a ModelNotFound that lists the models there are, or (empty
    store) says where it looked and how to get a model."""
    try:
        return store.manifest(model_id)
    except ModelNotFound:
        pass
    where = f"{store.root.resolve()} ({store_origin(models_dir)})"
    existing = [m.model_id for m in store.list_models()]
    if not existing:
        raise ModelNotFound(
            f"no models in {where}; make the small demo one with `surfing demo` "
            "(1-2 minutes on 2 cores) or train one with `surfing train`"
        )
    raise ModelNotFound(
        f"model {model_id!r} not found in {where}; models there: {', '.join(existing)}"
    )


def load_target(path: str, shape: list[int], value_range: list[float]) -> torch.Tensor:
    """The target as (1, *shape) in the model's value range: a PNG/JPEG (colour and size
    converted to a C x H x W model), or a .npy array of exactly the model's output shape."""
    import numpy as np

    if Path(path).suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
        if list(arr.shape) not in (list(shape), [1, *shape]):
            raise ValueError(f"{path} has shape {list(arr.shape)}; the model expects {shape}")
        return torch.from_numpy(np.asarray(arr, dtype=np.float32)).reshape(1, *shape)
    from surfing.images import load_image

    lo, hi = value_range
    return (lo + (hi - lo) * load_image(path, shape)).unsqueeze(0)


class StageBars:
    """One tqdm bar per pass (surf, then each rescue round; the portfolio's LM solve and
    restart rounds on the final network first, one stage each): a bar counts its own stages
    instead of jumping back when a new pass starts."""

    def __init__(self, stages: int, enabled: bool = True) -> None:
        self.stages, self.enabled = stages, enabled
        self.key: tuple[str, int | None] | None = None
        self.bar: tqdm | None = None

    def __call__(self, info) -> None:  # info: surfing.solvers.StageTrace
        key = (getattr(info, "pass_name", "surf"), getattr(info, "pass_round", None))
        if key != self.key:
            self.close()
            name = key[0] if key[1] is None else f"{key[0]} {key[1]}"
            self.key = key
            total = self.stages if key[0] in ("surf", "rescue") else 1  # final, restart r
            self.bar = tqdm(
                total=total,
                desc=name,
                unit="stage",
                file=sys.stderr,
                disable=not self.enabled,
                leave=True,
            )
        assert self.bar is not None
        self.bar.set_postfix(step=info.step, objective=f"{info.objective_mean:.3g}")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def step_bar(G: torch.nn.Module, steps: int, desc: str, enabled: bool) -> Iterator[None]:
    """A bar over Adam steps on G, fed by a forward hook (one forward pass per step)."""
    bar = tqdm(total=steps, desc=desc, unit="step", file=sys.stderr, disable=not enabled)

    def tick(*_args) -> None:
        if bar.n < steps:
            bar.update(1)

    handle = G.register_forward_hook(tick)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


def side_by_side(target: torch.Tensor, recon: torch.Tensor, scale: int) -> torch.Tensor:
    """(C, H, 3W + 2) in [0, 1]: target | reconstruction | |difference|, one-pixel white gaps
    (scaled with the rest when written)."""
    c, h, _ = target.shape
    gap = torch.ones(c, h, 1)
    diff = (recon - target).abs()
    return torch.cat([target, gap, recon, gap, diff], dim=2).clamp(0, 1)


def run(args: argparse.Namespace, store: ModelStore) -> None:
    """Invert one image; one JSON report line per method on stdout, progress on stderr."""
    import numpy as np

    from surfing.images import to_png
    from surfing.latents import sample_latents
    from surfing.measure import gaussian_matrix, measure
    from surfing.solvers import LM_RESTART_ROUNDS, direct, lm_restarts, resolve_schedule, surf
    from surfing.trajectory import final_generator, generators

    manifest = find_manifest(store, args.model, args.models_dir)
    shape = manifest.output_shape
    picture = len(shape) == 3 and shape[0] in (1, 3)  # else the reconstruction goes to .npy
    if args.scale is not None and (args.scale < 1 or not picture):
        raise ValueError("--scale takes N >= 1 and a model whose outputs are images")
    lo, hi = manifest.value_range
    y = load_target(args.image, shape, manifest.value_range)
    n = y[0].numel()
    A = gaussian_matrix(args.seed, args.measurements, n) if args.measurements else None
    b = measure(y, A)
    x0 = sample_latents(1, manifest.latent_dim, args.seed, manifest.latent_prior)
    show = not args.no_progress
    if args.restarts is not None and args.restarts < 0:
        raise ValueError("--restarts takes R >= 0")
    schedule = resolve_schedule(args.schedule, A, manifest.latent_dim)
    portfolio = args.method in ("surf", "both") and schedule == "portfolio"
    if args.restarts is not None and not (portfolio or args.method == "lm-restarts"):
        raise ValueError("--restarts applies to schedule portfolio and --method lm-restarts")
    results = {}
    if args.method in ("surf", "both"):
        stages = generators(store, args.model, stride=args.stride)
        if show and schedule == "portfolio":
            print(
                f"invert: Levenberg-Marquardt on the final network of {args.model}, then "
                f"surfing its {len(stages)} checkpoints if that misses (schedule portfolio)",
                file=sys.stderr,
            )
        elif show:
            print(
                f"invert: surfing {len(stages)} checkpoints of {args.model} (schedule {schedule})",
                file=sys.stderr,
            )
        bars = StageBars(len(stages), show)
        try:
            results["surf"] = surf(
                stages, b, x0, A, steps=args.steps, lr=args.lr, final_steps=args.final_steps,
                schedule=args.schedule, prior=manifest.latent_prior, progress=bars,
                rounds=args.restarts,  # None: surfing.portfolio.portfolio_rounds
            )
        finally:
            bars.close()
    G = final_generator(store, args.model)
    if args.method in ("adam", "both"):
        with step_bar(G, args.direct_steps, "adam", show):
            results["adam"] = direct(G, b, x0, A, steps=args.direct_steps, lr=args.lr)
    if args.method == "lm-restarts":
        prior = manifest.latent_prior
        rounds = LM_RESTART_ROUNDS if args.restarts is None else args.restarts
        results["lm-restarts"] = lm_restarts(
            G, b, x0, A, rounds=rounds, seed=args.seed, prior=prior
        )
    suffix = ".recon.png" if picture else ".recon.npy"
    out = Path(args.out or Path(args.image).with_suffix("").as_posix() + suffix)
    for name, res in results.items():
        with torch.no_grad():
            recon = G(res.x)
        pixel_error = float((recon - y).pow(2).sum() / n)
        path = out if len(results) == 1 else out.with_name(f"{out.stem}.{name}{out.suffix}")
        report = {
            "method": name,
            "latent": [round(v, 6) for v in res.x[0].tolist()],
            "objective": float(res.objective[0]),
            "pixel_error": pixel_error,
            "generator_evals": res.evals,
            "reconstruction": str(path),
        }
        if picture:
            unit = ((recon[0] - lo) / (hi - lo)).clamp(0, 1)  # to_png takes [0, 1]
            to_png(unit, path)
            if args.scale is not None:
                side = path.with_name(f"{path.stem}.side{path.suffix}")
                to_png(side_by_side(((y[0] - lo) / (hi - lo)).clamp(0, 1), unit, args.scale),
                       side, scale=args.scale)
                report["side_by_side"] = str(side)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, recon[0].numpy(), allow_pickle=False)
        if name == "surf":  # what each stage did (the schedule shows here)
            report["stages"] = [
                {"pass": t.pass_name if t.pass_round is None else f"{t.pass_name} {t.pass_round}",
                 "step": t.step, "steps_used": t.steps_used, "objective": t.objective_mean}
                for t in res.trace
            ]  # fmt: skip
        print(json.dumps(report))
