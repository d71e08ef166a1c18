"""GradSamp: skip whole epochs and apply an update sampled from a Generalized Gaussian.

Rooms: ``ggd`` (the distribution: fit, sample, KS test), ``schedule`` (which epochs are
sampled), ``sampling`` (the draw rule), ``config`` (:class:`GradSampConfig`), ``check``
(the GGD hypothesis test on one update), ``controller`` (:class:`GradSamp`) and
``method`` (``--method gradsamp:...``).
"""

from greenprop.gradsamp.config import DEFAULT_STRATEGY, GradSampConfig
from greenprop.gradsamp.controller import GradSamp, NothingSampledWarning
from greenprop.gradsamp.sampling import DEFAULT_BETA_BOUNDS, TOLERANCE_MODES, UPDATE_VARIANTS

__all__ = [
    "DEFAULT_BETA_BOUNDS",
    "DEFAULT_STRATEGY",
    "TOLERANCE_MODES",
    "UPDATE_VARIANTS",
    "GradSamp",
    "GradSampConfig",
    "NothingSampledWarning",
]
