"""MeZO: fine-tuning with forward passes only (Malladi et al., NeurIPS 2023).

Rooms: ``zo`` (the math: the seeded perturbation, the two-point projected gradient and
the update), ``config`` (:class:`MeZOConfig`), ``controller`` (:class:`MeZO`, which takes
the place of the loop's forward-backward-update) and ``method`` (``--method mezo:...``).
"""

from greenprop.mezo.config import MeZOConfig
from greenprop.mezo.controller import MeZO

__all__ = ["MeZO", "MeZOConfig"]
