"""Trainers record theta_0 and every N steps, stream into the store, and stay finite."""

from __future__ import annotations

import pytest
import torch

from models_store import ModelStore
from surfing.nets import InfoGANGenerator
from surfing.train import METHODS, TrainConfig, train


def fake_images(n: int = 256) -> torch.Tensor:
    """Blobs in [0, 1] with the Fashion-MNIST shape: enough for a few training steps."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g).pow(3)


@pytest.mark.parametrize("method", METHODS)
def test_trainer_records_init_and_every_n_steps(tmp_path, method: str) -> None:
    store = ModelStore(tmp_path)
    cfg = TrainConfig(
        method=method,
        latent_dim=3,
        width=0.05,
        every=4,
        max_steps=10,
        epochs=50,
        batch_size=16,
        n_critic=2,
        seed=5,
    )
    train(cfg, store, f"m-{method}", images=fake_images(), progress=False)
    manifest = store.manifest(f"m-{method}")
    assert [c.step for c in manifest.checkpoints] == [0, 4, 8, 10]
    assert manifest.complete and manifest.training["method"] == method
    assert manifest.arch == {"kind": "infogan", "latent_dim": 3, "width": 0.05}

    torch.manual_seed(5)  # the trainer seeds, then builds G first: theta_0 is reproducible
    theta_0 = InfoGANGenerator(3, 0.05).state_dict()
    first = store.load(f"m-{method}", 0)
    assert set(first) == set(theta_0)  # parameters and batch-norm buffers
    assert all(
        torch.equal(first[k], theta_0[k].float() if theta_0[k].is_floating_point() else theta_0[k])
        for k in theta_0
    )
    last = store.load(f"m-{method}", -1)
    assert all(torch.isfinite(v.float()).all() for v in last.values())
    assert not torch.equal(last["fc.0.weight"], first["fc.0.weight"])  # it trained


def test_training_is_reproducible(tmp_path) -> None:
    store = ModelStore(tmp_path)
    cfg = TrainConfig(method="dcgan", latent_dim=2, width=0.05, every=3, max_steps=3, batch_size=8)
    train(cfg, store, "a", images=fake_images(64), progress=False)
    train(cfg, store, "b", images=fake_images(64), progress=False)
    for index in range(len(store.manifest("a").checkpoints)):
        a, b = store.load("a", index), store.load("b", index)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_crash_mid_training_leaves_a_readable_prefix(tmp_path) -> None:
    store = ModelStore(tmp_path)

    class Boom(Exception):
        pass

    import surfing.train as tr

    original = tr.Method.step
    calls = {"n": 0}

    def failing_step(self, data):
        calls["n"] += 1
        if calls["n"] == 7:
            raise Boom
        return original(self, data)

    tr.Method.step = failing_step
    try:
        with pytest.raises(Boom):
            train(
                TrainConfig(
                    method="dcgan", latent_dim=2, width=0.05, every=3, max_steps=20, batch_size=8
                ),
                store,
                "crash",
                images=fake_images(64),
                progress=False,
            )
    finally:
        tr.Method.step = original
    manifest = store.manifest("crash")
    assert not manifest.complete
    assert [c.step for c in manifest.checkpoints] == [0, 3, 6]
    assert len(list(store.checkpoints("crash"))) == 3


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="gan", latent_dim=2)
