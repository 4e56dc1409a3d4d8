"""Generator architectures by name: the built-ins plus those installed packages declare.

A manifest's `arch` is `{"kind": NAME, ...config}`; `build_generator` looks NAME up here and
calls its factory with the whole dict. Names resolve only to built-ins, to factories registered
in-process by trusted code, or to entry points in the group `surfing.architectures` of packages
the operator installed — a manifest, upload or request can name an architecture, never a module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import nn

from surfing.nets import ConvGenerator, ExpansiveReLUNet, InfoGANGenerator

ENTRY_POINT_GROUP = "surfing.architectures"
Factory = Callable[[dict[str, Any]], nn.Module]

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class UnknownArchitecture(ValueError):
    """The manifest names an architecture this process does not have."""


class StateMismatch(ValueError):
    """A checkpoint's tensors do not fit the architecture (missing, extra or mis-shaped key)."""


def _infogan(arch: dict[str, Any]) -> nn.Module:
    return InfoGANGenerator(int(arch["latent_dim"]), float(arch.get("width", 1.0)))


def _relu(arch: dict[str, Any]) -> nn.Module:
    return ExpansiveReLUNet(int(arch["latent_dim"]), list(arch["hidden"]), int(arch["out_dim"]))


def _conv(arch: dict[str, Any]) -> nn.Module:
    return ConvGenerator(
        int(arch["latent_dim"]),
        int(arch["channels"]),
        int(arch["size"]),
        float(arch.get("width", 1.0)),
    )


BUILTINS: dict[str, Factory] = {"infogan": _infogan, "relu": _relu, "conv": _conv}
_registered: dict[str, Factory] = {}


def register(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Add an architecture in-process (an entry point does the same for an installed package)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"architecture name {name!r}: use 1-64 characters from [a-z0-9._-]")
    if not replace and (name in BUILTINS or name in _registered):
        raise ValueError(f"architecture {name!r} is already registered")
    _registered[name] = factory


def unregister(name: str) -> None:
    _registered.pop(name, None)


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Every name this process can build: built-ins, registered, installed entry points."""
    return sorted({*BUILTINS, *_registered, *_entry_points()})


def get_factory(name: object) -> Factory:
    """The factory for `name`; UnknownArchitecture (naming it and what exists) otherwise."""
    if isinstance(name, str) and _NAME_RE.fullmatch(name):
        if name in _registered:
            return _registered[name]
        if name in BUILTINS:
            return BUILTINS[name]
        ep = _entry_points().get(name)
        if ep is not None:
            factory = ep.load()  # the module is the one the installed package declared
            if not callable(factory):
                raise UnknownArchitecture(f"entry point {name!r} ({ep.value}) is not callable")
            return factory
    raise UnknownArchitecture(
        f"unknown generator architecture {name!r}; this process has: {', '.join(available())} "
        f"(install a package with a {ENTRY_POINT_GROUP!r} entry point to add one)"
    )


def build_generator(arch: Mapping[str, Any]) -> nn.Module:
    """A fresh generator for a manifest's `arch` dict (`kind` names the architecture)."""
    if not isinstance(arch, Mapping):
        raise ValueError(f"arch must be an object with a 'kind', got {arch!r}")
    factory = get_factory(arch.get("kind"))
    try:
        module = factory(dict(arch))
    except (KeyError, TypeError, ValueError) as e:
        kind = arch.get("kind")
        raise ValueError(f"architecture {kind!r} rejects its config {dict(arch)}: {e}") from e
    if not isinstance(module, nn.Module):
        raise ValueError(f"architecture {arch.get('kind')!r} did not return an nn.Module")
    return module


def check_state(arch: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Strict load check of a checkpoint against the architecture, without allocating weights.

    Raises StateMismatch naming the first missing, unexpected or mis-shaped key (with both
    shapes), so an import or upload fails with a message a user can act on.
    """
    with torch.device("meta"):
        expected = build_generator(arch).state_dict()
    for key, ref in expected.items():
        if key not in tensors:
            raise StateMismatch(
                f"checkpoint lacks {key!r} (shape {list(ref.shape)}) of architecture "
                f"{arch.get('kind')!r}"
            )
        got = tensors[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise StateMismatch(
                f"{key!r}: checkpoint has shape {list(got.shape)}, architecture "
                f"{arch.get('kind')!r} expects {list(ref.shape)}"
            )
        if got.dtype.is_floating_point != ref.dtype.is_floating_point:
            raise StateMismatch(f"{key!r}: checkpoint dtype {got.dtype}, expected {ref.dtype}")
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise StateMismatch(
            f"checkpoint has {extra[0]!r} (shape {list(tensors[extra[0]].shape)}), which "
            f"architecture {arch.get('kind')!r} does not"
        )
