"""Dense per-step FLOPs of the zoo's models, with and without the fused attention kernel counted.

``FlopCounterMode`` has no formula for ``_scaled_dot_product_flash_attention_for_cpu``
(what ``F.scaled_dot_product_attention`` runs on CPU), so counts before session 28
missed attention's matmuls; :func:`greenprop.metering.flops.flop_counter` adds them.
This prints, per model at its preset's size, one dense training step's forward and
backward FLOPs as counted now and without the fused-attention ops (the old count: every
other op is counted the same way), as a Markdown table. It counts, it does not time,
so it needs no lock.

    PYTHONPATH=src python benchmarks/attention_flops.py
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from greenprop.metering.flops import FUSED_ATTENTION_FORMULAS, count_flops, flop_counter
from greenprop.models import create


@dataclass(frozen=True)
class Case:
    label: str  # the model and where its size comes from
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]  # one batch: a tensor, or a tuple of positional inputs
    loss: Callable[[Any, Tensor], Tensor]


def _classify(logits: Tensor, _batch: Tensor) -> Tensor:
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))


def _next_token(logits: Tensor, _batch: Tensor) -> Tensor:
    return _classify(logits.flatten(0, 1), _batch)  # every position's next token


def _noise(prediction: Tensor, _batch: Tensor) -> Tensor:
    return F.mse_loss(prediction, torch.zeros_like(prediction))


def _images(batch: int, size: int = 28) -> Callable[[], Tensor]:
    return lambda: torch.randn(batch, 1, size, size)


def _tokens(batch: int, length: int) -> Tensor:
    ids = torch.randint(1000, (batch, length))
    return torch.stack([ids, torch.ones_like(ids)], dim=1)  # (B, 2, L): ids and mask


def _smollm2() -> nn.Module:
    from greenprop.models.smollm import load_smollm2

    return load_smollm2()


CASES = {
    "vit": Case(
        "vit dim 128, depth 6, 50 tokens, batch 128 (vcas-vit)",
        lambda: create("vit"),
        _images(128),
        _classify,
    ),
    "vit-results": Case(
        "vit dim 64, depth 4, 50 tokens, batch 64 (results-vit)",
        lambda: create("vit:depth=4", width=64),
        _images(64),
        _classify,
    ),
    "gpt2-tiny": Case(
        "gpt2-tiny width 64, 4 blocks, 64 tokens, batch 16 (language-models.md (a))",
        lambda: create("gpt2-tiny", num_classes=49152, image_size=65, width=64),
        lambda: torch.randint(49152, (16, 64)),
        _next_token,
    ),
    "minilm": Case(
        "minilm (eager attention), 56 tokens, batch 32 (vcas-minilm)",
        lambda: create("minilm"),
        lambda: _tokens(32, 56),
        _classify,
    ),
    "smollm2-135m": Case(
        "smollm2-135m (eager attention), 30 layers, 64 tokens, batch 4 (language-models.md (b))",
        _smollm2,
        lambda: torch.randint(49152, (4, 64)),
        lambda out, batch: _next_token(out.logits if hasattr(out, "logits") else out, batch),
    ),
    "ddpm-unet": Case(
        "ddpm-unet width 16, 28x28, batch 64 (diffusion.md)",
        lambda: create("ddpm-unet"),
        lambda: (torch.randn(64, 1, 28, 28), torch.randint(200, (64,))),
        _noise,
    ),
    "cnn": Case(
        "cnn width 16, batch 128 (ssprop-cnn)", lambda: create("cnn", width=16), _images(128), _classify
    ),
    "resnet18-gn": Case(
        "resnet18-gn width 16, batch 128 (vcas-resnet)",
        lambda: create("resnet18-gn", width=16),
        _images(128),
        _classify,
    ),
}


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def phase_counts(case: Case) -> dict[str, tuple[int, int]]:
    """``{"forward": (new, old), "backward": (new, old)}`` for one dense training step."""
    torch.manual_seed(0)
    model, inputs = case.build().train(), case.inputs()
    with flop_counter() as forward:
        loss = case.loss(_call(model, inputs), inputs)
    with flop_counter() as backward:
        loss.backward()
    counts = {}
    for phase, counter in (("forward", forward), ("backward", backward)):
        ops = counter.get_flop_counts()["Global"]
        attention = sum(flops for op, flops in ops.items() if op in FUSED_ATTENTION_FORMULAS)
        counts[phase] = (counter.get_total_flops(), counter.get_total_flops() - attention)
    # the trainer's count (count_flops) must agree with the phases counted here
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    step = count_flops(model, inputs, inputs, case.loss)
    if (step.forward, step.backward) != (counts["forward"][0], counts["backward"][0]):
        raise AssertionError(f"{case.label}: count_flops gives {step}, the phases {counts}")
    return counts


def table(names: Sequence[str]) -> str:
    rows = [
        "| Model (size, preset) | Forward old | Forward new | Backward old | Backward new | Step new / old |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        case = CASES[name]
        counts = phase_counts(case)
        (fwd, fwd_old), (bwd, bwd_old) = counts["forward"], counts["backward"]
        rows.append(
            f"| {case.label} | {fwd_old / 1e9:.4g} | {fwd / 1e9:.4g} | {bwd_old / 1e9:.4g} | "
            f"{bwd / 1e9:.4g} | {(fwd + bwd) / (fwd_old + bwd_old):.4f} |"
        )
    return "\n".join(rows) + "\n\nGFLOP per dense training step (forward includes the loss)."


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    text = table(args.models)
    print(text)
    return text


if __name__ == "__main__":
    main()
