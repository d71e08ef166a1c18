"""A dense MiniLM training step on Rotten Tomatoes batches padded to 56 tokens against the
same batches trimmed to their longest snippet (``trim_padding``, a Hugging Face user's
dynamic padding).

The batches are the first ``--batches`` of the ``vcas-minilm`` preset's first epoch
(4.8k snippets, batches of 32, the trainer's order for seed 0), so the trimmed lengths
are the ones that run trains on. Every round runs one AdamW step of each variant on the
same batch (the next batch each round), interleaved; the two variants are two copies of
the same model. Reported: the median step of each variant, the ratio of the medians and
the median of the per-round ratios, and the counted FLOPs of a forward + backward.

Example::

    OMP_NUM_THREADS=1 python benchmarks/trim_step.py --threads 1 --rounds 12 --warmup 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from _common import (
    add_common_options,
    forward_backward_flops,
    header_lines,
    interleaved_times,
    markdown_table,
    quartiles,
    save_results,
    start,
)
from greenprop import data as gp_data
from greenprop import models
from greenprop.experiments.presets import PRESETS
from greenprop.seeding import trainer_epoch_seed
from greenprop.train.evaluate import iterate_batches


def preset_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` padded training batches of the vcas-minilm preset's first epoch (seed 0)."""
    config = PRESETS["vcas-minilm"].config
    pair = gp_data.load(config["dataset"], subset=config["subset"], test_subset=config["test_subset"])
    generator = torch.Generator().manual_seed(trainer_epoch_seed(0, 0))
    batches = iterate_batches(pair.train, config["batch_size"], generator=generator)
    return [next(batches) for _ in range(count)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(p)
    p.add_argument("--batches", type=int, default=6, help="distinct batches cycled through (default 6)")
    p.add_argument("--rounds", type=int, default=12, help="timed rounds (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    args = p.parse_args(argv)
    if args.batches < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--batches and --rounds must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    env = start(args, __file__, argv)
    batches = preset_batches(args.batches)
    variants = {
        "padded": batches,
        "trimmed": [(gp_data.trim_to_longest(x), y) for x, y in batches],
    }
    torch.manual_seed(args.seed)
    base = models.create("minilm", num_classes=2)
    runs: dict[str, Any] = {}
    for name in variants:
        model = copy.deepcopy(base).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
        runs[name] = {"model": model, "optimizer": optimizer, "next": 0}

    def step(name: str) -> None:
        run = runs[name]
        x, y = variants[name][run["next"] % len(batches)]
        run["next"] += 1
        F.cross_entropy(run["model"](x), y).backward()
        run["optimizer"].step()
        run["optimizer"].zero_grad(set_to_none=True)

    steps = {name: (lambda n=name: step(n)) for name in variants}
    timings = interleaved_times(steps, args.rounds, args.warmup)
    seconds = timings.seconds
    per_round = [t / p for t, p in zip(seconds["trimmed"], seconds["padded"], strict=True)]
    flops = {name: sum(forward_backward_flops(base, x, y) for x, y in variants[name]) for name in variants}
    lengths = [x.shape[2] for x, _ in variants["trimmed"]]
    median = {name: statistics.median(values) for name, values in seconds.items()}
    q1, q2, q3 = quartiles(per_round)
    lines = header_lines(env, f"MiniLM dense step, batch 32: padded to 56 vs trimmed (lengths {lengths})")
    rows = [
        [name, f"{1e3 * median[name]:.1f}", f"{flops[name] / 1e9 / len(batches):.2f}"] for name in variants
    ]
    lines += markdown_table(["variant", "median step (ms)", "forward + backward GFLOP (mean)"], rows)
    lines += [
        "",
        f"trimmed / padded: ratio of medians {median['trimmed'] / median['padded']:.3f}, "
        f"per-round median {q2:.3f} [IQR {q1:.3f}, {q3:.3f}]; FLOPs {flops['trimmed'] / flops['padded']:.3f}",
    ]
    print("\n".join(lines))
    out = {
        "environment": env,
        "lengths": lengths,
        "seconds": seconds,
        "median_s": median,
        "per_round_ratio_quartiles": [q1, q2, q3],
        "flops": flops,
    }
    return save_results(out, args)


if __name__ == "__main__":
    main()
