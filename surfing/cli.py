"""`surfing` command line: train, invert, experiment, models, serve, worker."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _store(args: argparse.Namespace):  # -> ModelStore (import kept local for start-up speed)
    from models_store import ModelStore, default_store_root

    return ModelStore(args.models_dir or default_store_root())


def cmd_train(args: argparse.Namespace) -> None:
    from surfing.data import dataset_name, load_fashion_mnist, load_images
    from surfing.train import TrainConfig, save_sample_grid, train
    from surfing.trajectory import final_generator

    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = TrainConfig(
        method=args.method,
        latent_dim=args.latent_dim,
        epochs=args.epochs,
        every=args.every,
        width=args.width,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_steps=args.max_steps,
        arch=args.arch or ("conv" if args.data else "infogan"),
    )
    store = _store(args)
    if args.data:
        images = load_images(args.data, args.image_size, args.channels)
        dataset = dataset_name(args.data)
    elif args.image_size or args.channels:
        raise ValueError("--image-size and --channels apply to --data (your own images)")
    else:
        images, _ = load_fashion_mnist("train", args.data_dir)
        dataset = "fashion-mnist"
    summary = train(cfg, store, args.id, images=images, device=args.device, dataset=dataset)
    manifest = store.manifest(args.id)
    size = sum(c.bytes for c in manifest.checkpoints)
    G = final_generator(store, args.id)
    torch.manual_seed(cfg.seed)
    prior = (
        torch.randn(64, cfg.latent_dim)
        if cfg.method == "vae"
        else torch.rand(64, cfg.latent_dim) * 2 - 1
    )
    grid = Path(args.samples or store.root / args.id / "samples.png")
    save_sample_grid(G, prior, grid)
    print(
        json.dumps(
            {
                "model_id": args.id,
                "arch": manifest.arch,
                "output_shape": manifest.output_shape,
                "dataset": manifest.dataset,
                "steps": summary["steps"],
                "seconds": round(summary["seconds"], 1),
                "checkpoints": len(manifest.checkpoints),
                "bytes_on_disk": size,
                "samples": str(grid),
            },
            indent=2,
        )
    )


DEMO_ID = "demo-dcgan-k10"


def _demo_threads() -> int:
    """Torch threads for the demo: all cores on an idle machine, one on a busy one, where
    OpenMP's spinning threads fight the other processes (measured 8x slower per step on a
    loaded 2-core machine) unless OMP_WAIT_POLICY=passive, which scripts/run.sh sets."""
    import os

    cores = torch.get_num_threads()
    passive = os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive"
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5
    return 1 if busy and not passive else cores


def cmd_demo(args: argparse.Namespace) -> None:
    """A small DCGAN trajectory so a fresh install has something to invert (skipped if the
    store already holds a complete model; an interrupted demo is trained again)."""
    from surfing.train import TrainConfig, train

    store = _store(args)
    models = store.list_models()
    done = [m.model_id for m in models if m.complete]
    if done and not args.force:
        print(f"demo: store {store.root} already has {', '.join(done)}; nothing to do")
        return
    if any(m.model_id == DEMO_ID for m in models):
        print(f"demo: replacing the {'unfinished ' * (DEMO_ID not in done)}{DEMO_ID}")
        store.delete(DEMO_ID)
    threads = args.threads or _demo_threads()
    torch.set_num_threads(threads)
    # 600 steps is about where this DCGAN starts drawing garments (at 400 it is still noise,
    # and a narrower one failed to train at all): 70-90 CPU-seconds, 88 s on a busy 2-core box
    cfg = TrainConfig(method="dcgan", latent_dim=10, width=0.5, every=40, max_steps=args.steps)
    print(f"demo: training {DEMO_ID} ({args.steps} DCGAN steps, half width, {threads} "
          f"thread{'s' * (threads > 1)}) into {store.root}", flush=True)
    summary = train(cfg, store, DEMO_ID, device="cuda" if torch.cuda.is_available() else "cpu")
    print(f"demo: {summary['steps']} steps in {summary['seconds']:.0f}s")


def _invert_target(path: str, shape: list[int], value_range: list[float]) -> torch.Tensor:
    """The target as (1, *shape) in the model's value range (surfing.cli_invert.load_target)."""
    from surfing.cli_invert import load_target

    return load_target(path, shape, value_range)


