"""One canonical setting per method: the table that drives the tests every method must pass.

Each row is a method spec on a run small enough to take about a second (scikit-learn
digits, the zoo's CNN or ViT), and what the shared tests (``test_method_settings.py``:
exact resume, FLOP accounting, the CLI round trip) expect of it. A new method adds one
row here instead of its own copy of those tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any
from unittest.mock import ANY

from fixtures import digits_run
from greenprop.train.config import TrainConfig

#: Bounds on a real epoch's counted FLOPs over the dense epoch's: ``(lo, hi)`` means
#: ``lo < ratio < hi``; ``lo == hi`` means exactly that ratio.
Bounds = tuple[float, float]
DENSE: Bounds = (1.0, 1.0)  # the method cannot change this phase: the same FLOPs as dense
SAVES: Bounds = (0.0, 1.0)  # fewer FLOPs than dense
EXTRA: Bounds = (1.0, math.inf)  # more FLOPs than dense (the method's own passes)
NONE: Bounds = (0.0, 0.0)  # the method never runs this phase (MeZO's backward)

# Dropout (RNG), BatchNorm (buffers), SGD momentum (optimizer state) and the cosine LR
# (scheduler): every kind of state a resume must restore. 4 steps of 64 per epoch.
CNN = digits_run(
    model="cnn", epochs=3, batch_size=64, lr=0.05, dropout=0.2, subset=256, test_subset=128, flops_samples=8
)
# The default-depth (6) ViT at width 16: 16 steps of 8 per epoch.
VIT = CNN.replace(model="vit", epochs=2, batch_size=8, width=16, dropout=0.0, subset=128, test_subset=64)


@dataclass(frozen=True)
class MethodSetting:
    """A method's canonical run and what the shared tests expect of it.

    Attributes:
        id: the test id.
        config: the run; ``config.method`` is the spec, written as its label.
        controllers: names of the controllers the spec builds, in order.
        cut: the resume test interrupts the run before this epoch.
        replaced: epochs a controller takes over (no steps, no FLOPs).
        forward, backward: bounds on each real epoch's counted FLOPs over the dense
            epoch's (the baseline row's recipe on this row's model and data).
        record: fields (and values; ``ANY``: present) of every real epoch's record.
        replaced_record: the same for the replaced epochs' records.
        distributed: whether the method runs under DDP (the DDP tests take only these).
    """

    id: str
    config: TrainConfig
    controllers: tuple[str, ...]
    cut: int
    replaced: tuple[int, ...] = ()
    forward: Bounds = DENSE
    backward: Bounds = DENSE
    record: dict[str, Any] = field(default_factory=dict)
    replaced_record: dict[str, Any] = field(default_factory=dict)
    distributed: bool = True


SETTINGS: list[MethodSetting] = [
    MethodSetting("baseline", CNN, controllers=(), cut=2, record={"replaced_by": None}),
    MethodSetting(
        # Random channel selection draws from each layer's own generator, which the FLOP
        # count (recounted after a resume) must not disturb.
        "ssprop",
        CNN.replace(method="ssprop:keep=0.5,selection=random"),
        controllers=("ssprop",),
        cut=2,
        backward=(0.0, 0.85),
        record={"replaced_by": None, "ssprop": {"keep": 0.5}},
    ),
    MethodSetting(
        # Cut before the sampled epoch: the resumed run samples from the checkpointed update.
        "gradsamp",
        CNN.replace(epochs=4, method="gradsamp:strategy=pe:2,guard_threshold=0.5"),
        controllers=("gradsamp",),
        cut=2,
        replaced=(2,),
        record={"replaced_by": None},
        replaced_record={"replaced_by": "gradsamp", "steps": 0, "gradsamp": {"sampled": True, "guard": ANY}},
    ),
    MethodSetting(
        # Starts below exact so a short run saves; estimations at steps 0, 8 | 16, 24, two of
        # them after the resume.
        "vcas",
        VIT.replace(method="vcas:update_every=8,initial_s=0.5,initial_weight_ratio=0.5"),
        controllers=("vcas",),
        cut=1,
        forward=EXTRA,  # the variance estimation's forward passes
        backward=SAVES,  # sampled backward, estimation passes included
        record={"replaced_by": None, "vcas": ANY},
    ),
    MethodSetting(
        # Cut after the sampled epoch, with both methods' state in the checkpoint.
        "gradsamp+ssprop",
        CNN.replace(epochs=4, method="gradsamp:strategy=pe:2;ssprop:keep=0.5"),
        controllers=("gradsamp", "ssprop"),
        cut=3,
        replaced=(2,),
        backward=(0.0, 0.85),
        record={"replaced_by": None, "ssprop": {"keep": 0.5}},
        replaced_record={"replaced_by": "gradsamp", "gradsamp": {"sampled": True}, "ssprop": {"keep": 0.5}},
    ),
    MethodSetting(
        # Every step is two forward passes (dropout and BatchNorm in eval mode) and no backward.
        "mezo",
        CNN.replace(method="mezo:eps=1e-3,lr=1e-3"),
        controllers=("mezo",),
        cut=2,
        forward=(2.0, 2.0),
        backward=NONE,
        record={"replaced_by": None, "lr": None, "train_acc": None, "mezo": {"steps": 4, "steps_taken": ANY}},
        distributed=False,  # refused under DDP (each rank would estimate its own update)
    ),
]

#: ssProp settings only the DDP tests add (``test_distributed.py``): with the default top-k
#: selection each rank keeps the channels with the largest gradients *on its own shard* (the
#: random selection above draws the same channels on every rank, since its generators are
#: seeded from the run's seed alone), and with ``calibrate`` each rank times its own layers,
#: so one rank may run a layer dense while another runs it sparse. Neither may change the
#: collectives: the ranks must still end identical and nothing may hang.
PER_RANK_SETTINGS: list[MethodSetting] = [
    MethodSetting(
        "ssprop-topk",
        CNN.replace(method="ssprop:keep=0.5"),
        controllers=("ssprop",),
        cut=2,
        backward=(0.0, 0.85),
        record={"replaced_by": None, "ssprop": {"keep": 0.5}},
    ),
    MethodSetting(
        # Timing-based, so two runs may calibrate differently: no exact-resume claim.
        "ssprop-calibrate",
        CNN.replace(method="ssprop:keep=0.5,calibrate=true"),
        controllers=("ssprop",),
        cut=2,
        record={"replaced_by": None},
    ),
]
