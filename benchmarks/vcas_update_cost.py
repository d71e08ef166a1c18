"""One VCAS update's time on the vcas-minilm preset: its estimation part trimmed or not, or its
activation pass left out where no block samples or not.

Builds the preset's run (all-MiniLM-L6-v2 on Rotten Tomatoes, batch 32, trim_padding and
group_by_length, VCAS as the preset sets it) through the reference trainer, times the first
update (the measured token policy's timing included), lets two more updates sample, then
times further updates from a saved controller state (restored before each, so every
variant sees the same ratios and batches), order rotating every round, Python's GC off.
``--ab trim`` (the default) times them with the estimation part (8 of 32 samples) cut to
its own longest sequence, as the trainer does (``trimmed``), or left at its batch's length
(``untrimmed``: the run's ``batch_head`` off). ``--ab fold`` times them with the
activation pass left out where no block samples (``folded``, the default:
``estimation.two_backwards``) or always run (``two passes``, ``VCAS.fold_exact`` off),
from two states: the first update's (step 0, nothing samples; the token policy the first
update decided is kept, not timed again) and the later one.
Then times training steps (forward, backward, fused AdamW) on the preset's length-grouped
batches and reports the share of train time the updates imply over the preset's 300
steps (one update every 50: the first update plus five).

Run from the repository root: ``python benchmarks/vcas_update_cost.py --help``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from _common import add_common_options, header_lines, markdown_table, rotated, save_results, start
from greenprop.experiments.presets import PRESETS
from greenprop.train.config import TrainConfig
from greenprop.train.trainer import Trainer

#: --ab: the variants timed (the first is the trainer's way, the last the reference).
VARIANTS = {"trim": ("trimmed", "untrimmed"), "fold": ("folded", "two passes")}
STEPS, EVERY = 300, 50  # the preset's run and update interval


def build(args: argparse.Namespace) -> Trainer:
    preset = PRESETS["vcas-minilm"]
    settings = {**preset.config, "method": preset.methods[1], "seed": args.seed, "progress": False}
    settings.update(subset=args.subset, test_subset=8)
    return Trainer(TrainConfig(**settings))


def time_update(trainer: Trainer, head: Any, fold: bool = True) -> float:
    """Seconds of one update, the estimation part cut by ``head`` (None: the first samples),
    the activation pass left out where no block samples if ``fold``."""
    vcas, run = trainer.controllers[0], trainer.run
    run.batch_head, vcas.fold_exact = head, fold
    batches = iter(lambda: run.draw_batch(vcas._estimation_generator), None)  # as on_step_start draws
    start_time = time.perf_counter()
    vcas.update(batches, run.loss_fn)
    return time.perf_counter() - start_time


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--rounds", type=int, default=8, help="timed updates per variant (default 8)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (default 20)")
    p.add_argument("--subset", type=int, default=4800, help="training snippets (default the preset's 4800)")
    p.add_argument(
        "--ab",
        choices=sorted(VARIANTS),
        default="trim",
        help="trim: estimation part trimmed or not; "
        "fold: activation pass left out where no block samples or not",
    )
    add_common_options(p)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.subset < 32:
        p.error("--rounds and --steps must be >= 1, --subset >= 32")
    return args


def _policy_timer(vcas: Any) -> list[float]:
    """Wrap the controller's token policy so that the seconds it takes are recorded."""
    seconds: list[float] = []
    apply = vcas._apply_token_policy

    def timed(shapes: Any) -> None:
        start_time = time.perf_counter()
        apply(shapes)
        seconds.append(time.perf_counter() - start_time)

    vcas._apply_token_policy = timed
    return seconds


