"""GradSamp: skip whole epochs and apply an update sampled from a Generalized Gaussian."""

from greenprop.gradsamp.config import (
    DEFAULT_BETA_BOUNDS,
    DEFAULT_STRATEGY,
    TOLERANCE_MODES,
    UPDATE_VARIANTS,
    GradSampConfig,
)
from greenprop.gradsamp.controller import GradSamp

__all__ = [
    "DEFAULT_BETA_BOUNDS",
    "DEFAULT_STRATEGY",
    "TOLERANCE_MODES",
    "UPDATE_VARIANTS",
    "GradSamp",
    "GradSampConfig",
]
