"""CLI entry point of ssProp: parse string options, convert the model, return the controller."""

from __future__ import annotations

from torch import nn

from greenprop.controller import Controller
from greenprop.errors import GreenpropError
from greenprop.ssprop.config import SSPropConfig
from greenprop.ssprop.controller import SSProp
from greenprop.ssprop.surgery import apply_ssprop

__all__ = ["OPTIONS", "build"]

#: Option name -> help text, for the CLI (``--method ssprop keep=0.6 schedule=...``).
OPTIONS: dict[str, str] = {
    "keep": "fraction of output channels whose gradient is computed, in (0, 1] (default 0.6)",
    "schedule": "constant | linear | cosine | bar: keep over training, keep -> min_keep (default constant)",
    "min_keep": "final keep of linear/cosine/bar, in (0, keep] (required by them)",
    "period": "step the schedule per iteration, repeating every T iterations (T >= 1)",
    "per_step": "true: step per iteration over the whole run (default false: per epoch)",
    "warmup": "dense epochs first (default 0)",
    "interleave": "true: alternate dense (even) and sparse (odd) epochs (default false)",
    "selection": "topk (largest mean |dy|, default) | random (the paper's ablation)",
    "layers": "conv | linear | conv+linear: layer types to convert (default conv)",
    "include_output": "true: also convert the model's output layer (default false; a "
    "sparse classifier head can diverge)",
    "min_channels": "layers with fewer output channels stay dense (default 1)",
    "round_to": "round the kept-channel count up to a multiple, e.g. 16 for oneDNN (default 1)",
    "calibrate": "true: time each layer once and keep it dense where sparse is not faster",
    "seed": "seed of random selection (default: the run's seed)",
}


def build(
    model: nn.Module,
    options: dict[str, str],
    *,
    epochs: int,
    steps_per_epoch: int,
    seed: int,
) -> list[Controller]:
    """Validate ``options``, convert ``model`` in place, return ``[SSProp controller]``.

    Everything is validated before the model is touched, so a bad option leaves the
    model as it was; errors are :class:`GreenpropError` naming the option.
    """
    values: dict[str, object] = {"seed": seed, **options}
    config = SSPropConfig.from_dict(values)
    schedule = config.keep_schedule(epochs, steps_per_epoch)
    schedule.check_length()
    apply_ssprop(model, config)
    try:
        controller = SSProp(model, schedule)
    except GreenpropError as err:  # nothing converted: say which options decided it
        raise GreenpropError(
            f"ssprop converted no layer (layers={','.join(config.layers)}, "
            f"min_channels={config.min_channels}): {err}"
        ) from None
    return [controller]
