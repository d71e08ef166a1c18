"""Client-side local steps: plain SGD, FedProx's proximal term, FedSpeed's corrected step.

Pure torch on a model and a batch, so each can be checked against hand-computed values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["fedspeed_finish", "fedspeed_step", "prox_term", "sgd_step", "snapshot"]

Loss = Callable[[nn.Module], torch.Tensor]


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    """Detached copies of the trainable parameters (the round's global weights)."""
    return [p.detach().clone() for p in model.parameters()]


def prox_term(model: nn.Module, global_weights: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's ``mu/2 * ||w - w_t||^2``, squared, against detached global weights."""
    total = sum(
        ((p - g.detach()) ** 2).sum() for p, g in zip(model.parameters(), global_weights, strict=True)
    )
    return 0.5 * mu * total


def sgd_step(
    model: nn.Module,
    loss_fn: Loss,
    lr: float,
    global_weights: list[torch.Tensor] | None = None,
    mu: float = 0.0,
) -> float:
    """One SGD step on ``loss_fn(model)`` (+ the FedProx term when ``mu > 0``); returns the data loss."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    total = loss + prox_term(model, global_weights, mu) if mu > 0 and global_weights is not None else loss
    total.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)
    return float(loss.detach())


def fedspeed_step(
    model: nn.Module,
    loss_fn: Loss,
    lr: float,
    global_weights: list[torch.Tensor],
    correction: list[torch.Tensor],
    *,
    lam: float,
    rho: float,
    alpha: float,
) -> float:
    """One FedSpeed local step (Sun et al., ICLR 2023, Algorithm 1).

    ``g1 = grad f(x)``; the gradient-perturbation (extra ascent) step evaluates
    ``g2 = grad f(x + rho * g1 / ||g1||)``; the quasi-gradient ``g = (1-alpha) g1 + alpha g2``;
    the update ``x <- x - lr * (g - correction + (x - x_t) / lam)`` with the client's
    prox-correction ``correction`` (``hat g_i``). Returns the loss at ``x``.
    """
    params = list(model.parameters())
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    g1 = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g**2).sum() for g in g1)).clamp_min(1e-12)
    with torch.no_grad():
        for p, g in zip(params, g1, strict=True):
            p.add_(rho * g / norm)
    g2 = torch.autograd.grad(loss_fn(model), params)
    with torch.no_grad():
        for p, a, b, c, x0 in zip(params, g1, g2, correction, global_weights, strict=True):
            p.sub_(rho * a / norm)  # back to x
            quasi = (1 - alpha) * a + alpha * b
            p.sub_(lr * (quasi - c + (p - x0) / lam))
    return float(loss.detach())


def fedspeed_finish(
    model: nn.Module, global_weights: list[torch.Tensor], correction: list[torch.Tensor], lam: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """End of a FedSpeed round: ``hat g <- hat g - (x_K - x_t)/lam``; send ``x_K - lam * hat g``.

    Returns ``(new_correction, corrected_weights)``; the server averages the corrected weights.
    """
    new_corr, sent = [], []
    for p, x0, c in zip(model.parameters(), global_weights, correction, strict=True):
        nc = c - (p.detach() - x0) / lam
        new_corr.append(nc)
        sent.append(p.detach() - lam * nc)
    return new_corr, sent