def _restore(vcas: Any, state: dict[str, Any], policy: dict[str, float]) -> None:
    """The controller at ``state``, with ``policy`` (the first update's) in place of timing it again."""
    vcas.load_state_dict(copy.deepcopy(state))
    if vcas.token_break_even is None:
        vcas._set_break_even(policy)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the Markdown report, return (and optionally save) results."""
    args = parse_args(argv)
    env = start(args, __file__, argv)
    trainer = build(args)
    vcas, trim = trainer.controllers[0], trainer.run.batch_head
    vcas.on_train_start(trainer.run)
    trainer.model.train()
    policy_s = _policy_timer(vcas)
    states = {"step 0": copy.deepcopy(vcas.state_dict())}
    first = time_update(trainer, trim)
    policy = dict(vcas.token_break_even or {})
    for _ in range(2):  # ratios below 1: rows and tokens sampled
        time_update(trainer, trim)
    states["later"] = copy.deepcopy(vcas.state_dict())
    if args.ab == "trim":
        del states["step 0"]
    variants = VARIANTS[args.ab]
    times: dict[tuple[str, str], list[float]] = {(s, v): [] for s in states for v in variants}
    folds = {}
    gc.collect()
    gc.disable()
    try:
        for r in range(args.rounds):
            for name, state in states.items():
                for variant in rotated(list(variants), r):
                    _restore(vcas, state, policy)
                    folds[name] = all(s.drawn_ratio >= 1.0 for s in vcas.handle.samplers)
                    for _ in range(2 * r):  # each round its own batches, the same for both variants
                        torch.randperm(len(trainer.data.train), generator=vcas._estimation_generator)
                    head = None if variant == "untrimmed" else trim
                    seconds = time_update(trainer, head, fold=variant != "two passes")
                    times[(name, variant)].append(seconds)
        batches = trainer.parallel.epoch_batches(
            trainer.data.train, trainer.config.batch_size, args.seed, 0, lengths=trainer.train_lengths
        )
        steps = []
        for _ in range(args.steps):
            x, y = next(batches)
            start_time = time.perf_counter()
            trainer.loss_fn(trainer.model(x), y).backward()
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            steps.append(time.perf_counter() - start_time)
    finally:
        gc.enable()
    step = statistics.median(steps)
    updates = STEPS // EVERY
    rows = []
    for variant in variants:
        medians = {name: statistics.median(times[(name, variant)]) for name in states}
        # the first update: as timed, or (fold) the policy's timing plus this variant's step-0 update
        first_update = first if args.ab == "trim" else policy_s[0] + medians["step 0"]
        hooks = first_update + (updates - 1) * medians["later"]
        rows.append(
            {
                "variant": variant,
                "median_update_s": medians,
                "updates_s": {name: times[(name, variant)] for name in states},
                "first_update_s": first_update,
                "hooks_s": hooks,
                "share": hooks / (hooks + STEPS * step),
            }
        )
    reference = rows[-1]
    title = {"trim": "its part trimmed or not", "fold": "its activation pass left out or not"}[args.ab]
    lines = header_lines(env, f"VCAS on the vcas-minilm preset: one update's time, {title}")
    lines += [
        f"First update {first:.3f} s (its token policy's timing {policy_s[0]:.3f} s); median "
        f"training step {step:.3f} s ({args.steps} length-grouped batches). Implied share = "
        f"(first + {updates - 1} x median later update) / (that + {STEPS} x median step); "
        f"{args.rounds} rounds per variant and state, rotated. No block samples at: "
        + (", ".join(name for name, f in folds.items() if f) or "none")
        + ".",
        "",
    ]
    header = ["variant", *(f"median update, {name} (s)" for name in states)]
    header += [f"vs {reference['variant']}, {name}" for name in states]
    header += ["implied first update (s)", "implied hooks (s)", "implied share"]
    table = []
    for r in rows:
        medians = r["median_update_s"]
        table.append(
            [
                r["variant"],
                *(f"{medians[name]:.3f}" for name in states),
                *(f"{medians[name] / reference['median_update_s'][name]:.3f}" for name in states),
                f"{r['first_update_s']:.3f}",
                f"{r['hooks_s']:.2f}",
                f"{100 * r['share']:.1f}%",
            ]
        )
    lines += [*markdown_table(header, table), ""]
    print("\n".join(lines), flush=True)
    out = {"benchmark": "vcas_update_cost", "environment": env, "first_update_s": first}
    out.update(policy_s=policy_s[0], folds=folds, median_step_s=step, results=rows)
    return save_results(out, args)


if __name__ == "__main__":
    main()
