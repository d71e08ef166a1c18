"""apply_ssprop / remove_ssprop: which Conv2d/Linear layers become ssProp layers.

The selection rules live here (exact classes, layer types, output layer, channel
counts); the in-place class swap and its undo are :mod:`greenprop.surgery`'s, shared
with VCAS, so Parameters, hooks, optimizer references and ``state_dict`` keys are
unchanged by a conversion.
"""

from __future__ import annotations

import functools
import warnings

from torch import nn

from greenprop.seeding import ssprop_layer_seed
from greenprop.ssprop.config import SSPropConfig
from greenprop.ssprop.layers import SparseConv2d, SparseLayer, SparseLinear
from greenprop.surgery import (
    ModuleFilter,
    Swap,
    check_config,
    check_filter,
    swap,
    unswap,
    warn_nothing_swapped,
)

__all__ = ["apply_ssprop", "output_layer_names", "remove_ssprop", "sparse_layers"]

# Only these exact classes are converted: subclasses (e.g. the out_proj Linear inside
# nn.MultiheadAttention, whose weight is used without calling its forward, or user
# classes with their own forward) would silently lose their behaviour.
_CONVERTIBLE: dict[type[nn.Module], tuple[str, type[SparseLayer]]] = {
    nn.Conv2d: ("conv", SparseConv2d),
    nn.Linear: ("linear", SparseLinear),
}


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of the layers treated as producing the model's output.

    The last Conv2d/Linear in ``model.modules()`` order (registration order, which in
    nearly every model is also the order of the forward), plus every Conv2d/Linear
    whose own name is ``head`` (the model zoo's classifiers), in case a model
    registers its head before other layers.
    """
    names: set[str] = set()
    last: str | None = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            last = name
            if name.rsplit(".", 1)[-1] == "head":
                names.add(name)
    if last is not None:
        names.add(last)
    return names


def sparse_layers(model: nn.Module) -> dict[str, SparseLayer]:
    """The converted layers of ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}


def apply_ssprop(
    model: nn.Module,
    config: SSPropConfig | None = None,
    *,
    module_filter_fn: ModuleFilter | None = None,
) -> nn.Module:
    """Convert ``model``'s Conv2d (and optionally Linear) layers to ssProp layers, in place.

    Which layers: modules whose class is exactly ``nn.Conv2d`` / ``nn.Linear``, of the
    types in ``config.layers``, except the output layer (see
    :func:`output_layer_names`) unless ``config.include_output``. If
    ``module_filter_fn(module, qualified_name)`` is given it replaces the type and
    output-layer rules: an exact Conv2d/Linear is converted iff it returns True. In
    every case layers with fewer than ``config.min_channels`` output channels per
    group, and grouped convs with one channel per group (depthwise: nothing to
    select), stay dense.

    Converted layers start at ``keep=config.keep``; :class:`greenprop.SSProp` then
    drives keep from the schedule. Layers already converted are left as they are.
    Options are checked before the model is touched; warns
    (:class:`~greenprop.surgery.SurgeryWarning`) when nothing was converted.
    Returns ``model``.
    """
    config = check_config(config, SSPropConfig)
    check_filter(module_filter_fn)
    outputs = output_layer_names(model)
    plan: list[Swap] = []
    depthwise: list[str] = []
    already = 0
    for index, (name, module) in enumerate(model.named_modules()):
        if isinstance(module, SparseLayer):
            already += 1
            continue
        entry = _CONVERTIBLE.get(type(module))
        if entry is None:
            continue
        kind, sparse_cls = entry
        if module_filter_fn is not None:
            if not module_filter_fn(module, name):
                continue
        elif kind not in config.layers or (name in outputs and not config.include_output):
            continue
        groups = getattr(module, "groups", 1)
        out = module.weight.shape[0]
        if out // groups < 2 and groups > 1:
            depthwise.append(name)
            continue
        if out // groups < config.min_channels:
            continue
        init = functools.partial(
            sparse_cls._init_ssprop,
            keep=config.keep,
            selection=config.selection,
            round_to=config.round_to,
            calibrate=config.calibrate,
            seed=ssprop_layer_seed(config.seed, index),
        )
        plan.append(Swap(module, sparse_cls, init))
    if depthwise:
        warnings.warn(
            f"ssProp left {len(depthwise)} grouped conv(s) with one output channel per "
            f"group dense (nothing to select): {', '.join(depthwise[:5])}"
            + (" ..." if len(depthwise) > 5 else ""),
            stacklevel=2,
        )
    if not plan:
        why = f"{already} layer(s) already converted; " if already else ""
        warn_nothing_swapped(
            "apply_ssprop",
            f"{why}check config.layers={config.layers}, min_channels={config.min_channels} "
            "and module_filter_fn",
        )
        return model
    swap(plan)
    return model


def remove_ssprop(model: nn.Module) -> nn.Module:
    """Turn every ssProp layer of ``model`` back into its plain class, in place; returns ``model``.

    Idempotent: on a model without ssProp layers it changes nothing.
    """
    for module in model.modules():
        if isinstance(module, SparseLayer) and not unswap(module):
            # built directly as SparseConv2d / SparseLinear: no swap to undo
            module._strip_ssprop()
            module.__class__ = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    return model
