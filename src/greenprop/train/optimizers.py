"""Optimizers by spec string: ``sgd``, ``sgd:momentum=0.9,nesterov=true``, ``adagrad:eps=1e-8``.

A spec is a name and, after ``:``, ``key=value`` options separated by ``,`` (the syntax of
``--method``). Each optimizer's options are a :class:`~greenprop.options.MethodConfig`,
so bad options fail with the one error format ``"optimizer <name> option <key>=<value!r>:
<why>"``. The learning rate and weight decay stay training options (``--lr``,
``--weight-decay``): the LR schedule and every preset read them. SGD's momentum defaults
to the run's ``momentum`` field (``--momentum``), so older configs keep their meaning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from greenprop.errors import GreenpropError
from greenprop.options import MethodConfig, check_interval, fail, option

__all__ = ["OPTIMIZERS", "OptimizerSpec", "make_optimizer", "parse_optimizer"]


@dataclass(frozen=True)
class SGDOptions(MethodConfig):
    """``torch.optim.SGD``; momentum None means the run's ``momentum`` (``--momentum``)."""

    METHOD = "optimizer sgd"

    momentum: float | None = option(None, "momentum in [0, 1)", default_text="the run's --momentum (0.9)")
    nesterov: bool = option(False, "Nesterov momentum (needs momentum > 0 and dampening 0)")
    dampening: float = option(0.0, "dampening of the momentum in [0, 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.momentum is not None:
            check_interval(self, "momentum", "[0, 1)")
        check_interval(self, "dampening", "[0, 1)")
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            fail(self.METHOD, "nesterov", self.nesterov, "needs momentum > 0 and dampening=0")

    def kwargs(self, momentum: float) -> dict[str, Any]:
        m = momentum if self.momentum is None else self.momentum
        if self.nesterov and m == 0:
            fail(self.METHOD, "nesterov", self.nesterov, "needs momentum > 0 (the run's momentum is 0)")
        return {"momentum": m, "nesterov": self.nesterov, "dampening": self.dampening}


@dataclass(frozen=True)
class AdamOptions(MethodConfig):
    """``torch.optim.Adam`` / ``AdamW`` (the weight decay L2 / decoupled)."""

    METHOD = "optimizer adam"

    beta1: float = option(0.9, "first-moment decay in [0, 1)")
    beta2: float = option(0.999, "second-moment decay in [0, 1)")
    eps: float = option(1e-8, "denominator term, > 0")
    amsgrad: bool = option(False, "the AMSGrad variant")
    fused: bool | None = option(
        None,
        "torch's fused kernel, one pass over all parameters (the Hugging Face Trainer's default "
        "with torch >= 2.8; about 5x faster on MiniLM's 22.7M parameters on CPU, "
        "docs/benchmarks.md); none: fused where every parameter allows it",
        default_text="none",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(self, "beta1", "[0, 1)")
        check_interval(self, "beta2", "[0, 1)")
        check_interval(self, "eps", "(0, inf)")

    def kwargs(self, momentum: float) -> dict[str, Any]:
        return {"betas": (self.beta1, self.beta2), "eps": self.eps, "amsgrad": self.amsgrad}


@dataclass(frozen=True)
class AdamWOptions(AdamOptions):
    METHOD = "optimizer adamw"


@dataclass(frozen=True)
class AdagradOptions(MethodConfig):
    """``torch.optim.Adagrad``."""

    METHOD = "optimizer adagrad"

    lr_decay: float = option(0.0, "per-step learning-rate decay, >= 0")
    eps: float = option(1e-10, "denominator term, > 0")
    initial_accumulator_value: float = option(0.0, "starting sum of squared gradients, >= 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(self, "lr_decay", "[0, inf)")
        check_interval(self, "eps", "(0, inf)")
        check_interval(self, "initial_accumulator_value", "[0, inf)")

    def kwargs(self, momentum: float) -> dict[str, Any]:
        return {
            "lr_decay": self.lr_decay,
            "eps": self.eps,
            "initial_accumulator_value": self.initial_accumulator_value,
        }


@dataclass(frozen=True)
class AdadeltaOptions(MethodConfig):
    """``torch.optim.Adadelta`` (the run's ``lr`` scales the update; torch's default is 1.0)."""

    METHOD = "optimizer adadelta"

    rho: float = option(0.9, "decay of the squared-gradient and squared-update averages in [0, 1)")
    eps: float = option(1e-6, "denominator term, > 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(self, "rho", "[0, 1)")
        check_interval(self, "eps", "(0, inf)")

    def kwargs(self, momentum: float) -> dict[str, Any]:
        return {"rho": self.rho, "eps": self.eps}


@dataclass(frozen=True)
class RMSpropOptions(MethodConfig):
    """``torch.optim.RMSprop``."""

    METHOD = "optimizer rmsprop"

    alpha: float = option(0.99, "decay of the squared-gradient average in [0, 1)")
    eps: float = option(1e-8, "denominator term, > 0")
    momentum: float = option(0.0, "momentum in [0, 1) (not the run's --momentum)")
    centered: bool = option(False, "divide by the gradient's estimated variance")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(self, "alpha", "[0, 1)")
        check_interval(self, "eps", "(0, inf)")
        check_interval(self, "momentum", "[0, 1)")

    def kwargs(self, momentum: float) -> dict[str, Any]:
        return {"alpha": self.alpha, "eps": self.eps, "momentum": self.momentum, "centered": self.centered}


_TABLE: dict[str, tuple[type[Any], type[MethodConfig]]] = {
    "sgd": (torch.optim.SGD, SGDOptions),
    "adamw": (torch.optim.AdamW, AdamWOptions),
    "adam": (torch.optim.Adam, AdamOptions),
    "adagrad": (torch.optim.Adagrad, AdagradOptions),
    "adadelta": (torch.optim.Adadelta, AdadeltaOptions),
    "rmsprop": (torch.optim.RMSprop, RMSpropOptions),
}
#: The optimizer names ``--optimizer`` takes (options after ``:``).
OPTIMIZERS: tuple[str, ...] = tuple(_TABLE)


@dataclass(frozen=True)
class OptimizerSpec:
    """A parsed, validated optimizer spec."""

    name: str
    options: Any  # the name's options dataclass

    def build(
        self, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, momentum: float
    ) -> torch.optim.Optimizer:
        cls, _ = _TABLE[self.name]
        params = list(params)
        kwargs = self.options.kwargs(momentum)
        if hasattr(self.options, "fused"):
            kwargs["fused"] = _fused(self.name, self.options.fused, params)
        return cls(params, lr=lr, weight_decay=weight_decay, **kwargs)


#: Devices torch's fused Adam/AdamW kernels run on (torch 2.13).
_FUSED_DEVICES = ("cpu", "cuda")


def _fused(name: str, wanted: bool | None, params: list[Any]) -> bool:
    """Whether Adam/AdamW runs torch's fused kernel: ``wanted``, or (None) where every
    parameter is a floating-point tensor on a device the kernel supports.

    Raises:
        GreenpropError: ``fused=true`` was asked for and a parameter cannot take it.
    """
    groups = [p["params"] if isinstance(p, dict) else [p] for p in params]  # tensors or param groups
    tensors = [t for group in groups for t in ([group] if isinstance(group, torch.Tensor) else group)]
    fits = [t.is_floating_point() and t.device.type in _FUSED_DEVICES for t in tensors]
    unfit = next((t for t, fit in zip(tensors, fits, strict=True) if not fit), None)
    if wanted and unfit is not None:
        raise GreenpropError(
            f"optimizer {name} option fused=True: a parameter is {unfit.dtype} on {unfit.device}; the "
            f"fused kernel takes floating-point parameters on {' or '.join(_FUSED_DEVICES)} (use fused=false)"
        )
    return unfit is None if wanted is None else wanted


def parse_optimizer(spec: str) -> OptimizerSpec:
    """``name[:key=value,...]`` -> :class:`OptimizerSpec`; errors name the bad part."""
    if not isinstance(spec, str):
        raise GreenpropError(f"optimizer={spec!r} must be a string such as 'sgd' or 'adagrad:eps=1e-8'")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in _TABLE:
        raise GreenpropError(
            f"optimizer={spec!r}: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}"
        )
    values: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise GreenpropError(f"optimizer option {item!r} in {spec!r} is not key=value")
            values[key.strip()] = value.strip()
    return OptimizerSpec(name, _TABLE[name][1].from_dict(values))


def make_optimizer(
    spec: str, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names over ``params`` (``momentum``: SGD's default momentum)."""
    return parse_optimizer(spec).build(params, lr=lr, weight_decay=weight_decay, momentum=momentum)


def optimizer_help() -> dict[str, dict[str, str]]:
    """Optimizer name -> option -> help with default, for docs and ``greenprop methods``."""
    return {name: options.option_help() for name, (_, options) in _TABLE.items()}
