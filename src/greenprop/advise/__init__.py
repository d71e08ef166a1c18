"""``greenprop advise``: which method, at which setting, pays on this machine for this model.

It times the dense step and each layer's backward (dense and sparse) side by side,
runs a short probe of each method, and predicts each method's FLOPs and wall-time
saving for the run (:mod:`greenprop.advise.recommend` holds the rules, as pure
functions). docs/advise.md compares its predictions with measured runs.
"""

from greenprop.advise.measure import LayerTiming, StepTiming, VCASTiming
from greenprop.advise.probe import ProbeResult
from greenprop.advise.recommend import Advice, Measurements, MethodAdvice, choose_ssprop, recommend
from greenprop.advise.report import format_advice, to_json
from greenprop.advise.run import AdviseOptions, run_advise

__all__ = [
    "Advice",
    "AdviseOptions",
    "LayerTiming",
    "Measurements",
    "MethodAdvice",
    "ProbeResult",
    "StepTiming",
    "VCASTiming",
    "choose_ssprop",
    "format_advice",
    "recommend",
    "run_advise",
    "to_json",
]
