"""Record any training loop's generator trajectory: one line per optimizer step.

    with TrajectoryRecorder("data/models", "my-gan", G, every=40, arch={"kind": ...}) as rec:
        for step in range(1, n_steps + 1):
            ...  # the user's own update of G
            rec.step(step)

Surfing needs the networks *during* training, not only the last one. The recorder writes
theta_0 (the random initialisation) when it starts, theta every `every` steps, and the last
step on close(), each checkpoint streamed to disk atomically. A run that crashes keeps what it
wrote; a recorder made again for the same id appends after the last checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from models_store import Manifest, ModelExists, ModelStore, TrajectoryWriter
from surfing.architectures import UnknownArchitecture, check_state
from surfing.latents import check_prior


class TrajectoryRecorder:
    """Saves the generator's parameters and buffers at step 0, every `every` steps, and last.

    `store_or_dir` is a ModelStore or its root folder. `arch` is the manifest's architecture
    (`{"kind": NAME, ...config}`, NAME a built-in, registered or entry-point architecture) and
    is checked against the generator's state now, so a wrong one fails here and not at
    inversion time. `latent` is the prior the generator was trained on ("uniform" on [-1, 1]^k
    or "normal"); `output_shape` defaults to the shape of one eval-mode sample.

    If `model_id` names an incomplete trajectory (a crashed run) the recorder appends to it
    (`resumed` is True; arch, latent_dim, output_shape, value_range and prior must match):
    steps at or before `last_step` are ignored, so restarting the loop from an earlier own
    checkpoint neither duplicates nor reorders steps. Resuming is for a loop that restores its
    own training state (weights, optimizer) first; one that starts from scratch again should
    pass `overwrite=True`, which starts over (it also replaces a complete trajectory, which
    otherwise raises ModelExists).

    Only the state_dict is stored; training or eval mode does not change it, and the solver
    always evaluates stored networks in eval mode (batch norm uses the running statistics).
    """

    def __init__(
        self,
        store_or_dir: ModelStore | str | os.PathLike[str],
        model_id: str,
        generator: nn.Module,
        every: int = 40,
        *,
        arch: Mapping[str, Any],
        latent_dim: int | None = None,
        latent: str = "uniform",
        output_shape: Sequence[int] | None = None,
        value_range: Sequence[float] = (0.0, 1.0),
        dataset: str = "custom",
        training: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not isinstance(generator, nn.Module):
            raise TypeError(f"generator must be a torch.nn.Module, got {type(generator)}")
        arch = json.loads(json.dumps(dict(arch), allow_nan=False))  # as the manifest holds it
        latent_dim = _latent_dim(arch, latent_dim)
        self.store = (
            store_or_dir if isinstance(store_or_dir, ModelStore) else ModelStore(store_or_dir)
        )
        self.model_id = model_id
        self.generator = generator
        self.every = every
        self._check_arch(arch)
        if output_shape is None:
            output_shape = sample_shape(generator, latent_dim)

        spec = {
            "arch": arch,
            "latent_dim": latent_dim,
            "output_shape": [int(s) for s in output_shape],
            "value_range": [float(v) for v in value_range],
            "latent_prior": check_prior(latent),
        }
        self._writer, self.resumed = self._open(spec, dataset, training, overwrite)
        self._seen: int | None = None  # the highest step passed to step()
        if not self.resumed:
            self._save(0)  # theta_0: before the first optimizer step can change it

    # ---- opening -------------------------------------------------------------------------

    def _check_arch(self, arch: dict[str, Any]) -> None:
        try:
            check_state(arch, self.generator.state_dict())
        except UnknownArchitecture as e:
            raise UnknownArchitecture(
                f"{e}. The recorder checks it now: a trajectory of an architecture the "
                "service cannot build could never be inverted"
            ) from None

    def _open(
        self,
        spec: dict[str, Any],
        dataset: str,
        training: Mapping[str, Any] | None,
        overwrite: bool,
    ) -> tuple[TrajectoryWriter, bool]:
        if not overwrite and self.store.path(self.model_id).is_dir():
            manifest = self.store.manifest(self.model_id)
            if manifest.complete:
                raise ModelExists(
                    f"model {self.model_id!r} is a complete trajectory in {self.store.root}; "
                    "pass overwrite=True to record over it, or use another id"
                )
            _check_same(manifest, spec)
            return self.store.reopen(self.model_id), True
        writer = self.store.create(
            self.model_id,
            arch=spec["arch"],
            latent_dim=spec["latent_dim"],
            output_shape=spec["output_shape"],
            value_range=spec["value_range"],
            latent_prior=spec["latent_prior"],
            training={**(training or {}), "every": self.every, "recorder": "surfing.record"},
            dataset=dataset,
            overwrite=overwrite,
        )
        return writer, False

    # ---- recording -----------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        """The manifest as last written."""
        return self._writer.manifest

    @property
    def last_step(self) -> int | None:
        """Training step of the last recorded checkpoint (None: nothing recorded yet)."""
        checkpoints = self._writer.manifest.checkpoints
        return checkpoints[-1].step if checkpoints else None

    def step(self, global_step: int) -> bool:
        """Call after each optimizer step with the number of steps taken so far (1 after the
        first). Saves theta when the step is a multiple of `every` and later than the last
        recorded one; returns whether it saved."""
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step must be a non-negative int, got {global_step!r}")
        self._seen = global_step if self._seen is None else max(self._seen, global_step)
        if global_step % self.every == 0 and self._is_new(global_step):
            self._save(global_step)
            return True
        return False

    def _is_new(self, step: int) -> bool:
        last = self.last_step
        return last is None or step > last

    def _save(self, step: int) -> None:
        # state_dict() tensors are detached views of the live weights; the store's encoder
        # copies them to contiguous CPU float32 before the file is written.
        self._writer.add(step, self.generator.state_dict())

    def close(self) -> None:
        """Save the last step seen (if not saved yet) and mark the trajectory complete."""
        if self._seen is not None and self._is_new(self._seen):
            self._save(self._seen)
        self._writer.close()

    def __enter__(self) -> TrajectoryRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            # The run did not finish: keep complete=False (a new recorder resumes it) and do
            # not save weights an exception may have left half-updated.
            self._writer.__exit__(exc_type, exc, tb)


def sample_shape(generator: nn.Module, latent_dim: int) -> list[int]:
    """Shape of one sample, from a forward pass in eval mode (no batch-norm update)."""
    was_training = generator.training
    param = next(iter(generator.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            out = generator.eval()(torch.zeros(1, latent_dim, device=device))
    finally:
        generator.train(was_training)
    return list(out.shape[1:])


def _latent_dim(arch: dict[str, Any], latent_dim: int | None) -> int:
    """The given latent_dim, else the arch's; both given must agree."""
    in_arch = arch.get("latent_dim")
    k = in_arch if latent_dim is None else latent_dim
    if k is None:
        raise ValueError("give latent_dim (arch has no 'latent_dim' to take it from)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"latent_dim must be a positive int, got {k!r}")
    if in_arch is not None and in_arch != k:
        raise ValueError(f"latent_dim={k} but arch says latent_dim={in_arch!r}")
    return k


def _check_same(manifest: Manifest, spec: dict[str, Any]) -> None:
    """A resumed recording must describe the same model as the trajectory it appends to."""
    stored = {
        "arch": manifest.arch,
        "latent_dim": manifest.latent_dim,
        "output_shape": manifest.output_shape,
        "value_range": manifest.value_range,
        "latent_prior": manifest.latent_prior,
    }
    for key, value in stored.items():
        if value != spec[key]:
            raise ValueError(
                f"cannot resume model {manifest.model_id!r}: its {key} is {value!r}, the "
                f"recorder's is {spec[key]!r} (use another id, or overwrite=True to start over)"
            )
