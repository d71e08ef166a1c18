"""Top-1 / top-5 evaluation and batch iteration shared by the trainer and benchmarks."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import Dataset


def iterate_batches(
    dataset: Dataset, batch_size: int, *, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, targets)`` batches; shuffled when a generator is given.

    Datasets that accept a tensor of indices (greenprop's own) are indexed a whole
    batch at a time, which avoids per-sample collation; others are collated.
    """
    n = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    batched = getattr(dataset, "supports_batch_indexing", False)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        if batched:
            yield dataset[index]
        else:
            items = [dataset[int(i)] for i in index]
            yield torch.stack([x for x, _ in items]), torch.as_tensor([y for _, y in items])


def prepare_inputs(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Move a batch to the device in the run's memory layout."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    loss_fn: nn.Module | None = None,
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (in %) over ``dataset``."""
    sums = evaluate_sums(
        model, dataset, batch_size=batch_size, device=device, channels_last=channels_last, loss_fn=loss_fn
    )
    return evaluation_means(sums)


def evaluation_means(sums: dict[str, float]) -> dict[str, float]:
    """Mean loss, top-1 and top-5 (in %) from :func:`evaluate_sums` (or their sum over ranks)."""
    total = sums["total"]
    if total == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return {
        "loss": sums["loss_sum"] / total,
        "acc1": 100.0 * sums["top1"] / total,
        "acc5": 100.0 * sums["top5"] / total,
    }


@torch.no_grad()
def evaluate_sums(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    loss_fn: nn.Module | None = None,
) -> dict[str, float]:
    """Summed loss, top-1 and top-5 hits and the example count: what ranks add up under DDP."""
    device = torch.device(device)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()
    total, loss_sum, top1, top5 = 0, 0.0, 0, 0
    try:
        for x, y in iterate_batches(dataset, batch_size):
            x, y = prepare_inputs(x, device, channels_last), y.to(device)
            logits = model(x)
            loss_sum += float(loss_fn(logits, y)) * len(y)
            k = min(5, logits.shape[1])
            best = logits.topk(k, dim=1).indices
            hits = best == y[:, None]
            top1 += int(hits[:, 0].sum())
            top5 += int(hits.any(dim=1).sum())
            total += len(y)
    finally:
        model.train(was_training)
    return {"loss_sum": loss_sum, "top1": top1, "top5": top5, "total": total}
