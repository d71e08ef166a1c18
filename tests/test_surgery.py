"""The surgery contract every method keeps: apply_* / remove_* / controller on the same toy model.

One parametrised test per rule, run for ssProp and VCAS alike, plus the shared class-swap
engine's own rollback.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from greenprop.errors import GreenpropError
from greenprop.methods import build_method, parse_method
from greenprop.ssprop import SSProp, SSPropConfig, apply_ssprop, remove_ssprop, sparse_layers
from greenprop.surgery import SurgeryWarning, Swap, swap, unswap
from greenprop.vcas import VCAS, VCASConfig, apply_vcas, remove_vcas, vcas_handle

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """A pre-norm residual MLP block: per-sample, batch first (what VCAS needs)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def _model() -> nn.Module:
    """Three blocks and a head: both methods convert the same six Linears (not the head)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(*(Block(6) for _ in range(3))), nn.Linear(6, 3))


BLOCK_LINEARS = {f"0.{i}.fc{j}" for i in range(3) for j in (1, 2)}


@dataclass(frozen=True)
class Method:
    """How one method's surgery and controller are called, for the parametrised rules."""

    name: str
    apply: Callable[..., nn.Module]
    remove: Callable[[nn.Module], nn.Module]
    controller: Callable[[nn.Module], Any]
    config: Any
    other_config: Any  # another method's config: a wrong type for this one
    converted: Callable[[nn.Module], dict[str, nn.Module]]


METHODS = [
    Method(
        "ssprop",
        apply_ssprop,
        remove_ssprop,
        lambda model: SSProp(model, 0.5),
        SSPropConfig(keep=0.5, layers=("linear",)),
        VCASConfig(),
        sparse_layers,
    ),
    Method(
        "vcas",
        apply_vcas,
        remove_vcas,
        VCAS,
        VCASConfig(seed=3),
        SSPropConfig(),
        lambda model: dict(vcas_handle(model).layers) if vcas_handle(model) else {},
    ),
]
by_method = pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])


def _snapshot(model: nn.Module) -> list[tuple[Any, ...]]:
    """Everything surgery could change: classes, plain attributes, hooks, Parameters and keys."""
    modules = [
        (name, type(m), sorted(m.__dict__), len(m._forward_hooks), [id(p) for p in m._parameters.values()])
        for name, m in model.named_modules()
    ]
    return [*modules, (sorted(model.__dict__), list(model.state_dict()))]


def _quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _train_step(model: nn.Module) -> None:
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(1))
    model(x).square().mean().backward()


@by_method
def test_apply_and_remove_return_the_model(method: Method) -> None:
    model = _model()
    assert method.apply(model, method.config) is model
    assert set(method.converted(model)) == BLOCK_LINEARS
    assert method.remove(model) is model
    assert method.converted(model) == {}


@by_method
def test_remove_is_idempotent_and_silent(method: Method) -> None:
    model = _model()
    untouched = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert method.remove(model) is model  # never converted: nothing to do
        assert _snapshot(model) == untouched
        method.apply(model, method.config)
        _train_step(model)
        method.remove(model)
        assert method.remove(model) is model  # a second call
    assert _snapshot(model) == untouched


@by_method
@pytest.mark.parametrize("case", ["no candidate layer", "filter rejects all", "already converted"])
def test_a_call_that_converts_nothing_warns_and_changes_nothing(method: Method, case: str) -> None:
    model = nn.Sequential(nn.ReLU(), nn.Tanh()) if case == "no candidate layer" else _model()
    kwargs: dict[str, Any] = {}
    if case == "filter rejects all":
        kwargs["module_filter_fn"] = lambda module, name: False
    if case == "already converted":
        method.apply(model, method.config)
    before = _snapshot(model)
    with pytest.warns(SurgeryWarning, match=rf"^apply_{method.name} converted no layer: "):
        assert method.apply(model, method.config, **kwargs) is model
    assert _snapshot(model) == before


def _raising_filter(module: nn.Module, name: str) -> bool:
    if name.endswith("fc2"):  # after some layers were already chosen
        raise RuntimeError("filter failed")
    return True


