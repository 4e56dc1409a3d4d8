"""The worked example (examples/digits): an own generator class, known to surfing only through
its package's entry point, trained by its own loop under TrajectoryRecorder on scikit-learn's
digits, then a held-out digit inverted end to end through the HTTP API (embedded mode).

Needs the example installed (scripts/setup.sh does: pip install -e examples/digits).
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import numpy as np
import torch

from models_store import ModelStore
from surfing import architectures
from surfing.latents import sample_latents
from surfing.trajectory import final_generator

NAME = "digits-mlp"


def test_entry_point_makes_the_example_generator_buildable_by_name() -> None:
    eps = {ep.name: ep for ep in entry_points(group=architectures.ENTRY_POINT_GROUP)}
    assert eps[NAME].value == "surfing_digits.model:build"
    assert NAME in architectures.available()
    # known through importlib.metadata only: neither a built-in nor registered in-process
    assert NAME not in architectures.BUILTINS and NAME not in architectures._registered
    G = architectures.build_generator({"kind": NAME, "latent_dim": 5, "hidden": 16})
    assert (type(G).__module__, type(G).__name__) == ("surfing_digits.model", "DigitsGenerator")
    assert G.net[0].in_features == 5 and G.net[0].out_features == 16
    with torch.no_grad():
        out = G(torch.randn(3, 5))
    assert out.shape == (3, 1, 8, 8) and float(out.min()) > 0 and float(out.max()) < 1


def test_train_with_recorder_then_invert_a_held_out_digit_through_the_api(tmp_path) -> None:
    from surfing_digits.data import N_TEST, load_digits_split
    from surfing_digits.invert import embedded_client, invert, reconstruction
    from surfing_digits.train import train

    models = tmp_path / "models"
    summary = train(str(models), "digits", steps=400, every=20, seed=0)
    # it learnt: the loss fell, and held-out digits decode far better than the mean digit
    assert summary["loss_last"] < 0.9 * summary["loss_first"]
    assert summary["test_recon_mse"] < 0.7 * summary["mean_digit_mse"]

    store = ModelStore(models)
    manifest = store.manifest("digits")
    assert manifest.complete and manifest.arch == {"kind": NAME, "latent_dim": 8, "hidden": 128}
    assert manifest.latent_prior == "normal" and manifest.output_shape == [1, 8, 8]
    steps = [c.step for c in manifest.checkpoints]
    assert steps == list(range(0, 401, 20))
    assert not torch.equal(
        store.load("digits", 0)["net.0.weight"], store.load("digits", -1)["net.0.weight"]
    )

    train_images, _, test_images, _ = load_digits_split()
    assert len(test_images) == N_TEST == 297
    target = test_images[0, 0].numpy().astype(np.float64)  # never seen in training
    x0 = sample_latents(1, 8, seed=0, prior="normal")
    # The service's default schedule: a real digit is not exactly in G's range, which once
    # sent its Levenberg–Marquardt latents off to ||x|| ~ 1e4 (now kept within 5 sqrt(k)).
    options = {"method": "surf", "x_init": json.dumps(x0[0].tolist())}
    with embedded_client(models, tmp_path / "state") as client:
        job = invert(client, "digits", target, options, timeout_s=120)
        assert job["status"] == "succeeded", job["error"]
        recon = reconstruction(client, job)

    result = job["result"]
    # the default (portfolio): LM on G_T and its restart rounds miss an off-range digit, so it
    # surfs the recorded trajectory (then its rescue pass surfs it again)
    trace = result["trace"]
    on_g_t = [t["step"] for t in trace if t["pass"] in ("final", "restart")]
    assert on_g_t and set(on_g_t) == {steps[-1]} and trace[0]["pass"] == "final"
    assert [t["step"] for t in trace if t["pass"] == "surf"] == steps
    G = final_generator(store, "digits")
    x = torch.tensor(result["latent"], dtype=torch.float32)
    with torch.no_grad():
        g_x = G(x)[0, 0].double().numpy()
        g_x0 = G(x0)[0, 0].double().numpy()
    assert np.abs(recon - g_x).max() <= 1 / 255 + 1e-6  # the API's PNG is G_T(x)
    sent = np.round(target * 255) / 255  # the PNG upload is 8-bit
    assert abs(result["objective"][0] - 0.5 * ((g_x - sent) ** 2).sum()) < 1e-3

    def rmse(a: np.ndarray) -> float:
        return float(np.sqrt(((a - target) ** 2).mean()))

    mean_digit = train_images.mean(0)[0].double().numpy()
    assert rmse(recon) < 0.75 * rmse(mean_digit)  # measured 0.55 on this seed
    assert rmse(recon) < 0.6 * rmse(g_x0)  # measured 0.37
