"""Generalized Gaussian: fit, sample, cdf/pdf, KS test, degenerate input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from greenprop.gradsamp import ggd
from greenprop.gradsamp.ggd import GGDFitWarning, GGDParams

BETAS = [0.8, 1.2, 2.0, 3.0]


def _scipy_draws(beta: float, loc: float, scale: float, n: int, seed: int = 0) -> torch.Tensor:
    """Draws from SciPy's own sampler, so the fit is checked independently of ours."""
    x = stats.gennorm.rvs(beta, loc=loc, scale=scale, size=n, random_state=seed)
    return torch.from_numpy(x).float()


@pytest.mark.parametrize("beta", BETAS)
def test_fit_recovers_known_parameters(beta):
    loc, scale = 0.3, 0.7
    x = _scipy_draws(beta, loc, scale, 400_000, seed=int(beta * 10))
    fitted = ggd.fit(x.reshape(400, 1000))  # any shape
    assert fitted.fallback is None
    assert fitted.beta == pytest.approx(beta, rel=0.03)
    assert fitted.scale == pytest.approx(scale, rel=0.03)
    true_std = ggd.std_of(scale, beta)
    assert abs(fitted.loc - loc) < 6 * true_std / math.sqrt(x.numel())
    assert fitted.std == pytest.approx(true_std, rel=0.01)


@pytest.mark.parametrize("beta", BETAS)
def test_samples_pass_ks_against_their_own_parameters(beta):
    params = GGDParams(loc=-0.1, scale=2e-3, beta=beta)
    gen = torch.Generator().manual_seed(7)
    x = ggd.sample(params, (300, 200), gen)
    assert x.shape == (300, 200) and x.dtype == torch.float32
    result = ggd.ks_test(x, params)
    assert result.n == 60_000
    assert result.passed(0.01), result
    assert float(x.std()) == pytest.approx(params.std, rel=0.03)


@pytest.mark.parametrize("beta", BETAS)
def test_torch_fit_agrees_with_scipy_mle(beta):
    x = _scipy_draws(beta, 0.0, 1e-3, 300_000, seed=3)
    fast = ggd.fit(x)
    mle = ggd.fit(x, method="mle", max_samples=300_000, generator=torch.Generator().manual_seed(0))
    assert fast.beta == pytest.approx(mle.beta, rel=0.02)
    assert fast.scale == pytest.approx(mle.scale, rel=0.02)
    assert fast.loc == pytest.approx(mle.loc, abs=0.02 * fast.std)


def test_fit_agrees_with_mle_within_one_percent_on_a_million_draws():
    x = _scipy_draws(1.2, 0.0, 1.0, 1_000_000, seed=11)
    fast = ggd.fit(x)
    mle = ggd.fit(x, method="mle", max_samples=1_000_000)
    assert fast.beta == pytest.approx(mle.beta, rel=0.01)


def test_heavy_tailed_update_like_the_measured_hazard():
    """beta = 0.27 (the measured update): the fit finds the shape and a centre near loc."""
    params = GGDParams(loc=0.0, scale=2.3e-6, beta=0.27)
    x = ggd.sample(params, (800_000,), torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.isfinite(x).all()
    fitted = ggd.fit(x)
    assert fitted.beta == pytest.approx(0.27, rel=0.05)
    assert abs(fitted.loc) < 0.05 * params.std
    # The documented hazard: adding 1e-3 to the scale at this shape gives std ~1.06.
    assert params.std == pytest.approx(2.4e-3, rel=0.05)
    assert ggd.std_of(params.scale + 1e-3, 0.27) == pytest.approx(1.06, rel=0.02)


def test_sample_is_reproducible_with_a_generator():
    params = GGDParams(0.0, 1.0, 1.3)
    a = ggd.sample(params, (1000,), torch.Generator().manual_seed(5))
    b = ggd.sample(params, (1000,), torch.Generator().manual_seed(5))
    c = ggd.sample(params, (1000,), torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_small_beta_does_not_overflow():
    params = GGDParams(0.0, 1e-6, 0.05)
    x = ggd.sample(params, (10_000,), torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()


def test_std_and_scale_round_trip():
    for beta in [0.2, 0.5, 1.0, 2.0, 5.0]:
        assert ggd.std_of(ggd.scale_for_std(0.37, beta), beta) == pytest.approx(0.37)
    assert ggd.std_of(1.0, 2.0) == pytest.approx(math.sqrt(0.5))  # Gaussian: var = scale^2 / 2
    assert ggd.std_of(1.0, 1.0) == pytest.approx(math.sqrt(2.0))  # Laplace: var = 2 scale^2


def test_cdf_and_pdf_match_scipy():
    params = GGDParams(0.2, 0.5, 1.4)
    xs = np.linspace(-3, 3, 41)
    np.testing.assert_allclose(ggd.cdf(xs, params), stats.gennorm.cdf(xs, 1.4, 0.2, 0.5))
    np.testing.assert_allclose(ggd.pdf(torch.from_numpy(xs), params), stats.gennorm.pdf(xs, 1.4, 0.2, 0.5))
    assert np.all(np.diff(ggd.cdf(xs, params)) >= 0)
    assert params.to_scipy().cdf(0.2) == pytest.approx(0.5)


def test_ks_test_rejects_the_wrong_shape():
    gen = torch.Generator().manual_seed(2)
    gauss = ggd.sample(GGDParams(0.0, 1.0, 2.0), (20_000,), gen)
    laplace = GGDParams(0.0, ggd.scale_for_std(float(gauss.std()), 1.0), 1.0)
    assert not ggd.ks_test(gauss, laplace).passed()


@pytest.mark.parametrize(
    ("values", "reason", "loc"),
    [
        (torch.zeros(100), "all elements equal", 0.0),
        (torch.full((50,), 0.25), "all elements equal", 0.25),
        (torch.tensor([0.1, -0.2, 0.3]), "only 3 element", 0.0),
        (torch.tensor([0.1, float("nan")] * 10), "non-finite", 0.0),
        (torch.tensor([0.1, float("inf"), -0.3] * 10), "non-finite", 0.0),
        (torch.zeros(0), "only 0 element", 0.0),
    ],
)
def test_degenerate_input_gives_a_named_fallback_not_nan(values, reason, loc):
    with pytest.warns(GGDFitWarning, match=r"'layer3\.weight'.*" + reason):
        fitted = ggd.fit(values, name="layer3.weight")
    assert fitted.fallback is not None and reason in fitted.fallback
    assert all(math.isfinite(v) for v in (fitted.loc, fitted.scale, fitted.beta))
    assert fitted.scale == 0.0 and fitted.loc == pytest.approx(loc)
    draw = ggd.sample(fitted, (4, 5), torch.Generator().manual_seed(0))
    assert torch.all(draw == torch.tensor(loc, dtype=draw.dtype))
    # The step CDF of a fallback is usable (e.g. by the hypothesis check).
    assert ggd.ks_test(torch.full((10,), loc), fitted).statistic == 0.0


def test_unnamed_degenerate_tensor_is_described_by_shape():
    with pytest.warns(GGDFitWarning, match=r"shape \(2, 3\)"):
        ggd.fit(torch.zeros(2, 3))


def test_fit_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        ggd.fit(torch.randn(100), method="bayes")  # type: ignore[arg-type]
