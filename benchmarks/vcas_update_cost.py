"""One VCAS update's time on the vcas-minilm preset, its estimation part trimmed or not.

Builds the preset's run (all-MiniLM-L6-v2 on Rotten Tomatoes, batch 32, trim_padding and
group_by_length, VCAS as the preset sets it) through the reference trainer, times the first
update (the measured token policy's timing included), lets two more updates sample, then
times further updates from that same controller state (restored before each, so every
variant sees the same ratios and batches) with the estimation part (8 of 32 samples) cut to
its own longest sequence, as the trainer does (``trimmed``), or left at its batch's length
(``untrimmed``: the run's ``batch_head`` off), order rotating every round, Python's GC off.
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

VARIANTS = ("trimmed", "untrimmed")
STEPS, EVERY = 300, 50  # the preset's run and update interval


def build(args: argparse.Namespace) -> Trainer:
    preset = PRESETS["vcas-minilm"]
    settings = {**preset.config, "method": preset.methods[1], "seed": args.seed, "progress": False}
    settings.update(subset=args.subset, test_subset=8)
    return Trainer(TrainConfig(**settings))


def time_update(trainer: Trainer, head: Any) -> float:
    """Seconds of one update, the estimation part cut by ``head`` (None: the first samples)."""
    vcas, run = trainer.controllers[0], trainer.run
    run.batch_head = head
    batches = iter(lambda: run.draw_batch(vcas._estimation_generator), None)  # as on_step_start draws
    start_time = time.perf_counter()
    vcas.update(batches, run.loss_fn)
    return time.perf_counter() - start_time


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--rounds", type=int, default=8, help="timed updates per variant (default 8)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (default 20)")
    p.add_argument("--subset", type=int, default=4800, help="training snippets (default the preset's 4800)")
    add_common_options(p)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.subset < 32:
        p.error("--rounds and --steps must be >= 1, --subset >= 32")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the Markdown report, return (and optionally save) results."""
    args = parse_args(argv)
    env = start(args, __file__, argv)
    trainer = build(args)
    vcas, trim = trainer.controllers[0], trainer.run.batch_head
    vcas.on_train_start(trainer.run)
    trainer.model.train()
    first = time_update(trainer, trim)
    for _ in range(2):  # ratios below 1: rows and tokens sampled
        time_update(trainer, trim)
    state = copy.deepcopy(vcas.state_dict())
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    gc.collect()
    gc.disable()
    try:
        for r in range(args.rounds):
            for variant in rotated(list(VARIANTS), r):
                vcas.load_state_dict(copy.deepcopy(state))
                for _ in range(2 * r):  # each round its own batches, the same for both variants
                    torch.randperm(len(trainer.data.train), generator=vcas._estimation_generator)
                times[variant].append(time_update(trainer, trim if variant == "trimmed" else None))
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
    for variant in VARIANTS:
        update = statistics.median(times[variant])
        hooks = first + (updates - 1) * update
        rows.append(
            {
                "variant": variant,
                "median_update_s": update,
                "updates_s": times[variant],
                "hooks_s": hooks,
                "share": hooks / (hooks + STEPS * step),
            }
        )
    lines = header_lines(env, "VCAS on the vcas-minilm preset: one update's time, its part trimmed or not")
    lines += [
        f"First update (token policy timed) {first:.3f} s; median training step {step:.3f} s "
        f"({args.steps} length-grouped batches). Implied share = (first + {updates - 1} x median "
        f"update) / (that + {STEPS} x median step); {args.rounds} rounds per variant, rotated.",
        "",
        *markdown_table(
            ["estimation part", "median update (s)", "vs untrimmed", "implied hooks (s)", "implied share"],
            [
                [
                    r["variant"],
                    f"{r['median_update_s']:.3f}",
                    f"{r['median_update_s'] / rows[1]['median_update_s']:.3f}",
                    f"{r['hooks_s']:.2f}",
                    f"{100 * r['share']:.1f}%",
                ]
                for r in rows
            ],
        ),
        "",
    ]
    print("\n".join(lines), flush=True)
    out = {"benchmark": "vcas_update_cost", "environment": env, "first_update_s": first}
    out.update(median_step_s=step, results=rows)
    return save_results(out, args)


if __name__ == "__main__":
    main()
