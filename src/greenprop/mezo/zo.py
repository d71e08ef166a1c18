"""MeZO's math: a seeded Gaussian direction, the two-point projected gradient, the update.

The direction ``z`` (one standard normal entry per parameter entry) is never stored:
it is drawn again from its seed each time it is needed (to perturb, to undo the
perturbation, to update), which is what lets MeZO fine-tune with the memory of
inference. The projected gradient ``(L(theta + eps z) - L(theta - eps z)) / (2 eps)`` is
an estimate of the directional derivative ``z . grad L(theta)``; the update
``theta <- theta - lr * g * z`` is then an unbiased (up to O(eps^2)) estimate of an
SGD step along ``z z^T grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = ["directions", "perturb", "projected_gradient", "zo_update"]


def directions(params: Sequence[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
    """``z`` for each parameter in order, drawn from ``seed``: the same seed, the same z."""
    generators: dict[torch.device, torch.Generator] = {}
    for p in params:
        if p.device not in generators:
            generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        yield torch.randn(p.shape, generator=generators[p.device], device=p.device, dtype=p.dtype)


@torch.no_grad()
def perturb(params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    """``theta += scale * z`` in place, z regenerated from ``seed``."""
    for p, z in zip(params, directions(params, seed), strict=True):
        p.add_(z, alpha=scale)


@torch.no_grad()
def projected_gradient(
    loss: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], seed: int, eps: float
) -> tuple[float, float, float]:
    """``(g, L+, L-)``: the two-point estimate of ``z . grad L`` from two forward passes.

    ``loss()`` evaluates the training loss at the current parameters. The parameters end
    where they started (up to the rounding of ``+eps z - 2 eps z + eps z``, as in MeZO).
    """
    perturb(params, seed, eps)
    loss_plus = float(loss())
    perturb(params, seed, -2.0 * eps)
    loss_minus = float(loss())
    perturb(params, seed, eps)
    return (loss_plus - loss_minus) / (2.0 * eps), loss_plus, loss_minus


@torch.no_grad()
def zo_update(
    params: Sequence[torch.Tensor], seed: int, grad: float, lr: float, weight_decay: float = 0.0
) -> None:
    """``theta <- theta - lr * (g * z + weight_decay * theta)``, z regenerated from ``seed``."""
    for p, z in zip(params, directions(params, seed), strict=True):
        if weight_decay:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(z, alpha=-lr * grad)
