"""One rank of the DDP tests (run by torchrun from test_distributed.py): every method setting, thrice.

For each setting of ``method_settings.SETTINGS`` (and ``PER_RANK_SETTINGS``) named on the
command line, this rank trains
the run uninterrupted, then again stopped before the setting's ``cut`` epoch and resumed by a
new Trainer from the checkpoint, and saves what the test compares across ranks and runs to
``OUT/<id>/rank<R>.pt``: both runs' final parameters, GradSamp's sampled epochs, VCAS's ratios.
Every rank writes its process id to ``OUT/pid<R>`` first. With ``--fail-rank R`` rank R
raises at the start of the second epoch instead, while the others wait in a collective;
with ``--skip-rank R`` rank R alone skips the second epoch's steps, so the ranks call
different collectives (``--timeout`` bounds how long one waits).

    torchrun --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0 \\
        --local-addr 127.0.0.1 tests/ddp_worker.py OUT baseline vcas ...
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from greenprop.controller import Controller
from greenprop.train.distributed import process_group
from greenprop.train.launch import die_with_launcher
from greenprop.train.trainer import Trainer
from method_settings import PER_RANK_SETTINGS, SETTINGS


class Stop(Exception):
    """Raised on every rank at the same epoch: the run is cut there."""


class Cutter(Controller):
    """Stops the run at the start of epoch ``at`` (None: never); the same name in both halves."""

    name = "cutter"

    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == self.at:
            raise Stop


class Crash(Controller):
    """Raises on one rank only: the others must not hang waiting for it."""

    name = "crash"

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == 1 and dist.get_rank() == self.rank:
            raise RuntimeError(f"rank {self.rank} fails on purpose")


class SkipOnOneRank(Controller):
    """Replaces epoch 1 on one rank only: the mistake every method must avoid (its ranks
    then call different collectives); it must end the run within the timeout, not hang it."""

    name = "skip-on-one-rank"

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def replace_epoch(self, epoch: int) -> dict[str, Any] | None:
        return {} if epoch == 1 and dist.get_rank() == self.rank else None


def controller_state(trainer: Trainer) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for c in trainer.controllers:
        if c.name == "gradsamp":
            found["sampled"] = list(c.sampled_epochs)
        if c.name == "vcas":
            found["vcas"] = c.ratios()
    return found


def main(out: Path, ids: list[str], fail_rank: int | None, skip_rank: int | None, timeout_s: float) -> None:
    die_with_launcher()
    torch.set_num_threads(1)
    (out / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
    with process_group(torch.device("cpu"), timeout_s=timeout_s):
        rank = dist.get_rank()
        if fail_rank is not None:
            Trainer(SETTINGS[0].config, controllers=[Crash(fail_rank)]).fit()
        if skip_rank is not None:
            Trainer(SETTINGS[0].config, controllers=[SkipOnOneRank(skip_rank)]).fit()
        for setting in [s for s in [*SETTINGS, *PER_RANK_SETTINGS] if s.id in ids]:
            folder = out / setting.id
            full = Trainer(setting.config, folder / "full")
            full.fit()
            try:
                Trainer(setting.config, folder / "cut", controllers=[Cutter(setting.cut)]).fit()
                raise AssertionError("the cut run was not cut")
            except Stop:
                pass
            dist.barrier()  # rank 0 has written the checkpoint every rank resumes from
            resumed = Trainer(setting.config, folder / "cut", resume=True, controllers=[Cutter(None)])
            resumed.fit()
            result = {
                "full": {k: v.clone() for k, v in full.model.state_dict().items()},
                "resumed": {k: v.clone() for k, v in resumed.model.state_dict().items()},
                "full_state": controller_state(full),
                "resumed_state": controller_state(resumed),
                "losses": [r["loss"] for r in full.history],
            }
            torch.save(result, folder / f"rank{rank}.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("ids", nargs="*")
    parser.add_argument("--fail-rank", type=int)
    parser.add_argument("--skip-rank", type=int)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a collective waits")
    args = parser.parse_args()
    main(args.out, args.ids, args.fail_rank, args.skip_rank, args.timeout)
