"""SSPropConfig: every ssProp setting in one frozen, validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from greenprop.options import MethodConfig, check_interval, option
from greenprop.ssprop.functional import SELECTIONS
from greenprop.ssprop.schedule import SCHEDULE_KINDS, KeepSchedule

__all__ = ["LAYER_TYPES", "SSPropConfig"]

#: Layer types ssProp can convert: "conv" (nn.Conv2d) and "linear" (nn.Linear).
LAYER_TYPES: tuple[str, ...] = ("conv", "linear")


@dataclass(frozen=True)
class SSPropConfig(MethodConfig):
    """Settings of ssProp (scheduled channel-sparse backward), validated on construction.

    ``SSPropConfig(keep=0.6)`` is the simplest use: every Conv2d except the model's
    output layer computes its backward with 60% of its output channels. Each field's
    help (also listed by ``greenprop methods``) says what it does; ``from_dict`` reads
    the same names from the CLI's strings.

    Notes:
        The output layer is the last Conv2d/Linear in ``model.modules()`` order, plus any
        Conv2d/Linear named ``head`` (the zoo's classifiers); a prototype that sparsified a
        10-way classifier head at keep 0.4 diverged (9% accuracy), hence
        ``include_output=False``. ``round_to=16`` matches oneDNN, which pads channels to
        16 so an odd k costs as much as the next multiple. ``calibrate`` changes gradients
        based on timing, so it is off by default (not reproducible across machines).
    """

    METHOD = "ssprop"

    keep: float = option(0.6, "fraction of output channels whose gradient is computed, in (0, 1]")
    schedule: str = option(
        "constant",
        "constant | linear | cosine | bar: keep over training, keep -> min_keep",
        choices=SCHEDULE_KINDS,
    )
    min_keep: float | None = option(
        None, "final keep of linear/cosine/bar, in (0, keep]", default_text="none; required by them"
    )
    period: int | None = option(None, "step the schedule per iteration, repeating every T iterations, >= 1")
    per_step: bool = option(False, "true: step per iteration over the whole run (false: per epoch)")
    warmup: int = option(0, "dense epochs first")
    interleave: bool = option(False, "true: alternate dense (even) and sparse (odd) epochs, after warmup")
    selection: str = option(
        "topk", "topk (largest mean |dy|) | random (the paper's ablation)", choices=SELECTIONS
    )
    layers: tuple[str, ...] = option(
        ("conv",), "conv | linear | conv+linear: layer types to convert", choices=LAYER_TYPES
    )
    include_output: bool = option(
        False, "true: also convert the model's output layer (a sparse classifier head can diverge)"
    )
    min_channels: int = option(1, "layers with fewer output channels (per group) stay dense")
    round_to: int = option(1, "round the kept-channel count up to a multiple, e.g. 16 for oneDNN")
    calibrate: bool = option(
        False, "true: time each layer once and keep it dense where sparse is not faster"
    )
    seed: int = option(0, "seed of the random selection", default_text="the run's seed")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(self, "min_channels", "[1, inf)")
        check_interval(self, "round_to", "[1, inf)")
        # The schedule validates keep, min_keep, period and warmup.
        self.keep_schedule()

    def keep_schedule(self, epochs: int | None = None, steps_per_epoch: int | None = None) -> KeepSchedule:
        """The keep-ratio schedule these settings describe, for a run of that length."""
        return KeepSchedule(
            kind=self.schedule,
            keep=self.keep,
            min_keep=self.min_keep,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            period=self.period,
            per_step=self.per_step,
            warmup=self.warmup,
            interleave=self.interleave,
        )
