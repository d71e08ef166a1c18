"""``greenprop fl``: one federated GradSamp run on Flower's simulation runtime."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from greenprop.errors import GreenpropError

__all__ = ["add_parser", "run_command", "settings_from_args"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``greenprop fl`` and its options."""
    p = sub.add_parser(
        "fl", help="federated GradSamp (FedAvg/FedProx/FedSpeed) on Flower's simulation runtime"
    )
    p.add_argument("--strategy", default="fedavg", help="fedavg, fedprox or fedspeed")
    p.add_argument("--sampling", default="none", help="none, pe:P, pr:rho, dp:P or dr:rho (rounds sampled)")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.5, help="fraction of clients trained per round")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA")
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--subset", type=int, default=3000, help="training examples shared out to the clients")
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--mu", type=float, default=0.01, help="FedProx mu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)


def settings_from_args(args: argparse.Namespace):
    """Validated :class:`~greenprop.fl.app.FLSettings`; a bad option raises naming it."""
    from greenprop.fl.app import FLSettings
    from greenprop.fl.partitions import parse_partition
    from greenprop.fl.strategies import make_strategy

    checks = (
        ("clients", args.clients >= 1),
        ("rounds", args.rounds >= 1),
        ("local-epochs", args.local_epochs >= 1),
        ("batch-size", args.batch_size >= 1),
        ("fraction", 0 < args.fraction <= 1),
        ("lr", args.lr > 0),
        ("subset", args.subset >= args.clients),
    )
    for name, ok in checks:
        if not ok:
            raise GreenpropError(f"fl option {name}={getattr(args, name.replace('-', '_'))!r}: out of range")
    parse_partition(args.partition)
    s = FLSettings(
        strategy=args.strategy,
        sampling=args.sampling,
        clients=args.clients,
        fraction=args.fraction,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        partition=args.partition,
        model=args.model,
        dataset=args.dataset,
        subset=args.subset,
        test_subset=args.test_subset,
        seed=args.seed,
        mu=args.mu,
    )
    make_strategy(
        s.strategy,
        sampling=s.sampling,
        num_rounds=s.rounds,
        seed=s.seed,
        **({"proximal_mu": s.mu} if s.strategy == "fedprox" else {}),
    )
    return s


def run_command(args: argparse.Namespace) -> None:
    """Run it and print the totals."""
    s = settings_from_args(args)
    from greenprop.fl.runner import run_jobs

    out = Path(args.out)
    if (out / "metrics.json").exists():
        raise GreenpropError(f"fl option out={str(out)!r}: metrics.json exists already")
    run_jobs([(s, out)])
    print(json.dumps(json.loads((out / "metrics.json").read_text())["totals"], indent=1))
