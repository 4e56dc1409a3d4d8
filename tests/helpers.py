"""Small builders shared by the science tests: tiny trajectories that run in milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch

from models_store import ModelStore
from surfing.architectures import build_generator

RELU_ARCH = {"kind": "relu", "latent_dim": 2, "hidden": [20, 60], "out_dim": 100}


def interpolated_trajectory(
    root: Path, model_id: str, arch: dict = RELU_ARCH, n_ckpt: int = 6, seed: int = 0
) -> ModelStore:
    """theta_t = (1 - s_t) theta_0 + s_t theta_T: a smooth network flow, as Theorem 3.3 assumes."""
    torch.manual_seed(seed)
    start = build_generator(arch).state_dict()
    end = build_generator(arch).state_dict()
    store = ModelStore(root)
    out_shape = [1, 28, 28] if arch["kind"] == "infogan" else [arch["out_dim"]]
    with store.create(
        model_id,
        arch=arch,
        latent_dim=arch["latent_dim"],
        output_shape=out_shape,
        value_range=[0.0, 1.0],
        training={"method": "interpolation"},
        dataset="synthetic",
    ) as w:
        for t in range(n_ckpt):
            s = t / (n_ckpt - 1)
            w.add(
                t * 10,
                {
                    k: (1 - s) * start[k] + s * end[k] if start[k].is_floating_point() else end[k]
                    for k in start
                },
            )
    return store


class FakeQueue:
    """Records enqueues; runs nothing."""

    kind = "fake"

    def __init__(self) -> None:
        self.enqueued: list[str] = []

    def start(self) -> None: ...

    def close(self) -> None: ...

    def enqueue(self, job_id: str) -> str:
        self.enqueued.append(job_id)
        return f"{job_id}_{len(self.enqueued)}"

    def discard(self, queue_ref: str | None) -> None: ...

    def depth(self) -> int:
        return 0

    def workers(self) -> int:
        return 1

    def ping(self) -> None: ...
