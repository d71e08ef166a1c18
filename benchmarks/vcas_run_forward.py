"""A preset's exact and VCAS training runs side by side, step by step: forward and backward times.

``benchmarks/vcas_step.py`` times one fixed batch at fixed ratios with Python's GC off; a
run's forward sees what it does not: a new token count in most batches (length-grouped,
trimmed), block and token ratios the controller sets every ``update_every`` steps, the
controller's estimation between steps, the trainer's untimed FLOP count of each new batch
shape, the GC on. This script builds each of the preset's runs as ``greenprop compare``
does (:class:`~greenprop.train.trainer.Trainer`: the same model, data, batches, method
and controller), and runs them in one process, one training step each in turn (the order
alternates every step), through the preset's epochs: the same batch for each run at each
step, each step as the trainer's loop runs it (controller hooks, the FLOP count of a new
batch shape, forward = ``call_model`` + loss, backward, optimizer). Only forward and
backward are timed (``time.perf_counter``), with the process's minor page faults over
each forward.

It prints, per epoch and for the whole run: each run's summed forward and backward
seconds, the sums' ratio (VCAS / exact) and the median and quartiles of the per-step
ratios (robust to the machine's spikes, which hit single steps); and the forward's
per-step ratio by batch length. A per-step median near the step benchmark's with a sum
ratio above it means spikes, not VCAS's work.

Run from the repository root (``GLIBC_TUNABLES`` as the run had it: unset for an untuned
``compare``)::

    python benchmarks/vcas_run_forward.py --preset vcas-minilm --threads 2
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from _common import add_common_options, header_lines, markdown_table, quartiles, save_results, start
from greenprop import kernels
from greenprop.experiments.presets import get_preset
from greenprop.train.config import TrainConfig
from greenprop.train.evaluate import prepare_inputs
from greenprop.train.tasks import call_model
from greenprop.train.trainer import Trainer

#: Batch lengths are grouped in buckets of this many tokens in the by-length table.
LENGTH_BUCKET = 10


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class RunSteps:
    """One of the preset's runs, stepped from outside as the trainer's loop steps it."""

    def __init__(self, label: str, trainer: Trainer) -> None:
        self.label, self.trainer = label, trainer
        self.batches: Iterator[Any] = iter(())
        self.times: dict[str, list[float]] = {"forward": [], "backward": []}
        self.faults: list[int] = []
        self.lengths: list[int] = []
        trainer.train_model.train()
        for controller in trainer.controllers:
            controller.on_train_start(trainer.run)

    def start_epoch(self, epoch: int) -> None:
        t = self.trainer
        for controller in t.controllers:
            controller.on_epoch_start(epoch)
        self.batches = t.parallel.epoch_batches(
            t.data.train, t.config.batch_size, t.config.seed, epoch, lengths=t.train_lengths
        )

    def step(self, epoch: int, step: int) -> None:
        t = self.trainer
        x, y = next(self.batches)
        x, y = prepare_inputs(x, t.device, t.config.channels_last), y.to(t.device)
        inputs, targets = t.task.batch(x, y)
        for controller in t.controllers:
            controller.on_step_start(epoch, step)
        t._flops_per_sample(epoch, step, inputs, targets)  # the loop's count of a new shape, untimed
        faults, started = minor_faults(), time.perf_counter()
        loss = t.loss_fn(call_model(t.train_model, inputs), targets)
        forward_done = time.perf_counter()
        self.faults.append(minor_faults() - faults)
        loss.backward()
        self.times["backward"].append(time.perf_counter() - forward_done)
        self.times["forward"].append(forward_done - started)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        for controller in t.controllers:
            controller.on_step_end(epoch, step, value)
        self.lengths.append(int(x.shape[-1]))


def build_runs(args: argparse.Namespace) -> list[RunSteps]:
    """The preset's runs (its first method is the exact baseline), built as compare builds them."""
    preset = get_preset(args.preset)
    if len(preset.methods) != 2:
        raise SystemExit(f"preset {args.preset!r} has {len(preset.methods)} methods; this script takes two")
    overrides = {k: v for k, v in (("subset", args.subset), ("batch_size", args.batch_size)) if v is not None}
    config = {**preset.config, **overrides, "progress": False, "seed": args.seed}
    runs = []
    for label, method in zip(("exact", "vcas"), preset.methods, strict=True):
        runs.append(RunSteps(label, Trainer(TrainConfig(**config, method=method), None)))
    return runs


def ratio_stats(exact: Sequence[float], vcas: Sequence[float]) -> dict[str, Any]:
    """The sums' ratio and the per-step ratios' median and quartiles (VCAS / exact)."""
    per_step = [v / e for e, v in zip(exact, vcas, strict=True)]
    q1, median, q3 = quartiles(per_step)
    return {
        "sum_exact_s": sum(exact),
        "sum_vcas_s": sum(vcas),
        "sum_ratio": sum(vcas) / sum(exact),
        "median_ratio": median,
        "iqr": (q1, q3),
    }


def summarize(runs: list[RunSteps], epoch_of: list[int]) -> dict[str, Any]:
    exact, vcas = runs
    spans = {f"epoch {e + 1}": [i for i, x in enumerate(epoch_of) if x == e] for e in sorted(set(epoch_of))}
    spans["run"] = list(range(len(epoch_of)))
    out: dict[str, Any] = {"phases": {}, "by_length": {}, "faults_per_forward": {}}
    for phase in ("forward", "backward"):
        out["phases"][phase] = {
            span: ratio_stats([exact.times[phase][i] for i in at], [vcas.times[phase][i] for i in at])
            for span, at in spans.items()
        }
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
    return out


def report(result: dict[str, Any]) -> list[str]:
    rows = []
    for phase, spans in result["phases"].items():
        for span, s in spans.items():
            rows.append(
                [
                    phase,
                    span,
                    f"{s['sum_exact_s']:.2f}",
                    f"{s['sum_vcas_s']:.2f}",
                    f"{s['sum_ratio']:.3f}",
                    f"{s['median_ratio']:.3f} [{s['iqr'][0]:.3f}, {s['iqr'][1]:.3f}]",
                ]
            )
    lines = markdown_table(
        ["phase", "steps", "exact s", "vcas s", "sum ratio", "per-step ratio, median [IQR]"], rows
    )
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
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--preset", default="vcas-minilm", help="a preset with a baseline and one VCAS method")
    p.add_argument("--epochs", type=int, default=None, help="epochs to run (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="steps per epoch (default: the whole epoch)")
    p.add_argument("--subset", type=int, default=None, help="training samples (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
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
    for option in ("epochs", "steps", "subset", "batch_size", "block"):
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
    epochs = args.epochs or trainer.config.epochs
    steps = min(args.steps or trainer.steps_per_epoch, trainer.steps_per_epoch)
    epoch_of: list[int] = []
    if args.no_gc:
        gc.disable()
    try:
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
                        run.step(epoch, step)
                epoch_of.extend([epoch] * len(chunk))
    finally:
        gc.enable()
    result = summarize(runs, epoch_of)
    lines = header_lines(env, f"VCAS vs exact, the {args.preset} preset's runs stepped side by side")
    lines += [
        f"{epochs} epoch(s) x {steps} steps, {args.block} step(s) of each run in turn (order alternating),"
        f" GC {'off' if args.no_gc else 'on'}; forward = call_model + loss, backward = loss.backward(); "
        "sums in s; ratios VCAS / exact.",
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
        "lengths": {r.label: r.lengths for r in runs},
        "epoch_of": epoch_of,
    }
    return save_results(out, args)


if __name__ == "__main__":
    main()
