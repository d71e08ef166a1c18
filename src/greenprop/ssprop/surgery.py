"""apply_ssprop / remove_ssprop: convert Conv2d/Linear modules in place and back.

Conversion changes the *class* of the existing module objects (to
:class:`SparseConv2d` / :class:`SparseLinear`) and adds a few plain attributes; it
creates no module, Parameter or buffer. So every reference to the module (a parent,
a hook, an optimizer's param group, a DDP bucket) stays valid, ``state_dict`` keys are
unchanged, and a checkpoint moves freely between the converted and the plain model.
``torch.nn.utils.parametrize`` swaps classes the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn

from greenprop.errors import GreenpropError
from greenprop.ssprop.config import SSPropConfig
from greenprop.ssprop.layers import SparseConv2d, SparseLayer, SparseLinear

__all__ = ["apply_ssprop", "output_layer_names", "remove_ssprop", "sparse_layers"]

ModuleFilter = Callable[[nn.Module, str], bool]

# Only these exact classes are converted: subclasses (e.g. the out_proj Linear inside
# nn.MultiheadAttention, whose weight is used without calling its forward, or user
# classes with their own forward) would silently lose their behaviour.
_CONVERTIBLE: dict[type[nn.Module], tuple[str, type[SparseLayer]]] = {
    nn.Conv2d: ("conv", SparseConv2d),
    nn.Linear: ("linear", SparseLinear),
}
_ORIGINAL_CLASS = "_ssprop_original_class"


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
    Warns when nothing was converted. Returns ``model``.
    """
    if config is None:
        config = SSPropConfig()
    if not isinstance(config, SSPropConfig):
        raise GreenpropError(f"config must be an SSPropConfig, got {type(config).__name__}")
    outputs = output_layer_names(model)
    converted: list[str] = []
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
        setattr(module, _ORIGINAL_CLASS, type(module))
        module.__class__ = sparse_cls
        module._init_ssprop(  # type: ignore[attr-defined]
            keep=config.keep,
            selection=config.selection,
            round_to=config.round_to,
            calibrate=config.calibrate,
            seed=config.seed * 1_000_003 + index,
        )
        converted.append(name)
    if depthwise:
        warnings.warn(
            f"ssProp left {len(depthwise)} grouped conv(s) with one output channel per "
            f"group dense (nothing to select): {', '.join(depthwise[:5])}"
            + (" ..." if len(depthwise) > 5 else ""),
            stacklevel=2,
        )
    if not converted:
        why = f" ({already} already converted)" if already else ""
        warnings.warn(
            f"apply_ssprop converted no layer{why}: check config.layers={config.layers}, "
            f"min_channels={config.min_channels} and module_filter_fn",
            stacklevel=2,
        )
    return model


def remove_ssprop(model: nn.Module) -> nn.Module:
    """Turn every ssProp layer of ``model`` back into its plain class, in place."""
    for module in model.modules():
        if isinstance(module, SparseLayer):
            original = module.__dict__.pop(_ORIGINAL_CLASS, None)
            if original is None:  # built directly as SparseConv2d / SparseLinear
                original = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
            module._strip_ssprop()
            module.__class__ = original
    return model