def cmd_invert(args: argparse.Namespace) -> None:
    """Invert one image locally: progress bars on stderr, one JSON report per method on stdout
    (the work is in surfing.cli_invert, kept apart so this file stays a table of commands)."""
    from surfing.cli_invert import run

    run(args, _store(args))


def cmd_models(args: argparse.Namespace) -> None:
    store = _store(args)
    if args.action == "list":
        models = store.list_models()
        if not models:
            from surfing.cli_invert import store_origin

            print(f"no models in {store.root.resolve()} ({store_origin(args.models_dir)}); "
                  "`surfing demo` makes a small one", file=sys.stderr)
        for m in models:
            state = "complete" if m.complete else "partial"
            print(
                f"{m.model_id:32s} {m.training.get('method', '?'):8s} k={m.latent_dim:<3d} "
                f"{len(m.checkpoints):5d} checkpoints  {state}"
            )
    elif args.action == "compress":
        from models_store import convert

        m = convert(store, args.src, args.dst, args.encoding, levels=args.levels,
                    keyframe_every=args.keyframe_every)
        raw = sum(c.bytes for c in store.manifest(args.src).checkpoints)
        size = sum(c.bytes for c in m.checkpoints)
        print(f"{args.dst}: {len(m.checkpoints)} checkpoints, {size / 1e6:.1f} MB "
              f"({size / raw:.3f} of {args.src}'s {raw / 1e6:.1f} MB)")
    elif args.action == "import":
        _import_models(store, args)
    else:
        from surfing.cli_invert import find_manifest

        print(json.dumps(find_manifest(store, args.id, args.models_dir).to_dict(), indent=2))


def _import_models(store, args: argparse.Namespace) -> None:  # store: ModelStore
    from surfing.importer import import_checkpoints, parse_floats, parse_ints

    try:
        config = json.loads(args.config)
    except ValueError as e:
        raise ValueError(f"--config is not JSON ({e})") from None
    if not isinstance(config, dict) or "kind" in config:
        raise ValueError("--config must be a JSON object without 'kind' (--arch names it)")
    m = import_checkpoints(
        store, args.dir, args.id, {"kind": args.arch, **config},
        steps=parse_ints(args.steps, "--steps"),
        strip_prefix=args.strip_prefix,
        select=args.select,
        latent_dim=args.latent_dim,
        output_shape=parse_ints(args.output_shape, "--output-shape"),
        value_range=parse_floats(args.value_range, "--value-range"),
        latent_prior=args.latent_prior,
        dataset=args.dataset,
    )
    size = sum(c.bytes for c in m.checkpoints)
    print(f"{m.model_id}: imported {len(m.checkpoints)} checkpoints (steps "
          f"{m.checkpoints[0].step}..{m.checkpoints[-1].step}), {size / 1e6:.1f} MB, "
          f"k={m.latent_dim}, output {m.output_shape}, range {m.value_range}, "
          f"prior {m.latent_prior}")


def cmd_experiment(args: argparse.Namespace) -> None:
    from surfing.experiments import EXPERIMENTS

    torch.set_num_threads(args.threads or torch.get_num_threads())
    EXPERIMENTS[args.name].run(args)


def cmd_serve(args: argparse.Namespace) -> None:
    from app.main import serve

    serve(host=args.host, port=args.port)


