"""VCAS's FLOP accounting: what the sampled backward saved and what the estimation cost.

VCAS's backward is random, so counting one step on a slice says nothing about the
next. Instead what VCAS runs on the kept rows is tallied against its dense cost
(:class:`BackwardTally`): the Linear/Conv2d layers' backward, and in compacted blocks the
attention (SDPA's fused CPU kernel: the direct ViT rule's backward on the kept rows, the
re-run path's backward and the forward it runs again, the latter as done work with no
dense counterpart; the direct BERT rule's backward ``bmm``s on the kept rows), each by the
formula the FLOP counter uses; the tokens a direct rule leaves out for their zero gradient
are tallied as saved. The step is counted dense (inside :meth:`counting`), and the
difference plus the controller's estimation passes is the adjustment. Every other op the
counter counts is taken at its dense count, which is what runs where every row runs
(uncompacted blocks, the stem, the head): on the zoo ViT and ResNet, and on a BERT on the
direct path, the account of a step equals a FlopCounterMode count of it (tested). At batch
128, r = 0.5, nu = 0.3 both give 0.557 of the dense ViT step on the direct path and 0.572
re-run (``benchmarks/vcas_step.py --threads 1 --rs 0.5 --nus 0.3 --repeats 1 --warmup 1
--rerun --models vit``, columns "step FLOPs (counted)" and "(account)"); before the
attention was tallied the account of the same step said 0.593 on both paths.

Left out: attention written as plain matmuls in a block compacted on the re-run path (HF
BERT's eager attention off the direct path: ``direct=False``, or a call the rule refuses),
whose ``bmm`` it runs on the kept rows, forward again and backward, untallied. They are
2.4% of MiniLM's dense backward (1.85 of 77.97 GFLOP at 32 x 56 tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from greenprop.metering.accounting import FlopAccount
from greenprop.metering.flops import FlopCount, batch_head, count_flops_per_sample
from greenprop.vcas.layers import BackwardTally, Mode, VCASRuntime

__all__ = ["VCASFlops"]

_COUNT_SAMPLES = 16  # the dense FLOP count runs on this many samples of one batch


class _LossOf(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so the FLOP counter can slice any batch."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


class VCASFlops(FlopAccount):
    """Tallies of the training steps and of the estimation passes, and the dense reference.

    Args:
        model: the converted model (for the one dense count).
        runtime: the layers' shared runtime, whose tally this account collects.
    """

    def __init__(self, model: nn.Module, runtime: VCASRuntime) -> None:
        self.model = model
        self.runtime = runtime
        self.train = BackwardTally()
        self.overhead = BackwardTally()
        self.overhead_samples = {"forward": 0, "exact_backward": 0, "sampled_backward": 0}
        self._dense: FlopCount | None = None
        self._pending_count: tuple[Any, Callable[[nn.Module, Any], Tensor]] | None = None
        self._reported = BackwardTally()
        self._reported_overhead: dict[str, float] = {"forward": 0.0, "backward": 0.0}

    # ------------------------------------------------------------------ tallies
    def collect_train(self) -> None:
        """Move what the layers tallied since the last call into the training tally."""
        self.train.add(self.runtime.take_tally())

    def collect_overhead(self, samples: int) -> None:
        """Book one estimation on ``samples`` samples: a forward, an exact and a sampled backward."""
        self.overhead.add(self.runtime.take_tally())
        self.overhead_samples["forward"] += samples
        self.overhead_samples["exact_backward"] += samples
        self.overhead_samples["sampled_backward"] += samples

    def remember_batch(self, batch: Any, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        """Keep the first batch seen for the dense count, which runs on first use, untimed."""
        if self._dense is None and self._pending_count is None:
            self._pending_count = (batch_head(batch, _COUNT_SAMPLES), loss_fn)

    @property
    def dense_per_sample(self) -> FlopCount | None:
        """Dense forward/backward FLOPs of one sample (counted on the first update's batch)."""
        if self._dense is None and self._pending_count is not None:
            batch, loss_fn = self._pending_count
            with self.counting():
                self._dense = count_flops_per_sample(
                    _LossOf(self.model, loss_fn), (batch,), None, lambda loss, _: loss
                )
            self._pending_count = None
        return self._dense

    def overhead_flops(self) -> dict[str, float]:
        """Forward/backward FLOPs of all estimation passes so far."""
        dense = self.dense_per_sample
        if dense is None:
            return {"forward": 0.0, "backward": 0.0}
        o = self.overhead_samples
        backward = (o["exact_backward"] + o["sampled_backward"]) * dense.backward - self.overhead.saved
        return {"forward": o["forward"] * dense.forward, "backward": backward}

    # ------------------------------------------------------------------ FlopAccount
    @contextmanager
    def counting(self) -> Iterator[None]:
        """Dense, untallied backward inside the blocks (for counting the dense step)."""
        runtime = self.runtime
        previous, saved = runtime.mode, runtime.take_tally()
        runtime.mode = Mode.EXACT
        try:
            yield
        finally:
            runtime.mode = previous
            runtime.tally = saved

    def adjustment(self, epoch: int, step: int) -> dict[str, float]:
        """The backward saved since the last call (negative) plus any new estimation overhead."""
        self.collect_train()
        saved = self.train.saved - self._reported.saved
        self._reported = BackwardTally(self.train.done, self.train.dense)
        overhead = self.overhead_flops()
        delta = {k: overhead[k] - self._reported_overhead[k] for k in ("forward", "backward")}
        self._reported_overhead = overhead
        delta["backward"] -= saved
        return delta

    def describe(self) -> str:
        return "minus VCAS's tallied backward saving, plus its variance-estimation passes"

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        """Backward and whole-step FLOPs relative to dense, estimation overhead included.

        ``None`` ratios mean nothing was counted yet.
        """
        self.collect_train()
        dense = self.dense_per_sample
        report: dict[str, Any] = {
            "train_samples": self.train.samples,
            "sampled_backward_saved": self.train.saved,
            "overhead_samples": dict(self.overhead_samples),
        }
        if dense is None or self.train.samples == 0:
            report.update(backward_ratio=None, total_ratio=None, total_ratio_with_overhead=None)
            return report
        n = self.train.samples
        dense_bwd = n * dense.backward
        bwd = dense_bwd - self.train.saved
        overhead = self.overhead_flops()
        dense_total = n * dense.total
        report.update(
            dense_forward_per_sample=dense.forward,
            dense_backward_per_sample=dense.backward,
            backward_ratio=bwd / dense_bwd,
            total_ratio=(n * dense.forward + bwd) / dense_total,
            overhead_flops=overhead["forward"] + overhead["backward"],
            total_ratio_with_overhead=(n * dense.forward + bwd + sum(overhead.values())) / dense_total,
        )
        return report

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self.collect_train()
        dense = self.dense_per_sample
        return {
            "train_tally": (
                self.train.done,
                self.train.dense,
                self.train.samples,
                {k: list(v) for k, v in self.train.rows.items()},
            ),
            "overhead_tally": (self.overhead.done, self.overhead.dense),
            "overhead_samples": dict(self.overhead_samples),
            "dense_per_sample": None if dense is None else (dense.forward, dense.backward),
            "reported": (self._reported.done, self._reported.dense, dict(self._reported_overhead)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        done, dense, samples, rows = state["train_tally"]
        self.train = BackwardTally(done, dense, samples, {int(k): list(v) for k, v in rows.items()})
        self.overhead = BackwardTally(*state["overhead_tally"])
        self.overhead_samples = dict(state["overhead_samples"])
        d = state["dense_per_sample"]
        self._dense = None if d is None else FlopCount(*d)
        self._pending_count = None
        done, dense, overhead = state["reported"]
        self._reported, self._reported_overhead = BackwardTally(done, dense), dict(overhead)
        self.runtime.take_tally()
