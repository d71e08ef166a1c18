"""Shared helpers of the VCAS tests: toy models, skewed inputs, flat gradients, unbiasedness statistics."""

from __future__ import annotations

import inspect
import math
from types import ModuleType

import torch
from torch import Tensor, nn

from greenprop import models as gp_models


def skewed(shape: tuple[int, ...], seed: int) -> Tensor:
    """Random float64 tensor whose samples' norms span two orders of magnitude."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t * torch.logspace(-1, 1, shape[0], dtype=torch.float64).view(-1, *([1] * (len(shape) - 1)))


def grads(loss: Tensor, params: list[Tensor], **kwargs) -> Tensor:
    """The gradients of ``loss`` w.r.t. ``params``, flattened into one vector."""
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, **kwargs)])


def grad_dict(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def draw(loss: Tensor, params: list[Tensor], n: int) -> Tensor:
    """``n`` sampled gradients of the same graph, one per row."""
    return torch.stack([grads(loss, params, retain_graph=True) for _ in range(n)])


def z_scores(draws: Tensor, exact: Tensor) -> tuple[Tensor, float]:
    """z-scores of the mean of the draws around ``exact`` for the entries that vary, and the
    largest relative error of the entries that never vary (those must be exact)."""
    mean, std = draws.mean(0), draws.std(0)
    scale = exact.abs().max()
    varies = std > 1e-12 * scale
    fixed_err = float(((mean - exact)[~varies]).abs().max() / scale) if bool((~varies).any()) else 0.0
    z = (mean - exact)[varies] / (std[varies] / math.sqrt(draws.shape[0]))
    return z, fixed_err


def unbiased(z: Tensor) -> bool:
    """Mean within a few standard errors everywhere, and the z-scores look like noise."""
    a = z.abs()
    return bool(a.max() < 5.5) and float((a > 3).double().mean()) < 0.05 and float(a.mean()) < 1.3


# ---------------------------------------------------------------------------------------------
# toy models


class Block(nn.Module):
    """``x + fc2(gelu(fc1(norm(x))))``: acts on each sample (dim 0) separately."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def stack(depth: int = 2, dim: int = 6, hidden: int = 8, bias: bool = True, seed: int = 0) -> nn.Sequential:
    """``depth`` float64 :class:`Block`s."""
    torch.manual_seed(seed)
    return nn.Sequential(*(Block(dim, hidden, bias) for _ in range(depth))).double()


class ConvBlock(nn.Module):
    """``tanh(conv2(tanh(norm(conv1(x)))) + shortcut(x))``: acts on each sample separately.

    ``conv1`` takes the stride, groups and dilation (and a non-square kernel); the shortcut
    is a strided 1x1 conv when the shape changes. ``extra`` convs (e.g. reflect padding)
    are applied after ``conv2``, shape-preserving.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        *,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = True,
        extra: tuple[nn.Module, ...] = (),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            cin, cout, (3, 2), stride, padding=(dilation, 1), dilation=dilation, groups=groups, bias=bias
        )
        self.norm = nn.GroupNorm(2, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, groups=groups, bias=bias)
        self.extra = nn.Sequential(*extra)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.shortcut(x)
        h = self.conv1(x)[..., : skip.shape[-1]]  # kernel width 2, padding 1: may be one wider
        h = self.extra(self.conv2(torch.tanh(self.norm(h))))
        return torch.tanh(h + skip)


def convnet(seed: int = 0, *, groups: int = 2, bias: bool = True, extra: bool = False) -> nn.Sequential:
    """Two float64 residual conv blocks: 4 -> 4 (stride 2, dilation 2) -> 6."""
    torch.manual_seed(seed)
    extras: tuple[nn.Module, ...] = ()
    if extra:
        extras = (
            nn.Conv2d(6, 6, 3, padding="same", bias=bias),
            nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect", bias=bias),
        )
    return nn.Sequential(
        ConvBlock(4, 4, stride=2, groups=groups, dilation=2, bias=bias),
        ConvBlock(4, 6, groups=groups, bias=bias, extra=extras),
    ).double()


def vit(seed: int = 0, depth: int = 2) -> nn.Module:
    """A tiny ViT (width 32, 2 heads) on 8x8 single-channel images."""
    torch.manual_seed(seed)
    return gp_models.create(
        "vit", num_classes=10, in_channels=1, image_size=8, width=32, depth=depth, heads=2
    )


def resnet(seed: int = 0, name: str = "resnet18-gn") -> nn.Module:
    """``name`` (a ResNet-18 variant) at width 8 on single-channel images."""
    torch.manual_seed(seed)
    return gp_models.create(name, in_channels=1, width=8)


# ---------------------------------------------------------------------------------------------
# spying on the samplers the layers call


def spy_draws(monkeypatch, module: ModuleType, name: str) -> list[Tensor]:
    """Record the kept indices of every call of the sampler ``module.name`` that draws (ratio < 1)."""
    calls: list[Tensor] = []
    original = getattr(module, name)
    signature = inspect.signature(original)

    def spy(*args, **kwargs):
        idx, scale = original(*args, **kwargs)
        if signature.bind(*args, **kwargs).arguments["ratio"] < 1:
            calls.append(idx)
        return idx, scale

    monkeypatch.setattr(module, name, spy)
    return calls


def drop_rescale(monkeypatch, module: ModuleType, name: str) -> None:
    """Make the sampler ``module.name`` return scale 1 for every kept row (a biased estimator)."""
    original = getattr(module, name)

    def unscaled(*args, **kwargs):
        idx, scale = original(*args, **kwargs)
        return idx, torch.ones_like(scale)

    monkeypatch.setattr(module, name, unscaled)
