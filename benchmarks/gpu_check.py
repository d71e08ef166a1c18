"""Every method on one device: gradients against dense autograd, step-time ratios, peak memory.

One prepared run for a lent CUDA device (its default sizes are meant to finish in under
8 minutes on one H100-class GPU; not yet run on one); ``--smoke`` runs the same code
paths on CPU in seconds (tiny shapes, few rounds), which is how CI keeps it working.

Gradient checks (fp32 with TF32 off, and under bf16 autocast):

* ssProp at keep 1 on ResNet-18 equals the dense model's gradients (keep 1 is the
  plain convolution); at keep 0.5 a SparseConv2d's input, weight and bias gradients equal
  dense autograd's with the output gradient cut to the kept channels (the first k are
  made dominant, so the kept set is known), for stride 1 and 2, NCHW and channels_last;
* VCAS at ratio 1 (every sampler 1, every token ratio 1) on the ViT and the MiniLM
  encoder equals the dense model's gradients;
* GradSamp's sampled epoch adds a finite, non-zero update of each parameter's shape,
  fitted to a real epoch of SGD steps.

Step times, side by side (variants interleaved, order rotating every round, the device
synchronized around every call): ResNet-18 dense / ssProp / first-k floor at keeps 0.6
and 0.4 (forward + backward + SGD); ViT and MiniLM dense / VCAS at block ratio 0.5 and
token ratio 0.3 (forward + backward); a GradSamp sampled epoch against one real epoch
of ResNet-18 (60,000 images). Peak memory is that of one untimed step above its start
(``_common.step_memory``). One Markdown table, with the device's name, is printed;
``--json OUT`` saves everything. The exit status is 1 when a gradient check fails.

Run from the repository root: ``python benchmarks/gpu_check.py`` (``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradsamp_epoch
import ssprop_step
import vcas_step
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
from greenprop import models
from greenprop.errors import GreenpropError
from greenprop.gradsamp import GradSamp, GradSampConfig
from greenprop.ssprop import SparseConv2d, SSPropConfig, apply_ssprop
from greenprop.vcas import VCASConfig, apply_vcas, vcas_handle

#: Largest relative gradient error accepted per dtype (see :func:`relative_error`).
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}
SSPROP_KEEPS = (0.6, 0.4)
VCAS_RATIOS = (0.5, 0.3)  # block ratio r, token ratio nu
EPOCH_IMAGES = gradsamp_epoch.EPOCH_IMAGES


@dataclass(frozen=True)
class Sizes:
    """Shapes and repetitions of one run (full or smoke, CPU or CUDA)."""

    resnet_width: int
    image_size: int
    resnet_batch: int
    vit_batch: int
    encoder_batch: int
    seq_len: int
    layer_channels: int
    layer_side: int
    rounds: int
    warmup: int
    gradsamp_steps: int
    tiny_encoders: bool  # smoke: small stand-ins for the ViT and MiniLM


def sizes_for(device: torch.device, smoke: bool) -> Sizes:
    if smoke:
        return Sizes(8, 16, 4, 4, 4, 8, 8, 8, 2, 1, 2, tiny_encoders=True)
    if device.type == "cuda":
        return Sizes(64, 32, 256, 512, 256, 56, 128, 32, 30, 5, 10, tiny_encoders=False)
    return Sizes(64, 32, 128, 128, 32, 56, 128, 32, 10, 2, 5, tiny_encoders=False)


@dataclass
class GradCheck:
    """One comparison with dense autograd."""

    model: str
    variant: str
    dtype: str
    error: float  # largest relative error over the compared tensors
    tolerance: float
    passed: bool
    note: str = ""


@dataclass
class StepTimes:
    """One variant's step time next to its dense twin's, measured interleaved."""

    model: str
    variant: str
    median_ms: float
    ratio: float  # median of per-round ratios to dense (1 for dense)
    ratio_iqr: tuple[float, float]
    memory: dict[str, Any]  # step_memory reading of one untimed step


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off while checking fp32 gradients (CUDA matmuls and convolutions would round to 10 bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def precision(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """The context a check runs in: exact fp32, or bf16 autocast on ``device``."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return exact_fp32()


