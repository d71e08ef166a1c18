"""Flower ServerApp and ClientApp for greenprop's federated GradSamp runs.

The same two apps run on the simulation runtime (:mod:`greenprop.fl.runner`) and with
``flwr run`` against a SuperLink and SuperNodes. The run's settings travel in the
training message's ConfigRecord, so a client needs nothing but its partition id.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn

from greenprop import data as gdata
from greenprop import models
from greenprop.fl import (
    local,
    offline,  # noqa: F401  (env switches before flwr)
)
from greenprop.fl.partitions import partition
from greenprop.fl.strategies import make_strategy
from greenprop.metering.flops import count_flops_per_sample
from greenprop.metering.quantity import Quantity

__all__ = ["FLSettings", "Progress", "client_app", "make_server_app"]


@dataclass(frozen=True)
class FLSettings:
    """Everything one federated run needs; sent to clients as ConfigRecord entries."""

    strategy: str = "fedavg"
    sampling: str = "none"
    clients: int = 10
    fraction: float = 0.5
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    partition: str = "iid"
    model: str = "cnn"
    dataset: str = "fashion-mnist"
    subset: int = 3000
    test_subset: int = 1000
    seed: int = 0
    mu: float = 0.01
    lam: float = 10.0
    rho: float = 0.05
    alpha: float = 0.5

    def config(self) -> dict[str, Any]:
        return {f"gp-{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: ConfigRecord) -> FLSettings:
        return cls(**{k[3:]: v for k, v in config.items() if k.startswith("gp-")})


@lru_cache(maxsize=4)
def _dataset(name: str, subset: int, test_subset: int) -> gdata.DatasetPair:
    return gdata.load(name, subset=subset, test_subset=test_subset)


@lru_cache(maxsize=8)
def _partitions(s: FLSettings) -> tuple[np.ndarray, ...]:
    """Every client's example indices (a node's actor keeps them between rounds)."""
    labels = _dataset(s.dataset, s.subset, s.test_subset).train.labels.numpy()
    return tuple(partition(s.partition, labels, s.clients, s.seed))


def _model(s: FLSettings) -> nn.Module:
    info = _dataset(s.dataset, s.subset, s.test_subset).info
    torch.manual_seed(s.seed)
    return models.create(
        s.model, num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size
    )


def _correction_key(s: FLSettings) -> str:
    """FedSpeed's per-run state key: a digest of the run's settings."""
    digest = hashlib.sha1(json.dumps(asdict(s), sort_keys=True).encode()).hexdigest()[:12]
    return f"fedspeed-correction-{digest}"


# -- client ----------------------------------------------------------------------------------
client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training on this node's partition: SGD, + FedProx term, or FedSpeed's corrected step."""
    torch.set_num_threads(1)
    config = msg.content["config"]
    s = FLSettings.from_config(config)
    server_round = int(config["server-round"])
    pid = int(context.node_config["partition-id"])
    pair = _dataset(s.dataset, s.subset, s.test_subset)
    idx = _partitions(s)[pid]
    model = _model(s)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    glob = local.snapshot(model)
    corr: list[torch.Tensor] = [torch.zeros_like(p) for p in glob]
    # A node's state outlives one run (a sweep's jobs share the nodes): the correction is
    # kept under the run's own key and starts from zero in a run's first round.
    correction_key = _correction_key(s)
    if s.strategy == "fedspeed" and server_round > 1 and correction_key in context.state:
        corr = [t for t in context.state[correction_key].to_torch_state_dict().values()]
    gen = torch.Generator().manual_seed(hash((s.seed, server_round, pid)) & 0x7FFFFFFF)
    loss_f = nn.CrossEntropyLoss()
    mu = float(config.get("proximal-mu", 0.0))
    losses, seen = [], 0
    flops_per_sample = None
    for _ in range(s.local_epochs):
        order = torch.from_numpy(idx)[torch.randperm(len(idx), generator=gen)]
        for start in range(0, len(order), s.batch_size):
            xb, yb = pair.train[order[start : start + s.batch_size]]
            if flops_per_sample is None:
                flops_per_sample = count_flops_per_sample(model, xb, yb, loss_f).total
            step_loss = lambda m, xb=xb, yb=yb: loss_f(m(xb), yb)  # noqa: E731
            if s.strategy == "fedspeed":
                losses.append(
                    local.fedspeed_step(
                        model, step_loss, s.lr, glob, corr, lam=s.lam, rho=s.rho, alpha=s.alpha
                    )
                )
            else:
                losses.append(local.sgd_step(model, step_loss, s.lr, glob, mu))
            seen += len(yb)
    flops = (flops_per_sample or 0.0) * seen
    if s.strategy == "fedspeed":
        flops *= 2  # the extra ascent step is a second forward+backward per batch
        corr, sent = local.fedspeed_finish(model, glob, corr, s.lam)
        names = [n for n, _ in model.named_parameters()]
        context.state[correction_key] = ArrayRecord(dict(zip(names, corr, strict=True)))
        state = model.state_dict()
        state.update(dict(zip(names, sent, strict=True)))
    else:
        state = model.state_dict()
    metrics = {
        "num-examples": len(idx),
        "train-loss": sum(losses) / max(len(losses), 1),
        "client-flops": flops,
    }
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


