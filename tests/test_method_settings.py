"""What every method must do, one parametrised test each, driven by ``method_settings.SETTINGS``.

Only the public API: ``Trainer``/``TrainConfig`` and ``greenprop train``. Exact resume
(an interrupted and resumed run ends bit-identical to an uninterrupted one), FLOP
accounting (counted, finite, below dense exactly where the method saves) and the CLI
round trip (``metrics.json`` names the method; ``--resume`` on a finished run changes
nothing).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import torch

from fixtures import Recorder, digits_subset
from greenprop.cli import main
from greenprop.train.config import TrainConfig
from greenprop.train.trainer import Trainer
from method_settings import NONE, SETTINGS, Bounds, MethodSetting

pytestmark = pytest.mark.usefixtures("one_thread")

BASELINE = next(s for s in SETTINGS if s.id == "baseline")
PARAMS = [pytest.param(s, id=s.id) for s in SETTINGS]
TIMED = ("time", "energy", "memory", "load")  # record fields that depend on the machine's state


@dataclass
class Run:
    out: Path
    metrics: dict[str, Any]  # as written to metrics.json


def _train(config: TrainConfig, out: Path, **kwargs: Any) -> Trainer:
    return Trainer(config, out, data=digits_subset(config.subset, config.test_subset), **kwargs)


def _read(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Callable[[TrainConfig], Run]:
    """Each config's uninterrupted run, trained once for all the tests of this module."""
    runs: dict[TrainConfig, Run] = {}

    def get(config: TrainConfig) -> Run:
        if config not in runs:
            out = tmp_path_factory.mktemp("run")
            _train(config, out).fit()
            runs[config] = Run(out, _read(out))
        return runs[config]

    return get


def _leaves(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every leaf of a nested checkpoint with its path (containers left out)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _leaves(value, (*path, i))
    else:
        yield path, obj


def _checkpoint(out: Path) -> dict[tuple[Any, ...], Any]:
    """The checkpoint's leaves; the epoch records (``history``) are compared as metrics."""
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    return {path: leaf for path, leaf in _leaves(state) if path[0] != "history"}


def _untimed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMED} for r in records]


@pytest.mark.parametrize("setting", PARAMS)
def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(
    setting: MethodSetting, trained, tmp_path
):
    config, cut = setting.config, setting.cut
    whole = trained(config)
    with pytest.raises(KeyboardInterrupt):
        _train(config, tmp_path, controllers=[Recorder(stop_at=cut)]).fit()
    saved = _read(tmp_path)
    assert not saved["complete"] and len(saved["epochs"]) == cut

    resumed = _train(config, tmp_path, resume=True, controllers=[Recorder()])
    assert resumed.start_epoch == cut
    assert [c.name for c in resumed.controllers] == [*setting.controllers, "recorder"]
    resumed.fit()
    metrics = _read(tmp_path)
    assert metrics["complete"] and len(metrics["epochs"]) == config.epochs

    expected, got = _checkpoint(whole.out), _checkpoint(tmp_path)
    assert expected.keys() == got.keys()
    for path, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == got[path].dtype and torch.equal(value, got[path]), path
        else:
            assert value == got[path], path
    assert _untimed(metrics["epochs"]) == _untimed(whole.metrics["epochs"])
    assert metrics["summary"]["flops"] == whole.metrics["summary"]["flops"]


def _within(ratio: float, bounds: Bounds) -> bool:
    lo, hi = bounds
    return ratio == lo if lo == hi else lo < ratio < hi


@pytest.mark.parametrize("setting", PARAMS)
def test_counted_flops_are_below_dense_exactly_where_the_method_saves(setting: MethodSetting, trained):
    metrics = trained(setting.config).metrics
    # The dense epoch: the baseline row's recipe on this row's model and data.
    dense_config = setting.config.replace(method=BASELINE.config.method, epochs=1)
    dense = trained(dense_config).metrics["epochs"][0]["flops"]
    assert [r["epoch"] for r in metrics["epochs"] if r["replaced_by"]] == list(setting.replaced)
    for record in metrics["epochs"]:
        for phase, bounds in (("forward", setting.forward), ("backward", setting.backward)):
            flops = record["flops"][phase]
            assert flops["kind"] == "counted" and flops["unit"] == "FLOP"
            assert math.isfinite(flops["value"]), (record["epoch"], phase)
            if record["epoch"] in setting.replaced:
                assert record["steps"] == 0 and flops["value"] == 0, (record["epoch"], phase)
            else:
                assert record["steps"] > 0, record["epoch"]
                assert flops["value"] > 0 or bounds == NONE, (record["epoch"], phase)
                ratio = flops["value"] / dense[phase]["value"]
                assert _within(ratio, bounds), (record["epoch"], phase, ratio)
    for phase in ("forward", "backward"):
        total = sum(r["flops"][phase]["value"] for r in metrics["epochs"])
        assert metrics["summary"]["flops"][phase]["value"] == pytest.approx(total, rel=1e-12)


def _cli_options(config: TrainConfig) -> list[str]:
    """The ``greenprop train`` options that give ``config`` (defaults left out)."""
    options = []
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "progress":
            options.append("--no-progress")
        elif isinstance(value, bool):
            options.append(flag)
        else:
            options += [flag, str(value)]
    return options


@pytest.mark.parametrize("setting", PARAMS)
def test_cli_train_writes_the_methods_metrics_and_resume_changes_nothing(
    setting: MethodSetting, tmp_path, capsys
):
    out = tmp_path / "run"
    args = ["train", *_cli_options(setting.config), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "acc@1" in printed and "metrics:" in printed
    metrics = _read(out)
    assert metrics["complete"] and metrics["config"] == setting.config.to_dict()
    assert metrics["method"]["label"] == setting.config.method
    for record in metrics["epochs"]:
        wanted = setting.replaced_record if record["epoch"] in setting.replaced else setting.record
        assert _holds(record, wanted), (record["epoch"], wanted)

    written = {name: (out / name).read_bytes() for name in ("metrics.json", "checkpoint.pt")}
    assert main([*args, "--resume"]) == 0
    assert {name: (out / name).read_bytes() for name in written} == written


def _holds(record: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Every wanted field is in ``record`` with that value; nested dicts (a controller's
    namespaced fields) are matched field by field."""
    for key, value in wanted.items():
        if key not in record:
            return False
        if isinstance(value, dict):
            if not isinstance(record[key], dict) or not _holds(record[key], value):
                return False
        elif record[key] != value:
            return False
    return True
