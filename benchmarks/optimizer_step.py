"""One AdamW step over a model's parameters: torch's fused kernel against the per-tensor loop
and the multi-tensor (``foreach``) path.

On CPU torch runs ``AdamW`` as a Python loop over the parameter tensors unless ``fused``
or ``foreach`` is asked for; the fused kernel makes one pass. The Hugging Face Trainer uses
it by default since torch 2.8, and greenprop's ``adam``/``adamw`` optimizers do since
session 31 (``fused=none``: where every parameter allows it). The optimizer step is the
same work for dense training and every method, so a faster one shrinks the part of a run
no method can save (MiniLM's AdamW was 22% of its train time).

Each variant is its own copy of the model's parameters with the same random gradients;
one ``step()`` of each per round, interleaved, after ``--warmup`` untimed rounds (the first
step allocates the moments).

Example::

    OMP_NUM_THREADS=2 python benchmarks/optimizer_step.py --threads 2 --models minilm vit
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from _common import add_common_options, header_lines, markdown_table, quartiles, save_results, start
from greenprop import models
from greenprop.metering.interleave import interleaved_times

#: The variants, as ``torch.optim.AdamW`` keyword arguments.
VARIANTS: dict[str, dict[str, bool]] = {
    "loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
#: Models the step is timed on, with ``models.create`` arguments (the presets' models).
MODELS: dict[str, dict[str, Any]] = {
    "minilm": {"num_classes": 2},
    "vit": {"num_classes": 10, "in_channels": 1, "image_size": 28},
    "mlp": {"num_classes": 10, "in_channels": 1, "image_size": 8, "width": 16},
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(p)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["minilm", "vit"])
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 1:
        p.error("--rounds and --warmup must be >= 1 (the first step allocates the moments)")
    return args


def adamw_steps(model_name: str, seed: int) -> tuple[int, dict[str, Any]]:
    """The model's parameter count, and one ``step()`` callable per variant on its own copy."""
    torch.manual_seed(seed)
    base = [p.detach() for p in models.create(model_name, **MODELS[model_name]).parameters()]
    grads = [torch.randn_like(p) for p in base]
    steps = {}
    for name, kwargs in VARIANTS.items():
        params = [torch.nn.Parameter(p.clone()) for p in base]
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
        steps[name] = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kwargs).step
    return sum(p.numel() for p in base), steps


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    env = start(args, __file__, argv)
    rows, results = [], {}
    for model_name in args.models:
        count, steps = adamw_steps(model_name, args.seed)
        seconds = interleaved_times(steps, args.rounds, args.warmup).seconds
        median = {name: statistics.median(values) for name, values in seconds.items()}
        per_round = [f / lp for f, lp in zip(seconds["fused"], seconds["loop"], strict=True)]
        q1, q2, q3 = quartiles(per_round)
        results[model_name] = {"parameters": count, "seconds": seconds, "median_s": median}
        results[model_name]["fused_over_loop_quartiles"] = [q1, q2, q3]
        rows.append(
            [model_name, f"{count / 1e6:.2f}M"]
            + [f"{1e3 * median[name]:.2f}" for name in VARIANTS]
            + [f"{median['fused'] / median['loop']:.3f} [{q1:.3f}, {q3:.3f}]"]
        )
    lines = header_lines(env, f"AdamW step, median of {args.rounds} interleaved rounds")
    header = ["model", "parameters", *(f"{name} (ms)" for name in VARIANTS), "fused / loop [IQR per round]"]
    print("\n".join(lines + markdown_table(header, rows)))
    return save_results({"environment": env, "models": results}, args)


if __name__ == "__main__":
    main()