# -- server ----------------------------------------------------------------------------------
def evaluate_global(s: FLSettings, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Acc@1, Acc@5 and loss of the global model on the test subset."""
    pair = _dataset(s.dataset, s.subset, s.test_subset)
    model = _model(s)
    model.load_state_dict(state)
    model.eval()
    x, y = pair.test[torch.arange(len(pair.test))]
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {
        "acc1": float((top5[:, 0] == y).float().mean()),
        "acc5": float((top5 == y[:, None]).any(dim=1).float().mean()),
        "loss": float(nn.functional.cross_entropy(logits, y)),
    }


@dataclass
class Progress:
    """Where the ServerApp thread is, and the runner's request to stop it (read on interrupt)."""

    jobs: int = 0
    job: int = 0  # 1-based index of the running job; 0 before the first
    rounds: int = 0
    round: int = 0  # the last evaluated round (0: the initial model)
    finished: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)


class SimulationStopped(RuntimeError):
    """The runner asked the ServerApp thread to stop (the run was interrupted)."""


def _stop_with(grid: Grid, stop: threading.Event) -> None:
    """Make ``grid`` give up waiting for replies once ``stop`` is set.

    Flower's ServerApp thread is not a daemon and waits up to an hour for client replies
    that an interrupted simulation never sends: without this the process cannot exit.
    """
    pull = grid.pull_messages

    def pull_or_stop(message_ids: Iterable[str]) -> Iterable[Message]:
        if stop.is_set():
            raise SimulationStopped("interrupted")
        return pull(message_ids)

    grid.pull_messages = pull_or_stop  # type: ignore[method-assign]


def run_server(grid: Grid, s: FLSettings, out: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Run the strategy for ``s.rounds`` rounds on ``grid``; write and return ``out/metrics.json``."""
    common = {
        "fraction_train": s.fraction,
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_available_nodes": s.clients,
    }
    extra = {"fedprox": {"proximal_mu": s.mu}, "fedspeed": {"lam": s.lam, "rho": s.rho, "alpha": s.alpha}}
    strat = make_strategy(
        s.strategy,
        sampling=s.sampling,
        num_rounds=s.rounds,
        seed=s.seed,
        **extra.get(s.strategy, {}),
        **common,
    )
    evals: dict[int, dict[str, float]] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        evals[server_round] = evaluate_global(s, arrays.to_torch_state_dict())
        if progress is not None:
            progress.round = server_round
        return MetricRecord(evals[server_round])

    strat.start(
        grid=grid,
        initial_arrays=ArrayRecord(_model(s).state_dict()),
        num_rounds=s.rounds,
        train_config=ConfigRecord(s.config()),
        evaluate_fn=evaluate_fn,
    )
    records = []
    for r in range(1, s.rounds + 1):
        info = strat.rounds.get(r, {})
        flops = float(info.get("client_flops", 0.0))
        records.append(
            {
                "round": r,
                "sampled": bool(info.get("sampled")),
                **evals.get(r, {}),
                "clients": info.get("clients", 0),
                "client_flops": flops,
                "bytes_up": info.get("bytes_up", 0),
                "bytes_down": info.get("bytes_down", 0),
                "energy": Quantity.unavailable(
                    "J", "no energy counter read inside the simulated clients"
                ).to_dict(),
            }
        )
    totals = {
        "rounds_sampled": sum(r["sampled"] for r in records),
        "client_flops": sum(r["client_flops"] for r in records),
        "bytes_up": sum(r["bytes_up"] for r in records),
        "bytes_down": sum(r["bytes_down"] for r in records),
        "final": evals.get(s.rounds, {}),
        "initial": evals.get(0, {}),
    }
    payload = {"settings": asdict(s), "rounds": records, "totals": totals}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(payload, indent=1))
    return payload


def make_server_app(jobs: list[tuple[FLSettings, Path]], progress: Progress | None = None) -> ServerApp:
    """A ServerApp that runs each job in turn on the same SuperNodes (one runtime, many runs).

    With ``progress``, it records where it is and stops when ``progress.stop`` is set.
    """
    app = ServerApp()
    progress = progress or Progress()
    progress.jobs = len(jobs)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        progress.started.set()
        _stop_with(grid, progress.stop)
        try:
            for i, (s, out) in enumerate(jobs, 1):
                if not (out / "metrics.json").exists():  # else: resumable sweep
                    progress.job, progress.rounds, progress.round = i, s.rounds, 0
                    run_server(grid, s, out, progress)
                progress.finished += 1
        finally:
            progress.ended.set()

    return app
