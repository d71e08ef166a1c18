"""Data-parallel training on torch.distributed: the process group, each rank's shard, the collectives.

The reference trainer asks a :class:`Parallelism` how the run is split over processes.
:class:`SingleProcess` is the plain run (its data order is the trainer's historic one);
:class:`DataParallel` is one rank of a DDP run that ``torchrun`` or ``greenprop train
--nproc N`` started. Under DDP:

* ``batch_size`` is the *total* batch: each rank trains ``batch_size / world_size``
  examples a step on its own shard (:class:`torch.utils.data.DistributedSampler`,
  reshuffled every epoch from the run's seed), so steps per epoch, the learning-rate
  schedule and the counted FLOPs match the single-process run.
* Evaluation is sharded: each rank evaluates every ``world_size``-th test example
  (with the unwrapped model, so no DDP collective runs) and the per-rank sums are
  gathered and added in rank order, so every rank holds the same record and takes the
  same decisions from it (GradSamp's guard, the divergence check).
* Each step's loss is the mean over ranks (every rank sees the same value, so a
  divergence stops all ranks at the same step instead of hanging the others).
* FLOPs are summed over ranks; energy over distinct meters (ranks on one host read the
  same RAPL counter, or share the same ``--watts`` estimate, which is counted once).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from greenprop.controller import Controller
from greenprop.data.grouping import length_grouped_order
from greenprop.errors import GreenpropError
from greenprop.metering import Quantity
from greenprop.seeding import trainer_epoch_seed
from greenprop.train.evaluate import evaluate, evaluate_sums, evaluation_means, iterate_batches
from greenprop.train.tasks import Task

__all__ = [
    "DataParallel",
    "Parallelism",
    "Shard",
    "SingleProcess",
    "gather_objects",
    "parallelism",
    "pooled_over_ranks",
    "process_group",
    "with_rank_state",
    "world_from_env",
]

#: Addresses that mean "this machine": gloo then binds to the loopback interface.
LOOPBACK_ADDRESSES = frozenset({"127.0.0.1", "localhost", "::1"})
#: Seconds a collective may wait for the other ranks before it fails (instead of hanging).
DEFAULT_TIMEOUT_S = 300.0


# ------------------------------------------------------------------------- process group
@dataclass(frozen=True)
class World:
    """Where this process sits in the job (from torchrun's environment variables)."""

    rank: int
    world_size: int
    local_rank: int


def world_from_env() -> World | None:
    """The job torchrun (or ``greenprop train --nproc``) describes in RANK/WORLD_SIZE/LOCAL_RANK.

    None when this process was not started by a launcher.
    """
    if "WORLD_SIZE" not in os.environ:
        return None
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ.get(name, "0")
        try:
            values[name] = int(text)
        except ValueError:
            raise GreenpropError(f"environment variable {name}={text!r} is not an integer") from None
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if world.world_size < 1 or not 0 <= world.rank < world.world_size:
        raise GreenpropError(f"RANK={world.rank} and WORLD_SIZE={world.world_size} do not fit together")
    return world


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """A rank's own GPU: ``cuda`` becomes ``cuda:LOCAL_RANK``; CPU stays as it is."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


@contextmanager
def process_group(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[World | None]:
    """Join the launcher's process group for the block; yields None for a plain single process.

    On a loopback ``MASTER_ADDR`` gloo is told to use the loopback interface
    (``GLOO_SOCKET_IFNAME=lo``, unless set): by default it binds to the address the
    host name resolves to, which need not be loopback. On a clean exit every rank
    meets at a barrier before the group is destroyed (without it gloo can abort at
    exit while a peer is still tearing down); after an error the barrier is skipped,
    since the other ranks may never reach it (the launcher stops them).
    """
    world = world_from_env()
    if world is None or world.world_size == 1 or dist.is_initialized():
        yield world
        return
    if os.environ.get("MASTER_ADDR", "127.0.0.1") in LOOPBACK_ADDRESSES:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    device = rank_device(device, world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device),
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    ok = False
    try:
        yield world
        ok = True
    finally:
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` without a process group).

    Every rank must call it, the same number of times.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def pooled_over_ranks(items: list[Any], to_portable: Callable[[Any], Any] | None = None) -> list[Any]:
    """Every rank's ``items`` in one list, in rank order (``items`` itself without a process group).

    For estimates that every rank must take the same decision from (VCAS's variance
    draws): each rank measures on its own data, all pool the measurements.
    ``to_portable`` prepares an item for pickling (e.g. moves its tensors to the CPU).
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return items
    prepared = [to_portable(item) for item in items] if to_portable else items
    return [item for rank_items in gather_objects(prepared) for item in rank_items]


# ------------------------------------------------------------------------- shards
class Shard(Dataset):
    """The examples of ``dataset`` at ``indices``, indexable a batch at a time like the dataset."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor) -> None:
        self.dataset = dataset
        self.indices = indices
        self.supports_batch_indexing = getattr(dataset, "supports_batch_indexing", False)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: Any) -> Any:
        picked = self.indices[index]
        return self.dataset[picked if picked.ndim else int(picked)]


# ------------------------------------------------------------------------- the strategies
class Parallelism:
    """How a run is split over processes; the reference trainer asks it at every split point."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints, metrics and progress."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on."""
        return device

    def rank_batch_size(self, batch_size: int) -> int:
        return batch_size

    def steps_per_epoch(self, examples: int, batch_size: int) -> int:
        raise NotImplementedError

    def epoch_batches(
        self, dataset: Dataset, batch_size: int, seed: int, epoch: int, lengths: torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's training batches of ``epoch``; with the samples' ``lengths``, batches of
        similar length (:func:`greenprop.data.grouping.length_grouped_order`)."""
        raise NotImplementedError

    def estimation_data(self, dataset: Dataset) -> Dataset:
        """What controllers that draw batches of their own (VCAS) draw from on this rank."""
        return dataset

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module the training steps run through (after the method's surgery)."""
        return model

    def mean(self, value: float) -> float:
        """A per-rank scalar averaged over ranks (the same value on every rank)."""
        return value

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """Per-rank counts summed over ranks (the same totals on every rank)."""
        return values

    def evaluate(
        self, model: nn.Module, dataset: Dataset, *, task: Task | None = None, **kwargs: Any
    ) -> dict[str, float]:
        """The task's test metrics over the whole of ``dataset`` (classification: mean loss,
        top-1 and top-5 in %)."""
        if task is None:
            return evaluate(model, dataset, **kwargs)
        return task.evaluation_means(task.evaluate_sums(model, dataset, **kwargs))

    def energy(self, quantity: Quantity, source: str) -> Quantity:
        """The run's energy over the epoch from this rank's meter reading."""
        return quantity

    def parameter_spread(self, model: nn.Module) -> float:
        """Largest absolute difference between any rank's parameters and the main rank's."""
        return 0.0

    def rank_states(self, controllers: Sequence[Controller]) -> list[dict[str, Any]] | None:
        """Every rank's ``rank_local_state`` entries (None in one process), for the checkpoint."""
        return None

    def describe(self) -> dict[str, Any]:
        """What metrics.json says about the split."""
        return {"world_size": self.world_size}


class SingleProcess(Parallelism):
    """One process: the trainer's own batch order (seeded per epoch by ``trainer_epoch_seed``)."""

    def steps_per_epoch(self, examples: int, batch_size: int) -> int:
        return math.ceil(examples / batch_size)

    def epoch_batches(
        self, dataset: Dataset, batch_size: int, seed: int, epoch: int, lengths: torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(trainer_epoch_seed(seed, epoch))
        if lengths is None:
            return iterate_batches(dataset, batch_size, generator=generator)
        order = length_grouped_order(lengths, batch_size, generator)
        return iterate_batches(Shard(dataset, order), batch_size)


class DataParallel(Parallelism):
    """One rank of a DDP run (an initialized default process group)."""

    def __init__(self, rank: int, world_size: int, backend: str, local_rank: int | None = None) -> None:
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.local_rank = int(os.environ.get("LOCAL_RANK", rank)) if local_rank is None else local_rank

    def device(self, device: torch.device) -> torch.device:
        return rank_device(device, self.local_rank)

    def rank_batch_size(self, batch_size: int) -> int:
        if batch_size % self.world_size:
            raise GreenpropError(
                f"batch_size={batch_size} must be a multiple of the world size {self.world_size} "
                "(it is the total batch; each rank trains batch_size / world size a step)"
            )
        return batch_size // self.world_size

    def _sampler(self, dataset: Dataset, seed: int) -> DistributedSampler:
        return DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed, drop_last=False
        )

    def steps_per_epoch(self, examples: int, batch_size: int) -> int:
        per_rank = math.ceil(examples / self.world_size)  # DistributedSampler pads to equal shards
        return math.ceil(per_rank / self.rank_batch_size(batch_size))

    def epoch_batches(
        self, dataset: Dataset, batch_size: int, seed: int, epoch: int, lengths: torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if lengths is None:
            sampler = self._sampler(dataset, seed)
            sampler.set_epoch(epoch)
            shard = Shard(dataset, torch.tensor(list(sampler), dtype=torch.int64))
        else:  # every rank orders the whole epoch alike, then takes every world_size-th sample as
            # DistributedSampler does: one step's rank batches together are one grouped batch
            generator = torch.Generator().manual_seed(trainer_epoch_seed(seed, epoch))
            order = length_grouped_order(lengths, batch_size, generator)
            padded = math.ceil(len(order) / self.world_size) * self.world_size
            order = torch.cat([order, order[: padded - len(order)]])
            shard = Shard(dataset, order[self.rank :: self.world_size])
        return iterate_batches(shard, self.rank_batch_size(batch_size))

    def estimation_data(self, dataset: Dataset) -> Dataset:
        return self._static_shard(dataset)

    def _static_shard(self, dataset: Dataset) -> Shard:
        return Shard(dataset, torch.arange(self.rank, len(dataset), self.world_size))  # type: ignore[arg-type]

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _gather_sum(self, values: Sequence[float]) -> list[float]:
        """Sum over ranks in rank order: every rank computes the identical total."""
        rows = gather_objects([float(v) for v in values])
        return [math.fsum(column) for column in zip(*rows, strict=True)]

    def mean(self, value: float) -> float:
        return self._gather_sum([value])[0] / self.world_size

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        return dict(zip(keys, self._gather_sum([values[k] for k in keys]), strict=True))

    def evaluate(
        self, model: nn.Module, dataset: Dataset, *, task: Task | None = None, **kwargs: Any
    ) -> dict[str, float]:
        # Each rank's BatchNorm statistics moved with its own last batch (DDP broadcasts
        # rank 0's at the next forward): take rank 0's now, so every rank evaluates the
        # model that rank 0 checkpoints.
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        shard = self._static_shard(dataset)
        sums, means, keys = (
            (evaluate_sums, evaluation_means, _SUMS)
            if task is None
            else (task.evaluate_sums, task.evaluation_means, task.sum_keys)
        )
        mine = sums(model, shard, **kwargs) if len(shard) else dict.fromkeys(keys, 0.0)
        return means(self.sum_values(mine))

    def energy(self, quantity: Quantity, source: str) -> Quantity:
        readings = gather_objects((socket.gethostname(), source, quantity.to_dict()))
        by_meter: dict[tuple[str, str], Quantity] = {}
        for host, meter, item in readings:
            q = Quantity.from_dict(item)
            held = by_meter.get((host, meter))
            # One meter read by several ranks over the same epoch: count it once (the longest reading).
            if held is None or (q.value is not None and (held.value is None or q.value > held.value)):
                by_meter[(host, meter)] = q
        total = None
        for q in by_meter.values():
            total = q if total is None else total + q
        assert total is not None
        return total

    def parameter_spread(self, model: nn.Module) -> float:
        worst = 0.0
        with torch.no_grad():
            for p in model.parameters():
                main = p.detach().clone()
                dist.broadcast(main, src=0)
                worst = max(worst, float((p.detach() - main).abs().max()) if p.numel() else 0.0)
        return max(gather_objects(worst))

    def rank_states(self, controllers: Sequence[Controller]) -> list[dict[str, Any]] | None:
        mine = {
            c.name: {key: state[key] for key in c.rank_local_state if key in state}
            for c in controllers
            if c.rank_local_state and (state := c.state_dict())
        }
        return gather_objects(mine)

    def describe(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "master_addr": os.environ.get("MASTER_ADDR"),
            "batch": "batch_size is the total over ranks; DistributedSampler shards, reshuffled per epoch",
            "evaluation": "test set sharded over ranks, sums gathered (every rank holds the same record)",
            "flops": "summed over ranks",
            "energy": "summed over distinct meters (ranks reading one host's counter count it once)",
            "time": "rank 0's clock",
            "memory": "rank 0's process",
            "controller_fields": "rank 0's",
        }


_SUMS = ("loss_sum", "top1", "top5", "total")


def with_rank_state(
    state: dict[str, Any], name: str, rank_states: list[Any] | None, rank: int
) -> dict[str, Any]:
    """A controller's checkpointed state with this rank's own rank-local entries put back."""
    if not rank_states or rank >= len(rank_states):
        return state
    return {**state, **rank_states[rank].get(name, {})}


def parallelism() -> Parallelism:
    """DataParallel when a default process group with several ranks is running, else SingleProcess."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DataParallel(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return SingleProcess()
