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
from greenprop.metering.flops import FlopCount, batch_head, batch_size, count_flops_per_sample, sample_shapes
from greenprop.vcas.layers import BackwardTally, Mode, VCASRuntime

__all__ = ["VCASFlops"]

_COUNT_SAMPLES = 16  # the dense FLOP count runs on this many samples of one batch
Shapes = tuple[tuple[int, ...], ...]  # a batch's sample shapes (sample_shapes)


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

    The dense count is per sample shape (:func:`~greenprop.metering.flops.sample_shapes`):
    text batches trimmed to their longest sequence differ in length, so each estimation
    batch's passes are booked at the dense count of its own shape (counted once per
    shape, on first use), and the training steps' dense reference is what the loop
    booked (:meth:`booked`); a loop that books nothing (VCAS in a user's own loop) is
    taken at the first estimation batch's per-sample count, right where every batch
    has the same shape.

    Args:
        model: the converted model (for the dense counts).
        runtime: the layers' shared runtime, whose tally this account collects.
    """

    def __init__(self, model: nn.Module, runtime: VCASRuntime) -> None:
        self.model = model
        self.runtime = runtime
        self.train = BackwardTally()
        self.overhead = BackwardTally()
        #: Estimation samples by sample shape (each books a forward and an exact backward), and
        #: those whose sampled backward ran too (left out where no block sampled: estimation.py).
        self._overhead_by_shape: dict[Shapes, int] = {}
        self._sampled_by_shape: dict[Shapes, int] = {}
        self._dense: dict[Shapes, FlopCount] = {}  # per sample, by sample shape
        self._pending: dict[Shapes, tuple[Any, Callable[[nn.Module, Any], Tensor]]] = {}
        self._first_shape: Shapes | None = None
        #: The loop's booked counts of the training steps (dense: counted inside counting()).
        self._booked = FlopCount(0.0, 0.0)
        self._booked_samples = 0
        self._reported = BackwardTally()
        self._reported_overhead: dict[str, float] = {"forward": 0.0, "backward": 0.0}

    # ------------------------------------------------------------------ tallies
    def collect_train(self) -> None:
        """Move what the layers tallied since the last call into the training tally."""
        self.train.add(self.runtime.take_tally())

    def collect_overhead(self, batch: Any, sampled_pass: bool = True) -> None:
        """Book one estimation on ``batch``: a forward, an exact and (``sampled_pass``) a sampled backward."""
        self.overhead.add(self.runtime.take_tally())
        samples, shapes = batch_size(batch), sample_shapes(batch)
        self._overhead_by_shape[shapes] = self._overhead_by_shape.get(shapes, 0) + samples
        if sampled_pass:
            self._sampled_by_shape[shapes] = self._sampled_by_shape.get(shapes, 0) + samples

    @property
    def overhead_samples(self) -> dict[str, int]:
        """Samples the estimation passes ran, per pass kind."""
        samples = sum(self._overhead_by_shape.values())
        sampled = sum(self._sampled_by_shape.values())
        return {"forward": samples, "exact_backward": samples, "sampled_backward": sampled}

    def remember_batch(self, batch: Any, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        """Keep a batch of a shape not counted yet for its dense count, which runs on first use, untimed."""
        shapes = sample_shapes(batch)
        if self._first_shape is None:
            self._first_shape = shapes
        if shapes not in self._dense and shapes not in self._pending:
            self._pending[shapes] = (batch_head(batch, _COUNT_SAMPLES), loss_fn)

    def booked(self, count: FlopCount, samples: int) -> None:
        """The loop's count of a training batch (dense, as counted inside :meth:`counting`)."""
        self._booked = self._booked + count
        self._booked_samples += samples

    def _train_dense(self, dense: FlopCount) -> FlopCount:
        """Dense FLOPs of the training samples so far: the loop's booked counts where it
        booked every sample, else ``dense`` (one sample's) times the samples."""
        if self._booked_samples == self.train.samples:
            return self._booked
        return dense.scale(self.train.samples)

    def _dense_of(self, shapes: Shapes) -> FlopCount:
        """Dense forward/backward FLOPs of one sample of this shape (counted on first use)."""
        if shapes not in self._dense:
            batch, loss_fn = self._pending.pop(shapes)
            with self.counting():
                self._dense[shapes] = count_flops_per_sample(
                    _LossOf(self.model, loss_fn), (batch,), None, lambda loss, _: loss
                )
        return self._dense[shapes]

    @property
    def dense_per_sample(self) -> FlopCount | None:
        """Dense forward/backward FLOPs of one sample of the first estimation batch (None: none yet)."""
        return None if self._first_shape is None else self._dense_of(self._first_shape)

    def overhead_flops(self) -> dict[str, float]:
        """Forward/backward FLOPs of all estimation passes so far, each at its batch's shape."""
        forward = backward = 0.0
        for shapes, samples in self._overhead_by_shape.items():
            dense = self._dense_of(shapes)
            forward += samples * dense.forward
            # the exact backward, and the sampled one where it ran
            backward += (samples + self._sampled_by_shape.get(shapes, 0)) * dense.backward
        return {"forward": forward, "backward": backward - self.overhead.saved}

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

        ``None`` ratios mean nothing was counted yet. ``dense_*_per_sample`` are the
        first update's batch's (with trimmed text batches, one length among several).
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
        train_dense = self._train_dense(dense)
        bwd = train_dense.backward - self.train.saved
        overhead = self.overhead_flops()
        report.update(
            dense_forward_per_sample=dense.forward,
            dense_backward_per_sample=dense.backward,
            backward_ratio=bwd / train_dense.backward,
            total_ratio=(train_dense.forward + bwd) / train_dense.total,
            overhead_flops=overhead["forward"] + overhead["backward"],
            total_ratio_with_overhead=(train_dense.forward + bwd + sum(overhead.values()))
            / train_dense.total,
        )
        return report

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self.collect_train()
        for shapes in list(self._pending):
            self._dense_of(shapes)
        return {
            "train_tally": (
                self.train.done,
                self.train.dense,
                self.train.samples,
                {k: list(v) for k, v in self.train.rows.items()},
            ),
            "overhead_tally": (self.overhead.done, self.overhead.dense),
            "overhead_by_shape": [(_plain(k), n) for k, n in self._overhead_by_shape.items()],
            "sampled_by_shape": [(_plain(k), n) for k, n in self._sampled_by_shape.items()],
            "dense_by_shape": [(_plain(k), d.forward, d.backward) for k, d in self._dense.items()],
            "first_shape": None if self._first_shape is None else _plain(self._first_shape),
            "booked": (self._booked.forward, self._booked.backward, self._booked_samples),
            "reported": (self._reported.done, self._reported.dense, dict(self._reported_overhead)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        done, dense, samples, rows = state["train_tally"]
        self.train = BackwardTally(done, dense, samples, {int(k): list(v) for k, v in rows.items()})
        self.overhead = BackwardTally(*state["overhead_tally"])
        self._overhead_by_shape = {_shapes(k): int(n) for k, n in state["overhead_by_shape"]}
        # absent from states saved before session 32, when every estimation ran both backwards
        sampled = state.get("sampled_by_shape", state["overhead_by_shape"])
        self._sampled_by_shape = {_shapes(k): int(n) for k, n in sampled}
        self._dense = {_shapes(k): FlopCount(f, b) for k, f, b in state["dense_by_shape"]}
        first = state["first_shape"]
        self._first_shape = None if first is None else _shapes(first)
        self._pending = {}
        forward, backward, booked_samples = state["booked"]
        self._booked, self._booked_samples = FlopCount(forward, backward), int(booked_samples)
        done, dense, overhead = state["reported"]
        self._reported, self._reported_overhead = BackwardTally(done, dense), dict(overhead)
        self.runtime.take_tally()


def _plain(shapes: Shapes) -> list[list[int]]:
    """Sample shapes as nested lists (what a checkpoint holds)."""
    return [list(shape) for shape in shapes]


def _shapes(plain: Any) -> Shapes:
    return tuple(tuple(int(d) for d in shape) for shape in plain)
