"""apply_vcas / remove_vcas: put the samplers into a model in place, and take them out.

:func:`apply_vcas` registers a forward hook on each selected block (the hook routes
the block's output through a :class:`~greenprop.vcas.layers.BlockSampler`) and changes
the class of every ``nn.Linear`` inside those blocks to
:class:`~greenprop.vcas.layers.VCASLinear` (and of every zero-padded ``nn.Conv2d`` to
:class:`~greenprop.vcas.layers.VCASConv2d`, for residual CNN blocks). No module,
Parameter or buffer is created or renamed, so ``state_dict`` keys, optimizer param
groups and checkpoints are the same with and without VCAS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from greenprop.errors import GreenpropError
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
    if block_types is not None:
        types = tuple(block_types)
        if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise GreenpropError(f"block_types must be nn.Module classes, got {block_types!r}")
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


def vcas_handle(model: nn.Module) -> VCASHandle | None:
    """The handle of a model VCAS was applied to, else None."""
    return getattr(model, _ATTR, None)


def apply_vcas(
    model: nn.Module,
    config: VCASConfig | None = None,
    *,
    block_types: Sequence[type[nn.Module]] | None = None,
) -> VCASHandle:
    """Insert VCAS's samplers into ``model`` in place; returns what was changed.

    Args:
        model: the network; its blocks must act on each sample separately (no
            BatchNorm inside, see :mod:`greenprop.vcas.layers`), batch first.
        config: the settings (``VCASConfig()``, the paper's defaults, when None).
        block_types: classes of the blocks to sample after, e.g. transformers'
            ``BertLayer``; None finds the model's repeated layers (:func:`find_blocks`).

    Raises:
        GreenpropError: no block found, a block contains BatchNorm, or VCAS is
            already applied.
    """
    config = config or VCASConfig()
    if vcas_handle(model) is not None:
        raise GreenpropError("VCAS is already applied to this model; call remove_vcas first")
    names = find_blocks(model, block_types)
    if not names:
        wanted = "the given block_types" if block_types is not None else "repeated layers with Linear/Conv2d"
        raise GreenpropError(f"apply_vcas found no block to sample ({wanted}); pass block_types=")
    modules = dict(model.named_modules())
    for name in names:
        coupling = [n for n, m in modules[name].named_modules() if isinstance(m, _COUPLING_NORMS)]
        if coupling:
            raise GreenpropError(
                f"block {name!r} contains BatchNorm ({name}.{coupling[0]}): its backward mixes samples, "
                "so rows dropped by VCAS would be refilled and nothing saved; use LayerNorm/GroupNorm blocks "
                "(the zoo has resnet18-gn)"
            )
    runtime = VCASRuntime(
        activation_generator=torch.Generator().manual_seed(config.seed),
        weight_generator=torch.Generator().manual_seed(config.seed + 1),
        check_rows=config.check_rows,
    )
    owners: dict[int, str] = {}
    for name in names:  # a layer shared by two blocks would read the wrong block's record
        for sub_name, sub in modules[name].named_modules():
            if isinstance(sub, (nn.Linear, nn.Conv2d)) and owners.setdefault(id(sub), name) != name:
                raise GreenpropError(
                    f"layer {name}.{sub_name} is shared by blocks {owners[id(sub)]!r} and {name!r}; "
                    "VCAS needs each sampled layer inside one block"
                )
    handle = VCASHandle(config, runtime, samplers=[], linears={})
    for index, name in enumerate(names):
        sampler = BlockSampler(index, name, runtime, last=index == len(names) - 1)
        handle.samplers.append(sampler)
        handle.hooks.append(modules[name].register_forward_hook(sampler.hook))
        for sub_name, sub in modules[name].named_modules():
            if type(sub) is nn.Linear:  # exact class: subclasses may have their own forward
                sub.__class__ = VCASLinear
                sub.vcas_runtime = runtime
                sub.vcas_weight_ratio = config.initial_weight_ratio
                sub.vcas_block = index
                handle.linears[f"{name}.{sub_name}"] = sub
            elif type(sub) is nn.Conv2d and _plain_padding(sub):
                sub.__class__ = VCASConv2d
                sub.vcas_runtime = runtime
                sub.vcas_block = index
                handle.convs[f"{name}.{sub_name}"] = sub
    setattr(model, _ATTR, handle)
    return handle


def _plain_padding(conv: nn.Conv2d) -> bool:
    """Zero padding given as numbers: what the kept-rows backward passes to convolution_backward.

    Other convolutions (``padding="same"``, reflect/circular modes) stay plain
    ``nn.Conv2d``: still exact, only without the saving.
    """
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def remove_vcas(model: nn.Module) -> None:
    """Undo :func:`apply_vcas`: hooks removed, layers plain ``nn.Linear`` / ``nn.Conv2d`` again."""
    handle = vcas_handle(model)
    if handle is None:
        raise GreenpropError("VCAS is not applied to this model")
    for hook in handle.hooks:
        hook.remove()
    for layer in handle.linears.values():
        layer.__class__ = nn.Linear
        del layer.vcas_runtime, layer.vcas_weight_ratio, layer.vcas_block
    for conv in handle.convs.values():
        conv.__class__ = nn.Conv2d
        del conv.vcas_runtime, conv.vcas_block
    delattr(model, _ATTR)
