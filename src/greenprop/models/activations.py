"""The activation functions the zoo's MLP and CNN take by name (GradSamp paper, Table 19)."""

from __future__ import annotations

from torch import nn

__all__ = ["ACTIVATIONS", "make_activation"]

_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}
#: Names accepted by ``activation=`` (zoo ``mlp`` and ``cnn``).
ACTIVATIONS: tuple[str, ...] = tuple(_MODULES)


def make_activation(name: str) -> nn.Module:
    """A fresh activation module (ReLU in place, as before the option existed)."""
    if name not in _MODULES:
        raise ValueError(f"activation={name!r}: choose from {', '.join(ACTIVATIONS)}")
    return nn.ReLU(inplace=True) if name == "relu" else _MODULES[name]()
