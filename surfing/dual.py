"""The Jacobian of a chain of layers in one batched pass: the latent and its k tangents together.

Forward-mode AD through torch.func (vmap over jvp) costs about two forward passes of the
same rows on a CPU: it dispatches every op twice (primal, tangent) through functorch's Python
layers. For a generator that is a plain chain of layers the same numbers come from one pass
over B(k + 1) rows: the B latents on top, then the k unit tangents of every latent. A linear
layer (Linear, Conv, ConvTranspose, eval-mode batch norm) maps a tangent by the same weights
without the shift; an elementwise activation multiplies it by its derivative at the primal.

A generator opts in with `layer_chain()`: the layers whose composition is its forward pass,
row by row (tested for every built-in architecture). Anything else -- no `layer_chain`, a layer
type not listed here, batch norm in training mode -- gets None from `chain`, and the caller
uses torch.func.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh)
RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)


def supported(layer: nn.Module) -> bool:
    """Whether `chain_jacobian` knows this layer's tangent map (and the layer keeps rows apart)."""
    if isinstance(layer, LINEAR):
        return getattr(layer, "padding_mode", "zeros") == "zeros"
    if isinstance(layer, NORMS):  # eval mode with running statistics: a per-channel affine map
        return not layer.training and layer.running_mean is not None
    if isinstance(layer, nn.Flatten):
        return layer.start_dim >= 1
    if isinstance(layer, nn.Unflatten):
        return isinstance(layer.dim, int) and layer.dim >= 1
    return isinstance(layer, ACTIVATIONS + RESHAPES)


def chain(G: nn.Module) -> list[nn.Module] | None:
    """G's layer chain if G declares one (`layer_chain()`) and every layer is supported."""
    declare = getattr(G, "layer_chain", None)
    if not callable(declare):
        return None
    layers = list(declare())
    return layers if all(supported(layer) for layer in layers) else None


def _shift(layer: nn.Module, z: torch.Tensor, B: int) -> None:
    """Add the layer's bias to the primal rows only (a tangent has no constant term)."""
    if layer.bias is not None:
        z[:B] += layer.bias.view(-1, *([1] * (z.dim() - 2)))


def _linear(layer: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The layer's weights on every row, without its bias."""
    if isinstance(layer, nn.Linear):
        return F.linear(z, layer.weight)
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        return layer._conv_forward(z, layer.weight, None)
    conv = F.conv_transpose1d if isinstance(layer, nn.ConvTranspose1d) else F.conv_transpose2d
    return conv(
        z, layer.weight, None, layer.stride, layer.padding, layer.output_padding, layer.groups,
        layer.dilation,
    )  # fmt: skip


def _activation(layer: nn.Module, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the activation of the primal rows `pre`, its derivative there); out of place, whatever
    the layer's `inplace` says."""
    if isinstance(layer, nn.ReLU):
        return torch.relu(pre), (pre > 0).to(pre.dtype)
    if isinstance(layer, nn.LeakyReLU):
        slope = layer.negative_slope
        return F.leaky_relu(pre, slope), torch.where(pre > 0, 1.0, slope).to(pre.dtype)
    if isinstance(layer, nn.Sigmoid):
        y = torch.sigmoid(pre)
        return y, y * (1 - y)
    y = torch.tanh(pre)
    return y, 1 - y * y


def chain_jacobian(layers: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G(x) flattened to (B, n), its Jacobian ∂G/∂x of shape (B, n, k)) for G = the chain.

    Rows B + j B + i carry d/dx_j of target i's activations, so an activation's derivative at
    the primal (B, ...) broadcasts over the k tangent blocks."""
    B, k = x.shape
    z = torch.empty(B * (k + 1), k, dtype=x.dtype, device=x.device)
    z[:B] = x
    eye = torch.eye(k, dtype=x.dtype, device=x.device)
    z[B:].view(k, B, k).copy_(eye.unsqueeze(1).expand(k, B, k))
    for layer in layers:
        if isinstance(layer, LINEAR):
            z = _linear(layer, z)
            _shift(layer, z, B)
        elif isinstance(layer, NORMS):  # primal exactly as the layer computes it
            p = F.batch_norm(z[:B], layer.running_mean, layer.running_var, layer.weight,
                             layer.bias, False, 0.0, layer.eps)  # fmt: skip
            mean0 = torch.zeros_like(layer.running_mean)
            t = F.batch_norm(z[B:], mean0, layer.running_var, layer.weight, None, False, 0.0,
                             layer.eps)  # fmt: skip
            z = torch.cat([p, t])
        elif isinstance(layer, ACTIVATIONS):
            y, slope = _activation(layer, z[:B])
            t = z[B:].view(k, B, *y.shape[1:]) * slope
            z = torch.cat([y, t.view(k * B, *y.shape[1:])])
        else:
            z = layer(z)
    out = z[:B].flatten(1)
    J = z[B:].reshape(k, B, -1).permute(1, 2, 0)  # (B, n, k)
    return out, J
