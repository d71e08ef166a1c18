"""Wall time and memory of one SmolLM2-135M training step on this machine, to size runs.

A step is what a causal-LM fine-tune does per batch: forward over ``B x L`` tokens,
next-token cross-entropy of all ``B x L`` predictions over the 49,152-token vocabulary
(blocks of ``L + 1`` ids), backward, ``AdamW.step``.
The model is :func:`greenprop.models.smollm.load_smollm2` (float32, eager attention),
every parameter trained. The tokens are random ids from a fixed seed (the step's work
does not depend on which tokens). Shapes are timed interleaved, after warm-up steps
that also create AdamW's state. Next to each step's wall time is the CPU time the
process used in it (all threads): on a busy machine the wall time stretches with the
load, while the CPU time stays near the work itself, so CPU time / threads estimates the
step's wall time on an idle machine. Memory is one more step per shape, measured as the
process's resident-set rise above the step's start (activations, gradients, workspaces;
the model and AdamW state are resident before) and its peak RSS.

Run ``python benchmarks/smollm_step.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from _common import (
    add_common_options,
    header_lines,
    interleaved_times,
    markdown_table,
    memory_cell,
    quartiles,
    save_results,
    start,
    step_memory,
)
from greenprop.metering.flops import flop_counter
from greenprop.models.smollm import load_smollm2


def parse_shape(text: str) -> tuple[int, int]:
    """``"8x64"`` -> (8, 64): batch and tokens the model reads per sequence."""
    try:
        batch, length = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be BATCHxTOKENS, e.g. 8x64, got {text!r}") from None
    if batch < 1 or length < 1:
        raise argparse.ArgumentTypeError(f"shape needs batch >= 1 and tokens >= 1, got {text!r}")
    return batch, length


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        default=[(8, 64), (4, 128)],
        metavar="BxL",
        help="batch x tokens per step (default: 8x64 4x128)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per shape")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per shape first")
    parser.add_argument("--num-layers", type=int, default=None, help="keep only the first decoder layers")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    add_common_options(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    env = start(args, __file__, argv)
    torch.manual_seed(args.seed)
    model = load_smollm2(num_layers=args.num_layers).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    vocab = model.config.vocab_size
    batches = {f"{b}x{length}": torch.randint(0, vocab, (b, length + 1)) for b, length in args.shapes}

    cpu_seconds: dict[str, list[float]] = {name: [] for name in batches}

    def step(name: str, ids: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            cpu = time.process_time()
            logits = model(input_ids=ids[:, :-1]).logits
            F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            cpu_seconds[name].append(time.process_time() - cpu)

        return run

    steps = {name: step(name, ids) for name, ids in batches.items()}
    load_before = tuple(round(x, 2) for x in os.getloadavg())
    timings = interleaved_times(steps, rounds=args.repeats, warmup=args.warmup)
    load_after = tuple(round(x, 2) for x in os.getloadavg())
    timed_cpu = {name: values[args.warmup :] for name, values in cpu_seconds.items()}  # without warm-up
    memory = step_memory(steps)
    flops = {}
    for name, ids in batches.items():
        with flop_counter() as counter:
            logits = model(input_ids=ids[:, :-1]).logits
            F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)
        flops[name] = counter.get_total_flops()

    layers = model.config.num_hidden_layers
    params = sum(p.numel() for p in model.parameters())
    lines = header_lines(env, f"SmolLM2-135M training step ({layers} layers, {params / 1e6:.1f}M parameters)")
    lines.append(f"- load average (1, 5, 15 min) before timing {load_before}, after {load_after}")
    lines.append("")
    rows = []
    results = []
    for name, ids in batches.items():
        seconds = timings.seconds[name]
        q1, median, q3 = quartiles(seconds)
        cpu = quartiles(timed_cpu[name])[1]
        tokens = ids[:, 1:].numel()
        rows.append(
            [
                name,
                f"{median:.2f}",
                f"{q1:.2f}-{q3:.2f}",
                f"{cpu:.2f}",
                f"{tokens / median:.0f}",
                f"{flops[name] / 1e9:.0f}",
                memory_cell(memory[name]),
                "n/a" if memory[name]["peak_mib"] is None else f"{memory[name]['peak_mib']:.0f}",
            ]
        )
        results.append(
            {
                "shape": name,
                "predicted_tokens": tokens,
                "median_s": median,
                "per_repeat_s": seconds,
                "cpu_median_s": cpu,
                "cpu_per_repeat_s": timed_cpu[name],
                "tokens_per_s": tokens / median,
                "forward_backward_flops": flops[name],
                "memory": memory[name],
            }
        )
    header = [
        "batch x tokens",
        "step s (median)",
        "quartiles",
        "CPU s (median)",
        "tokens/s",
        "GFLOPs (fwd+bwd)",
        "step rise MiB",
        "peak RSS MiB",
    ]
    lines += markdown_table(header, rows)
    print("\n".join(lines))
    out = {
        "env": env,
        "layers": layers,
        "parameters": params,
        "load_before": load_before,
        "load_after": load_after,
        "results": results,
    }
    return save_results(out, args)


if __name__ == "__main__":
    main()