def cmd_submit(args: argparse.Namespace) -> None:
    """Invert an image on a Surfing server (with --measurements: recover it from A·y, measured
    here with the server's documented Gaussian matrix); wait with a progress bar; write the
    server's reconstruction PNG."""
    import os

    from surfing.client import Client, SurfingError

    server = args.server or os.environ.get("SURFING_SERVER", "http://127.0.0.1:8000")
    options = {
        "method": args.method, "schedule": args.schedule, "steps": args.steps,
        "final_steps": args.final_steps, "direct_steps": args.direct_steps, "lr": args.lr,
        "stride": args.stride, "restarts": args.restarts, "rescue": args.rescue,
    }
    out = Path(args.out or Path(args.image).with_suffix("").as_posix() + ".recon.png")
    try:
        with Client(server, api_key=args.api_key) as client:
            if args.measurements:
                from surfing.measure import gaussian_matrix, measure

                model = client.model(args.model)
                y = _invert_target(args.image, model["output_shape"], model["value_range"])
                A = gaussian_matrix(args.seed, args.measurements, y[0].numel())
                job_id = client.cs_recover(
                    measure(y, A).numpy(), args.model, seed=args.seed, m=args.measurements,
                    true_image=args.image, start_seed=args.seed, **options,
                )
            else:
                job_id = client.invert(args.image, args.model, seed=args.seed, **options)
            print(f"submit: job {job_id} on {client.url}", file=sys.stderr)
            doc = client.wait(job_id, progress=not args.quiet, timeout=args.timeout)
            if doc["status"] != "succeeded":
                print(f"surfing: job {job_id} {doc['status']}: {doc.get('error')}",
                      file=sys.stderr)
                sys.exit(1)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(client.reconstruction_png(job_id, scale=args.scale))
    except (SurfingError, TimeoutError) as exc:
        print(f"surfing: error: {exc}", file=sys.stderr)
        sys.exit(1)
    res = doc["result"]
    print(json.dumps({
        "job_id": job_id, "method": doc["method"], "latent": res["latent"][0],
        "objective": res["objective"][0],
        "pixel_error": (res.get("pixel_error") or [None])[0],
        "measurement_residual": (res.get("measurement_residual") or [None])[0],
        "generator_evals": res["evals"], "reconstruction": str(out),
    }))


def cmd_keys(args: argparse.Namespace) -> None:
    from app.services.keys import command

    command(args.action, getattr(args, "name", None), getattr(args, "scope", None),
            getattr(args, "id", None))


def cmd_jobs(args: argparse.Namespace) -> None:
    from app.lifecycle.retention import command

    command(args.older_than_days, dry_run=args.dry_run)


def cmd_worker(args: argparse.Namespace) -> None:
    from worker.main import run_worker

    run_worker(burst=args.burst)


