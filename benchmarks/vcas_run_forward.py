"""A preset's exact and VCAS training runs side by side, step by step: every phase of the step.

``benchmarks/vcas_step.py`` times one fixed batch at fixed ratios with Python's GC off; a
run's step sees what it does not: a new token count in most batches (length-grouped,
trimmed), block and token ratios the controller sets every ``update_every`` steps, the
controller's estimation between steps, the trainer's untimed FLOP count of each new batch
shape, the GC on. ``greenprop compare`` times whole runs, but an exact epoch and a VCAS
epoch minutes apart, each under that moment's load of a shared machine. This script builds
each of the preset's runs as ``greenprop compare`` does
(:class:`~greenprop.train.trainer.Trainer`: the same model, data, batches, method and
controller) and runs them in one process through the trainer's own epoch loop
(``Trainer._epoch_steps``, which ``Trainer._run_epoch`` runs to its end), one training step
of each in turn (the order alternates every step): the same batch for each run at each
step, each run with its own global RNG stream (seeded at each epoch's start as
``Trainer._fit`` seeds it), and each epoch ending as the trainer's does (scheduler,
evaluation, ``on_epoch_end``). The runs' epochs are what ``Trainer.fit`` makes of them.

Each step's phases are the trainer's ``PhaseTimer`` phases (data, hooks, forward, backward,
optimizer; an epoch's start, its ``on_epoch_start`` hooks, is timed with its first step),
and their sum is the step's train time as ``compare`` counts it (everything but the
evaluation). VCAS's estimation (the controller's ``update``, inside its hooks) is timed on
its own, and the process's minor page faults over each training forward (``call_model``).

It prints, per epoch and for the whole run: each run's summed seconds of every phase and of
the train time, the sums' ratio (VCAS / exact) and the median and quartiles of the per-step
ratios (robust to the machine's spikes, which hit single steps); the estimation's share of
VCAS's train time; the forward's per-step ratio by batch length; and each run's test
accuracy and loss after every epoch (``Trainer._evaluate``), which for the same seed are
what ``compare`` reports where the run's course does not depend on the machine (a measured
token policy times layers: its decisions may differ from one process to the next).

Run from the repository root (``GLIBC_TUNABLES`` as the run had it: unset for an untuned
``compare``)::

    python benchmarks/vcas_run_forward.py --preset vcas-minilm --threads 2
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Generator, Sequence
from types import TracebackType
from typing import Any

import torch

import greenprop.train.trainer as trainer_module
from _common import add_common_options, header_lines, markdown_table, quartiles, save_results, start
from greenprop import kernels
from greenprop.experiments.presets import get_preset
from greenprop.metering import PhaseTimer
from greenprop.seeding import trainer_epoch_seed
from greenprop.train.config import TrainConfig
from greenprop.train.trainer import Trainer
from greenprop.vcas.controller import VCAS

#: Batch lengths are grouped in buckets of this many tokens in the by-length table.
LENGTH_BUCKET = 10
#: The trainer's timed phases of a step (Trainer._train_epoch); their sum is the step's train time.
PHASES = ("data", "hooks", "forward", "backward", "optimizer")
#: Per-step series: the phases, their sum, the step's wall time (untimed work included), the estimation.
SERIES = (*PHASES, "train", "wall", "estimation")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def batch_length(inputs: Any) -> int:
    """The last dimension of the model's input (a text batch's token count)."""
    first = inputs[0] if isinstance(inputs, tuple) else inputs
    return int(first.shape[-1])


class ForwardProbe:
    """The trainer's training forward (its ``call_model``) wrapped, while in use, to note each
    forward's minor page faults and batch length in the run being stepped (only in its forward
    phase: VCAS's estimation and FLOP account call it too)."""

    def __init__(self) -> None:
        self.run: RunSteps | None = None
        self._original: Callable[..., Any] = trainer_module.call_model

    def _probed(self, model: torch.nn.Module, inputs: Any) -> Any:
        faults = minor_faults()
        try:
            return self._original(model, inputs)
        finally:
            if self.run is not None and self.run.timer.is_open("forward"):
                self.run.faults.append(minor_faults() - faults)
                self.run.lengths.append(batch_length(inputs))

    def __enter__(self) -> ForwardProbe:
        trainer_module.call_model = self._probed
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        trainer_module.call_model = self._original


