"""VCASConfig: every VCAS setting in one frozen, validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from greenprop.options import MethodConfig, check_interval, option, require

__all__ = ["VCASConfig"]


@dataclass(frozen=True)
class VCASConfig(MethodConfig):
    """Settings of VCAS (variance-controlled adaptive sampling), validated on construction.

    ``VCASConfig()`` holds the paper's defaults (Wang, Chen & Zhu, 2024, arXiv:2402.17227,
    and its public reference code). Training starts exact (``initial_s = 1``, weight
    ratios 1) and the controller lowers the ratios while the extra variance stays small.
    Each field's help (also listed by ``greenprop methods``) says what it does and marks
    the values that are our choices rather than the paper's (``min_ratio``, ``seed``,
    ``check_rows``, ``estimation_fraction``, ``token_policy``, ``timing_cache``,
    ``block_policy``).

    Notes:
        ``s`` is the norm mass: the fraction of gradient-norm mass the kept samples must
        reach. Above ``tau_act`` it rises by ``s_step``, otherwise it falls; each weight
        ratio ``nu_l`` is multiplied by ``weight_ratio_multiplier`` while its variance is
        below ``tau_w`` and divided by it otherwise. ``check_rows`` catches models that
        break the samplers' assumptions (an auxiliary loss on a block's internals, a
        sequence-first block) at the cost of a scan of each gradient.
    """

    METHOD = "vcas"

    tau_act: float = option(0.025, "tolerated activation-sampling variance / SGD variance, > 0")
    tau_w: float = option(0.025, "tolerated token-sampling variance / SGD variance, per Linear, > 0")
    update_every: int = option(
        100, "F: steps between variance estimations / ratio updates (short runs need fewer)"
    )
    mc_repeats: int = option(2, "M: Monte-Carlo batches per estimation, >= 2 (a variance needs two draws)")
    s_step: float = option(0.01, "step of the norm mass s per update, in (0, 1)")
    weight_ratio_multiplier: float = option(
        0.95, "token ratios are multiplied or divided by this per update, in (0, 1)"
    )
    ema_decay: float = option(0.6, "smoothing of the block ratios, in [0, 1) (0: none)")
    variance_sample_fraction: float = option(
        0.01, "fraction of weight entries the variances are measured on, in (0, 1]"
    )
    initial_s: float = option(1.0, "starting s, in (0, 1] (1: start exact)")
    initial_weight_ratio: float = option(1.0, "starting token ratio of every Linear, in [min_ratio, 1]")
    min_ratio: float = option(0.05, "floor of every ratio, in (0, 1] (ours: the paper has none)")
    estimation_fraction: float = option(
        1.0,
        "fraction of each estimation batch's samples the variances are measured on, in (0, 1] "
        "(ours; at least 8 samples, or the whole batch if smaller)",
    )
    token_policy: Literal["all", "measured"] = option(
        "all",
        "all: every Linear samples tokens; measured: only at ratios where a timing of its weight "
        "gradient at its shapes on this machine shows sampling is faster (ours)",
    )
    timing_cache: str | None = option(
        None, "JSON file of the token and block policies' timings, read and extended (none: time every run)"
    )
    seed: int = option(0, "seed of the samplers", default_text="the run's seed")
    compact: bool = option(
        True,
        "true: a block's backward re-runs it on the kept samples only (every op, not only the "
        "Linear/Conv2d layers; no activation graph kept between forward and backward); false: the "
        "layers skip dropped rows inside the full-size backward",
    )
    compact_max_ratio: float = option(
        0.7,
        "blocks that re-run are compacted only while their ratio (or a later block's, if lower: the "
        "rows they keep at most) is at most this, in [0, 1] (ours: "
        "near ratio 1 the re-run costs more than it saves; measured on the zoo ViT)",
    )
    direct: bool = option(
        True,
        "true: compacted blocks of known types (the zoo's ViT and ResNet blocks, BERT layers) keep "
        "their activations and compute the kept samples' backward op by op, without re-running the "
        "forward (ours); false: every compacted block re-runs",
    )
    direct_max_ratio: float = option(
        0.9,
        "blocks on the direct path are compacted while their ratio (or a later block's, if lower: the "
        "rows they keep at most) is at most this, in [0, 1] "
        "(ours: without a re-run compaction pays up to 0.9 on the zoo ViT, ResNet-18-GN and MiniLM; "
        "above it a ViT block or BERT layer whose output gradient is zero at most tokens still takes it)",
    )
    sample_max_ratio: float = option(
        0.8,
        "blocks sample only while their ratio is at most this; above it they run exact, in (0, 1] "
        "(ours: near ratio 1 the sampler's norms, draw and gathers cost more than the few rows "
        "they drop; the direct step's measured break-even on CPU: about 0.7 on the zoo ResNet-18-GN, "
        "0.85 on the ViT, 0.9 on MiniLM); 1: always sample",
    )
    block_policy: Literal["fixed", "measured"] = option(
        "fixed",
        "fixed: every block samples only while its ratio is at most sample_max_ratio; measured: each "
        "block's own limit is where a timing of its forward + backward on the first update's batch "
        "shows sampling is faster than running it exact (ours; timings kept in timing_cache)",
    )
    check_rows: bool = option(
        False, "true: every sampled layer verifies that skipped rows carry no gradient (debug)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(self, "tau_act", "(0, inf)")
        check_interval(self, "tau_w", "(0, inf)")
        check_interval(self, "update_every", "[1, inf)")
        check_interval(self, "mc_repeats", "[2, inf)")
        check_interval(self, "s_step", "(0, 1)")
        check_interval(self, "weight_ratio_multiplier", "(0, 1)")
        check_interval(self, "ema_decay", "[0, 1)")
        check_interval(self, "variance_sample_fraction", "(0, 1]")
        check_interval(self, "estimation_fraction", "(0, 1]")
        check_interval(self, "initial_s", "(0, 1]")
        check_interval(self, "min_ratio", "(0, 1]")
        check_interval(self, "compact_max_ratio", "[0, 1]")
        check_interval(self, "direct_max_ratio", "[0, 1]")
        check_interval(self, "sample_max_ratio", "(0, 1]")
        require(
            self,
            "initial_weight_ratio",
            self.min_ratio <= self.initial_weight_ratio <= 1.0,
            f"in [min_ratio={self.min_ratio}, 1]",
        )
