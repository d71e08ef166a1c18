"""Language-model tasks: next-token prediction (perplexity) and the label as the next token.

A batch of the language-model data is ``(B, 2, L)`` (token ids, attention mask;
:mod:`greenprop.data.lm`), the model maps ids ``(B, L)`` to next-token logits
``(B, L, V)``.

:class:`CausalLMTask` (``rotten-tomatoes-lm``): the model reads the first ``L - 1`` ids
and predicts each next one; a target whose token is padding (mask 0) is ignored. The
loss is the mean cross-entropy over the predicted tokens; the test perplexity (lower is
better) is ``exp`` of the mean over every predicted test token.

:class:`LMClassificationTask` (``rotten-tomatoes-lm-sentiment``): the model reads a
prompted review and its next token after the prompt should be the label word. The loss
is the cross-entropy of that one prediction over the whole vocabulary (plain language
modelling, no new parameters); accuracy takes the likelier of the label words.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from greenprop.train.evaluate import iterate_batches, prepare_inputs
from greenprop.train.tasks import Metric, Task

__all__ = ["IGNORE", "CausalLMTask", "LMClassificationTask", "LabelTokenLoss", "NextTokenLoss"]

#: Target id that takes no part in the loss (padding), as in torch's cross_entropy.
IGNORE = -100
#: Logit entries (tokens x vocabulary) evaluated at once (128 MiB in float32).
_EVAL_LOGITS = 2**25


class NextTokenLoss(nn.Module):
    """Mean cross-entropy of ``logits (B, L, V)`` against ``targets (B, L)``, padding ignored."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


class LabelTokenLoss(nn.Module):
    """Mean cross-entropy of one position's logits per sample: ``targets (B, 2)`` holds
    each sample's position and the token expected there."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(answer_logits(logits, targets), targets[:, 1])


def answer_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(B, V)``: each sample's logits at its answer position ``targets[:, 0]``."""
    return logits[torch.arange(len(logits), device=logits.device), targets[:, 0]]


class _LanguageTask(Task):
    """What both tasks share: the vocabulary and evaluation in batches of bounded logits."""

    def __init__(self, vocab_size: int) -> None:
        #: Bounds the evaluation batch, so its logits take at most 128 MiB.
        self.vocab_size = vocab_size

    @torch.no_grad()
    def _evaluation_sums(
        self,
        model: nn.Module,
        dataset: Dataset,
        sums: Callable[[torch.Tensor, Any], dict[str, float]],
        *,
        batch_size: int,
        device: torch.device | str,
        channels_last: bool,
    ) -> dict[str, float]:
        """``sums(logits, targets)`` added up over ``dataset`` in evaluation mode."""
        length = int(dataset[0][0].shape[-1])  # type: ignore[index]
        batch_size = max(1, min(batch_size, _EVAL_LOGITS // (length * self.vocab_size)))
        was_training = model.training
        model.eval()
        totals: dict[str, float] = dict.fromkeys(self.sum_keys, 0.0)
        try:
            for x, y in iterate_batches(dataset, batch_size):
                x = prepare_inputs(x, torch.device(device), channels_last)
                inputs, targets = self.batch(x, y.to(x.device))
                for key, value in sums(model(inputs), targets).items():
                    totals[key] += value
        finally:
            model.train(was_training)
        return totals


class CausalLMTask(_LanguageTask):
    """Next-token prediction on token blocks; test loss (nats per token) and perplexity."""

    name = "causal-lm"
    metrics = (Metric("ppl", "Perplexity", False), Metric("test_loss", "Test loss (nats/token)", False))
    sum_keys = ("loss_sum", "total")

    def __init__(self, vocab_size: int) -> None:
        super().__init__(vocab_size)
        self.loss_fn = NextTokenLoss()

    def batch(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[Any, Any]:
        """``(ids[:, :-1], ids[:, 1:])``, targets on padding set to :data:`IGNORE`."""
        ids, mask = x[:, 0], x[:, 1]
        return ids[:, :-1], ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)

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

        def sums(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
            flat = F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
            )
            return {"loss_sum": float(flat), "total": int((targets != IGNORE).sum())}

        return self._evaluation_sums(
            model, dataset, sums, batch_size=batch_size, device=device, channels_last=channels_last
        )

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


class LMClassificationTask(_LanguageTask):
    """The label as the next token after a prompt; accuracy over the label words, test loss."""

    name = "lm-classification"
    metrics = (Metric("acc1", "Acc@1 (%)", True), Metric("test_loss", "Test loss (label token)", False))
    sum_keys = ("loss_sum", "correct", "total")

    def __init__(self, vocab_size: int, label_tokens: tuple[int, ...]) -> None:
        super().__init__(vocab_size)
        self.loss_fn = LabelTokenLoss()
        self.label_tokens = torch.tensor(label_tokens, dtype=torch.int64)

    def batch(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[Any, Any]:
        """``(ids, targets)``: targets ``(B, 2)`` are the last real position and the label's token."""
        ids, mask = x[:, 0], x[:, 1]
        last = mask.sum(dim=1) - 1
        return ids, torch.stack([last, self.label_tokens.to(y.device)[y]], dim=1)

    def _correct(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """Samples whose label word is the likeliest of the label words at the answer position."""
        tokens = self.label_tokens.to(logits.device)
        choice = tokens[answer_logits(logits, targets)[:, tokens].argmax(dim=1)]
        return float((choice == targets[:, 1]).sum())

    def train_sums(self, outputs: torch.Tensor, targets: Any) -> dict[str, float]:
        return {"correct": self._correct(outputs, targets)}

    def train_fields(self, sums: dict[str, float], samples: int) -> dict[str, Any]:
        return {"train_acc": 100.0 * sums["correct"] / samples}

    def evaluate_sums(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        batch_size: int = 512,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
    ) -> dict[str, float]:
        """Summed label-token cross-entropy, correct answers and the sample count."""

        def sums(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
            loss = F.cross_entropy(answer_logits(logits, targets), targets[:, 1], reduction="sum")
            return {"loss_sum": float(loss), "correct": self._correct(logits, targets), "total": len(targets)}

        return self._evaluation_sums(
            model, dataset, sums, batch_size=batch_size, device=device, channels_last=channels_last
        )

    def evaluation_means(self, sums: dict[str, float]) -> dict[str, float]:
        if sums["total"] == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        return {"loss": sums["loss_sum"] / sums["total"], "acc1": 100.0 * sums["correct"] / sums["total"]}

    def describe(self, record: dict[str, Any]) -> list[str]:
        return [f"test loss {record['loss']:.4f}", f"acc@1 {record['acc1']:.2f}%"]

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "acc1": history[-1]["acc1"],
            "test_loss": history[-1]["loss"],
            "best_acc1": max(r["acc1"] for r in history),
        }
