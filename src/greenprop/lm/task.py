"""The causal-LM task: next-token cross-entropy, test perplexity (lower is better).

A batch of the ``rotten-tomatoes-lm`` data is ``(B, 2, L)`` (token ids, attention mask;
:mod:`greenprop.data.lm`). The model reads the first ``L - 1`` ids and predicts each
next one; a target whose token is padding (mask 0) is ignored. The loss is the mean
cross-entropy over the predicted tokens; the test perplexity is ``exp`` of the mean
over every predicted test token.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from greenprop.train.evaluate import iterate_batches, prepare_inputs
from greenprop.train.tasks import Metric, Task

__all__ = ["IGNORE", "CausalLMTask", "NextTokenLoss"]

#: Target id that takes no part in the loss (padding), as in torch's cross_entropy.
IGNORE = -100
#: Logit entries (tokens x vocabulary) evaluated at once (128 MiB in float32).
_EVAL_LOGITS = 2**25


class NextTokenLoss(nn.Module):
    """Mean cross-entropy of ``logits (B, L, V)`` against ``targets (B, L)``, padding ignored."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


class CausalLMTask(Task):
    """Next-token prediction on token blocks; test loss (nats per token) and perplexity."""

    name = "causal-lm"
    metrics = (Metric("ppl", "Perplexity", False), Metric("test_loss", "Test loss (nats/token)", False))
    sum_keys = ("loss_sum", "total")

    def __init__(self, vocab_size: int) -> None:
        self.loss_fn = NextTokenLoss()
        #: Bounds the evaluation batch, so its logits take at most 128 MiB.
        self.vocab_size = vocab_size

    def batch(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[Any, Any]:
        """``(ids[:, :-1], ids[:, 1:])``, targets on padding set to :data:`IGNORE`."""
        ids, mask = x[:, 0], x[:, 1]
        return ids[:, :-1], ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)

    @torch.no_grad()
    def evaluate_sums(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        batch_size: int = 512,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
    ) -> dict[str, float]:
        """Summed next-token cross-entropy and the number of predicted tokens over ``dataset``."""
        length = int(dataset[0][0].shape[-1]) - 1  # type: ignore[index]
        batch_size = max(1, min(batch_size, _EVAL_LOGITS // (length * self.vocab_size)))
        was_training = model.training
        model.eval()
        loss_sum, total = 0.0, 0
        try:
            for x, y in iterate_batches(dataset, batch_size):
                ids, targets = self.batch(prepare_inputs(x, torch.device(device), channels_last), y)
                logits = model(ids)
                loss_sum += float(
                    F.cross_entropy(
                        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
                    )
                )
                total += int((targets != IGNORE).sum())
        finally:
            model.train(was_training)
        return {"loss_sum": loss_sum, "total": total}

    def evaluation_means(self, sums: dict[str, float]) -> dict[str, float]:
        if sums["total"] == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        loss = sums["loss_sum"] / sums["total"]
        return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf}

    def describe(self, record: dict[str, Any]) -> list[str]:
        return [f"test loss {record['loss']:.4f}", f"ppl {record['ppl']:.2f}"]

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "ppl": history[-1]["ppl"],
            "test_loss": history[-1]["loss"],
            "best_ppl": min(r["ppl"] for r in history),
        }