def relative_error(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    """Largest ``|got - want| / |want|`` over tensors (Frobenius norms).

    A tensor whose reference gradient is tiny against the others' (a bias next to
    BatchNorm) is compared against 1% of the typical tensor's norm instead, so float
    noise on a near-zero gradient does not read as a large relative error.
    """
    norms = [float(w.float().norm()) for w in want]
    floor = 1e-2 * math.sqrt(sum(n * n for n in norms) / max(len(norms), 1))
    worst = 0.0
    for g, w, n in zip(got, want, norms, strict=True):
        worst = max(worst, float((g.float() - w.float()).norm()) / max(n, floor, 1e-30))
    return worst


def param_grads(model: nn.Module, batch: tuple[Tensor, Tensor], context: Any) -> dict[str, Tensor]:
    """Gradients of the cross-entropy of one batch, by parameter name."""
    x, y = batch
    model.zero_grad(set_to_none=True)
    with context:
        loss = F.cross_entropy(model(x), y)
    loss.float().backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def compare_models(
    label: tuple[str, str], dense: nn.Module, other: nn.Module, batch: tuple[Tensor, Tensor], dtype: str
) -> GradCheck:
    """Check ``other``'s parameter gradients against ``dense``'s on the same batch."""
    device = batch[0].device
    want = param_grads(dense, batch, precision(device, dtype))
    got = param_grads(other, batch, precision(device, dtype))
    if sorted(got) != sorted(want):
        missing = sorted(set(want) ^ set(got))
        return GradCheck(*label, dtype, math.inf, TOLERANCE[dtype], False, f"gradients differ in {missing}")
    error = relative_error([got[k] for k in want], list(want.values()))
    return GradCheck(
        *label, dtype, error, TOLERANCE[dtype], error <= TOLERANCE[dtype], f"{len(want)} tensors"
    )


def to_device(batch: tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    return batch[0].to(device), batch[1].to(device)


# --------------------------------------------------------------------------- models


def resnet(sizes: Sizes, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.create("resnet18", in_channels=3, image_size=sizes.image_size, width=sizes.resnet_width)


def build_encoders(sizes: Sizes, seed: int) -> dict[str, tuple[nn.Module, tuple[Tensor, Tensor], str]]:
    """``{name: (dense model, batch, description)}`` for the ViT and the MiniLM encoder (CPU)."""
    out = {}
    if sizes.tiny_encoders:
        torch.manual_seed(seed)
        vit = models.create("vit", num_classes=10, in_channels=1, image_size=8, width=16, depth=2, heads=2)
        x, y = torch.randn(sizes.vit_batch, 1, 8, 8), torch.randint(0, 10, (sizes.vit_batch,))
        out["vit"] = (vit, (x, y), "tiny ViT (dim 16, depth 2) on random 8x8 images (smoke)")
    else:
        x, y, source = vcas_step.load_batch("vit", sizes.vit_batch, sizes.seq_len, "real", seed)
        out["vit"] = (vcas_step.build("vit", seed), (x, y), f"zoo ViT (dim 128, depth 6) on 28x28: {source}")
    out["minilm"] = minilm(sizes, seed)
    return out


def minilm(sizes: Sizes, seed: int) -> tuple[nn.Module, tuple[Tensor, Tensor], str]:
    """all-MiniLM-L6-v2 when transformers and its weights are installed, else a ViT of its size.

    The stand-in has MiniLM's width, depth, heads and MLP ratio (384, 6, 12, 4) and 50
    tokens (49 patches of a 28x28 image and the cls token); smoke runs shrink it.
    """
    if not sizes.tiny_encoders:
        try:
            model = vcas_step.build("minilm", seed)
            x, y, source = vcas_step.load_batch("minilm", sizes.encoder_batch, sizes.seq_len, "real", seed)
            return model, (x, y), f"all-MiniLM-L6-v2, {sizes.seq_len} tokens ({source})"
        except GreenpropError as err:
            why = f"MiniLM unavailable: {err}"
    else:
        why = "smoke"
    dim, depth, heads, image, patch = (384, 6, 12, 28, 4) if not sizes.tiny_encoders else (24, 2, 3, 8, 2)
    torch.manual_seed(seed)
    model = models.create(
        "vit",
        num_classes=2,
        in_channels=1,
        image_size=image,
        width=dim,
        depth=depth,
        heads=heads,
        mlp_ratio=4.0,
        patch_size=patch,
    )
    batch = torch.randn(sizes.encoder_batch, 1, image, image), torch.randint(0, 2, (sizes.encoder_batch,))
    tokens = (image // patch) ** 2 + 1
    return (
        model.train(),
        batch,
        f"MiniLM-sized ViT stand-in (dim {dim}, depth {depth}, {tokens} tokens; {why})",
    )


# --------------------------------------------------------------------------- gradient checks


def check_ssprop_model(sizes: Sizes, device: torch.device, seed: int, keep: float = 1.0) -> list[GradCheck]:
    """ssProp on the whole ResNet-18 against the dense model (equal at keep 1, the default)."""
    dense = resnet(sizes, seed).to(device)
    sparse = apply_ssprop(copy.deepcopy(dense), SSPropConfig(keep=keep))
    batch = to_device(ssprop_step.random_batch(sizes.resnet_batch, sizes.image_size, False, seed), device)
    return [compare_models(("resnet18", f"ssProp keep {keep:g}"), dense, sparse, batch, d) for d in TOLERANCE]


def check_ssprop_layer(
    channels: int, side: int, stride: int, channels_last: bool, dtype: str, device: torch.device, batch: int
) -> GradCheck:
    """A SparseConv2d at keep 0.5 against dense autograd of the output gradient cut to its k channels."""
    torch.manual_seed(0)
    c_out = 2 * channels if stride == 2 else channels
    sparse = SparseConv2d(channels, c_out, 3, stride=stride, padding=1, bias=True, keep=0.5).to(device)
    dense = nn.Conv2d(channels, c_out, 3, stride=stride, padding=1, bias=True).to(device)
    dense.load_state_dict(sparse.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    sparse.to(memory_format=fmt)
    dense.to(memory_format=fmt)
    k = sparse.k_for()
    x = torch.randn(batch, channels, side, side, device=device).contiguous(memory_format=fmt)
    grads = []
    for layer, cut in ((sparse, False), (dense, True)):
        xi = x.clone().requires_grad_(True)
        with precision(device, dtype):
            out = layer(xi)
        gen = torch.Generator(device=device).manual_seed(1)
        dy = torch.randn(out.shape, generator=gen, device=device, dtype=out.dtype)
        dy[:, :k] *= 100.0  # the first k channels dominate: ssProp keeps exactly them
        if cut:
            dy[:, k:] = 0.0
        grads.append(torch.autograd.grad(out, (xi, layer.weight, layer.bias), dy))
    error = relative_error(grads[0], grads[1])
    layout = "NHWC" if channels_last else "NCHW"
    return GradCheck(
        f"conv {channels}->{c_out} s{stride} {side}x{side}",
        f"ssProp keep 0.5 ({layout})",
        dtype,
        error,
        TOLERANCE[dtype],
        error <= TOLERANCE[dtype],
        f"k {k}/{c_out}; input, weight, bias",
    )


def check_vcas(
    name: str, dense: nn.Module, batch: tuple[Tensor, Tensor], device: torch.device, ratio: float = 1.0
) -> list[GradCheck]:
    """VCAS with every block and token ratio at ``ratio`` against the dense model (equal at 1)."""
    dense = dense.to(device)
    sampled = copy.deepcopy(dense)
    handle = vcas_handle(apply_vcas(sampled, VCASConfig(seed=0)))
    vcas_step.set_ratios(handle, ratio, ratio)
    batch = to_device(batch, device)
    return [compare_models((name, f"VCAS ratio {ratio:g}"), dense, sampled, batch, d) for d in TOLERANCE]


def real_epoch_steps(model: nn.Module, batch: tuple[Tensor, Tensor], steps: int) -> None:
    """``steps`` SGD steps on one batch: the real epoch GradSamp fits its draw to."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()


def gradsamp_model(sizes: Sizes, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.create("resnet18", in_channels=1, image_size=28, width=sizes.resnet_width)


def check_gradsamp(sizes: Sizes, device: torch.device, seed: int) -> GradCheck:
    """A sampled epoch after a real one adds a finite, non-zero update of every parameter's shape."""
    model = gradsamp_model(sizes, seed).to(device)
    gen = torch.Generator().manual_seed(seed)
    batch = (
        torch.randn(sizes.resnet_batch, 1, 28, 28, generator=gen),
        torch.randint(0, 10, (sizes.resnet_batch,)),
    )
    batch = to_device(batch, device)
    gs = GradSamp(model, GradSampConfig(strategy="pe:1", seed=seed), epochs=3)
    gs.on_epoch_start(0)
    before_real = [p.detach().clone() for p in model.parameters()]
    real_epoch_steps(model, batch, sizes.gradsamp_steps)
    gs.on_epoch_end(0)
    real = [p.detach() - b for p, b in zip(model.parameters(), before_real, strict=True)]
    gs.on_epoch_start(1)
    before = [p.detach().clone() for p in model.parameters()]
    gs.sampled_update(1)
    sampled = [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]
    bad = [
        i
        for i, (s, r) in enumerate(zip(sampled, real, strict=True))
        if s.shape != r.shape or not torch.isfinite(s).all() or (bool(r.any()) and not s.any())
    ]
    norm = math.sqrt(sum(float(s.float().norm()) ** 2 for s in sampled))
    real_norm = math.sqrt(sum(float(r.float().norm()) ** 2 for r in real))
    scale = norm / real_norm if real_norm else math.inf
    return GradCheck(
        "resnet18 (1x28x28)",
        "GradSamp sampled epoch",
        "fp32",
        float(len(bad)),
        0.0,
        not bad and math.isfinite(scale),
        f"update norm {scale:.3g}x the real epoch's; {len(bad)} of {len(sampled)} tensors bad",
    )


Encoders = dict[str, tuple[nn.Module, tuple[Tensor, Tensor], str]]


def gradient_checks(sizes: Sizes, device: torch.device, seed: int, encoders: Encoders) -> list[GradCheck]:
    checks = check_ssprop_model(sizes, device, seed)
    for dtype in TOLERANCE:
        for stride in (1, 2):
            for channels_last in (False, True):
                checks.append(
                    check_ssprop_layer(
                        sizes.layer_channels,
                        sizes.layer_side,
                        stride,
                        channels_last,
                        dtype,
                        device,
                        sizes.resnet_batch,
                    )
                )
    for name, (model, batch, _) in encoders.items():
        checks += check_vcas(name, model, batch, device)
        model.zero_grad(set_to_none=True)
    checks.append(check_gradsamp(sizes, device, seed))
    return checks


# --------------------------------------------------------------------------- step times


def side_by_side(
    model: str, steps: dict[str, Callable[[], object]], sizes: Sizes, device: torch.device
) -> list[StepTimes]:
    """Time the variants interleaved (the first is dense) and measure one untimed step's memory each."""
    times = interleaved_times(steps, sizes.rounds, sizes.warmup, device).seconds
    memory = step_memory(steps, device)
    dense = next(iter(steps))
    rows = []
    for name, seconds in times.items():
        q1, ratio, q3 = quartiles([s / d for s, d in zip(seconds, times[dense], strict=True)])
        rows.append(StepTimes(model, name, 1e3 * statistics.median(seconds), ratio, (q1, q3), memory[name]))
    return rows


def time_ssprop(sizes: Sizes, device: torch.device, seed: int) -> list[StepTimes]:
    base = resnet(sizes, seed)
    x, y = to_device(ssprop_step.random_batch(sizes.resnet_batch, sizes.image_size, False, seed), device)
    rows = []
    for keep in SSPROP_KEEPS:
        print(f"  timing ResNet-18 ssProp keep {keep:g}", file=sys.stderr, flush=True)
        variants, _ = ssprop_step.build_variants(base, keep, 1, channels_last=False)
        names = {
            "a": f"dense (round of keep {keep:g})",
            "b": f"ssProp keep {keep:g}",
            "c": f"first-k floor keep {keep:g}",
        }
        steps = {names[v]: ssprop_step.make_step(m.to(device), x, y, lr=0.01) for v, m in variants.items()}
        rows += side_by_side("resnet18", steps, sizes, device)
    return rows


def forward_backward(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """The VCAS benchmark's step: forward, loss, backward; gradients reset."""
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def time_vcas(sizes: Sizes, device: torch.device, seed: int, encoders: Encoders) -> list[StepTimes]:
    rows = []
    r, nu = VCAS_RATIOS
    for name, (dense, batch, _) in encoders.items():
        print(f"  timing {name} VCAS r={r:g} nu={nu:g}", file=sys.stderr, flush=True)
        dense = dense.to(device)
        sampled = copy.deepcopy(dense)
        vcas_step.set_ratios(vcas_handle(apply_vcas(sampled, VCASConfig(seed=seed))), r, nu)
        x, y = to_device(batch, device)
        steps = {
            "dense": functools.partial(forward_backward, dense, x, y),
            f"VCAS r {r:g} nu {nu:g}": functools.partial(forward_backward, sampled, x, y),
        }
        rows += side_by_side(name, steps, sizes, device)
    return rows


def time_gradsamp(sizes: Sizes, device: torch.device, seed: int) -> list[StepTimes]:
    """A sampled epoch against one real epoch (median step x steps of 60,000 images)."""
    print("  timing GradSamp sampled epoch", file=sys.stderr, flush=True)
    model = gradsamp_model(sizes, seed).to(device)
    sampled = gradsamp_epoch.time_sampled_epoch(model, max(sizes.rounds // 3, 1))
    step = gradsamp_epoch.time_training_steps(model, sizes.resnet_batch, sizes.rounds, 28, device)
    steps_per_epoch = -(-EPOCH_IMAGES // sizes.resnet_batch)
    real_epoch = step * steps_per_epoch
    total = sum(sampled.values())
    batch = torch.randn(sizes.resnet_batch, 1, 28, 28), torch.randint(0, 10, (sizes.resnet_batch,))
    x, y = to_device(batch, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def real_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    gs = GradSamp(model, GradSampConfig(strategy="pe:1", seed=seed), epochs=3)
    gs.on_epoch_start(0)
    real_step()
    gs.on_epoch_end(0)
    gs.on_epoch_start(1)
    memory = step_memory({"real": real_step, "sampled": lambda: gs.sampled_update(1)}, device)
    name = "resnet18 (1x28x28)"
    return [
        StepTimes(
            name,
            f"real epoch (median step x {steps_per_epoch})",
            1e3 * real_epoch,
            1.0,
            (1.0, 1.0),
            memory["real"],
        ),
        StepTimes(
            name, "sampled epoch", 1e3 * total, total / real_epoch, (math.nan, math.nan), memory["sampled"]
        ),
    ]


# --------------------------------------------------------------------------- report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU ({torch.get_num_threads()} threads)"


def table(checks: Sequence[GradCheck], timings: Sequence[StepTimes]) -> list[str]:
    header = ["part", "model", "variant", "measured", "vs dense", "peak MiB (step)", "verdict"]
    rows = [
        [
            "gradients",
            c.model,
            f"{c.variant}, {c.dtype}",
            f"rel. error {c.error:.2g}" if c.tolerance else c.note,
            f"<= {c.tolerance:g}" if c.tolerance else "-",
            "-",
            "ok" if c.passed else "FAILED",
        ]
        for c in checks
    ]
    for t in timings:
        iqr = (
            ""
            if math.isnan(t.ratio_iqr[0]) or t.ratio == 1.0
            else f" [{t.ratio_iqr[0]:.3f}, {t.ratio_iqr[1]:.3f}]"
        )
        unit = "s" if "epoch" in t.variant else "ms"
        value = t.median_ms / 1e3 if unit == "s" else t.median_ms
        rows.append(
            [
                "step time",
                t.model,
                t.variant,
                f"{value:.4g} {unit}",
                f"{t.ratio:.3g}{iqr}",
                memory_cell(t.memory),
                "-",
            ]
        )
    return markdown_table(header, rows)


def report(env: dict[str, Any], args: argparse.Namespace, sizes: Sizes, out: dict[str, Any]) -> str:
    checks = [GradCheck(**c) for c in out["gradients"]]
    timings = [StepTimes(**t) for t in out["step_times"]]
    lines = header_lines(env, f"gpu_check on {out['device_name']}")
    memory = timings[0].memory["source"] if timings else "no timings run"
    lines += [
        f"Sizes: {asdict(sizes)}. Gradient errors are the largest |g - g_dense| / |g_dense| over the "
        "compared tensors (fp32 with TF32 off; bf16 under autocast for both sides). Step times are "
        f"medians of {sizes.rounds} interleaved rounds after {sizes.warmup} warm-up rounds; vs dense "
        "is the median of per-round ratios [IQR] (the sampled epoch: of a real epoch). Peak MiB: one "
        f"untimed step above its start ({memory}).",
        "",
        *(f"- {name}: {text}" for name, text in out["encoders"].items()),
        "",
        *table(checks, timings),
        "",
        f"Wall time of the whole check: {out['wall_s']:.0f} s.",
    ]
    failed = [c for c in checks if not c.passed]
    if failed:
        lines.append(
            f"FAILED: {len(failed)} gradient check(s): "
            + "; ".join(f"{c.model} {c.variant} {c.dtype}" for c in failed)
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument(
        "--device", default="auto", help="cuda, cuda:N, cpu or auto (default: cuda when available)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes and two rounds: checks the code paths in seconds"
    )
    p.add_argument("--skip-timing", action="store_true", help="only the gradient checks")
    add_common_options(p)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device!r}: no CUDA device is available to this torch ({torch.__version__})")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the checks and timings, print the report, return (and optionally save) the results."""
    args = parse_args(argv)
    env = start(args, __file__, argv)
    device = torch.device(args.device)
    sizes = sizes_for(device, args.smoke)
    began = time.perf_counter()
    print(f"gradient checks on {device} ...", file=sys.stderr, flush=True)
    encoders = build_encoders(sizes, args.seed)
    checks = gradient_checks(sizes, device, args.seed, encoders)
    timings: list[StepTimes] = []
    if not args.skip_timing:
        timings += time_ssprop(sizes, device, args.seed)
        timings += time_vcas(sizes, device, args.seed, encoders)
        timings += time_gradsamp(sizes, device, args.seed)
    out: dict[str, Any] = {
        "benchmark": "gpu_check",
        "environment": env,
        "device_name": device_name(device),
        "sizes": asdict(sizes),
        "encoders": {name: text for name, (_, _, text) in encoders.items()},
        "gradients": [asdict(c) for c in checks],
        "step_times": [asdict(t) for t in timings],
        "wall_s": time.perf_counter() - began,
        "passed": all(c.passed for c in checks),
    }
    print(report(env, args, sizes, out), flush=True)
    return save_results(out, args)


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
