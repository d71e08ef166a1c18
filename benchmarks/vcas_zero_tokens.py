"""How much of a Linear layer's weight-gradient work is on tokens whose term is exactly zero.

VCAS leaves zero-score tokens (``||dy_t|| * ||x_t|| = 0``) out of ``grad_W`` once a
layer's token ratio is below 1. In a padded text batch many are: padding positions
get no gradient, and in a BERT's last layer only ``[CLS]`` reaches the classifier. A
dense backward that skipped them would save that work without any sampling, so this
share is the part of VCAS's token saving that is not sampling. Measured with exact
(dense) backward passes of the plain model on real training batches.

    python benchmarks/vcas_zero_tokens.py --batches 4
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from _common import add_threads_option, set_threads
from greenprop import data, models


def zero_token_share(
    model: nn.Module, blocks: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict:
    """FLOPs of grad_W on zero-score tokens vs all tokens, over the Linear layers in ``blocks``."""
    inputs: dict[nn.Module, torch.Tensor] = {}
    totals = {"zero_token_flops": 0.0, "grad_w_flops": 0.0}

    def keep_input(module: nn.Module, args: tuple, _out: torch.Tensor) -> None:
        inputs[module] = args[0].detach()

    def count(module: nn.Module, _grad_in: tuple, grad_out: tuple) -> None:
        dy = grad_out[0].reshape(-1, module.out_features)
        x = inputs.pop(module).reshape(-1, module.in_features)
        zero = int(((dy.norm(dim=1) == 0) | (x.norm(dim=1) == 0)).sum())
        flops = 2.0 * module.in_features * module.out_features
        totals["zero_token_flops"] += zero * flops
        totals["grad_w_flops"] += dy.shape[0] * flops

    linears = [m for m in blocks.modules() if isinstance(m, nn.Linear)]
    handles = [
        h
        for m in linears
        for h in (m.register_forward_hook(keep_input), m.register_full_backward_hook(count))
    ]
    try:
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
    finally:
        for handle in handles:
            handle.remove()
    share = totals["zero_token_flops"] / totals["grad_w_flops"]
    # grad_x costs the same as grad_W per token, so the Linear backward is twice grad_W.
    return {**totals, "share_of_grad_w": share, "share_of_linear_backward": share / 2, "layers": len(linears)}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4, help="training batches of 32 (default 4)")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    set_threads(args)
    torch.manual_seed(0)
    pair = data.load("rotten-tomatoes", subset=4_800)  # the vcas-minilm preset's training data
    model = models.create("minilm", num_classes=2).train()
    batches = [pair.train[torch.arange(32 * i, 32 * (i + 1))] for i in range(args.batches)]
    result = zero_token_share(model, model.hf.bert.encoder.layer, batches)
    print(
        f"MiniLM, {args.batches} batches of 32 x {batches[0][0].shape[-1]} tokens, "
        f"{result['layers']} Linears: "
        f"zero-score tokens carry {100 * result['share_of_grad_w']:.1f}% of the weight-gradient FLOPs, "
        f"{100 * result['share_of_linear_backward']:.1f}% of the Linear backward FLOPs"
    )
    return result


if __name__ == "__main__":
    main()
