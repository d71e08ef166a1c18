"""Named comparison presets: a base training config, the methods and the seeds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from greenprop.errors import GreenpropError


@dataclass(frozen=True)
class Preset:
    description: str
    config: dict[str, Any]
    methods: tuple[str, ...] = ("baseline",)
    seeds: tuple[int, ...] = (0,)
    notes: list[str] = field(default_factory=list)


_GRADSAMP_CNN: dict[str, Any] = {
    "model": "cnn",
    "width": 16,
    "dataset": "fashion-mnist",
    "subset": 5_000,
    "test_subset": 2_000,
    "epochs": 20,
    "batch_size": 128,
    "lr": 0.05,
}
#: The paper's strategies (Section 4.1) as in its accuracy tables.
_GRADSAMP_STRATEGIES: tuple[str, ...] = (
    "baseline",
    "gradsamp:strategy=pe:5",
    "gradsamp:strategy=pe:10",
    "gradsamp:strategy=pr:0.2",
    "gradsamp:strategy=pr:0.5",
    "gradsamp:strategy=dp:5",
    "gradsamp:strategy=dr:0.5",
)

_SSPROP_BASE: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "subset": 10_000,
    "test_subset": 2_000,
    "epochs": 6,
    "batch_size": 128,
    "lr": 0.05,
}
_SSPROP_METHODS: tuple[str, ...] = ("baseline", "ssprop:keep=0.2,interleave=true", "ssprop:keep=0.6")

PRESETS: dict[str, Preset] = {
    # The demo: every method on one model they all apply to. VCAS needs repeated blocks
    # without BatchNorm, so the zoo's GroupNorm ResNet-18, narrow (width 8). The run is 128
    # steps, so VCAS's controller updates every 16 steps (8 updates) to lower its ratios
    # within it (see _VCAS_FAST below for the longer presets).
    "demo": Preset(
        description="every method on ResNet-18 with GroupNorm (width 8), 4k/2k Fashion-MNIST subset, "
        "4 epochs, one seed: dense baseline and its frontier (1, 2, 3 epochs), GradSamp (Pe=2), "
        "ssProp (keep 0.2 interleaved), VCAS and GradSamp+ssProp",
        config={
            "model": "resnet18-gn",
            "width": 8,
            "dataset": "fashion-mnist",
            "subset": 4_000,
            "test_subset": 2_000,
            "epochs": 4,
            "batch_size": 128,
            "lr": 0.05,
        },
        methods=(
            "baseline",
            "gradsamp:strategy=pe:2",
            "ssprop:keep=0.2,interleave=true",
            "vcas:update_every=16,s_step=0.05,weight_ratio_multiplier=0.8",
            "gradsamp:strategy=pe:2;ssprop:keep=0.2,interleave=true",
            "gradsamp:strategy=pe:2;vcas:update_every=16,s_step=0.05,weight_ratio_multiplier=0.8",
        ),
        seeds=(0,),
    ),
    # ssProp's accuracy table: dense vs the paper's headline (keep 0.2 in every other
    # epoch, 40% of the converted layers' backward saved) vs a constant keep of 0.6.
    "ssprop-cnn": Preset(
        description="ssProp vs dense: CNN on a 10k/2k Fashion-MNIST subset, 6 epochs, 3 seeds",
        config={**_SSPROP_BASE, "model": "cnn"},
        methods=_SSPROP_METHODS,
        seeds=(0, 1, 2),
    ),
    "ssprop-resnet": Preset(
        description="ssProp vs dense: ResNet-18 (narrow, width 16) on a 5k/2k Fashion-MNIST "
        "subset, 6 epochs, 3 seeds",
        config={**_SSPROP_BASE, "model": "resnet18-narrow", "subset": 5_000},
        methods=_SSPROP_METHODS,
        seeds=(0, 1, 2),
    ),
    # GradSamp's accuracy tables (paper Table 2 shape) at CPU scale, sized so one 20-epoch run
    # takes about a minute on a quiet 2-core CPU: one epoch measured 13-15 s (cnn) and 24-31 s
    # (mixer, 2.5k) on the 2 cores under a load of 3-4 from other jobs; bare forward+backward
    # steps suggest 3-4x less on a quiet machine. Estimates, not measurements: check the first
    # baseline run and shrink `subset` if it is slower.
    "gradsamp-cnn": Preset(
        description="GradSamp strategies vs baseline: CNN (width 16) on a 5k/2k Fashion-MNIST "
        "subset, 20 epochs, 3 seeds (estimated 20 min on a quiet 2-core CPU)",
        config=_GRADSAMP_CNN,
        methods=_GRADSAMP_STRATEGIES,
        seeds=(0, 1, 2),
    ),
    "gradsamp-mixer": Preset(
        description="GradSamp strategies vs baseline: MLP-Mixer (dim 64) on a 2k/2k "
        "Fashion-MNIST subset, 20 epochs, 3 seeds (estimated 25 min on a quiet 2-core CPU)",
        config={**_GRADSAMP_CNN, "model": "mixer", "width": 64, "subset": 2_000},
        methods=_GRADSAMP_STRATEGIES,
        seeds=(0, 1, 2),
    ),
    "gradsamp-variants": Preset(
        description="GradSamp update-variant ablation at Pe=3 (4 of 20 epochs sampled): ggd, "
        "ggd-signed, extrapolate and the paper's literal tolerance rule; CNN as gradsamp-cnn "
        "(estimated 15 min on a quiet 2-core CPU)",
        config=_GRADSAMP_CNN,
        methods=(
            "baseline",
            "gradsamp:strategy=pe:3,update=ggd",
            "gradsamp:strategy=pe:3,update=ggd-signed",
            "gradsamp:strategy=pe:3,update=extrapolate",
            "gradsamp:strategy=pe:3,tolerance_mode=paper",
        ),
        seeds=(0, 1, 2),
    ),
}


# VCAS's runs are ~100x shorter than the paper's, so the controller adapts faster than
# its defaults (update every 50 steps instead of 100, s step 0.05 instead of 0.01, weight
# ratios x0.8 instead of x0.95) to reach its variance-bounded ratios within the run; the
# thresholds tau_act = tau_w = 0.025, M = 2 repeats, EMA 0.6 and the 1% entries are the
# paper's. The variance estimation measures on a quarter of each estimation batch (at least
# 8 samples), which keeps its cost at 2-3% of training (7.5% on whole batches, measured in
# docs/benchmarks.md; MiniLM 2.7-2.9% in session 32, its batches drawn length-grouped as it
# trains). Since session 26 a Linear samples tokens only at ratios its timing on
# this machine shows to pay (token_policy=measured: on the ViT's 128-wide layers only below
# token ratios of 0.3-0.5), and the norm mass s starts at 0.85, where the controller of the
# session-25 runs arrived after its first three updates (the paper starts at 1 in runs 100x
# longer; above tau_act the controller raises s again). Since session 27 each preset's blocks
# sample only below its model's measured break-even (ResNet-18-GN 0.7, ViT 0.85, MiniLM 0.9).
# Since session 28 ResNet-18-GN estimates on an eighth of its batches of 128 (16 samples):
# a quarter took 3.1% of its train time (the bound is 3%), an eighth 2.0% at the same
# accuracy and time (session 27, docs/vcas.md); since session 29 the ViT does too (a quarter
# took 3.1% of its train time in session 28).
# docs/vcas.md discusses the choices.
_VCAS_FAST = "vcas:update_every=50,s_step=0.05,weight_ratio_multiplier=0.8"


def _vcas_fast(sample_max_ratio: float, estimation_fraction: float = 0.25) -> str:
    """The fast VCAS settings with blocks sampling only below the model's measured break-even
    (the direct step against dense on this CPU, docs/vcas.md "Exact above the break-even")."""
    return (
        f"{_VCAS_FAST},estimation_fraction={estimation_fraction:g},token_policy=measured,"
        f"initial_s=0.85,sample_max_ratio={sample_max_ratio:g}"
    )


PRESETS["vcas-vit"] = Preset(
    description="VCAS vs exact: the zoo's tiny ViT (dim 128, depth 6) on a 5k/2k Fashion-MNIST "
    "subset, 10 epochs (400 steps), AdamW, 3 seeds",
    config={
        "model": "vit",
        "dataset": "fashion-mnist",
        "subset": 5_000,
        "test_subset": 2_000,
        "epochs": 10,
        "batch_size": 128,
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.05,
    },
    methods=("baseline", _vcas_fast(0.85, estimation_fraction=0.125)),
    seeds=(0, 1, 2),
)

PRESETS["vcas-minilm"] = Preset(
    description="VCAS vs exact: fine-tuning all-MiniLM-L6-v2 (6-layer BERT, 22.7M params) on "
    "4.8k/1k Rotten Tomatoes snippets (padded to 56; batches grouped by length and trimmed to "
    "their longest), 2 epochs "
    "(300 steps of 32), AdamW, 3 seeds",
    config={
        "model": "minilm",
        "dataset": "rotten-tomatoes",
        "subset": 4_800,
        "test_subset": 1_000,
        "epochs": 2,
        "batch_size": 32,
        "optimizer": "adamw",
        "lr": 5e-5,
        "weight_decay": 0.01,
        # Dynamic padding, as a Hugging Face user trains: the dense rival skips the padding
        # too, so VCAS gains only from what it samples (before session 29 the dense step ran
        # 56 tokens and VCAS's direct rule skipped the padding's zero gradients).
        "trim_padding": True,
        # And batches of similar length, as the Trainer's group_by_length gives (since session
        # 30): trimmed batches were still 48% padding, which the dense step computed and
        # VCAS's direct rule skipped; grouped, 3% (docs/vcas.md, "Length-grouped batches").
        "group_by_length": True,
    },
    methods=("baseline", _vcas_fast(0.9)),
    seeds=(0, 1, 2),
)

PRESETS["vcas-resnet"] = Preset(
    description="VCAS on a CNN (our addition to the paper): ResNet-18 with GroupNorm (width 16) on a "
    "5k/2k Fashion-MNIST subset, 8 epochs (320 steps), SGD, 3 seeds; residual blocks are the blocks",
    config={**_SSPROP_BASE, "model": "resnet18-gn", "width": 16, "subset": 5_000, "epochs": 8},
    methods=("baseline", _vcas_fast(0.7, estimation_fraction=0.125)),
    seeds=(0, 1, 2),
)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise GreenpropError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


# Ablations (issue 15, docs/ablations.md), sized for a busy shared 2-core CPU (about 20 CPU-s
# per run with one thread): CNN (width 16) on a 2k/1k Fashion-MNIST subset, 10 epochs of 16
# steps; GradSamp's four strategy families, each sampling 1-2 of the 10 epochs.
_ABLATION_CNN: dict[str, Any] = {**_GRADSAMP_CNN, "subset": 2_000, "test_subset": 1_000, "epochs": 10}
_ABLATION_SIZE = "CNN (width 16) on a 2k/1k Fashion-MNIST subset, 10 epochs"
_ABLATION_STRATEGIES: tuple[str, ...] = (
    "baseline",
    "gradsamp:strategy=pe:3",
    "gradsamp:strategy=pr:0.25",
    "gradsamp:strategy=dp:3",
    "gradsamp:strategy=dr:0.25",
)
# GradSamp paper Table 10: the strategies under AdaGrad and AdaDelta.
for _name, _optimizer, _lr in (("adagrad", "adagrad", 0.01), ("adadelta", "adadelta", 1.0)):
    PRESETS[f"gradsamp-{_name}"] = Preset(
        description=f"GradSamp strategies vs baseline under {_optimizer} (lr {_lr:g}): "
        f"{_ABLATION_SIZE}, 3 seeds (paper Table 10 shape)",
        config={**_ABLATION_CNN, "optimizer": _optimizer, "lr": _lr},
        methods=_ABLATION_STRATEGIES,
        seeds=(0, 1, 2),
    )
# GradSamp paper Table 19: the strategies with ReLU / Sigmoid / Tanh networks.
for _activation in ("relu", "sigmoid", "tanh"):
    PRESETS[f"gradsamp-{_activation}"] = Preset(
        description=f"GradSamp strategies vs baseline, {_activation} activations: {_ABLATION_SIZE}, "
        "SGD, 3 seeds (paper Table 19 shape)",
        config={**_ABLATION_CNN, "model": f"cnn:activation={_activation}"},
        methods=_ABLATION_STRATEGIES,
        seeds=(0, 1, 2),
    )
# The ssProp paper's Dropout setting: ssProp drop 0.2 (keep 0.8) with and without Dropout 0.2
# (before the CNN's head); the two presets together give the 2x2 table.
for _dropout in (0.0, 0.2):
    PRESETS[f"ssprop-dropout{_dropout:g}"] = Preset(
        description=f"dense vs ssProp keep 0.8 with Dropout {_dropout:g}: {_ABLATION_SIZE}, SGD, 3 seeds",
        config={**_ABLATION_CNN, "dropout": _dropout},
        methods=("baseline", "ssprop:keep=0.8"),
        seeds=(0, 1, 2),
    )

# GradSamp paper Table 11 shape (MeZO vs fine-tuning vs GradSamp) at CPU scale: one MiniLM step
# of 16 snippets took 1.5 to 10 s on the shared 2-core machine (by its load), so the runs are tiny;
# 96 snippets and lr 5e-5 (18 steps) left fine-tuning at the majority class.
# MeZO gets the same counted FLOPs as fine-tuning: its step is 2 forward passes against
# fine-tuning's forward + backward (3 forwards' worth), so 1.5x the steps: 5 epochs (150 steps)
# against 3 (90 steps); lr 1e-5 is the top of the paper's RoBERTa-large grid. It runs with
# `greenprop train` and this config plus `--method mezo:eps=1e-3,lr=1e-5 --epochs 5` (compare
# would add a 5-epoch baseline); docs/ablations.md has the command.
PRESETS["mezo-minilm"] = Preset(
    description="full fine-tuning vs GradSamp (Pe=1) on all-MiniLM-L6-v2: 480/256 Rotten Tomatoes "
    "snippets, 3 epochs of 30 steps of 16, AdamW lr 1e-4; MeZO runs with --epochs 5 (paper Table 11 shape)",
    config={
        "model": "minilm",
        "dataset": "rotten-tomatoes",
        "subset": 480,
        "test_subset": 256,
        "epochs": 3,
        "batch_size": 16,
        "optimizer": "adamw",
        "lr": 1e-4,
        "weight_decay": 0.01,
    },
    methods=("baseline", "gradsamp:strategy=pe:1"),
    seeds=(0, 1, 2),
    notes=["MeZO: greenprop train, --method mezo:eps=1e-3,lr=1e-5 --epochs 5 (150 steps, 1.1x the FLOPs)"],
)

# The headline results page (docs/results.md, issue 12): each zoo family with the dense
# baseline, its frontier, every method that applies and the best combination, 3 seeds.
# The settings were chosen from the method cards before any of these runs: ssProp's
# headline (keep 0.2 interleaved, within noise of dense on the CNN in docs/ssprop.md),
# VCAS's short-run settings (within noise on the ViT and ResNet-GN in docs/vcas.md;
# updating every 20 steps instead of 50, as these runs have 120 steps, not 400), and
# GradSamp at Pe=1, its largest saving (the first and last epochs always train, so 2 of 5
# epochs are sampled: 40%; docs/gradsamp.md saw every strategy up to 31.7% within noise).
# No single method reaches the page's 50% target, so the combination adds to Pe=1 a
# method that saves in the epochs that train: ssProp at a constant keep 0.6 (the same
# mean keep as the headline; interleaving would thin exactly the epochs Pe=1 samples) or,
# on the ViT, VCAS. Sized for the shared 2-core machine under a load of 10-17: one epoch
# of the width-16 CNN on 5k images took 65 s there, so the page's runs are 5 epochs on
# 1.5k-2k images. Measured there (one seed of the preset, round-robin): CNN 12.5 min,
# ViT 40 min; the ResNet's first epoch took 166 s, so one seed would need ~70 min and it
# was not run to the end (docs/results.md).
_RESULTS_EPOCHS = 5
_PE1 = "gradsamp:strategy=pe:1"
_SSPROP_HEADLINE = "ssprop:keep=0.2,interleave=true"
_PE1_SSPROP = f"{_PE1};ssprop:keep=0.6"
_VCAS_SHORT = "vcas:update_every=20,s_step=0.05,weight_ratio_multiplier=0.8"
_RESULTS_DATA: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "test_subset": 1_000,
    "epochs": _RESULTS_EPOCHS,
    "batch_size": 64,
}
PRESETS["results-cnn"] = Preset(
    description="results page: CNN (width 16) on a 2k/1k Fashion-MNIST subset, 5 epochs of batch "
    "64, SGD, 3 seeds: dense + frontier, GradSamp Pe=1, ssProp, GradSamp+ssProp (VCAS refuses "
    "BatchNorm)",
    config={**_RESULTS_DATA, "model": "cnn", "width": 16, "subset": 2_000, "lr": 0.05},
    methods=("baseline", _PE1, _SSPROP_HEADLINE, _PE1_SSPROP),
    seeds=(0, 1, 2),
)
PRESETS["results-vit"] = Preset(
    description="results page: ViT (dim 64, depth 4) on a 1.5k/1k Fashion-MNIST subset, 5 epochs "
    "of batch 64, AdamW, 3 seeds: dense + frontier, GradSamp Pe=1, ssProp (opt-in on the "
    "Linears), VCAS, GradSamp+VCAS",
    config={
        **_RESULTS_DATA,
        "model": "vit:depth=4",
        "width": 64,
        "subset": 1_500,
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.05,
    },
    methods=(
        "baseline",
        _PE1,
        f"{_SSPROP_HEADLINE},layers=conv+linear",
        _VCAS_SHORT,
        f"{_PE1};{_VCAS_SHORT}",
    ),
    seeds=(0, 1, 2),
)
PRESETS["results-resnet"] = Preset(
    description="results page: ResNet-18 (narrow, BatchNorm, width 8) on a 1.5k/1k Fashion-MNIST "
    "subset, 5 epochs of batch 64, SGD, 3 seeds: dense + frontier, GradSamp Pe=1, ssProp, "
    "GradSamp+ssProp (VCAS refuses BatchNorm)",
    config={**_RESULTS_DATA, "model": "resnet18-narrow", "width": 8, "subset": 1_500, "lr": 0.05},
    methods=("baseline", _PE1, _SSPROP_HEADLINE, _PE1_SSPROP),
    seeds=(0, 1, 2),
)