def build_parser() -> argparse.ArgumentParser:
    from surfing.experiments import EXPERIMENTS
    from surfing.solvers import DEFAULT_SCHEDULE, SCHEDULES
    from surfing.train import ARCHS, METHODS

    p = argparse.ArgumentParser(prog="surfing", description=__doc__)
    p.add_argument(
        "--models-dir", help="trajectory store (default $SURFING_MODELS_DIR or ./data/models)"
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a generator, recording its checkpoint trajectory")
    t.add_argument("--method", choices=METHODS, required=True)
    t.add_argument("--latent-dim", type=int, required=True)
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--every", type=int, default=40, help="record a checkpoint every N steps")
    t.add_argument("--id", required=True, help="model id for the trajectory")
    t.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = paper size)")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--data-dir", help="Fashion-MNIST IDX folder")
    t.add_argument("--data", help="your own images: a PNG/JPEG folder or an .npy array")
    t.add_argument("--image-size", type=int, help="--data resized to S x S (8, 16, 28, 32, 64)")
    t.add_argument("--channels", type=int, choices=(1, 3), help="1 = grayscale, 3 = RGB")
    t.add_argument("--arch", choices=ARCHS, help="generator (default infogan; conv with --data)")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--threads", type=int)
    t.add_argument("--samples", help="where to write the sample grid PNG")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="train a small demo trajectory if the store is empty")
    d.add_argument("--steps", type=int, default=600)
    d.add_argument("--force", action="store_true", help="train even if models exist")
    d.add_argument("--threads", type=int, help="torch threads (default: all cores, 1 if busy)")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("invert", help="invert one image with a stored trajectory (no server)")
    i.add_argument("image", help="target PNG/JPEG (converted to the model's C x H x W) or .npy")
    i.add_argument("--model", required=True)
    i.add_argument("--method", choices=["surf", "adam", "both", "lm-restarts"], default="surf",
                   help="lm-restarts: LM on the final network, then fresh starts for misfits")
    i.add_argument("--measurements", type=int, help="m: compressed sensing with a Gaussian A")
    i.add_argument("--seed", type=int, default=0, help="seed of A and of x_init")
    i.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=DEFAULT_SCHEDULE,
        help=f"how to surf (default {DEFAULT_SCHEDULE}: LM on the final network and restarts, "
        "the trajectory only for a miss; 'paper' = fixed Adam steps per checkpoint)",
    )
    i.add_argument(
        "--restarts",
        type=int,
        metavar="R",
        help="restart rounds on the final network: schedule portfolio's first phase and "
        "--method lm-restarts (default as the service: portfolio 2, or 20 when m <= 3k; "
        "lm-restarts 3)",
    )
    i.add_argument("--steps", type=int, default=20, help="Adam steps (cap) per surfing stage")
    i.add_argument("--final-steps", type=int, default=1000, help="Adam steps on the last network")
    i.add_argument("--direct-steps", type=int, default=2000, help="Adam steps for --method adam")
    i.add_argument("--lr", type=float, default=0.01)
    i.add_argument("--stride", type=int, default=1, help="use every j-th checkpoint")
    i.add_argument("--out", help="reconstruction PNG path")
    i.add_argument("--scale", type=int, metavar="N", help="also write OUT.side.png: target | "
                   "reconstruction | |difference|, N x nearest-neighbour")
    i.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    i.set_defaults(func=cmd_invert)

    e = sub.add_parser("experiment", help="reproduce a paper experiment")
    e.add_argument("--threads", type=int)
    esub = e.add_subparsers(dest="name", required=True)
    for name, exp in EXPERIMENTS.items():
        ep = esub.add_parser(name, help=exp.help)
        exp.add_arguments(ep)
    e.set_defaults(func=cmd_experiment)

    m = sub.add_parser("models", help="list, show, compress or import stored trajectories")
    msub = m.add_subparsers(dest="action", required=True)
    msub.add_parser("list")
    show = msub.add_parser("show")
    show.add_argument("id")
    comp = msub.add_parser("compress", help="re-encode a trajectory compactly as a new model id")
    comp.add_argument("src")
    comp.add_argument("dst")
    comp.add_argument("--encoding", default="qdelta")
    comp.add_argument("--levels", type=float, default=1.0, help="step = rms(move) / levels")
    comp.add_argument("--keyframe-every", type=int, default=16)
    imp = msub.add_parser("import", help="store a folder of per-step checkpoints as a trajectory")
    imp.add_argument("dir", help="folder of .safetensors / .pt / .pth files, one per step")
    imp.add_argument("--arch", required=True, help="architecture name (a built-in or installed)")
    imp.add_argument("--config", default="{}", help='architecture config JSON: {"latent_dim": 10}')
    imp.add_argument("--id", required=True, help="model id for the trajectory")
    imp.add_argument("--steps", help="steps of the files in name order (default: from the names)")
    imp.add_argument("--strip-prefix", help="remove this key prefix, e.g. module.")
    imp.add_argument("--select", help="keep keys under this prefix or nested entry: generator.")
    imp.add_argument("--latent-dim", type=int, help="default: the config's latent_dim")
    imp.add_argument("--output-shape", help="C,H,W (default: from running the net once)")
    imp.add_argument("--value-range", help="LO,HI (default: from a final Sigmoid/Tanh)")
    imp.add_argument("--latent-prior", choices=["uniform", "normal"], default="uniform")
    imp.add_argument("--dataset", default="imported", help="what the generator was trained on")
    m.set_defaults(func=cmd_models)

    s = sub.add_parser(
        "serve", help="run the HTTP API (embedded SQLite + in-process runner by default)"
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(func=cmd_serve)

    sb = sub.add_parser("submit", help="invert an image on a Surfing server (see `serve`), "
                        "wait with a progress bar, write the reconstruction PNG")
    sb.add_argument("image", help="target PNG/JPEG or .npy (converted by the server)")
    sb.add_argument("--server", help="API URL (default $SURFING_SERVER or "
                    "http://127.0.0.1:8000)")
    sb.add_argument("--model", required=True)
    sb.add_argument("--api-key", help="default $SURFING_API_KEY (`surfing keys create`)")
    sb.add_argument("--method",
                    choices=["surf", "adam", "adam-restarts", "hybrid", "lm-restarts"],
                    default="surf")
    sb.add_argument(
        "--schedule", choices=SCHEDULES, help=f"surf only (server default: {DEFAULT_SCHEDULE})"
    )
    sb.add_argument("--rescue", action=argparse.BooleanOptionalAction,
                    help="surf only: re-surf targets not fitted (server default: on)")
    sb.add_argument("--measurements", type=int, help="m: compressed sensing with a Gaussian A")
    sb.add_argument("--seed", type=int, default=0, help="seed of A and of x_init")
    for flag in ("--steps", "--final-steps", "--direct-steps", "--stride", "--restarts"):
        sb.add_argument(flag, type=int, help="solver option (server default if unset)")
    sb.add_argument("--lr", type=float, help="Adam learning rate (server default 0.01)")
    sb.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    sb.add_argument("--quiet", action="store_true", help="no progress bar")
    sb.add_argument("--scale", type=int, default=1, help="nearest-neighbour zoom of the PNG")
    sb.add_argument("--out", help="reconstruction PNG path (default IMAGE.recon.png)")
    sb.set_defaults(func=cmd_submit)

    k = sub.add_parser("keys", help="API keys: create (shown once), list, revoke")
    ksub = k.add_subparsers(dest="action", required=True)
    kc = ksub.add_parser("create", help="make a key and print it (the only time it is shown)")
    kc.add_argument("--name", required=True, help="who or what the key is for")
    kc.add_argument("--scope", choices=["read", "submit", "admin"], default="submit",
                    help="read: GET own jobs and models; submit: + POST jobs, cancel own; "
                    "admin: + model management and every job")
    ksub.add_parser("list", help="ids, names, scopes; never the secrets")
    kr = ksub.add_parser("revoke", help="stop a key from working (its jobs stay)")
    kr.add_argument("id", help="the key id (`surfing keys list`)")
    k.set_defaults(func=cmd_keys)

    j = sub.add_parser("jobs", help="job housekeeping: purge old inputs and results")
    jsub = j.add_subparsers(dest="action", required=True)
    jp = jsub.add_parser("purge", help="drop the inputs and result payloads of finished jobs "
                         "older than N days (job rows and their summaries stay)")
    jp.add_argument("--older-than-days", type=int, help="default: $SURFING_RETENTION_DAYS (30)")
    jp.add_argument("--dry-run", action="store_true", help="count, change nothing")
    j.set_defaults(func=cmd_jobs)

    w = sub.add_parser("worker", help="run an RQ worker (needs REDIS_URL and DATABASE_URL)")
    w.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    w.set_defaults(func=cmd_worker)
    return p


def main(argv: list[str] | None = None) -> None:
    from models_store import StoreError
    from surfing.data import DatasetMissing

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (StoreError, DatasetMissing, ValueError) as exc:
        print(f"surfing: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
