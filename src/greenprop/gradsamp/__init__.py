"""GradSamp: skip whole epochs and apply an update sampled from a Generalized Gaussian."""

from greenprop.gradsamp.controller import (
    DEFAULT_BETA_BOUNDS,
    TOLERANCE_MODES,
    UPDATE_VARIANTS,
    GradSamp,
)

__all__ = ["DEFAULT_BETA_BOUNDS", "TOLERANCE_MODES", "UPDATE_VARIANTS", "GradSamp"]
