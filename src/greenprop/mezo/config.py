"""MeZOConfig: MeZO's settings in one frozen, validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from greenprop.options import MethodConfig, check_interval, option

__all__ = ["MeZOConfig"]


@dataclass(frozen=True)
class MeZOConfig(MethodConfig):
    """Settings of MeZO (zeroth-order SGD), validated on construction.

    The defaults are the paper's for OPT fine-tuning (eps 1e-3, a constant learning rate
    from its grid {1e-6, 1e-7}, no weight decay); small models tolerate a larger ``lr``.
    MeZO's learning rate is its own and constant: the run's optimizer, ``--lr`` and its
    schedule are not used, since no gradient ever reaches them.
    """

    METHOD = "mezo"

    eps: float = option(1e-3, "perturbation scale: the two losses are taken at theta +- eps*z, > 0")
    lr: float = option(1e-6, "constant learning rate of the ZO-SGD update, > 0")
    weight_decay: float = option(0.0, "decoupled weight decay of every parameter per step, >= 0")
    seed: int = option(0, "seed of the perturbations z", default_text="the run's seed")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(self, "eps", "(0, inf)")
        check_interval(self, "lr", "(0, inf)")
        check_interval(self, "weight_decay", "[0, inf)")
        check_interval(self, "seed", "[0, inf)")