BAD_OPTIONS = [
    pytest.param("config", GreenpropError, "config must be", id="config-of-another-method"),
    pytest.param({"module_filter_fn": 42}, GreenpropError, "module_filter_fn", id="filter-not-callable"),
    pytest.param({"module_filter_fn": _raising_filter}, RuntimeError, "filter failed", id="filter-raises"),
]


@by_method
@pytest.mark.parametrize(("options", "error", "match"), BAD_OPTIONS)
def test_a_bad_option_leaves_the_model_as_it_was(method: Method, options, error, match: str) -> None:
    model = _model()
    before = _snapshot(model)
    config, kwargs = (method.other_config, {}) if options == "config" else (method.config, options)
    with pytest.raises(error, match=match):
        method.apply(model, config, **kwargs)
    assert _snapshot(model) == before
    assert method.converted(model) == {}


def test_a_bad_block_types_leaves_the_model_as_it_was() -> None:
    model = _model()
    before = _snapshot(model)
    with pytest.raises(GreenpropError, match="block_types"):
        apply_vcas(model, block_types=[int])
    assert _snapshot(model) == before


@by_method
def test_conversion_keeps_the_parameters_and_the_undo_is_exact(method: Method) -> None:
    model = _model()
    untouched = _snapshot(model)
    params = list(model.parameters())
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method.apply(model, method.config)
    layers = method.converted(model)
    assert all(isinstance(layer, nn.Linear) and type(layer) is not nn.Linear for layer in layers.values())
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], params, strict=True))
    _train_step(model)
    opt.step()
    method.remove(model)
    assert _snapshot(model) == untouched  # classes, attributes, hooks: as before
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))


@by_method
def test_module_filter_fn_chooses_the_layers(method: Method) -> None:
    model = _model()
    modules = dict(model.named_modules())
    asked: list[str] = []

    def only_fc1(module: nn.Module, name: str) -> bool:
        assert modules[name] is module  # called with the layer and its qualified name
        asked.append(name)
        return name.endswith("fc1")

    method.apply(model, method.config, module_filter_fn=only_fc1)
    assert set(method.converted(model)) == {f"0.{i}.fc1" for i in range(3)}
    assert {f"0.{i}.fc1" for i in range(3)} <= set(asked)
    assert all(type(modules[f"0.{i}.fc2"]) is nn.Linear for i in range(3))


@by_method
def test_the_controller_refuses_an_unconverted_model_the_same_way(method: Method) -> None:
    model = _model()
    pattern = rf"^the model has no \w+ layers: call apply_{method.name}\(model\) first$"
    with pytest.raises(GreenpropError, match=pattern):
        method.controller(model)
    method.apply(model, method.config)
    method.controller(model)  # converted: fine
    method.remove(model)
    with pytest.raises(GreenpropError, match=pattern):
        method.controller(model)


@by_method
def test_the_cli_builder_refuses_a_model_it_cannot_convert(method: Method) -> None:
    # A run whose method converted nothing would report dense training under its name.
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning escapes either: one clear error
        with pytest.raises(GreenpropError, match=rf"^{method.name}.* converted no layer: "):
            build_method(parse_method(method.name), model, epochs=2, steps_per_epoch=1, seed=0)
    assert _snapshot(model) == before


def test_swap_rolls_back_when_an_init_fails() -> None:
    class Marked(nn.Linear):
        pass

    def mark(module: nn.Module) -> None:
        module.mark = True

    def fail(module: nn.Module) -> None:
        module.half_done = True
        raise RuntimeError("init failed")

    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    before = [sorted(a.__dict__), sorted(b.__dict__)]
    with pytest.raises(RuntimeError, match="init failed"):
        swap([Swap(a, Marked, mark), Swap(b, Marked, fail)])
    assert type(a) is nn.Linear and type(b) is nn.Linear
    assert [sorted(a.__dict__), sorted(b.__dict__)] == before
    assert not unswap(a)  # nothing left to undo
