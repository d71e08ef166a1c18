"""GradSamp versions of Flower's FedAvg and FedProx, and FedSpeed, as Message-API strategies.

In a sampled round :meth:`configure_train` returns no message (no client trains, nothing
is sent) and :meth:`aggregate_train`, which Flower's ``Strategy.start`` calls every round
even with no replies, moves the global model by a per-tensor draw from the GGD fitted to
the last real round's update ``theta(r) - theta(r-1)``: greenprop's centralised GradSamp
draw rule (:func:`greenprop.gradsamp.sampling.sample_update`) and schedules
(:func:`greenprop.gradsamp.schedule.parse_strategy`, round ``r`` = epoch ``r - 1``).
Client sampling is seeded by ``(seed, round)``, so a run reproduces from its seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from greenprop.errors import GreenpropError
from greenprop.fl import offline  # noqa: F401  (env switches before flwr)
from greenprop.gradsamp.config import GradSampConfig
from greenprop.gradsamp.sampling import sample_update
from greenprop.gradsamp.schedule import Strategy as Schedule
from greenprop.gradsamp.schedule import parse_strategy

__all__ = ["STRATEGIES", "GradSampFedAvg", "GradSampFedProx", "GradSampFedSpeed", "make_strategy"]


def _schedule(sampling: str, num_rounds: int, seed: int, allow_consecutive: bool) -> Schedule | None:
    if sampling in ("none", "", None):
        return None
    try:
        return parse_strategy(sampling, epochs=num_rounds, seed=seed, allow_consecutive=allow_consecutive)
    except GreenpropError as err:
        raise GreenpropError(f"fl option sampling={sampling!r}: {err}") from None


class GradSampMixin:
    """Round sampling on top of a FedAvg-like strategy (``sampling="none"``: the plain one).

    A cooperative ``__init__``: the GradSamp keywords are taken here and the rest goes on
    to the Flower strategy that follows in the MRO (FedAvg, FedProx).
    """

    def __init__(
        self,
        *,
        sampling: str = "none",
        num_rounds: int,
        seed: int = 0,
        gradsamp: GradSampConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.gradsamp = gradsamp or GradSampConfig(seed=seed)
        self.schedule = _schedule(sampling, num_rounds, seed, self.gradsamp.allow_consecutive)
        self.num_rounds = num_rounds
        self.seed = seed
        self._current: dict[str, torch.Tensor] | None = None
        self._last_delta: dict[str, torch.Tensor] | None = None
        self.rounds: dict[int, dict[str, Any]] = {}

    def is_sampled(self, server_round: int) -> bool:
        """Whether round ``server_round`` (1-based) is replaced by a GGD draw."""
        if self.schedule is None or self._last_delta is None:
            return False
        return self.schedule.should_skip(server_round - 1, self.num_rounds)

    def _sample_nodes(self, grid: Grid, server_round: int) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        size = max(int(len(nodes) * self.fraction_train), self.min_train_nodes)
        size = min(size, len(nodes))
        return random.Random(f"{self.seed}:{server_round}").sample(nodes, size)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = arrays.to_torch_state_dict()
        sampled = self.is_sampled(server_round)
        info: dict[str, Any] = {"sampled": sampled, "clients": 0, "bytes_down": 0, "bytes_up": 0}
        self.rounds[server_round] = info
        if sampled:
            return []
        config["server-round"] = server_round
        self._extra_config(config)
        nodes = self._sample_nodes(grid, server_round)
        info["clients"] = len(nodes)
        info["bytes_down"] = arrays.count_bytes() * len(nodes)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]

    def _extra_config(self, config: ConfigRecord) -> None:
        """Strategy-specific settings sent to clients (FedProx's mu, FedSpeed's lambda...)."""

    def _aggregate(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return FedAvg.aggregate_train(self, server_round, replies)  # type: ignore[arg-type]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        info = self.rounds.setdefault(server_round, {"sampled": False, "clients": 0, "bytes_down": 0})
        assert self._current is not None, "configure_train runs before aggregate_train"
        if info["sampled"]:
            return self._draw(server_round), MetricRecord({"sampled": 1})
        info["bytes_up"] = sum(
            rec.count_bytes()
            for m in replies
            if not m.has_error()
            for rec in m.content.array_records.values()
        )
        info["client_flops"] = sum(
            float(rec.get("client-flops", 0.0))
            for m in replies
            if not m.has_error()
            for rec in m.content.metric_records.values()
        )
        arrays, metrics = self._aggregate(server_round, replies)
        if arrays is not None:
            new = arrays.to_torch_state_dict()
            self._last_delta = {k: new[k].double() - self._current[k].double() for k in new}
        return arrays, metrics

    def _draw(self, server_round: int) -> ArrayRecord:
        """theta(r+1) = theta(r) + a GGD draw fitted to the last real update, tensor by tensor."""
        assert self._current is not None and self._last_delta is not None
        cfg = self.gradsamp
        gen = torch.Generator().manual_seed(hash((cfg.seed, server_round)) & 0x7FFFFFFF)
        out = {}
        for name, value in self._current.items():
            if not value.is_floating_point():
                out[name] = value.clone()
                continue
            draw, _ = sample_update(
                self._last_delta[name],
                update=cfg.update,
                tolerance=cfg.tolerance,
                tolerance_mode=cfg.tolerance_mode,
                update_scale=cfg.update_scale,
                clamp=cfg.clamp_draws,
                beta_bounds=cfg.beta_bounds,
                fit_method=cfg.fit_method,
                generator=gen,
                name=name,
            )
            out[name] = (value.double() + draw.double()).to(value.dtype)
        return ArrayRecord(out)


class GradSampFedAvg(GradSampMixin, FedAvg):
    """FedAvg whose sampled rounds are GGD draws (``sampling="none"``: plain FedAvg)."""


class GradSampFedProx(GradSampMixin, FedProx):
    """FedProx (clients add ``mu/2 ||w - w_t||^2``) with GradSamp round sampling."""

    def __init__(self, *, proximal_mu: float = 0.01, **kwargs: Any) -> None:
        if not proximal_mu > 0:
            raise GreenpropError(f"fl option mu={proximal_mu!r}: FedProx needs mu > 0")
        super().__init__(proximal_mu=proximal_mu, **kwargs)

    def _extra_config(self, config: ConfigRecord) -> None:
        config["proximal-mu"] = self.proximal_mu


class GradSampFedSpeed(GradSampMixin, FedAvg):
    """FedSpeed (Sun et al., ICLR 2023): clients send ``x_K - lam * hat g_i``; the server averages them.

    The corrected average is FedAvg's weighted mean of those corrected weights (the paper
    uses the plain mean over active clients; equal partitions make the two the same).
    """

    def __init__(self, *, lam: float = 10.0, rho: float = 0.05, alpha: float = 0.5, **kwargs: Any) -> None:
        for name, value, ok in (
            ("lam", lam, lam > 0),
            ("rho", rho, rho >= 0),
            ("alpha", alpha, 0 <= alpha <= 1),
        ):
            if not ok:
                raise GreenpropError(f"fl option {name}={value!r}: out of range for FedSpeed")
        super().__init__(**kwargs)
        self.lam, self.rho, self.alpha = lam, rho, alpha

    def _extra_config(self, config: ConfigRecord) -> None:
        config["fedspeed-lambda"] = self.lam
        config["fedspeed-rho"] = self.rho
        config["fedspeed-alpha"] = self.alpha


STRATEGIES = {"fedavg": GradSampFedAvg, "fedprox": GradSampFedProx, "fedspeed": GradSampFedSpeed}


def make_strategy(name: str, **kwargs: Any) -> GradSampMixin:
    """A strategy by its CLI name (fedavg, fedprox, fedspeed)."""
    if name not in STRATEGIES:
        raise GreenpropError(f"fl option strategy={name!r}: choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name](**kwargs)
