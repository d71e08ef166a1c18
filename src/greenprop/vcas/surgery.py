"""apply_vcas / remove_vcas: which blocks VCAS samples after, and which layers inside them it converts.

:func:`apply_vcas` registers a forward hook on each selected block (the hook routes
the block's output through a :class:`~greenprop.vcas.layers.BlockSampler`) and swaps
every ``nn.Linear`` inside those blocks to :class:`~greenprop.vcas.layers.VCASLinear`
(and every zero-padded ``nn.Conv2d`` to :class:`~greenprop.vcas.layers.VCASConv2d`,
for residual CNN blocks). The selection rules and refusals live here; the in-place
class swap and its undo are :mod:`greenprop.surgery`'s, shared with ssProp, so
``state_dict`` keys, optimizer param groups and checkpoints are the same with and
without VCAS.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from greenprop.errors import GreenpropError
from greenprop.seeding import vcas_activation_seed, vcas_weight_seed
from greenprop.surgery import (
    ModuleFilter,
    Swap,
    check_config,
    check_filter,
    swap,
    unswap,
    warn_nothing_swapped,
)
from greenprop.vcas.compaction import CompactedForward
from greenprop.vcas.config import VCASConfig
from greenprop.vcas.layers import BlockSampler, VCASConv2d, VCASLinear, VCASRuntime

__all__ = ["VCASHandle", "apply_vcas", "find_blocks", "remove_vcas", "vcas_handle"]

_ATTR = "_greenprop_vcas"
_COUPLING_NORMS = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


@dataclass
class VCASHandle:
    """What :func:`apply_vcas` changed in one model (kept on the model as a plain attribute)."""

    config: VCASConfig
    runtime: VCASRuntime
    samplers: list[BlockSampler]
    linears: dict[str, VCASLinear]
    convs: dict[str, VCASConv2d] = field(default_factory=dict)
    hooks: list[RemovableHandle] = field(default_factory=list)
    compacted: list[nn.Module] = field(default_factory=list)  # blocks whose forward is a CompactedForward

    @property
    def layers(self) -> dict[str, VCASLinear | VCASConv2d]:
        """Every converted layer (Linear and Conv2d), by qualified name."""
        return {**self.linears, **self.convs}


def find_blocks(model: nn.Module, block_types: Sequence[type[nn.Module]] | None = None) -> list[str]:
    """Qualified names of the blocks VCAS samples after, in forward order.

    With ``block_types``, every module of those types (outermost only). Without, the
    repeated layers of the model: the children of each ``nn.ModuleList`` /
    ``nn.Sequential`` holding at least two modules of one class that contain an
    ``nn.Linear`` or ``nn.Conv2d`` (a transformer's ``encoder.layer``, the zoo ViT's
    ``blocks``, a ResNet stage's residual blocks).
    """
    types = _check_block_types(block_types)
    if types is not None:
        names: list[str] = []
        for name, module in model.named_modules():
            inside = any(name.startswith(outer + ".") for outer in names)
            if isinstance(module, types) and not inside and module is not model:
                names.append(name)
        return names
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        children = list(module)
        same_class = len({type(child) for child in children}) == 1
        has_linear = any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in children[0].modules())
        if same_class and has_linear and not any(name.startswith(outer + ".") for outer in names):
            prefix = f"{name}." if name else ""
            names.extend(f"{prefix}{i}" for i in range(len(children)))
    return names


def _check_block_types(
    block_types: Sequence[type[nn.Module]] | None,
) -> tuple[type[nn.Module], ...] | None:
    if block_types is None:
        return None
    types = tuple(block_types)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise GreenpropError(f"block_types must be nn.Module classes, got {block_types!r}")
    return types


def vcas_handle(model: nn.Module) -> VCASHandle | None:
    """What :func:`apply_vcas` changed in ``model`` (samplers, layers, runtime), else None."""
    return getattr(model, _ATTR, None)


def apply_vcas(
    model: nn.Module,
    config: VCASConfig | None = None,
    *,
    module_filter_fn: ModuleFilter | None = None,
    block_types: Sequence[type[nn.Module]] | None = None,
) -> nn.Module:
    """Insert VCAS's samplers into ``model`` in place; returns ``model``.

    A sampler goes after every block; inside the blocks each exact ``nn.Linear`` and
    zero-padded ``nn.Conv2d`` is converted (:func:`vcas_handle` lists them all).

    Args:
        model: the network; its blocks must act on each sample separately (no
            BatchNorm inside, see :mod:`greenprop.vcas.layers`), batch first.
        config: the settings (``VCASConfig()``, the paper's defaults, when None).
        module_filter_fn: ``(layer, qualified_name) -> bool``; when given, only the
            layers inside the blocks for which it returns True are converted.
        block_types: classes of the blocks to sample after, e.g. transformers'
            ``BertLayer``; None finds the model's repeated layers (:func:`find_blocks`).

    Every option is checked before the model is touched. Warns
    (:class:`~greenprop.surgery.SurgeryWarning`) and changes nothing when no layer
    would be converted: no block found, no layer chosen, or VCAS already applied.

    Raises:
        GreenpropError: a bad option, a block that contains BatchNorm, or a layer
            shared by two blocks.
    """
    config = check_config(config, VCASConfig)
    check_filter(module_filter_fn)
    _check_block_types(block_types)
    if vcas_handle(model) is not None:
        warn_nothing_swapped("apply_vcas", "VCAS is already applied to this model; call remove_vcas first")
        return model
    names = find_blocks(model, block_types)
    if not names:
        wanted = "the given block_types" if block_types is not None else "repeated layers with Linear/Conv2d"
        warn_nothing_swapped("apply_vcas", f"found no block to sample ({wanted}); pass block_types=")
        return model
    modules = dict(model.named_modules())
    for name in names:
        coupling = [n for n, m in modules[name].named_modules() if isinstance(m, _COUPLING_NORMS)]
        if coupling:
            raise GreenpropError(
                f"block {name!r} contains BatchNorm ({name}.{coupling[0]}): its backward mixes samples, "
                "so rows dropped by VCAS would be refilled and nothing saved; use LayerNorm/GroupNorm blocks "
                "(the zoo has resnet18-gn)"
            )
    owners: dict[int, str] = {}
    for name in names:  # a layer shared by two blocks would read the wrong block's record
        for sub_name, sub in modules[name].named_modules():
            if isinstance(sub, (nn.Linear, nn.Conv2d)) and owners.setdefault(id(sub), name) != name:
                raise GreenpropError(
                    f"layer {name}.{sub_name} is shared by blocks {owners[id(sub)]!r} and {name!r}; "
                    "VCAS needs each sampled layer inside one block"
                )
    runtime = VCASRuntime(
        activation_generator=torch.Generator().manual_seed(vcas_activation_seed(config.seed)),
        weight_generator=torch.Generator().manual_seed(vcas_weight_seed(config.seed)),
        check_rows=config.check_rows,
        sample_max_ratio=config.sample_max_ratio,
    )
    handle = VCASHandle(config, runtime, samplers=[], linears={})
    plan: list[Swap] = []
    for index, name in enumerate(names):
        for sub_name, sub in modules[name].named_modules():
            qualified = f"{name}.{sub_name}" if sub_name else name
            if type(sub) is nn.Linear:  # exact class: subclasses may have their own forward
                cls, init, layers = VCASLinear, _init_linear, handle.linears
            elif type(sub) is nn.Conv2d and _plain_padding(sub):
                cls, init, layers = VCASConv2d, _init_conv, handle.convs
            else:
                continue
            if module_filter_fn is not None and not module_filter_fn(sub, qualified):
                continue
            plan.append(Swap(sub, cls, functools.partial(init, runtime=runtime, block=index, config=config)))
            layers[qualified] = sub  # type: ignore[assignment]
    if not plan:
        warn_nothing_swapped(
            "apply_vcas", f"no Linear/Conv2d inside the {len(names)} block(s) passed module_filter_fn"
        )
        return model
    swap(plan)
    for index, name in enumerate(names):
        sampler = BlockSampler(index, name, runtime, last=index == len(names) - 1)
        handle.samplers.append(sampler)
        if config.compact:  # the sampler runs inside the compacted backward (it owns the hook call too)
            compacted = CompactedForward(
                modules[name],
                sampler,
                runtime,
                config.compact_max_ratio,
                direct=config.direct,
                direct_max_ratio=config.direct_max_ratio,
            )
            modules[name].forward = compacted
            handle.compacted.append(modules[name])
        else:
            handle.hooks.append(modules[name].register_forward_hook(sampler.hook))
    setattr(model, _ATTR, handle)
    return model


def _init_linear(layer: nn.Module, *, runtime: VCASRuntime, block: int, config: VCASConfig) -> None:
    layer.vcas_runtime = runtime
    layer.vcas_weight_ratio = config.initial_weight_ratio
    layer.vcas_token_break_even = 1.0  # token sampling wherever the ratio is below 1
    layer.vcas_block = block


def _init_conv(layer: nn.Module, *, runtime: VCASRuntime, block: int, config: VCASConfig) -> None:
    layer.vcas_runtime = runtime
    layer.vcas_block = block


def _plain_padding(conv: nn.Conv2d) -> bool:
    """Zero padding given as numbers: what the kept-rows backward passes to convolution_backward.

    Other convolutions (``padding="same"``, reflect/circular modes) stay plain
    ``nn.Conv2d``: still exact, only without the saving.
    """
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def remove_vcas(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_vcas` in place (hooks removed, layers plain again); returns ``model``.

    Idempotent: on a model without VCAS it changes nothing.
    """
    handle = vcas_handle(model)
    if handle is None:
        return model
    for hook in handle.hooks:
        hook.remove()
    for block in handle.compacted:
        del block.forward  # the class's forward again
    for layer in handle.layers.values():
        unswap(layer)
    delattr(model, _ATTR)
    return model
