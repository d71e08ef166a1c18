"""Share of VCAS's training time spent in its variance estimation, and the controller's path.

Trains the vcas-vit preset's model (the zoo ViT, dim 128, depth 6, on 28x28 Fashion-MNIST
images, batch 128, AdamW lr 1e-3), or with ``--model resnet`` the vcas-resnet preset's
(ResNet-18-GN, width 16, SGD lr 0.05), for ``--steps`` steps once per variant; each variant is
a VCAS option string (``update_every=50,estimation_fraction=0.25``). The variants train
side by side: same initial weights, same batches in the same order, their steps
interleaved (order rotating every step), Python's GC off while timing. Per variant it
reports the seconds spent in ``vcas.step`` (the estimation, every ``F`` steps) and in
the training steps (forward, backward, optimizer), the estimation's share of the total,
the median update and step times with the share they imply at ``F = 50``, and every
update's measured variance ratios and new ratios (the controller's path).

Run from the repository root: ``python benchmarks/vcas_estimation.py --help``. The
script uses only the public VCAS API, so the same command runs against another checkout
(``PYTHONPATH=<checkout>/src``) for a before/after comparison.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common import add_common_options, header_lines, markdown_table, rotated, save_results, start
from greenprop import data, models
from greenprop.methods import parse_method
from greenprop.vcas import VCAS, VCASConfig, apply_vcas


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def batches(train: Any, size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless random training batches drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield train[torch.randperm(len(train), generator=gen)[:size]]


#: --model: the preset whose model is trained, and how it reads in the report.
MODELS = {
    "vit": "vcas-vit's model (ViT dim 128, depth 6)",
    "resnet": "vcas-resnet's model (ResNet-18-GN, width 16)",
}


def build(name: str) -> nn.Module:
    """The preset's model for 28x28 grey images, 10 classes."""
    if name == "resnet":
        return models.create("resnet18-gn", num_classes=10, in_channels=1, image_size=28, width=16)
    return models.create("vit", num_classes=10, in_channels=1, image_size=28)


class Run:
    """One variant: its model, optimizer, controller, estimation batches and timings."""

    def __init__(
        self, options: str, initial: dict[str, Tensor], train: Any, args: argparse.Namespace
    ) -> None:
        self.options = options
        torch.manual_seed(args.seed)
        self.model = build(args.model)
        self.model.load_state_dict(initial)
        config = VCASConfig.from_dict({"seed": args.seed, **parse_method(f"vcas:{options}").options})
        self.vcas = VCAS(apply_vcas(self.model, config))
        if args.model == "resnet":  # the vcas-resnet preset's optimizer
            self.opt: torch.optim.Optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        else:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        self.estimation = batches(train, args.batch, args.seed + 1)
        self.update_s: list[float] = []
        self.step_s: list[float] = []

    def step(self, batch: tuple[Tensor, Tensor]) -> None:
        self.model.train()
        start = time.perf_counter()
        record = self.vcas.step(self.estimation, loss_fn)
        mid = time.perf_counter()
        loss_fn(self.model, batch).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        end = time.perf_counter()
        if record is not None:
            self.update_s.append(mid - start)
        self.step_s.append(end - mid)

    def summary(self, f: int) -> dict[str, Any]:
        estimation, training = sum(self.update_s), sum(self.step_s)
        update, step = statistics.median(self.update_s), statistics.median(self.step_s)
        return {
            "options": self.options,
            "updates": len(self.update_s),
            "estimation_s": estimation,
            "training_s": training,
            "share": estimation / (estimation + training),
            "median_update_s": update,
            "median_step_s": step,
            f"share_at_F{f}": update / (update + f * step),
            "history": self.vcas.history,
        }


def summary_table(rows: Sequence[dict[str, Any]], f: int) -> list[str]:
    header = ["variant", "updates", "estimation (s)", "training steps (s)", "estimation share"]
    header += ["median update (s)", "median step (s)", f"share at F={f}"]
    body = [
        [
            f"`{r['options']}`",
            str(r["updates"]),
            f"{r['estimation_s']:.1f}",
            f"{r['training_s']:.1f}",
            f"{100 * r['share']:.1f}%",
            f"{r['median_update_s']:.3f}",
            f"{r['median_step_s']:.3f}",
            f"{100 * r[f'share_at_F{f}']:.1f}%",
        ]
        for r in rows
    ]
    return markdown_table(header, body)


def history_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    header = [
        "variant",
        "step",
        "act. var. ratio",
        "token var. ratio (mean)",
        "s",
        "block ratio",
        "token ratio",
    ]
    body = []
    for r in rows:
        for h in r["history"]:
            weight = h["weight_variance_ratio_mean"]
            body.append(
                [
                    f"`{r['options']}`",
                    str(h["step"]),
                    f"{h['activation_variance_ratio']:.4f}",
                    "-" if weight is None else f"{weight:.4f}",
                    f"{h['s']:.2f}",
                    f"{h['activation_ratio_mean']:.3f}",
                    "-" if h["weight_ratio_mean"] is None else f"{h['weight_ratio_mean']:.3f}",
                ]
            )
    return markdown_table(header, body)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument(
        "--variants",
        nargs="+",
        default=["update_every=50,s_step=0.05,weight_ratio_multiplier=0.8"],
        help="VCAS option strings, one per variant (default: the vcas-vit preset's)",
    )
    p.add_argument("--model", choices=tuple(MODELS), default="vit", help="preset model (default vit)")
    p.add_argument("--steps", type=int, default=100, help="training steps per variant (default 100)")
    p.add_argument("--subset", type=int, default=5000, help="Fashion-MNIST training images (default 5000)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--share-at", type=int, default=50, help="F for the implied share (default 50)")
    add_common_options(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.subset < args.batch or args.batch < 1 or args.share_at < 1:
        p.error("--steps, --batch and --share-at must be >= 1, --subset >= --batch")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the Markdown report, return (and optionally save) results."""
    args = parse_args(argv)
    env = start(args, __file__, argv)
    train = data.load("fashion-mnist", subset=args.subset).train
    torch.manual_seed(args.seed)
    initial = build(args.model).state_dict()
    runs = {v: Run(v, initial, train, args) for v in args.variants}
    order = batches(train, args.batch, args.seed)
    gc.collect()
    gc.disable()
    try:
        for i in range(args.steps):
            batch = next(order)
            print(f"  step {i}", file=sys.stderr, flush=True)
            for v in rotated(args.variants, i):
                runs[v].step(batch)
    finally:
        gc.enable()
    rows = [run.summary(args.share_at) for run in runs.values()]
    lines = header_lines(env, "VCAS: the variance estimation's share of training time")
    lines += [
        f"{MODELS[args.model]} on {args.subset} Fashion-MNIST images, batch {args.batch}, "
        f"{args.steps} steps per variant, side by side. estimation = time in `vcas.step` (its updates); "
        "training steps = forward + backward + optimizer. The implied share is median update / "
        f"(median update + {args.share_at} x median step).",
        "",
        *summary_table(rows, args.share_at),
        "",
        "The controller's updates (measured variance ratios, then the new ratios):",
        "",
        *history_table(rows),
        "",
    ]
    print("\n".join(lines), flush=True)
    return save_results({"benchmark": "vcas_estimation", "environment": env, "results": rows}, args)


if __name__ == "__main__":
    main()
