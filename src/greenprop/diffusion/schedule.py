"""DDPM's forward process and ancestral sampler (Ho et al., 2020), as pure tensor functions.

With a linear ``beta_t`` schedule, ``alpha_t = 1 - beta_t`` and ``alpha_bar_t`` their
running product, the forward process is ``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0,
(1 - alpha_bar_t) I)``; the model learns the noise ``eps`` in ``x_t``, and sampling
walks back from pure noise with
``x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps_hat) / sqrt(alpha_t) + sigma_t z``,
``sigma_t^2`` the posterior variance ``beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)``.
Timesteps are 0-based here: ``t = 0`` is the first noising step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from greenprop.errors import GreenpropError

__all__ = ["NoiseSchedule", "ancestral_sample"]


@dataclass(frozen=True)
class NoiseSchedule:
    """The linear beta schedule of DDPM: ``steps`` betas from ``beta_start`` to ``beta_end``.

    Defaults are T = 200 (ssProp's diffusion code) and DDPM's 1e-4 .. 0.02.
    """

    steps: int = 200
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise GreenpropError(f"diffusion_steps={self.steps!r} must be a positive integer")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise GreenpropError(
                f"need 0 < beta_start <= beta_end < 1, got {self.beta_start!r}, {self.beta_end!r}"
            )

    @property
    def betas(self) -> torch.Tensor:
        return torch.linspace(self.beta_start, self.beta_end, self.steps, dtype=torch.float64)

    @property
    def alpha_bars(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def posterior_variances(self) -> torch.Tensor:
        """``beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)``, with ``alpha_bar_{-1} = 1`` (0 at t = 0)."""
        alpha_bars = self.alpha_bars
        previous = torch.cat([alpha_bars.new_ones(1), alpha_bars[:-1]])
        return self.betas * (1.0 - previous) / (1.0 - alpha_bars)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise`` for a batch of timesteps ``t``."""
        alpha_bar = self.alpha_bars.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


@torch.inference_mode()
def ancestral_sample(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw ``shape[0]`` samples with DDPM's ancestral sampler (the posterior variance as sigma^2).

    All randomness comes from ``generator`` (a CPU generator; draws are moved to
    ``device``), so the same seed gives the same samples for the same model. The whole
    batch takes each step together, under ``torch.inference_mode`` (no autograd records:
    sampling costs T forward passes and nothing more).
    """
    betas = schedule.betas
    alpha_bars = schedule.alpha_bars
    sigmas = schedule.posterior_variances.sqrt()
    x = torch.randn(shape, generator=generator).to(device)
    for step in reversed(range(schedule.steps)):
        t = torch.full((shape[0],), step, dtype=torch.int64, device=device)
        eps = model(x, t)
        beta, alpha_bar = float(betas[step]), float(alpha_bars[step])
        x = (x - beta / (1.0 - alpha_bar) ** 0.5 * eps) / (1.0 - beta) ** 0.5
        if step > 0:
            x = x + float(sigmas[step]) * torch.randn(shape, generator=generator).to(device)
    return x
