"""The Frechet distance between two feature sets, each summarised by a Gaussian.

``FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, the formula of FID
(Heusel et al., 2017). greenprop applies it to the penultimate features of its own
small Fashion-MNIST classifier, not to Inception's: call the number "FD (greenprop CNN
features)"; it is comparable between runs scored with the same classifier, not with
published FIDs.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

from greenprop.errors import GreenpropError

__all__ = ["METRIC_NAME", "frechet_distance"]

#: How reports name the score.
METRIC_NAME = "FD (greenprop CNN features)"


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature rows ``a`` (N, D) and ``b`` (M, D).

    Means and sample covariances (``ddof=1``) in float64; the matrix square root is
    :func:`scipy.linalg.sqrtm`. If the product of the covariances is near singular
    (fewer samples than features), a 1e-6 ridge is added to both; round-off's imaginary
    part is dropped. Never negative (clamped at 0 against round-off).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise GreenpropError(f"feature sets must be (N, D) with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise GreenpropError(f"each feature set needs at least 2 rows, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise GreenpropError("feature sets must be finite (a generated sample diverged?)")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(cov_a @ cov_b)
    if caught or not np.isfinite(root).all():  # singular: fewer samples than features
        ridge = np.eye(len(cov_a)) * 1e-6
        root = scipy.linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    root = np.real(root)
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root))
    return max(value, 0.0)
