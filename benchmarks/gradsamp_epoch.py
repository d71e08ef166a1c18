"""Cost of a GradSamp sampled epoch (fit + sample + apply) against one real epoch.

A sampled epoch replaces a whole epoch of forward/backward/optimizer steps by, per
parameter tensor, a GGD fit to the last real update and one draw of the same shape.
This script times both on the same model in one process:

* the sampled epoch: ``GradSamp.on_epoch_start`` (the pre-epoch snapshot, paid by
  every real epoch), ``on_epoch_end`` (update = params - snapshot) and
  ``sampled_update`` (fit + sample + apply), median over ``--repeats``;
* one real epoch: the median of ``--steps`` training steps (forward, backward, SGD)
  at ``--batch`` times the number of steps of a Fashion-MNIST epoch (60,000 images).

Target (the GradSamp issue): sampled epoch <= 1% of a real epoch for ResNet-18.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch

from _common import add_threads_option, set_threads, synchronizer
from greenprop import models
from greenprop.gradsamp import GradSamp, GradSampConfig

EPOCH_IMAGES = 60_000


def time_training_steps(
    model: torch.nn.Module, batch: int, steps: int, image_size: int, device: torch.device | str = "cpu"
) -> float:
    """Median seconds of one forward + backward + SGD step on a fixed random batch (on ``device``)."""
    sync = synchronizer(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 1, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    times = []
    for i in range(steps + 1):
        sync()
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_sampled_epoch(model: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Median seconds of snapshot, update, and fit + sample + apply (on the model's device)."""
    sync = synchronizer(next(model.parameters()).device)
    parts: dict[str, list[float]] = {"snapshot": [], "update": [], "sample": []}

    def timed(part: str, fn: Callable[[], object]) -> None:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        parts[part].append(time.perf_counter() - start)

    for r in range(repeats):
        gs = GradSamp(model, GradSampConfig(strategy="pe:1", seed=r), epochs=3)
        timed("snapshot", lambda gs=gs: gs.on_epoch_start(0))
        with torch.no_grad():  # stand-in for a real epoch's training: a heavy-tailed change
            for p in model.parameters():
                p.add_(torch.distributions.Laplace(0.0, 1e-3).sample(p.shape).to(p.device), alpha=1.0)
        timed("update", lambda gs=gs: gs.on_epoch_end(0))
        gs.on_epoch_start(1)
        timed("sample", lambda gs=gs: gs.sampled_update(1))
    return {k: statistics.median(v) for k, v in parts.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--repeats", type=int, default=5, help="timed sampled epochs")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    set_threads(args)
    torch.manual_seed(0)
    model = models.create(args.model, in_channels=1, image_size=28)
    n_params = sum(p.numel() for p in model.parameters())
    sampled = time_sampled_epoch(model, args.repeats)
    step = time_training_steps(model, args.batch, args.steps, 28)
    steps_per_epoch = -(-EPOCH_IMAGES // args.batch)
    real_epoch = step * steps_per_epoch
    sampled_total = sum(sampled.values())
    result = {
        "params": n_params,
        "step_s": step,
        "real_epoch_s": real_epoch,
        "sampled_epoch_s": sampled_total,
        "ratio": sampled_total / real_epoch,
        **sampled,
    }
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES') or 'unset'}"
    )
    print(f"model {args.model}: {n_params:,} parameters in {len(list(model.parameters()))} tensors")
    print()
    print("| part | seconds |")
    print("|---|---|")
    for name in ("snapshot", "update", "sample"):
        print(f"| sampled epoch: {name} | {sampled[name]:.4f} |")
    print(f"| sampled epoch, total | {sampled_total:.4f} |")
    print(f"| training step (batch {args.batch}, median of {args.steps}) | {step:.3f} |")
    print(f"| real epoch = {steps_per_epoch} steps | {real_epoch:.1f} |")
    print(f"| **sampled / real** | **{100 * result['ratio']:.3f}%** (target <= 1%) |")
    return result


if __name__ == "__main__":
    main()
