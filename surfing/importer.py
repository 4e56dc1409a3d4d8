"""Import a folder of per-step checkpoints saved by someone else's training loop as a trajectory.

Each file (`.safetensors`, or `.pt`/`.pth` read with `torch.load(weights_only=True)` only, so a
file holding pickled code is refused, never run) becomes one checkpoint, ordered by the step in
its name (`G_step_000400.pt`, `ckpt-40.safetensors`: the last integer of the stem) or by
explicit steps. Every file is remapped and strictly checked against the architecture before
anything is written, and the model is written into a hidden staging folder and renamed into
the store at the end, so readers never see a half-imported model.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from models_store import Manifest, ModelExists, ModelStore, validate_model_id
from models_store._atomic import fsync_dir
from surfing.architectures import StateMismatch, build_generator, check_state
from surfing.latents import check_prior

SUFFIXES = (".safetensors", ".pt", ".pth")
STAGING_PREFIX = ".import-"  # hidden: ModelStore.list_models skips dot-folders
_INT_RE = re.compile(r"\d+")


class ImportFailed(ValueError):
    """A checkpoint cannot be imported; the message names the file and what is wrong."""


def checkpoint_files(src_dir: Path, steps: Sequence[int] | None = None) -> list[tuple[int, Path]]:
    """(step, path) in training order: steps parsed from the names, or `steps` over name order."""
    if not src_dir.is_dir():
        raise ImportFailed(f"{src_dir} is not a folder")
    files = sorted(
        p for p in src_dir.iterdir()
        if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise ImportFailed(f"{src_dir} holds no {'/'.join(SUFFIXES)} checkpoint files")
    if steps is not None:
        if len(steps) != len(files):
            raise ImportFailed(
                f"{len(steps)} steps given for {len(files)} checkpoint files in {src_dir}"
            )
        pairs = list(zip((int(s) for s in steps), files, strict=True))
    else:
        pairs = []
        for p in files:
            found = _INT_RE.findall(p.stem)
            if not found:
                raise ImportFailed(
                    f"{p.name}: no step number in the file name (name files like "
                    "G_step_000400.pt, or pass the steps explicitly with --steps)"
                )
            pairs.append((int(found[-1]), p))
        pairs.sort(key=lambda sp: sp[0])
    for (s0, p0), (s1, p1) in zip(pairs, pairs[1:], strict=False):
        if s1 == s0:
            raise ImportFailed(f"{p0.name} and {p1.name} both are step {s0}")
        if s1 < s0:
            raise ImportFailed(f"steps must increase: {p1.name} is step {s1} after {s0}")
    if pairs[0][0] < 0:
        raise ImportFailed(f"{pairs[0][1].name}: step {pairs[0][0]} is negative")
    return pairs


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The raw contents of one file: tensors only, never unpickled objects."""
    if path.suffix == ".safetensors":
        try:
            return dict(safetensors.torch.load_file(path))
        except (SafetensorError, OSError) as e:
            raise ImportFailed(f"{path.name}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ImportFailed(
            f"{path.name}: refused, it holds pickled objects other than tensors and plain "
            f"containers ({_unpickling_reason(e)}); only torch.load(weights_only=True) is "
            "used here: save the generator's state_dict() instead, or convert to .safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ImportFailed(f"{path.name}: cannot be read by torch.load ({e})") from None
    if not isinstance(obj, Mapping):
        raise ImportFailed(f"{path.name}: holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _unpickling_reason(e: Exception) -> str:
    """The line of torch's message that names the refused global (not its advice to turn
    weights_only off, which is exactly what must not happen here)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
    return (named or lines or [type(e).__name__])[0]


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts of tensors as dotted keys ({"generator": {"fc.weight": t}} ->
    "generator.fc.weight"); other values (step counters, hyper-parameters) are left out."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
    return flat


def remap(
    obj: Mapping[str, Any], strip_prefix: str | None = None, select: str | None = None
) -> dict[str, torch.Tensor]:
    """Tensors under the generator's own names.

    `select` keeps the keys under a prefix and removes it ("generator." picks both flat keys
    "generator.fc.weight" and a nested {"generator": state_dict}); `strip_prefix` removes a
    prefix every key may carry ("module." of DataParallel), before and after the selection.
    """
    tensors = _flatten(obj)
    tensors = _strip(tensors, strip_prefix)
    if select:
        prefix = select if select.endswith(".") else select + "."
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        tensors = _strip(tensors, strip_prefix)
    return tensors


def _strip(tensors: dict[str, torch.Tensor], prefix: str | None) -> dict[str, torch.Tensor]:
    if not prefix:
        return tensors
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}


def _hint(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, Any]) -> str:
    """Suggest --select/--strip-prefix when the keys carry a prefix the architecture lacks."""
    for key in tensors:
        head, _, rest = key.partition(".")
        if rest in expected and key not in expected:
            return f" (keys look like {key!r}: try --select {head}. or --strip-prefix {head}.)"
    return ""


def load_checked(
    path: Path, arch: Mapping[str, Any], strip_prefix: str | None, select: str | None
) -> dict[str, torch.Tensor]:
    """One file's tensors, remapped and strictly checked against the architecture."""
    tensors = remap(read_checkpoint(path), strip_prefix, select)
    if not tensors:
        where = f" under {select!r}" if select else ""
        raise ImportFailed(f"{path.name}: no tensors{where}")
    try:
        check_state(arch, tensors)
    except StateMismatch as e:
        with torch.device("meta"):
            expected = build_generator(arch).state_dict()
        raise ImportFailed(f"{path.name}: {e}{_hint(tensors, expected)}") from None
    return tensors


def _first_linear(G: nn.Module) -> int | None:
    for m in G.modules():
        if isinstance(m, nn.Linear):
            return int(m.in_features)
    return None


def infer_shapes(
    arch: Mapping[str, Any],
    latent_dim: int | None = None,
    output_shape: Sequence[int] | None = None,
) -> tuple[int, list[int]]:
    """(latent_dim, output_shape): given values, checked against one run of the architecture
    on a zero latent, else what that run shows.

    latent_dim defaults to the arch config's "latent_dim", else the first Linear layer's
    inputs; the net runs on the meta device (no weights), or on the CPU if an op has no meta
    kernel. A declared output_shape must hold as many values as the net produces.
    """
    kind = arch.get("kind")
    with torch.device("meta"):
        G = build_generator(arch).eval()
    k = latent_dim or arch.get("latent_dim") or _first_linear(G)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ImportFailed(
            f"cannot tell the latent dimension of architecture {kind!r}: pass --latent-dim"
        )
    try:
        with torch.no_grad(), torch.device("meta"):
            out = G(torch.zeros(1, k))
    except Exception:  # an op without a meta kernel: run the real (random) net once
        try:
            with torch.no_grad():
                out = build_generator(arch).eval()(torch.zeros(1, k))
        except Exception as e:
            raise ImportFailed(
                f"architecture {kind!r} does not map a (1, {k}) latent to an output ({e}); "
                "check the latent dimension and the architecture config"
            ) from None
    produced = [int(s) for s in out.shape[1:]]
    if output_shape is None:
        return k, produced
    declared = [int(s) for s in output_shape]
    if not declared or min(declared) < 1 or math.prod(declared) != math.prod(produced):
        raise ImportFailed(
            f"output shape {declared} does not fit architecture {kind!r}, which produces "
            f"{produced} per latent"
        )
    return k, declared


def infer_value_range(arch: Mapping[str, Any]) -> list[float]:
    """[0, 1] after a final Sigmoid, [-1, 1] after a final Tanh; else the user must say."""
    with torch.device("meta"):
        last = list(build_generator(arch).modules())[-1]
    if isinstance(last, nn.Sigmoid):
        return [0.0, 1.0]
    if isinstance(last, nn.Tanh):
        return [-1.0, 1.0]
    raise ImportFailed(
        f"cannot tell the output range of architecture {arch.get('kind')!r} (its last layer is "
        f"{type(last).__name__}, not Sigmoid or Tanh): pass --value-range LO,HI"
    )


def import_checkpoints(
    store: ModelStore,
    src_dir: str | os.PathLike[str],
    model_id: str,
    arch: Mapping[str, Any],
    *,
    steps: Sequence[int] | None = None,
    strip_prefix: str | None = None,
    select: str | None = None,
    latent_dim: int | None = None,
    output_shape: Sequence[int] | None = None,
    value_range: Sequence[float] | None = None,
    latent_prior: str = "uniform",
    dataset: str = "imported",
) -> Manifest:
    """Check every checkpoint in `src_dir`, then store them as model `model_id` in one rename.

    Raises ImportFailed (a ValueError) naming the first bad file, ModelExists if the id is
    taken; on any failure nothing is left in the store.
    """
    src = Path(src_dir)
    validate_model_id(model_id)
    check_prior(latent_prior)
    if store.path(model_id).exists():
        raise ModelExists(f"model {model_id!r} already exists in {store.root}")
    arch = dict(arch)
    k, shape = infer_shapes(arch, latent_dim, output_shape)
    vr = [float(v) for v in value_range] if value_range else infer_value_range(arch)
    if len(vr) != 2 or not vr[0] < vr[1]:
        raise ImportFailed(f"value range must be LO,HI with LO < HI, got {vr}")
    files = checkpoint_files(src, steps)
    for _, path in files:  # strict check of every file before anything is written
        load_checked(path, arch, strip_prefix, select)

    store.root.mkdir(parents=True, exist_ok=True)
    staging = store.root / f"{STAGING_PREFIX}{model_id}-{uuid.uuid4().hex[:12]}"
    try:
        staged = ModelStore(staging)
        training = {"method": "imported", "source": src.name, "files": len(files)}
        with staged.create(
            model_id, arch=arch, latent_dim=k, output_shape=shape, value_range=vr,
            training=training, dataset=dataset, latent_prior=latent_prior,
        ) as writer:
            for step, path in files:
                writer.add(step, load_checked(path, arch, strip_prefix, select))
        try:
            os.rename(staging / model_id, store.path(model_id))
        except OSError as e:
            raise ModelExists(f"model {model_id!r} already exists in {store.root}") from e
        fsync_dir(store.root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return store.manifest(model_id)


def parse_ints(text: str | None, what: str) -> list[int] | None:
    """"0,40,80" -> [0, 40, 80] (CLI helper)."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ImportFailed(f"{what} must be comma-separated integers, got {text!r}") from None


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ImportFailed(f"{what} must be comma-separated numbers, got {text!r}") from None