class RunSteps:
    """One of the preset's runs, stepped from outside through its trainer's own epoch loop
    (``Trainer._epoch_steps``), under a global RNG state of its own, as if it ran alone."""

    def __init__(self, label: str, trainer: Trainer) -> None:
        self.label, self.trainer = label, trainer
        self.probe: ForwardProbe | None = None
        self.times: dict[str, list[float]] = {name: [] for name in SERIES}
        self.faults: list[int] = []
        self.lengths: list[int] = []
        #: Each epoch's record, as Trainer.fit keeps it (test accuracy and loss, times, ...).
        self.records: list[dict[str, Any]] = []
        #: Each epoch's evaluation seconds (not train time).
        self.eval_s: list[float] = []
        #: Seconds of each of VCAS's estimations (its controller's update), in order.
        self.updates_s: list[float] = []
        self.timer = PhaseTimer(trainer.device)
        self._epoch: Generator[int, None, dict[str, Any]] | None = None
        self._rng = torch.get_rng_state()
        for controller in trainer.controllers:
            controller.on_train_start(trainer.run)  # as Trainer._fit
            if isinstance(controller, VCAS):
                controller.update = self._timed(controller.update)  # type: ignore[method-assign]

    def _timed(self, update: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        def timed(*args: Any, **kwargs: Any) -> dict[str, Any]:
            started = time.perf_counter()
            try:
                return update(*args, **kwargs)
            finally:
                self.updates_s.append(time.perf_counter() - started)

        return timed

    def start_epoch(self, epoch: int) -> None:
        t = self.trainer
        torch.manual_seed(trainer_epoch_seed(t.config.seed, epoch))  # as Trainer._fit, before each epoch
        self._rng = torch.get_rng_state()
        self.timer = PhaseTimer(t.device)
        self._epoch = t._epoch_steps(epoch, self.timer)

    def _resume(self) -> tuple[dict[str, float], float, float, dict[str, Any] | None]:
        """Run the epoch on to its next pause, under this run's RNG state: seconds per timed
        phase, wall seconds, estimation seconds, and the epoch's record once it ended."""
        if self._epoch is None:
            raise RuntimeError(f"{self.label}: no epoch started")
        if self.probe is not None:
            self.probe.run = self
        torch.set_rng_state(self._rng)
        before, updates = self.timer.totals(), len(self.updates_s)
        record = None
        started = time.perf_counter()
        try:
            next(self._epoch)
        except StopIteration as end:
            record = end.value
        wall = time.perf_counter() - started
        self._rng = torch.get_rng_state()
        spent = {k: v - before.get(k, 0.0) for k, v in self.timer.totals().items()}
        return spent, wall, sum(self.updates_s[updates:]), record

    def step(self) -> None:
        spent, wall, estimation, record = self._resume()
        if record is not None:
            raise RuntimeError(f"{self.label}: the trainer's epoch ended before the script's steps did")
        unknown = sorted(k for k, v in spent.items() if v and k not in PHASES)
        if unknown:
            raise SystemExit(
                f"{self.label}: a step timed phase(s) {unknown}, which this script does not report"
            )
        for phase in PHASES:
            self.times[phase].append(spent.get(phase, 0.0))
        self.times["train"].append(sum(spent.get(phase, 0.0) for phase in PHASES))
        self.times["wall"].append(wall)
        self.times["estimation"].append(estimation)

    def end_epoch(self) -> None:
        """The epoch's end as the trainer's loop runs it (scheduler, evaluation, on_epoch_end)."""
        spent, _, _, record = self._resume()
        if record is None:
            raise RuntimeError(f"{self.label}: the trainer's epoch has more steps than the script ran")
        train = {k: v for k, v in spent.items() if v and k != "eval"}
        if train:
            raise RuntimeError(f"{self.label}: the epoch's end timed train phases {train}")
        self.eval_s.append(spent.get("eval", 0.0))
        self.trainer.history.append(record)  # as Trainer._fit
        self.records.append(record)
        self._epoch = None


def run_configs(args: argparse.Namespace) -> list[tuple[str, TrainConfig]]:
    """The preset's runs' configs, labelled exact (its first method, the baseline) and vcas."""
    preset = get_preset(args.preset)
    if len(preset.methods) != 2:
        raise SystemExit(f"preset {args.preset!r} has {len(preset.methods)} methods; this script takes two")
    options = (("subset", args.subset), ("test_subset", args.test_subset), ("batch_size", args.batch_size))
    overrides = {k: v for k, v in options if v is not None}
    config = {**preset.config, **overrides, "progress": False, "seed": args.seed}
    if args.epochs is not None:
        config["epochs"] = args.epochs
    exact, vcas = preset.methods
    if args.vcas_options:  # later options override the preset's (tau_act=0.05,...)
        vcas = f"{vcas},{args.vcas_options}" if ":" in vcas else f"{vcas}:{args.vcas_options}"
    return [("exact", TrainConfig(**config, method=exact)), ("vcas", TrainConfig(**config, method=vcas))]


def build_runs(args: argparse.Namespace) -> list[RunSteps]:
    """The preset's runs, built as compare builds them (a Trainer of each config)."""
    return [RunSteps(label, Trainer(config, None)) for label, config in run_configs(args)]


def ratio_stats(exact: Sequence[float], vcas: Sequence[float]) -> dict[str, Any]:
    """The sums' ratio and the per-step ratios' median and quartiles (VCAS / exact); steps
    where exact's time is 0 have no ratio, a sum of 0 none either (None)."""
    per_step = [v / e for e, v in zip(exact, vcas, strict=True) if e > 0]
    q1, median, q3 = quartiles(per_step) if per_step else (None, None, None)
    return {
        "sum_exact_s": sum(exact),
        "sum_vcas_s": sum(vcas),
        "sum_ratio": sum(vcas) / sum(exact) if sum(exact) > 0 else None,
        "median_ratio": median,
        "iqr": (q1, q3),
    }


def summarize(runs: list[RunSteps], epoch_of: list[int]) -> dict[str, Any]:
    exact, vcas = runs
    spans = {f"epoch {e + 1}": [i for i, x in enumerate(epoch_of) if x == e] for e in sorted(set(epoch_of))}
    spans["run"] = list(range(len(epoch_of)))
    out: dict[str, Any] = {"phases": {}, "by_length": {}}
    for phase in (*PHASES, "train"):
        out["phases"][phase] = {
            span: ratio_stats([exact.times[phase][i] for i in at], [vcas.times[phase][i] for i in at])
            for span, at in spans.items()
        }
    out["estimation"] = {"spans": {}, "updates_s": vcas.updates_s}
    for span, at in spans.items():
        estimation = sum(vcas.times["estimation"][i] for i in at)
        train = sum(vcas.times["train"][i] for i in at)
        share = estimation / train if train else None
        out["estimation"]["spans"][span] = {"s": estimation, "share_of_vcas_train": share}
    out["untimed_ms_per_step"] = {}
    for r in runs:
        untimed = [w - t for w, t in zip(r.times["wall"], r.times["train"], strict=True)]
        out["untimed_ms_per_step"][r.label] = 1e3 * statistics.median(untimed)
    buckets: dict[int, list[int]] = {}
    for i, length in enumerate(exact.lengths):
        buckets.setdefault(length // LENGTH_BUCKET * LENGTH_BUCKET, []).append(i)
    for bucket, at in sorted(buckets.items()):
        e, v = [exact.times["forward"][i] for i in at], [vcas.times["forward"][i] for i in at]
        out["by_length"][bucket] = {
            "steps": len(at),
            "exact_ms": 1e3 * statistics.median(e),
            "vcas_ms": 1e3 * statistics.median(v),
            "median_ratio": statistics.median(b / a for a, b in zip(e, v, strict=True)),
        }
    out["faults_per_forward"] = {r.label: statistics.fmean(r.faults) for r in runs}
    out["accuracy"] = {
        r.label: [{k: rec.get(k) for k in ("epoch", "acc1", "loss", "train_loss")} for rec in r.records]
        for r in runs
    }
    out["eval_s"] = {r.label: r.eval_s for r in runs}
    return out


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def report(result: dict[str, Any]) -> list[str]:
    rows = []
    for phase, spans in result["phases"].items():
        for span, s in spans.items():
            q1, q3 = s["iqr"]
            rows.append(
                [
                    phase,
                    span,
                    f"{s['sum_exact_s']:.2f}",
                    f"{s['sum_vcas_s']:.2f}",
                    _ratio(s["sum_ratio"]),
                    f"{_ratio(s['median_ratio'])} [{_ratio(q1)}, {_ratio(q3)}]",
                ]
            )
    lines = markdown_table(
        ["phase", "steps", "exact s", "vcas s", "sum ratio", "per-step ratio, median [IQR]"], rows
    )
    estimation = result["estimation"]
    updates = estimation["updates_s"]
    shares = ", ".join(
        f"{span} {100 * e['share_of_vcas_train']:.1f}%"
        for span, e in estimation["spans"].items()
        if e["share_of_vcas_train"] is not None
    )
    lines += [
        "",
        f"VCAS's estimation (its controller's update, in its hooks): {len(updates)} updates, "
        f"{sum(updates):.2f} s"
        + (f" (the first, with any measured policy's timing, {updates[0]:.2f} s)" if updates else "")
        + f"; share of VCAS's train time: {shares}.",
    ]
    untimed = result["untimed_ms_per_step"]
    lines += [
        f"Untimed work per step (wall - train; FLOP counts of new shapes, the loop's bookkeeping), "
        f"median: exact {untimed['exact']:.2f} ms, vcas {untimed['vcas']:.2f} ms."
    ]
    by_length = [
        [
            f"{b}-{b + LENGTH_BUCKET - 1}",
            str(s["steps"]),
            f"{s['exact_ms']:.1f}",
            f"{s['vcas_ms']:.1f}",
            f"{s['median_ratio']:.3f}",
        ]
        for b, s in result["by_length"].items()
    ]
    lines += ["", "Forward by batch length (tokens):", ""]
    lines += markdown_table(["length", "steps", "exact ms", "vcas ms", "per-step ratio, median"], by_length)
    faults = result["faults_per_forward"]
    lines += ["", f"Minor page faults per forward: exact {faults['exact']:.0f}, vcas {faults['vcas']:.0f}"]
    accuracy = result["accuracy"]
    rows = [
        [
            str(e["epoch"] + 1),
            f"{e['acc1']:.2f}",
            f"{v['acc1']:.2f}",
            f"{e['loss']:.4f}",
            f"{v['loss']:.4f}",
            f"{result['eval_s']['exact'][i]:.2f}",
            f"{result['eval_s']['vcas'][i]:.2f}",
        ]
        for i, (e, v) in enumerate(zip(accuracy["exact"], accuracy["vcas"], strict=True))
    ]
    lines += ["", "Test set after each epoch (Trainer._evaluate, as the trainer's epoch ends):", ""]
    lines += markdown_table(
        ["epoch", "exact acc1 %", "vcas acc1 %", "exact loss", "vcas loss", "exact eval s", "vcas eval s"],
        rows,
    )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--preset", default="vcas-minilm", help="a preset with a baseline and one VCAS method")
    p.add_argument("--epochs", type=int, default=None, help="epochs to run (default: the preset's)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per epoch (default: the whole epoch; fewer end each epoch there, as the trainer ends it)",
    )
    p.add_argument("--subset", type=int, default=None, help="training samples (default: the preset's)")
    p.add_argument("--test-subset", type=int, default=None, help="test samples (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument(
        "--vcas-options",
        default="",
        help="options added to the preset's VCAS method, overriding its own (e.g. tau_act=0.05,tau_w=0.05)",
    )
    p.add_argument(
        "--no-gc", action="store_true", help="Python's GC off while stepping (the trainer leaves it on)"
    )
    p.add_argument(
        "--block",
        type=int,
        default=1,
        help="steps of one run before the other's steps (default 1; compare runs a whole epoch of each)",
    )
    add_common_options(p)
    args = p.parse_args(argv)
    for option in ("epochs", "steps", "subset", "test_subset", "batch_size", "block"):
        value = getattr(args, option)
        if value is not None and value < 1:
            p.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    env = start(args, __file__, argv)
    runs = build_runs(args)
    kernels.load()  # as the trainer does before its first timed epoch
    trainer = runs[0].trainer
    epochs = trainer.config.epochs
    steps = min(args.steps or trainer.steps_per_epoch, trainer.steps_per_epoch)
    for run in runs:
        run.trainer.steps_per_epoch = steps  # the loop's length: an epoch ends after these steps
    epoch_of: list[int] = []
    load_at_start = os.getloadavg()
    if args.no_gc:
        gc.disable()
    try:
        with ForwardProbe() as probe:
            for run in runs:
                run.probe = probe
            for epoch in range(epochs):
                for run in runs:
                    run.start_epoch(epoch)
                for first in range(0, steps, args.block):
                    chunk = range(first, min(first + args.block, steps))
                    turn = len(epoch_of) // args.block % 2
                    for run in runs if turn == 0 else runs[::-1]:
                        for step in chunk:
                            print(
                                f"  epoch {epoch + 1} step {step + 1}/{steps}",
                                file=sys.stderr,
                                end="\r",
                                flush=True,
                            )
                            run.step()
                    epoch_of.extend([epoch] * len(chunk))
                for run in runs:
                    run.end_epoch()
    finally:
        gc.enable()
    load_at_end = os.getloadavg()
    result = summarize(runs, epoch_of)
    result["load_average"] = {"start": load_at_start, "end": load_at_end}
    lines = header_lines(env, f"VCAS vs exact, the {args.preset} preset's runs stepped side by side")
    lines += [
        f"{epochs} epoch(s) x {steps} steps, {args.block} step(s) of each run in turn (order alternating),"
        f" GC {'off' if args.no_gc else 'on'}; the trainer's phases per step (an epoch's start with its first"
        " step), train = their sum (compare's train time: all but evaluation); forward = call_model + loss,"
        " backward = loss.backward(); sums in s; ratios VCAS / exact. Load average (1, 5, 15 min) at start "
        + " / ".join(f"{x:.2f}" for x in load_at_start)
        + ", at end "
        + " / ".join(f"{x:.2f}" for x in load_at_end)
        + ".",
        "",
        *report(result),
    ]
    print("\n".join(lines), flush=True)
    out = {
        "benchmark": "vcas_run_forward",
        "environment": env,
        "preset": args.preset,
        "result": result,
        "times": {r.label: r.times for r in runs},
        "faults": {r.label: r.faults for r in runs},
        "lengths": {r.label: r.lengths for r in runs},
        "epoch_of": epoch_of,
        "records": {r.label: r.records for r in runs},
    }
    return save_results(out, args)


if __name__ == "__main__":
    main()
